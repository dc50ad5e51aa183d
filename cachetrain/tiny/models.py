"""Tiny offline models (and the demo VAE's training), for the demo and the tests; the data is cachetrain.shapes.

``build_tiny_sd(folder)`` writes an ordinary SD1.5-shaped diffusers folder (UNet, VAE, CLIP text
encoder + tokenizer, PNDM scheduler) built deterministically from configs: every script loads it
through the same code path as a real SD1.5 folder or hub id.

``build_tiny_t5(folder)`` writes the SD1.5 + SDXL VAE + T5 model in miniature (a StableDiffusionT5Pipeline
folder): a T5 encoder (d_model 16) with a sentencepiece tokenizer trained on the synthetic captions,
an SDXL-shaped VAE, a UNet whose cross-attention takes the projection's output, and the projection.

``make_shapes_dataset(root, n)`` (cachetrain.shapes) draws coloured shapes on coloured backgrounds with
captions that say which ("a red circle on a blue background"); ``python -m cachetrain.tiny data`` writes it.

    python -m cachetrain.tiny model OUT_DIR
    python -m cachetrain.tiny t5model OUT_DIR
    python -m cachetrain.tiny data OUT_DIR --count 512 --size 64
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .shapes import COLOURS, SHAPES, TINY_RESOLUTION, make_shapes_dataset, shape_captions, shape_pixels
from ..sidecar import CLIP_L_SUFFIX, IMAGE_LATENT_KEY, SD_VAE_SUFFIX, TEXT_EMBEDDING_KEY, write_sidecar

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")

TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=16, sample_size=64,
)
SD15_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, prediction_type="epsilon",
)
# The T5 variant: its own VAE config (SDXL's fp16 upcast; the scaling factor is set from its latents
# when built, as for the SD1.5 tiny model) and a cross-attention width of 24, unlike the SD1.5 tiny
# model's 32, so mixing parts of the two is caught by the shape checks.
TINY_T5_ENCODER = dict(d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, relative_attention_num_buckets=8,
                       relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0)
TINY_T5_PROJECTION_DIM = 24
TINY_T5_UNET = {**TINY_UNET, "cross_attention_dim": TINY_T5_PROJECTION_DIM}
TINY_SDXL_VAE = {**TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True}
TINY_T5_MAX_LENGTH = 64

# The demo's VAE: trained once on the shapes (train_vae below), committed beside this file, so the
# demo's samples are pictures rather than a random decoder's noise. Narrower than TINY_VAE to stay
# well under 1 MB in fp16; the same 4x downsampling, so the tiny UNet's 16x16 latents fit it.
DEMO_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=8, sample_size=64,
)
DEMO_VAE_DIR = Path(__file__).with_name("demo_vae")

# SD1.5's structure (4 levels, 2 layers per block, its block types, a 4-level VAE with 2 layers per
# block) at narrow widths: the model single-file export is proven on, since the original layout's
# keys follow that structure. The other tiny models are smaller and faster, but do not have it.
SD15_STRUCTURE_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
)
SD15_STRUCTURE_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=8, sample_size=128,
)


def caption_words() -> list[str]:
    return sorted({"a", "on", "background", *SHAPES, *COLOURS})


def write_clip_tokenizer(folder: Path) -> None:
    """A byte-level BPE vocabulary where every caption word is one token (as in real CLIP)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in caption_words():
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def load_clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(os.fspath(folder), model_max_length=77, pad_token="<|endoftext|>")


def build_tiny_sd(folder: os.PathLike | str, seed: int = 0, trained_vae: bool = False,
                  sd15_structure: bool = False, scheduler_overrides: dict | None = None) -> Path:
    """Write a tiny SD1.5-shaped pipeline folder; the same seed gives the same weights.

    ``trained_vae``: the committed demo VAE (DEMO_VAE_DIR) instead of a random one.
    ``sd15_structure``: SD1.5's UNet and VAE structure at narrow widths (SD15_STRUCTURE_UNET /
    SD15_STRUCTURE_VAE), which single-file export maps. ``scheduler_overrides`` change the
    scheduler config (e.g. ``prediction_type="v_prediction"``).
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tokenizer_folder = folder / "_tokenizer_source"
    write_clip_tokenizer(tokenizer_folder)
    tokenizer = load_clip_tokenizer(tokenizer_folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(SD15_STRUCTURE_UNET if sd15_structure else TINY_UNET))
    if trained_vae:
        vae = AutoencoderKL.from_pretrained(DEMO_VAE_DIR, torch_dtype=torch.float32)  # its own scaling factor
    else:
        vae = AutoencoderKL(**(SD15_STRUCTURE_VAE if sd15_structure else TINY_VAE))
        # A random VAE's latents have a std far from SD's; set the scaling factor as one would for a
        # real VAE (1/std over sample images), so scaled latents are unit-sized against the noise.
        resolution = TINY_RESOLUTION * (2 if sd15_structure else 1)  # 8x down to the UNet's 16x16
        vae.register_to_config(scaling_factor=round(1.0 / _latent_std(vae, seed, resolution=resolution), 5))
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**{**SD15_SCHEDULER, **(scheduler_overrides or {})}), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    for leftover in tokenizer_folder.iterdir():
        leftover.unlink()
    tokenizer_folder.rmdir()
    return folder


def _latent_std(vae, seed: int, count: int = 32, resolution: int = TINY_RESOLUTION) -> float:
    with torch.no_grad():
        return vae.encode(shape_pixels(count, resolution, seed)).latent_dist.mean.std().item()


def train_demo_vae(out_dir: os.PathLike | str, seed: int = 0, steps: int = 1500, batch_size: int = 16,
                   learning_rate: float = 2e-3, kl_weight: float = 1e-6, image_count: int = 4096,
                   crop: int = 32, log=print) -> Path:
    """Train DEMO_VAE to reconstruct the synthetic shapes and save it (fp16) as a diffusers VAE folder.

    Plain reconstruction (L1 + MSE on pixels) of a sampled latent, with a small KL term so that the
    latent space stays smooth for the UNet. The images are drawn once from ``seed`` (a different
    stream from the demo's dataset, seed 0, when seed != 0). The scaling factor is set from the
    trained latents' std, as for a real VAE. It trains on random ``crop``-pixel crops: a quarter of
    the work of whole images, and a convolutional VAE applies what it learnt on crops to whole images.
    """
    import time

    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**DEMO_VAE)
    pixels = shape_pixels(image_count, TINY_RESOLUTION, seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps,
                                                   pct_start=min(0.3, 50 / steps))
    generator = torch.Generator().manual_seed(seed)
    started = time.monotonic()
    for step in range(1, steps + 1):
        top, left = torch.randint(0, TINY_RESOLUTION - crop + 1, (2,), generator=generator).tolist()
        batch = pixels[torch.randint(0, image_count, (batch_size,), generator=generator), :,
                       top:top + crop, left:left + crop]
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        decoded = vae.decode(latents).sample
        reconstruction = (decoded - batch).abs().mean() + ((decoded - batch) ** 2).mean()
        loss = reconstruction + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps or step == 10:
            log(f"[train_vae] step {step}/{steps} reconstruction {reconstruction.item():.4f} "
                f"({time.monotonic() - started:.0f} s)")
    vae.eval()
    vae.register_to_config(scaling_factor=round(1.0 / _latent_std(vae, seed + 2), 5))
    out_dir = Path(out_dir)
    vae.half().save_pretrained(out_dir, safe_serialization=True)  # fp16 halves the committed file
    return out_dir


def write_t5_tokenizer(folder: Path):
    """A unigram sentencepiece T5 tokenizer trained on the shape captions (pad 0, end 1, unknown 2)."""
    import io

    import sentencepiece
    from transformers import T5Tokenizer

    model = io.BytesIO()
    # hard_vocab_limit=False: a corpus this small cannot fill a fixed vocabulary
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(shape_captions()), model_writer=model, vocab_size=64, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    # from_pretrained on the folder: T5Tokenizer(vocab_file=...) would ignore the file
    return T5Tokenizer.from_pretrained(os.fspath(folder), extra_ids=0, model_max_length=TINY_T5_MAX_LENGTH)


def build_tiny_t5(folder: os.PathLike | str, seed: int = 0) -> Path:
    """Write a tiny StableDiffusionT5Pipeline folder; the same seed gives the same weights."""
    import shutil

    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from ..models.assemble import SD15_DDIM_SCHEDULE
    from ..models.t5 import StableDiffusionT5Pipeline, T5Projection

    folder = Path(folder)
    tokenizer_folder = folder / "_tokenizer_source"
    tokenizer = write_t5_tokenizer(tokenizer_folder)
    torch.manual_seed(seed)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id, is_encoder_decoder=False,
                                           **TINY_T5_ENCODER))
    vae = AutoencoderKL(**TINY_SDXL_VAE)
    # as for the SD1.5 tiny model: scaled latents unit-sized against the noise (SDXL's 0.13025 fits
    # the real SDXL VAE, not this random one, and would leave the tiny UNet almost nothing to learn)
    vae.register_to_config(scaling_factor=round(1.0 / _latent_std(vae, seed), 5))
    pipeline = StableDiffusionT5Pipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        t5_projection=T5Projection.initialised(TINY_T5_ENCODER["d_model"], TINY_T5_PROJECTION_DIM, seed=seed),
        unet=UNet2DConditionModel(**TINY_T5_UNET), scheduler=DDIMScheduler(**SD15_DDIM_SCHEDULE),
    )
    pipeline.save_pretrained(folder)
    shutil.rmtree(tokenizer_folder)
    return folder


def write_random_pairs(root: os.PathLike | str, count: int, latent_shape=(4, 16, 16), text_shape=(77, 32),
                       dtype: torch.dtype = torch.float32, folders: int = 8, seed: int = 0) -> None:
    """``count`` pairs of random latent and CLIP-embedding sidecars (no images): data for the loader
    and trainer benchmarks, where only the sidecars' sizes matter."""
    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        folder = root / f"part{i % folders}"
        folder.mkdir(parents=True, exist_ok=True)
        latent = torch.randn(latent_shape, generator=generator).to(dtype)
        embedding = torch.randn(text_shape, generator=generator).to(dtype)
        write_sidecar(folder / f"s{i:06d}{SD_VAE_SUFFIX}", {IMAGE_LATENT_KEY: latent}, {"kind": "image_latent"})
        write_sidecar(folder / f"s{i:06d}{CLIP_L_SUFFIX}", {TEXT_EMBEDDING_KEY: embedding}, {"kind": "text_embedding"})

def main(argv: list[str] | None = None) -> None:
    from ..cli import ArgumentParser

    parser = ArgumentParser(prog="python -m cachetrain.tiny",
                            description="Build the tiny offline model or the synthetic dataset.")
    sub = parser.add_subparsers(dest="what", required=True)
    model = sub.add_parser("model", help="write a tiny SD1.5-shaped diffusers folder")
    model.add_argument("out_dir")
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--trained_vae", action="store_true",
                       help="use the committed demo VAE (trained on the shapes) instead of a random one")
    model.add_argument("--sd15_structure", action="store_true",
                       help="SD1.5's UNet/VAE structure at narrow widths (the layout single-file export maps)")
    train_vae = sub.add_parser("train_vae", help="train the demo VAE on the synthetic shapes (how demo_vae/ was made)")
    train_vae.add_argument("out_dir")
    train_vae.add_argument("--seed", type=int, default=0)
    train_vae.add_argument("--steps", type=int, default=1500)
    t5model = sub.add_parser("t5model", help="write a tiny SD1.5 UNet + SDXL VAE + T5 pipeline folder")
    t5model.add_argument("out_dir")
    t5model.add_argument("--seed", type=int, default=0)
    data = sub.add_parser("data", help="write the synthetic shapes dataset (images + captions)")
    data.add_argument("out_dir")
    data.add_argument("--count", type=int, default=512)
    data.add_argument("--size", type=int, default=TINY_RESOLUTION)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--colours", nargs="+", choices=sorted(COLOURS), default=None,
                      help="the shapes' palette (default: all colours)")
    data.add_argument("--backgrounds", nargs="+", choices=sorted(COLOURS), default=None,
                      help="a separate background palette (default: any colour but the shape's)")
    data.add_argument("--shapes", nargs="+", choices=SHAPES, default=None,
                      help="the shapes drawn (default: all shapes)")
    data.add_argument("--centred", action="store_true",
                      help="every shape of one size in the middle (default: random sizes and places)")
    args = parser.parse_args(argv)
    if args.what == "model":
        print(build_tiny_sd(args.out_dir, seed=args.seed, trained_vae=args.trained_vae,
                            sd15_structure=args.sd15_structure))
    elif args.what == "train_vae":
        torch.set_num_threads(1)
        print(train_demo_vae(args.out_dir, seed=args.seed, steps=args.steps))
    elif args.what == "t5model":
        print(build_tiny_t5(args.out_dir, seed=args.seed))
    else:
        images = make_shapes_dataset(args.out_dir, args.count, args.size, args.seed,
                                     colours=tuple(args.colours) if args.colours else None,
                                     backgrounds=tuple(args.backgrounds) if args.backgrounds else None,
                                     shapes=tuple(args.shapes) if args.shapes else None, centred=args.centred)
        print(f"{len(images)} images in {args.out_dir}")


if __name__ == "__main__":
    main()
