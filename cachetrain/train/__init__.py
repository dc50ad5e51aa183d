"""Train: sidecar pairs -> a trained UNet, checkpoints and logs (train_from_cached.py).

Owns, in the order a run meets them: flags and presets (``config``, ``config_rules``, ``presets``, ``layers``), the run's
data (``run_data``, ``epoch_order``, ``loader``, ``shard_data`` for packed shards, ``bad_data``, ``validation``,
``fixed_embeddings``), the model and what trains it (``run_model``), the numerics of a step
(``objective``, ``optim``, ``step``, ``telemetry``, ``ema``), the processes (``processes``), what is
refused before step 1 (``start_checks``), the parts that do not train (``frozen_parts``), when and how to
save (``save_policy``, ``checkpoint``, ``checkpoint_writer``, ``training_state``, ``run_dir``), a resume
(``resume``, and ``elastic`` for one on another process count), samples at checkpoints (``sample_drawer``)
and the loop (``trainer``). Imports the package root and ``models``;
never ``cache``, ``sample``, ``view`` or ``tiny``.
"""
