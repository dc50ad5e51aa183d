"""Cache: images and captions -> sidecar files beside them (the first stage).

Owns: reading images (``images``), each process's share of the files (``shares``), what a build must do
(``plan``), writing sidecars (``writer``), what a build reports (``summary``), the build engine and its
flags (``build``), and the builders: latents (``image_cache``), CLIP text (``text_cache``), T5 text
(``t5_cache``); packing cached pairs into shards (``pack``). Imports the package root and ``models`` (to load encoders); never ``train``.
"""
