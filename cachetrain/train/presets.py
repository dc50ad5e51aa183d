"""Named training recipes: the flags a kind of run starts from (``--preset sd15``, ``--preset t5``).

A preset replaces TrainConfig's defaults and nothing else: a flag the user gives always wins
(config.py's defaults < the preset < the user's flags). train_sd.sh and train_t5.sh select one and
pass only what their user set, so a change made here reaches every wrapper user. See what a preset
sets with ``train_from_cached.py --preset NAME --help`` (the defaults shown are the preset's).
"""

from __future__ import annotations

from typing import Any

from ..sidecar import CLIP_L_SUFFIX, SD_VAE_SUFFIX, SDXL_VAE_SUFFIX, T5_SUFFIX

# what both recipes share: a cosine schedule with a short warm-up, min-SNR weighting (gamma 5)
_COMMON: dict[str, Any] = {
    "learning_rate": 1e-5,
    "max_steps": "10000",
    "save_steps": 1000,
    "scheduler": "cosine",
    "warmup_steps": "100",
    "use_snr": True,
    "noise_gamma": 5.0,
    "optimizer": "adamw",
    "sampler_steps": 30,
}

PRESETS: dict[str, dict[str, Any]] = {
    # SD1.5 on SD-VAE latents and CLIP-L embeddings: 16 x 4 = 64 samples per optimizer step
    "sd15": {"imgcache_suffix": SD_VAE_SUFFIX, "txtcache_suffix": CLIP_L_SUFFIX,
             **_COMMON, "batch_size": 16, "gradient_accum": 4},
    # SD1.5 + SDXL VAE + T5: batch 64 per process fits in memory with gradient checkpointing
    "t5": {"imgcache_suffix": SDXL_VAE_SUFFIX, "txtcache_suffix": T5_SUFFIX,
           **_COMMON, "batch_size": 64, "gradient_accum": 1, "gradient_checkpointing": True},
}


def describe(name: str) -> str:
    """The preset as the flags it stands for, e.g. ``--batch_size 16 --use_snr`` (for --help)."""
    words = []
    for field_name, value in PRESETS[name].items():
        if value is True:
            words.append(f"--{field_name}")
        elif value is False:
            words.append(f"--no-{field_name}")
        else:
            words.append(f"--{field_name} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return " ".join(words)
