"""View: looking at what the earlier stages wrote.

Owns: the side-by-side page of several runs' samples (``compare``, compare_imgdirs.py) and the cache
inspector (``inspect``). Imports the package root, ``models`` and ``train``; nothing imports it but the
console commands.
"""
