"""Sample: drawing samples outside training (sample_images.py), of one folder or of a run's checkpoints.

Owns: samples of one model folder (``folder_sampler``) and the command line with ``--watch``
(``sampler_cli``). Imports the package root, ``models`` (drawing) and ``train`` (a run's checkpoints and
settings); nothing imports it but the console commands.
"""
