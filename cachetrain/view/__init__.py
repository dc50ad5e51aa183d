"""View: looking at what the earlier stages wrote.

Owns: the side-by-side page of several runs' samples (``compare``, compare_imgdirs.py) and the cache
inspector (``inspect``) and its tools (``cache_tools``: validate a cache against its images, compare two
tensor files, show a latent). Imports the package root, ``models``, ``train`` and ``cache`` (to prepare
images as the cache does); nothing imports it but the console commands.
"""
