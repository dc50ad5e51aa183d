"""The benchmark scripts run end to end on CPU (their figures are measured elsewhere, not asserted here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import OPTIONAL_PACKAGES

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, optional_packages: bool = False) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if optional_packages:  # bitsandbytes, for --optimizer adamw8
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(OPTIONAL_PACKAGES)]))
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_gpu_train_bench_runs_the_trainer_step_on_the_tiny_unet():
    out = _run("bench/gpu_train.py", "--tiny", "--steps", "1", "--windows", "1", "--warmup", "1",
               optional_packages=True)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    # the default set at batch 2, without compilation (minutes on a CPU), each configuration once; the
    # LoRA ones at rank 8 (the tiny UNet's layers are 32 wide)
    assert [r["config"] for r in results] == ["b2-nockpt-fp32m-adamw", "b2-nockpt-bf16w-adamw-lora8",
                                             "b2-nockpt-fp32m-adamw-lora8", "b2-ckpt-bf16w-adamw",
                                             "b2-ckpt-fp32m-adamw8", "b2-ckpt-bf16w-adamw-lora8",
                                             "b2-nockpt-fp32m-adamw-cl", "b2-ckpt-bf16w-lion", "b2-nockpt-bf16w-adamw"]
    assert all(r["images_per_sec"] > 0 and r["card"] == "cpu (tiny UNet)" for r in results)
    trainable = {r["config"]: r["trainable_parameters"] for r in results}
    # a LoRA configuration trains the adapter alone (the trainer's attach_adapter), a full one every weight
    assert (trainable["b2-nockpt-bf16w-adamw-lora8"] == trainable["b2-ckpt-bf16w-adamw-lora8"]
            < trainable["b2-nockpt-fp32m-adamw"] / 10)


def test_gpu_train_bench_profiles_where_a_full_and_a_lora_step_spend_their_time():
    out = _run("bench/gpu_train.py", "--tiny", "--steps", "1", "--windows", "1", "--warmup", "1", "--profile", "1",
               "--only", "b64-nockpt-fp32m-adamw", "b64-nockpt-fp32m-adamw-lora32")
    full, lora = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert (full["config"], lora["config"]) == ("b2-nockpt-fp32m-adamw", "b2-nockpt-fp32m-adamw-lora8")
    for result in (full, lora):
        shares = result["profile"]["share_by_kind"]
        assert shares["attention"] > 0 and shares["convolution"] > 0 and shares["matmul"] > 0
        # each operator counted once: on one CPU thread the operators' own times add up to at most the
        # profiled steps' wall time (an operator counted with the operators it calls would exceed it)
        profiled = result["profile"]
        assert 0 < profiled["ms_per_step"] <= 1.02 * profiled["wall_ms_per_step"]
        # the optimizer's kernels are found and named as such (how their share compares between the modes is
        # the bench's to measure: on one noisy CPU step it is not stable enough to assert)
        assert shares["optimizer and clipping"] > 0
    assert lora["trainable_parameters"] < full["trainable_parameters"] / 10


def test_gpu_encode_bench_runs_the_cache_scripts_encode_code_on_the_tiny_models():
    out = _run("bench/gpu_encode.py", "--tiny", "--windows", "1", "--calls", "1", "--warmup", "1")
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["encoder"], r["item"]) for r in results] == [
        ("SD1.5 VAE encoder", "64px image"), ("SDXL VAE encoder", "64px image"),
        ("T5 encoder + projection (tiny)", "caption of 8 tokens"),
        ("T5 encoder + projection (tiny)", "caption of 16 tokens")]
    assert all(r["items_per_sec"] > 0 for r in results)
    assert results[0]["gflop_per_item"] > 0


def test_shard_bench_packs_streams_and_starts_from_a_manifest():
    out = _run("bench/bench_shards.py", "--pairs", "64", "--batch_size", "8", "--epochs", "1",
               "--pairs_per_shard", "16", "--start_pairs", "200", "--no_s3")
    assert "per-file loader:" in out and "local shard loader" in out
    shown = re.search(r"time to the first batch from a (\d+)-pair shard set", out)
    assert shown and 200 <= int(shown.group(1)) < 200 + 4 * 16  # whole shards (at most 4 x 16 pairs each)


def test_lora_bench_times_a_lora_and_a_full_step_and_counts_their_state():
    out = _run("bench/bench_lora.py", "--windows", "1", "--steps", "1", "--warmup", "1", "--batch", "2",
               "--widths", "32")
    lines = out.splitlines()
    tiny, width_32 = [json.loads(line) for line in lines if line.startswith("{")]
    assert lines[1].startswith("step time: LoRA ") and lines[2].startswith("trainable state:")
    assert tiny["lora"]["trainable"] < tiny["full"]["trainable"] and tiny["step_ratio"] > 0
    assert tiny["sd15_size"]["parameters"] == 859_520_964 and 0 < tiny["sd15_size"]["state_ratio"] < 0.01
    # the sweep's UNet is SD1.5's structure at a tenth of its widths; its LoRA is the trainer's, on attention
    assert width_32["block_out_channels"] == [32, 64, 128, 128] and width_32["step_ratio"] > 0
    assert width_32["lora_parameters"] == 672_768 and 0.06 < width_32["state_ratio"] < 0.07
    assert lines[-1].startswith("width 32-64-128-128 (10.4M parameters): LoRA step ")


def test_noise_variants_bench_times_each_variant():
    out = _run("bench/bench_noise_variants.py", "--shape", "4", "8", "8", "--samples", "2", "--rounds", "1")
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in results] == ["plain", "multires_noise_iterations 6", "ip_noise_gamma 0.1", "both"]
    assert all(r["us_per_sample"] > 0 for r in results)


def test_the_bounded_read_bench_reads_with_and_without_the_bound():
    out = _run("bench/bench_bounded_read.py", "--reads", "20", "--rounds", "1")
    assert "bounded:" in out and "unbounded:" in out and "the bound costs" in out
