"""Caption -> text-embedding sidecars (create_clipl.py; create_t5cache_768.py shares this machinery).

Sources are the images of a data root; the caption of ``x.jpg`` is ``x.txt`` and its sidecar
``x<suffix>`` (tensor ``emb`` [T, D]). Captions are read as UTF-8 and stripped. Per caption:
  - missing: the image gets no text sidecar; reported as failed ("no caption"). An old text
    sidecar left beside it is an orphan (removed with --prune), never silently reused;
  - not UTF-8: reported as failed, no sidecar;
  - empty: encoded as the empty prompt, reported as a note ("empty caption");
  - longer than the tokenizer's limit: truncated to it, reported as a note ("truncated caption").

The empty prompt's embedding (for caption dropout) is written once per data root at
``<root>/.empty_prompt<suffix>`` (``empty_prompt_path``): hidden, so no walk takes it for a sample.

A builder for another text encoder plugs in by overriding ``embed`` (and ``overlong`` and
``settings_metadata`` if its rules differ) and is run by ``run_text_cache(builder, args, text_cache_settings(args))``.
``embed`` may return one [B, T, D] tensor or a list of [T_i, D] tensors (trimmed embeddings).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..models import loading as models
from ..cli import ArgumentParser
from .build import (add_common_cache_flags, add_custom_flag, add_single_file_config_flag, check_cache_flags,
                          custom_model_source, default_encoder_dtype, requested_device, run_cache_build,
                          settings_from_args, CacheSettings)
from .summary import CacheSummary, write_problem
from .writer import EncodedItem
from .shares import agree_on_exit_status, process_device
from ..freshness import caption_source_identity, check_freshness
from ..sidecar import (CAPTION_EXTENSION, CLIP_L_SUFFIX, DEFAULT_IMAGE_EXTENSIONS, TEXT_EMBEDDING_KEY, CaptionRejected,
                      empty_prompt_path, read_caption, text_variant_key, write_sidecar)
from ..models.text_encoding import clip_overlong, encode_clip_prompts
from ..tree import normalize_extensions


@dataclass
class TextEmbeddingBuilder:
    tokenizer: object
    text_encoder: torch.nn.Module
    model_name: str
    device: torch.device
    dtype: torch.dtype
    save_dtype: torch.dtype
    batch_size: int
    caption_suffix: str = CAPTION_EXTENSION  # x.jpg's caption is x<caption_suffix>
    variants_by_line: bool = False  # --caption_variants: each non-empty line of a caption file is one caption

    def __post_init__(self):
        self.encoder_class, self.fingerprint = models.encoder_identity(self.text_encoder)
        self.text_encoder = self.text_encoder.to(self.device).eval().requires_grad_(False)
        if self.dtype != torch.float32:  # loaded in fp32 so the fingerprint never depends on --dtype
            self.text_encoder = self.text_encoder.to(self.dtype)

    def settings_metadata(self) -> dict[str, str]:
        return {
            "kind": "text_embedding",
            "encoder_class": self.encoder_class,
            "encoder_fingerprint": self.fingerprint,
            "max_length": str(self.tokenizer.model_max_length),
            "dtype": models.dtype_name(self.save_dtype),
            # only when asked: sidecars cached without the flag stay fresh
            **({"caption_variants": "lines"} if self.variants_by_line else {}),
        }

    def expected_metadata(self, source: str) -> dict[str, str | None]:
        # None: a sidecar cached with --caption_variants is rebuilt by a run without it
        return {"caption_variants": None, **self.settings_metadata(),
                **caption_source_identity(read_caption(source, self.caption_suffix))}

    def embed(self, prompts: list[str]) -> torch.Tensor | Sequence[torch.Tensor]:
        """[B, T, D] (or B tensors [T_i, D]) for ``prompts``: override for another text encoder."""
        return encode_clip_prompts(self.tokenizer, self.text_encoder, prompts)

    def overlong(self, prompts: list[str]) -> list[bool]:
        """Which prompts ``embed`` truncates."""
        return clip_overlong(self.tokenizer, prompts)

    def variants_of(self, caption: str) -> list[str]:
        """The captions one caption file gives: itself, or with --caption_variants each non-empty line."""
        if not self.variants_by_line:
            return [caption]
        return [line.strip() for line in caption.splitlines() if line.strip()] or [""]

    def encode(self, sources: list[str], summary: CacheSummary) -> Iterator[EncodedItem]:
        for start in range(0, len(sources), self.batch_size):
            batch_sources, captions = [], []
            for source in sources[start : start + self.batch_size]:
                try:
                    captions.append(read_caption(source, self.caption_suffix))
                    batch_sources.append(source)
                except CaptionRejected as error:  # changed since planning
                    summary.fail(source, error.kind, str(error))
            if not captions:
                continue
            variants = [self.variants_of(caption) for caption in captions]
            prompts = [prompt for group in variants for prompt in group]  # every variant, encoded in one batch
            overlong = iter(self.overlong(prompts))
            for source, caption, group in zip(batch_sources, captions, variants):
                if any([next(overlong) for _ in group]):
                    summary.note(source, "truncated caption",
                                 f"longer than {self.tokenizer.model_max_length} tokens; the rest is cut off")
                if not caption:
                    summary.note(source, "empty caption", "encoded as the empty prompt")
            embeddings = self.embed(prompts)
            # One finiteness check and one device->host copy per batch, not per caption.
            if isinstance(embeddings, torch.Tensor):
                finite = torch.isfinite(embeddings).flatten(1).all(dim=1).cpu().tolist()
                embeddings = list(embeddings.to(self.save_dtype).cpu())
            else:
                finite = torch.stack([torch.isfinite(e).all() for e in embeddings]).cpu().tolist()
                embeddings = [e.to(self.save_dtype).cpu() for e in embeddings]
            position = 0
            for source, caption, group in zip(batch_sources, captions, variants):
                own = range(position, position + len(group))
                position += len(group)
                if not all(finite[k] for k in own):
                    summary.fail(source, "non-finite output",
                                 "the text encoder produced NaN/Inf for this caption; nothing written")
                    continue
                # the caption's name is recorded (not compared: its sha256 is) so inspect finds the caption
                metadata = {**self.settings_metadata(), **caption_source_identity(caption), "encoder": self.model_name,
                            "caption_suffix": self.caption_suffix}
                if self.variants_by_line:
                    metadata["caption_variant_count"] = str(len(group))
                tensors = {text_variant_key(v): embeddings[k].clone() for v, k in enumerate(own)}
                yield EncodedItem(source, tensors, metadata)

    def write_empty_prompt(self, data_root: str, suffix: str, overwrite: bool, summary: CacheSummary) -> None:
        """The root's empty-prompt sidecar, unless a fresh one is there; a write that fails is counted in
        ``summary`` like any other sidecar's (the trainer then refuses caption dropout on this root)."""
        target = empty_prompt_path(data_root, suffix)
        expected = {**self.settings_metadata(), **caption_source_identity("")}
        if not overwrite and check_freshness(target, expected).status == "fresh":
            return
        emb = self.embed([""])[0].to(self.save_dtype)
        try:
            write_sidecar(target, {TEXT_EMBEDDING_KEY: emb}, {**expected, "encoder": self.model_name})
        except Exception as error:  # disk full, read-only root, safetensors' own error
            summary.fail(str(target), *write_problem(str(target), error))


def build_parser(default_model: str, default_suffix: str, description: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description)
    parser.add_argument("--model", default=default_model,
                        help=f"diffusers folder or hub id with tokenizer/ and text_encoder/ (default {default_model})")
    parser.add_argument("--out_suffix", default=default_suffix, help=f"sidecar suffix: x.txt -> x{default_suffix}")
    parser.add_argument("--extensions", nargs="+", default=list(DEFAULT_IMAGE_EXTENSIONS),
                        help="image extensions whose captions are cached (case-insensitive)")
    parser.add_argument("--caption_suffix", "--txt_suffix", dest="caption_suffix", default=CAPTION_EXTENSION,
                        help=f"the caption of x.jpg is x<caption_suffix> (default {CAPTION_EXTENSION}; the original "
                             f"T5 scripts' captions are .txtqs). --txt_suffix is the original's name for it")
    parser.add_argument("--caption_variants", action="store_true",
                        help="each non-empty line of a caption file is one caption: all are cached in the one "
                             "sidecar (emb, emb_1, ...) and the trainer draws one per sample")
    add_common_cache_flags(parser, default_batch=64)
    return parser


def encoder_device_and_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """--device / --dtype, or this process's GPU in bf16, or the CPU in fp32."""
    try:
        device = process_device(requested_device(args))
    except ValueError as error:  # --cpu with --device cuda
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return device, models.parse_dtype(args.dtype) if args.dtype else default_encoder_dtype(device)


def main_clip(argv: list[str] | None = None) -> int:
    parser = build_parser(models.SD15_MODEL_ID, CLIP_L_SUFFIX,
                          "Cache CLIP-L text embeddings of the captions beside each image.")
    add_custom_flag(parser, "tokenizer/ and text_encoder/ (standard CLIP parts, so none of the pipeline's code runs)")
    add_single_file_config_flag(parser)  # --model may be a single-file SD1.5 model
    args = parser.parse_args(argv)
    check_cache_flags(parser, args)  # before any model loads
    settings = text_cache_settings(args)
    device, dtype = encoder_device_and_dtype(args)
    try:
        model = custom_model_source(args, ("tokenizer", "text_encoder"))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        tokenizer, text_encoder = models.load_clip_text_encoder(model, torch.float32,
                                                                args.single_file_config or models.SD15_MODEL_ID)
    except (OSError, ValueError) as error:
        print(f"error: could not load the CLIP tokenizer and text encoder of {model}: {error}", file=sys.stderr)
        return 2
    builder = TextEmbeddingBuilder(tokenizer=tokenizer, text_encoder=text_encoder,
                                   model_name=models.model_name(model), device=device, dtype=dtype,
                                   save_dtype=models.parse_dtype(args.save_dtype), batch_size=args.batch_size,
                                   caption_suffix=args.caption_suffix, variants_by_line=args.caption_variants)
    return run_text_cache(builder, args, settings)


def text_cache_settings(args: argparse.Namespace) -> CacheSettings:
    """The engine's settings from the common flags, made before the encoder loads (minutes for T5-xxl):
    a missing --data_root, an unwritable --report or a malformed --shard ends the run with one line, status 2."""
    try:
        return settings_from_args(args, normalize_extensions(args.extensions), num_workers=0)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def run_text_cache(builder: TextEmbeddingBuilder, args: argparse.Namespace, settings: CacheSettings) -> int:
    """Cache ``builder``'s embeddings of every caption under ``args.data_root``, the empty prompt once per
    root, print the summary, and return the exit status."""
    summary = run_cache_build(builder, settings)
    if settings.shard_index == 0:
        for root in args.data_root:
            builder.write_empty_prompt(root, args.out_suffix, args.overwrite, summary)
    print(summary.render(), file=sys.stderr)
    return agree_on_exit_status(summary.exit_status())
