"""Caption -> T5 -> projection sidecars (create_t5cache_768.py): ``x.txt_t5cache`` holds ``emb`` [T, D].

Only a caption's real tokens are stored, up to and including the end token: T5 captions are short
next to the tokenizer's limit (512 for T5-xxl), so padding them would mostly store zeros. The trainer's
collate pads a batch back by the shared pad rule (``text_encoding.pad_text_embeddings``), the same
rule the pipeline's encode_prompt applies when sampling.

Walking, skipping fresh sidecars, sharding, writing and the report are text_cache's and the cache
engine's (cache_build, cache_plan, cache_writer, cache_summary); this module says only how T5 captions
are batched and encoded.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..models import ldm_layout, loading as models
from .summary import CacheSummary
from .writer import EncodedItem
from ..sidecar import T5_SUFFIX, TRIMMED_TOKENS, CaptionRejected, read_caption
from .build import check_cache_flags
from .text_cache import (TextEmbeddingBuilder, build_parser, encoder_device_and_dtype, run_text_cache,
                         text_cache_settings)
from ..models.text_encoding import encode_t5_prompts, t5_overlong

# Captions are sorted by token length within windows of this many batches: batches of similar
# length waste little compute on padding, and a window keeps memory flat on huge datasets.
LENGTH_SORT_WINDOW_BATCHES = 32


@dataclass
class T5EmbeddingBuilder(TextEmbeddingBuilder):
    """TextEmbeddingBuilder for T5 + projection: real tokens only, batched by caption length."""

    projection: torch.nn.Module | None = None
    max_length: int = 0  # 0: the tokenizer's limit

    def __post_init__(self):
        super().__post_init__()
        if self.projection is None:
            raise ValueError("T5EmbeddingBuilder needs the pipeline's t5_projection")
        self.max_length = self.max_length or int(self.tokenizer.model_max_length)
        self.projection_class, self.projection_fingerprint = models.encoder_identity(self.projection)
        self.projection = self.projection.to(self.device).eval().requires_grad_(False)

    def settings_metadata(self) -> dict[str, str]:
        return {
            **super().settings_metadata(),
            "kind": "text_embedding_t5",
            "max_length": str(self.max_length),
            "projection_class": self.projection_class,
            "projection_fingerprint": self.projection_fingerprint,
            "tokens": TRIMMED_TOKENS,
        }

    def embed(self, prompts: list[str]) -> list[torch.Tensor]:
        return encode_t5_prompts(self.tokenizer, self.text_encoder, self.projection, prompts, self.max_length)

    def overlong(self, prompts: list[str]) -> list[bool]:
        """Which prompts lose tokens to --max_length."""
        return t5_overlong(self.tokenizer, prompts, self.max_length)

    def by_token_length(self, sources: list[str]) -> list[str]:
        """``sources`` ordered by their captions' token count, so each batch pads little.

        A caption that cannot be read sorts first; the shared encode reports it."""
        texts = []
        for source in sources:
            try:
                texts.append(read_caption(source, self.caption_suffix))
            except CaptionRejected:
                texts.append("")
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length).input_ids]
        return [source for _, source in sorted(zip(lengths, sources), key=lambda pair: pair[0])]

    def encode(self, sources: list[str], summary: CacheSummary) -> Iterator[EncodedItem]:
        """The shared caption encode, over windows of sources sorted by token length."""
        window = self.batch_size * LENGTH_SORT_WINDOW_BATCHES
        for start in range(0, len(sources), window):
            yield from super().encode(self.by_token_length(sources[start : start + window]), summary)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(None, T5_SUFFIX, "Cache T5 + projection embeddings of the captions beside "
                          "each image (only the tokenizer, text encoder and projection are loaded). This script "
                          "exists for custom pipelines: it implies --custom, so the code a --model folder "
                          "carries (pipeline.py, its projection's module) is run; use it on folders you trust.")
    parser.add_argument("--custom", "--is_custom", nargs="?", const=True, default=None, metavar="FOLDER",
                        help="implied: --model is a custom pipeline and its own code is run; a bare --custom "
                             "(the original's spelling) changes nothing, --custom FOLDER takes the text parts "
                             "from FOLDER instead of --model")
    parser.add_argument("--max_length", type=int, default=None,
                        help="tokens kept per caption, end token included (default: the tokenizer's limit)")
    args = parser.parse_args(argv)
    check_cache_flags(parser, args)  # before any model loads
    model = args.custom if isinstance(args.custom, str) else args.model
    if not model:
        parser.error("--model is required: a T5 pipeline folder or hub id (see assemble_t5_pipeline.py)")
    if ldm_layout.is_single_file(model):
        parser.error(f"--model {model}: a T5 pipeline has no single-file form; give its folder or hub id")
    if args.max_length is not None and args.max_length < 2:
        parser.error("--max_length must be >= 2 (one word and the end token)")
    settings = text_cache_settings(args)
    # bf16 on CUDA (T5 overflows in fp16), fp32 on CPU; each torchrun process on its own GPU
    device, dtype = encoder_device_and_dtype(args)
    if dtype == torch.float16:  # T5's activations overflow fp16: every caption would come out NaN
        print("error: T5 overflows in float16; use --dtype bfloat16 or float32", file=sys.stderr)
        return 2
    from ..models.t5 import load_t5_text_parts  # here, not at the top: it imports diffusers (4 s of --help)

    try:
        # trusted always: this script exists for custom pipelines (as the original, it implies --custom)
        tokenizer, text_encoder, projection = load_t5_text_parts(model, dtype, trust_remote_code=True)
    except (OSError, ValueError) as error:
        print(f"error: could not load the T5 parts of {model}: {error}", file=sys.stderr)
        return 2
    builder = T5EmbeddingBuilder(tokenizer=tokenizer, text_encoder=text_encoder, model_name=models.model_name(model),
                                 device=device, dtype=dtype, save_dtype=models.parse_dtype(args.save_dtype),
                                 batch_size=args.batch_size, projection=projection, max_length=args.max_length or 0,
                                 caption_suffix=args.caption_suffix, variants_by_line=args.caption_variants)
    return run_text_cache(builder, args, settings)
