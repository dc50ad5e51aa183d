"""Turning prompts into UNet conditioning: the single home of each text encoder's rule.

The cache builders, the trainer's collate and the pipelines call these functions, so a cached embedding is exactly
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


# ---------------------------------------------------------------------------------------------
# T5 (the SD1.5 + T5 model): prompts -> T5 hidden states -> projection, real tokens only


def t5_token_ids(tokenizer, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both [B, L]: truncated to ``max_length`` (end token kept), padded to the longest."""
    encoded = tokenizer(prompts, padding="longest", max_length=max_length, truncation=True, return_tensors="pt")
    return encoded.input_ids, encoded.attention_mask


def t5_overlong(tokenizer, prompts: list[str], max_length: int) -> list[bool]:
    """Which prompts lose tokens to truncation at ``max_length``."""
    lengths = tokenizer(prompts, truncation=False, add_special_tokens=True).input_ids
    return [len(ids) > max_length for ids in lengths]


def encode_t5_prompts(tokenizer, text_encoder, projection, prompts: list[str], max_length: int) -> list[torch.Tensor]:
    """One [T_i, D] tensor per prompt: the projected T5 states of its real tokens, end token included.

    The batch is padded to its longest prompt with the pads masked out, so a prompt's tokens come
    out the same whichever prompts share its batch. What the cache stores and what the pipeline
    feeds the UNet both start here; ``pad_text_embeddings`` turns the list into UNet conditioning.
    """
    ids, mask = t5_token_ids(tokenizer, prompts, max_length)
    device = text_encoder.device
    with torch.no_grad():
        hidden = text_encoder(ids.to(device), attention_mask=mask.to(device))[0]
        weight = next(projection.parameters())  # any projection module, ours or a folder's own code
        projected = projection(hidden.to(device=weight.device, dtype=weight.dtype))
    lengths = mask.sum(dim=1).tolist()
    return [tokens[:length] for tokens, length in zip(projected, lengths)]


def pad_text_embeddings(embeddings: list[torch.Tensor], length: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pad rule: [T_i, D] embeddings -> ([B, L, D] conditioning, [B, L] attention mask or None).

    ``L`` is ``length`` when given (longer embeddings are truncated to it), else the longest ``T_i``.
    Padded positions hold zeros and are 0 in the mask (1 marks a real token), so the UNet's
    cross-attention ignores them. When no position is padded the mask is None: the UNet then
    attends to every token, which is the same thing. The trainer's collate and the T5 pipeline's
    encode_prompt both call this, so training and sampling condition the UNet identically.
    """
    if not embeddings:
        raise ValueError("pad_text_embeddings needs at least one embedding")
    widths = {emb.shape[-1] for emb in embeddings}
    if len(widths) > 1:
        raise ValueError(f"text embeddings of one batch differ in width: {sorted(widths)}")
    lengths = [min(emb.shape[0], length) if length is not None else emb.shape[0] for emb in embeddings]
    target = length if length is not None else max(lengths)
    if all(n == target for n in lengths):
        return torch.stack([emb[:target] for emb in embeddings]), None
    first = embeddings[0]
    padded = first.new_zeros((len(embeddings), target, first.shape[-1]))
    mask = torch.zeros((len(embeddings), target), dtype=torch.long)
    for row, (emb, n) in enumerate(zip(embeddings, lengths)):
        padded[row, :n] = emb[:n]
        mask[row, :n] = 1
    return padded, mask.to(first.device)
