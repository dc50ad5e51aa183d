"""Caption -> T5 -> projection sidecars (create_t5cache_768.py): ``x.txt_t5cache`` holds ``emb`` [T, D].

Only a caption's real tokens are stored, up to and including the end token: T5 captions are short
next to the tokenizer's limit (512 for T5-xxl), so padding them would mostly store zeros. The trainer's
collate pads a batch back by the shared pad rule (``text_encoding.pad_text_embeddings``), the same
rule the pipeline's encode_prompt applies when sampling.

Walking, skipping fresh sidecars, sharding, writing and the report are text_cache's and
cache_build's; this module says only how T5 captions are batched and encoded.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import models
from .cache_build import CacheSummary, EncodedItem
from .sidecar import TEXT_EMBEDDING_KEY, T5_SUFFIX, caption_source_identity
from .t5 import load_t5_text_parts
from .text_cache import TextEmbeddingBuilder, build_parser, read_caption, run_text_cache
from .text_encoding import encode_t5_prompts, pad_text_embeddings, t5_overlong

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
            "tokens": "real tokens up to and including the end token",
        }

    def embed(self, prompts: list[str]) -> list[torch.Tensor]:
        return encode_t5_prompts(self.tokenizer, self.text_encoder, self.projection, prompts, self.max_length)

    def overlong(self, prompts: list[str]) -> list[bool]:
        """Which prompts lose tokens to --max_length."""
        return t5_overlong(self.tokenizer, prompts, self.max_length)

    def _token_lengths(self, captions: list[str]) -> list[int]:
        ids = self.tokenizer(captions, truncation=True, max_length=self.max_length).input_ids
        return [len(x) for x in ids]

    def encode(self, sources: list[str], summary: CacheSummary) -> Iterator[EncodedItem]:
        window = self.batch_size * LENGTH_SORT_WINDOW_BATCHES
        for start in range(0, len(sources), window):
            readable = []
            for source in sources[start : start + window]:
                try:
                    readable.append((source, read_caption(source)))
                except (OSError, ValueError) as error:  # changed since planning
                    summary.fail(source, str(error))
            if not readable:
                continue
            captions = [caption for _, caption in readable]
            for caption, overlong in zip(captions, self.overlong(captions)):
                if overlong:
                    summary.count("note:truncated")
                if not caption:
                    summary.count("note:empty caption")
            lengths = self._token_lengths(captions)
            by_length = sorted(range(len(readable)), key=lambda i: lengths[i])
            for batch_start in range(0, len(by_length), self.batch_size):
                batch = [readable[i] for i in by_length[batch_start : batch_start + self.batch_size]]
                yield from self._encode_batch(batch, summary)

    def _encode_batch(self, batch: list[tuple[str, str]], summary: CacheSummary) -> Iterator[EncodedItem]:
        embeddings = self.embed([caption for _, caption in batch])
        lengths = [emb.shape[0] for emb in embeddings]
        # one transfer to the host per batch (the zero padding is finite and sliced off again)
        padded = pad_text_embeddings(embeddings)[0].to(self.save_dtype).cpu()
        finite = torch.isfinite(padded).flatten(1).all(dim=1).tolist()
        for (source, caption), emb, length, ok in zip(batch, padded, lengths, finite):
            if not ok:
                summary.fail(source, "the text encoder produced NaN/Inf for this caption; nothing written")
                continue
            metadata = {**self.settings_metadata(), **caption_source_identity(caption),
                        "encoder": self.model_name, "dtype": models.dtype_name(self.save_dtype)}
            yield EncodedItem(source, {TEXT_EMBEDDING_KEY: emb[:length].clone()}, metadata)

def main(argv: list[str] | None = None) -> int:
    parser = build_parser(None, T5_SUFFIX, "Cache T5 + projection embeddings of the captions beside "
                          "each image (only the tokenizer, text encoder and projection are loaded).")
    parser.add_argument("--custom", default=None, metavar="FOLDER",
                        help="take the text parts from this pipeline folder and run the projection code it "
                             "carries (only for folders you trust); overrides --model")
    parser.add_argument("--max_length", type=int, default=None,
                        help="tokens kept per caption, end token included (default: the tokenizer's limit)")
    args = parser.parse_args(argv)
    model = args.custom or args.model
    if not model:
        parser.error("--model is required: a T5 pipeline folder or hub id (see assemble_t5_pipeline.py)")
    if args.max_length is not None and args.max_length < 2:
        parser.error("--max_length must be >= 2 (one word and the end token)")
    device = torch.device(args.device) if args.device else models.default_device()
    # bf16 on CUDA: T5 overflows in fp16; fp32 on CPU, where bf16 has no fast kernels
    dtype = models.parse_dtype(args.dtype) if args.dtype else \
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        tokenizer, text_encoder, projection = load_t5_text_parts(model, dtype, trust_remote_code=bool(args.custom))
    except (OSError, ValueError) as error:
        print(f"error: could not load the T5 parts of {model}: {error}", file=sys.stderr)
        return 2
    builder = T5EmbeddingBuilder(tokenizer=tokenizer, text_encoder=text_encoder, model_name=models.model_name(model),
                                 device=device, dtype=dtype, save_dtype=models.parse_dtype(args.save_dtype),
                                 batch_size=args.batch_size, projection=projection, max_length=args.max_length or 0)
    return run_text_cache(builder, args)
