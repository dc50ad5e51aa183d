"""bench_lora.py --sd15_t5: a LoRA on a UNet of SD1.5's size in the T5 model's setup, at batch 1 on CPU.

The model folder is the tiny T5 model (T5 encoder, SDXL-shaped VAE, tokenizer) with two parts replaced:
the UNet is built from SD1.5's config (859.5M parameters, random weights: nothing is downloaded) and
the projection maps T5's width to SD1.5's cross-attention width, 768. The captions are cached through
that projection by create_t5cache_768.py and the images by create_img_sdxl.py, as for any T5 run; the
runs are train_from_cached.py processes under /usr/bin/time -v, so peak RSS is the whole process's.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, attention_head_dim=8)


def build_model(folder: Path) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from cachetrain.models.t5 import T5Projection
    from cachetrain.tiny.models import TINY_T5_ENCODER, build_tiny_t5

    build_tiny_t5(folder, seed=0)
    torch.manual_seed(0)
    UNet2DConditionModel(**SD15_UNET).save_pretrained(folder / "unet")
    T5Projection.initialised(TINY_T5_ENCODER["d_model"], SD15_UNET["cross_attention_dim"], seed=0) \
        .save_pretrained(folder / "t5_projection")


def build_data(model: Path, data: Path, image_side: int) -> None:
    from cachetrain.commands import create_img_sdxl, create_t5cache_768
    from cachetrain.tiny.models import make_shapes_dataset

    make_shapes_dataset(data, count=4, size=image_side, seed=0)
    common = ["--model", str(model), "--data_root", str(data), "--num_workers", "0", "--no_progress"]
    assert create_img_sdxl(common + ["--resolution", str(image_side)]) == 0
    assert create_t5cache_768(common) == 0


def timed_run(args: list[str], log: Path) -> dict:
    """One train_from_cached.py process under /usr/bin/time -v: exit status, wall seconds, peak RSS."""
    command = ["/usr/bin/time", "-v", sys.executable, str(REPO / "train_from_cached.py"), *args]
    start = time.perf_counter()
    with open(log, "w") as out:
        status = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO).returncode
    text = log.read_text()
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"exit_status": status, "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_gib": round(int(peak.group(1)) / 1024 ** 2, 2) if peak else None, "log": str(log)}


def run_sd15_t5(work: Path, rank: int, latent: int, full: bool) -> None:
    work.mkdir(parents=True, exist_ok=True)
    model, data = work / "model", work / f"data{latent}"
    if not (model / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        build_model(model)
    if not data.is_dir():
        build_data(model, data, image_side=latent * 4)  # the tiny SDXL-shaped VAE downsamples by 4
    common = ["--preset", "t5", "--pretrained_model", str(model), "--train_data_dir", str(data),
              "--batch_size", "1", "--gradient_accum", "1", "--num_workers", "0", "--no_progress", "--log_every", "1",
              "--learning_rate", "1e-4", "--seed", "0"]
    lora = ["--lora_type", "lora", "--lora_rank", str(rank), "--save_steps", "2"]
    results = {"latent": f"4x{latent}x{latent}", "rank": rank, "batch": 1,
               "setup": "preset t5 (AdamW fp32, gradient checkpointing on)"}
    lora_dir = work / "lora_run"
    results["lora"] = timed_run(common + lora + ["--output_dir", str(lora_dir), "--max_steps", "2"],
                                work / "lora.log")
    results["lora"]["saved"] = (lora_dir / "checkpoint-00002" / "pytorch_lora_weights.safetensors").is_file()
    results["lora_resume"] = timed_run(common + lora + ["--output_dir", str(lora_dir), "--max_steps", "3", "--resume"],
                                       work / "lora_resume.log")
    results["lora_resume"]["saved"] = (lora_dir / "checkpoint-00003" / "pytorch_lora_weights.safetensors").is_file()
    if full:
        results["full"] = timed_run(common + ["--output_dir", str(work / "full_run"), "--max_steps", "1",
                                              "--save_steps", "0"], work / "full.log")
    print(json.dumps(results))
    for name, run in results.items():
        if isinstance(run, dict):
            print(f"{name}: exit {run['exit_status']}, {run['wall_s']} s, peak RSS {run['peak_rss_gib']} GiB"
                  + (f", checkpoint written: {run['saved']}" if "saved" in run else ""))
