"""The output folder a wrapper run gets when its OUTPUT_DIR is left empty: named from its settings, as
the original scripts' wrappers named theirs (batch, accumulation, LR, schedule, steps, min-SNR gamma),
so runs with other settings land in other folders.

``python -m cachetrain.train.run_name FLAGS...`` prints the name for the trainer flags a wrapper built.
"""

from __future__ import annotations

import sys

from .config import TrainConfig, parse_train_args


def output_dir_from_settings(config: TrainConfig) -> str:
    """e.g. sd15_b16a4_1e-05_cosine10000g5 (g: the min-SNR gamma, when min-SNR weighting is on)."""
    name = (f"{config.preset or 'sd'}_b{config.batch_size}a{config.gradient_accum}_{config.learning_rate:g}_"
            f"{config.scheduler}{config.max_steps}")
    return name + (f"g{config.noise_gamma:g}" if config.use_snr else "")


def main(argv: list[str] | None = None) -> int:
    print(output_dir_from_settings(parse_train_args(sys.argv[1:] if argv is None else argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
