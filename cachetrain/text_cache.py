"""Caption -> text-embedding sidecars (create_clipl.py; create_t5cache_768.py shares this machinery).

Sources are the images of a data root; the caption of ``x.jpg`` is ``x.txt`` and its sidecar
``x<suffix>``. An image without a caption is reported and gets no text sidecar. Each data root also
gets the empty prompt's embedding at ``<root>/.empty_prompt<suffix>`` (for caption dropout).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import models
from .cache_build import (CacheSettings, CacheSummary, EncodedItem, add_common_cache_flags, effective_shard,
                          parse_shard, run_cache_build)
from .sidecar import (TEXT_EMBEDDING_KEY, caption_path, caption_source_identity, check_freshness,
                      empty_prompt_path, write_sidecar)
from .text_encoding import clip_overlong, encode_clip_prompts
from .tree import DEFAULT_IMAGE_EXTENSIONS, normalize_extensions

def read_caption(image_path: str) -> str:
    """The stripped text of the image's caption file; OSError/ValueError with the reason if unusable."""
    path = caption_path(image_path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no caption file {path.name}") from None
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise ValueError(f"caption {path.name} is not UTF-8 ({error.reason} at byte {error.start})") from None


@dataclass
class TextEmbeddingBuilder:
    tokenizer: object
    text_encoder: torch.nn.Module
    model_name: str
    device: torch.device
    dtype: torch.dtype
    save_dtype: torch.dtype
    batch_size: int

    def __post_init__(self):
        self.encoder_class, self.fingerprint = models.encoder_identity(self.text_encoder)
        self.text_encoder = self.text_encoder.to(self.device).eval().requires_grad_(False)

    def settings_metadata(self) -> dict[str, str]:
        return {
            "kind": "text_embedding",
            "encoder_class": self.encoder_class,
            "encoder_fingerprint": self.fingerprint,
            "max_length": str(self.tokenizer.model_max_length),
        }

    def expected_metadata(self, source: str) -> dict[str, str]:
        return {**self.settings_metadata(), **caption_source_identity(read_caption(source))}

    def embed(self, prompts: list[str]) -> torch.Tensor:
        return encode_clip_prompts(self.tokenizer, self.text_encoder, prompts)

    def encode(self, sources: list[str], summary: CacheSummary) -> Iterator[EncodedItem]:
        for start in range(0, len(sources), self.batch_size):
            batch_sources, captions = [], []
            for source in sources[start : start + self.batch_size]:
                try:
                    captions.append(read_caption(source))
                    batch_sources.append(source)
                except (OSError, ValueError) as error:  # changed since planning
                    summary.fail(source, str(error))
            if not captions:
                continue
            for caption, overlong in zip(captions, clip_overlong(self.tokenizer, captions)):
                if overlong:
                    summary.count("note:truncated")
                if not caption:
                    summary.count("note:empty caption")
            embeddings = self.embed(captions)
            finite = torch.isfinite(embeddings).flatten(1).all(dim=1).cpu().tolist()
            embeddings = embeddings.to(self.save_dtype).cpu()
            for source, caption, emb, ok in zip(batch_sources, captions, embeddings, finite):
                if not ok:
                    summary.fail(source, "the text encoder produced NaN/Inf for this caption; nothing written")
                    continue
                metadata = {**self.settings_metadata(), **caption_source_identity(caption),
                            "encoder": self.model_name, "dtype": models.dtype_name(self.save_dtype)}
                yield EncodedItem(source, {TEXT_EMBEDDING_KEY: emb.clone()}, metadata)

    def write_empty_prompt(self, data_root: str, suffix: str, overwrite: bool) -> None:
        target = empty_prompt_path(data_root, suffix)
        expected = {**self.settings_metadata(), **caption_source_identity("")}
        if not overwrite and check_freshness(target, expected).status == "fresh":
            return
        emb = self.embed([""])[0].to(self.save_dtype)
        write_sidecar(target, {TEXT_EMBEDDING_KEY: emb},
                      {**expected, "encoder": self.model_name, "dtype": models.dtype_name(self.save_dtype)})


def build_parser(default_model: str, default_suffix: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=default_model,
                        help=f"diffusers folder or hub id with tokenizer/ and text_encoder/ (default {default_model})")
    parser.add_argument("--out_suffix", default=default_suffix, help=f"sidecar suffix: x.txt -> x{default_suffix}")
    parser.add_argument("--extensions", nargs="+", default=list(DEFAULT_IMAGE_EXTENSIONS),
                        help="image extensions whose captions are cached (case-insensitive)")
    add_common_cache_flags(parser, default_batch=64)
    return parser


def main_clip(argv: list[str] | None = None) -> int:
    parser = build_parser("runwayml/stable-diffusion-v1-5", ".txt_clipl",
                          "Cache CLIP-L text embeddings of the captions beside each image.")
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else models.default_device()
    dtype = models.parse_dtype(args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer, text_encoder = models.load_clip_text_encoder(args.model, dtype)
    builder = TextEmbeddingBuilder(tokenizer=tokenizer, text_encoder=text_encoder,
                                   model_name=models.model_name(args.model), device=device, dtype=dtype,
                                   save_dtype=models.parse_dtype(args.save_dtype), batch_size=args.batch_size)
    return run_text_cache(builder, args)


def run_text_cache(builder: TextEmbeddingBuilder, args: argparse.Namespace) -> int:
    shard_index, shard_count = effective_shard(parse_shard(args.shard))
    settings = CacheSettings(data_roots=args.data_root, out_suffix=args.out_suffix,
                             extensions=normalize_extensions(args.extensions), batch_size=args.batch_size,
                             overwrite=args.overwrite, num_workers=0, shard_index=shard_index,
                             shard_count=shard_count, report_path=args.report, show_progress=not args.no_progress)
    summary = run_cache_build(builder, settings)
    if shard_index == 0:
        for root in args.data_root:
            builder.write_empty_prompt(root, args.out_suffix, args.overwrite)
    print(summary.render(), file=sys.stderr)
    return 0 if summary.ok else 1
