"""Turning prompts into UNet conditioning: the single home of each text encoder's rule.

The cache builders and the pipelines both call these functions, so a cached embedding is exactly
what sampling feeds the UNet for the same prompt.
"""

from __future__ import annotations

import torch


def clip_token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's limit (77 for SD1.5), as StableDiffusionPipeline does."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def clip_overlong(tokenizer, prompts: list[str]) -> list[bool]:
    """Which prompts lose tokens to truncation."""
    lengths = tokenizer(prompts, truncation=False, add_special_tokens=True).input_ids
    return [len(ids) > tokenizer.model_max_length for ids in lengths]


def encode_clip_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """[B, 77, D]: the CLIP text encoder's last hidden state, as the SD1.5 pipeline's encode_prompt gives it."""
    ids = clip_token_ids(tokenizer, prompts).to(text_encoder.device)
    attention_mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        attention_mask = torch.ones_like(ids)
    with torch.no_grad():
        return text_encoder(ids, attention_mask=attention_mask)[0]
