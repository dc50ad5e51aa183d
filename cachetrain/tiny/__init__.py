"""Tiny: offline models and data for the demo and the tests (no download anywhere).

Owns: tiny SD1.5-shaped and T5 pipelines built from configs, the demo VAE and its training
(``models``), and the synthetic shapes dataset (``shapes``); ``python -m cachetrain.tiny``. Imports the
package root and ``models``; only the demo, the tests and the console commands use it.
"""
