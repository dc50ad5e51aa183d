"""View: looking at what the earlier stages wrote.

Owns: runs side by side (compare_imgdirs.py: ``compare`` the command, ``sample_runs`` the pairing of
the runs' images, ``compare_page`` the HTML page, ``side_by_side`` the labelled PNGs) and the cache
inspector (``inspect``) and its tools (``cache_tools``: validate a cache against its images, compare two
tensor files, show a latent). Imports the package root, ``models``, ``train`` and ``cache`` (to prepare
images as the cache does); nothing imports it but the console commands.
"""
