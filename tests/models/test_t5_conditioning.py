"""T5 caption conditioning: the pad rule, the T5 cache, and train/sample consistency.

What the trainer feeds the UNet for a caption (its sidecar read back through collate) must be what
the pipeline's own encode_prompt feeds it when sampling that caption: embedding and mask, also
under --force_toklen (for SD1.5's CLIP conditioning too).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from cachetrain import sidecar
from cachetrain.train.loader import CachedPairDataset, collate_pairs
from cachetrain.sidecar import empty_prompt_path
from cachetrain.models.text_encoding import pad_text_embeddings
from cachetrain.tree import index_training_pairs
from tests.t5_support import cache_args, cache_t5_embeddings, captions_of, text_sidecar


def _pipeline(model):
    from cachetrain.models.t5 import StableDiffusionT5Pipeline

    return StableDiffusionT5Pipeline.from_pretrained(model)


def _collate_captions(captions, token_length=None):
    """Read the sidecars of ``captions`` back exactly as the trainer does: dataset items -> collate."""
    root = captions[0].parents[1]
    index, _ = index_training_pairs([root], sidecar.SDXL_VAE_SUFFIX, sidecar.T5_SUFFIX)
    position = {index.base_path(i): i for i in range(len(index))}
    dataset = CachedPairDataset(index)
    items = [dataset[position[str(c.with_suffix(""))]] for c in captions]
    return collate_pairs(items, token_length=token_length)


def _texts(captions):
    return [c.read_text(encoding="utf-8").strip() for c in captions]


# ---------------------------------------------------------------------------------------------
# The pad rule


def test_pad_rule_fills_padding_with_zeros_and_masks_only_it():
    short, long = torch.randn(2, 3), torch.randn(4, 3)
    padded, mask = pad_text_embeddings([short, long])
    assert padded.shape == (2, 4, 3)
    assert torch.equal(padded[0, :2], short) and torch.equal(padded[1], long)
    assert torch.equal(padded[0, 2:], torch.zeros(2, 3))
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_pad_rule_gives_no_mask_when_nothing_is_padded():
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    padded, mask = pad_text_embeddings([a, b])
    assert mask is None
    assert torch.equal(padded, torch.stack([a, b]))


def test_pad_rule_pads_or_truncates_to_a_forced_length():
    a, b = torch.randn(2, 3), torch.randn(6, 3)
    padded, mask = pad_text_embeddings([a, b], length=4)
    assert padded.shape == (2, 4, 3)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert torch.equal(padded[1], b[:4])
    truncated, no_mask = pad_text_embeddings([torch.randn(5, 3), b], length=4)
    assert truncated.shape == (2, 4, 3) and no_mask is None


def test_pad_rule_refuses_embeddings_of_different_widths():
    with pytest.raises(ValueError, match="width"):
        pad_text_embeddings([torch.randn(2, 3), torch.randn(2, 4)])


# ---------------------------------------------------------------------------------------------
# The T5 cache


def test_t5_sidecars_hold_only_the_real_tokens_up_to_the_end_token(tiny_t5_model, t5_cached_template):
    tokenizer = _pipeline(tiny_t5_model).tokenizer
    captions = captions_of(t5_cached_template)
    lengths = set()
    for caption in captions:
        ids = tokenizer(caption.read_text(encoding="utf-8").strip()).input_ids
        assert ids[-1] == tokenizer.eos_token_id
        emb = sidecar.read_sidecar(text_sidecar(caption), "emb", ndim=2)
        assert emb.shape == (len(ids), 24)
        lengths.add(len(ids))
        metadata = sidecar.read_metadata(text_sidecar(caption))
        assert metadata["kind"] == "text_embedding_t5"
        assert metadata["max_length"] == str(tokenizer.model_max_length)  # default: the tokenizer's limit
        assert metadata["projection_class"] == "T5Projection"
    assert len(lengths) > 1, "the synthetic captions should differ in token length"
    empty = sidecar.read_sidecar(empty_prompt_path(str(t5_cached_template), sidecar.T5_SUFFIX), "emb")
    assert empty.shape == (1, 24)  # the empty prompt is just the end token


def test_a_captions_embedding_does_not_depend_on_the_batch_it_was_cached_in(tiny_t5_model, t5_cached_template,
                                                                             tmp_path):
    root = tmp_path / "data"
    shutil.copytree(t5_cached_template, root)
    assert cache_t5_embeddings(tiny_t5_model, root, "--overwrite", "--batch_size", "1") == 0
    for caption in captions_of(root)[:12]:
        alone = sidecar.read_sidecar(text_sidecar(caption), "emb")
        batched = sidecar.read_sidecar(text_sidecar(t5_cached_template / caption.relative_to(root)), "emb")
        torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-6)


def test_captions_are_encoded_in_order_of_token_length_so_batches_carry_little_padding(tiny_t5_model,
                                                                                       t5_cached_template):
    from cachetrain.cache.summary import CacheSummary
    from cachetrain.models.t5 import load_t5_text_parts
    from cachetrain.cache.t5_cache import T5EmbeddingBuilder

    tokenizer, text_encoder, projection = load_t5_text_parts(str(tiny_t5_model))
    builder = T5EmbeddingBuilder(tokenizer=tokenizer, text_encoder=text_encoder, model_name="tiny",
                                 device=torch.device("cpu"), dtype=torch.float32, save_dtype=torch.float32,
                                 batch_size=8, projection=projection)
    sources = sorted(str(p) for p in t5_cached_template.rglob("*.jpg"))
    lengths = [item.tensors["emb"].shape[0] for item in builder.encode(sources, CacheSummary())]
    assert len(lengths) == len(sources)
    assert lengths == sorted(lengths) and len(set(lengths)) > 1


def test_max_length_truncates_captions_and_a_changed_limit_makes_sidecars_stale(tiny_t5_model, t5_cached_template,
                                                                                 tmp_path):
    root = tmp_path / "data"
    shutil.copytree(t5_cached_template, root)
    assert cache_t5_embeddings(tiny_t5_model, root, "--max_length", "10") == 0
    for caption in captions_of(root):
        assert sidecar.read_sidecar(text_sidecar(caption), "emb").shape == (10, 24)
        assert sidecar.read_metadata(text_sidecar(caption))["max_length"] == "10"


def test_the_t5_cache_needs_only_the_tokenizer_text_encoder_and_projection(tiny_t5_model, t5_cached_template,
                                                                           tmp_path):
    text_only = tmp_path / "text-parts"
    shutil.copytree(tiny_t5_model, text_only)
    for part in ("unet", "vae", "scheduler"):
        shutil.rmtree(text_only / part)
    root = tmp_path / "data"
    shutil.copytree(t5_cached_template, root)
    assert cache_t5_embeddings(text_only, root, "--overwrite") == 0
    caption = captions_of(root)[0]
    torch.testing.assert_close(sidecar.read_sidecar(text_sidecar(caption), "emb"),
                               sidecar.read_sidecar(text_sidecar(t5_cached_template / caption.relative_to(root)), "emb"))


def test_the_t5_cache_says_what_is_missing_from_a_folder_that_is_not_a_t5_model(tmp_path, capsys):
    from cachetrain.cache.t5_cache import main

    (tmp_path / "data").mkdir()
    assert main(cache_args(tmp_path, tmp_path / "data")) == 2
    assert "no tokenizer, text_encoder, t5_projection subfolder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Train/sample consistency


def test_a_cached_caption_and_encode_prompt_give_the_same_unet_conditioning(tiny_t5_model, t5_cached_template):
    pipeline = _pipeline(tiny_t5_model)
    caption = captions_of(t5_cached_template)[0]
    batch = _collate_captions([caption])
    context, mask = pipeline.encode_prompt(_texts([caption]), device="cpu")
    assert batch.attention_mask is None and mask is None  # nothing to pad in a batch of one
    torch.testing.assert_close(batch.embeddings, context, rtol=1e-5, atol=1e-6)


def test_captions_of_different_lengths_are_padded_and_masked_alike_in_training_and_sampling(tiny_t5_model,
                                                                                           t5_cached_template):
    pipeline = _pipeline(tiny_t5_model)
    by_length = {}
    for caption in captions_of(t5_cached_template):
        by_length.setdefault(sidecar.read_sidecar(text_sidecar(caption), "emb").shape[0], caption)
    captions = [by_length[n] for n in sorted(by_length)][:3]
    assert len(captions) >= 2

    batch = _collate_captions(captions)
    context, mask = pipeline.encode_prompt(_texts(captions), device="cpu")
    assert batch.attention_mask is not None
    assert torch.equal(batch.attention_mask, mask)
    assert batch.attention_mask.sum(dim=1).tolist() == sorted(by_length)[:len(captions)]
    torch.testing.assert_close(batch.embeddings, context, rtol=1e-5, atol=1e-6)


def test_force_toklen_pads_or_truncates_every_caption_in_collate(t5_cached_template):
    captions = captions_of(t5_cached_template)[:4]
    lengths = [sidecar.read_sidecar(text_sidecar(c), "emb").shape[0] for c in captions]

    padded = _collate_captions(captions, token_length=40)
    assert padded.embeddings.shape == (4, 40, 24)
    assert padded.attention_mask.sum(dim=1).tolist() == lengths

    truncated = _collate_captions(captions, token_length=3)
    assert truncated.embeddings.shape == (4, 3, 24)
    assert truncated.attention_mask is None


def test_force_toklen_must_be_positive():
    from cachetrain.train.config import ConfigError, parse_train_args

    base = ["--pretrained_model", "m", "--train_data_dir", "d"]
    assert parse_train_args(base + ["--force_toklen", "77"]).force_toklen == 77
    assert parse_train_args(base).force_toklen is None
    with pytest.raises(ConfigError, match="--force_toklen"):
        parse_train_args(base + ["--force_toklen", "0"])


# ---------------------------------------------------------------------------------------------
# A folder published with its own projection code

DOUBLING_PROJECTION_CODE = '''
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class DoublingProjection(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_dim: int = 16, out_dim: int = 24):
        super().__init__()
        self.proj = torch.nn.Linear(in_dim, out_dim)

    def forward(self, states):
        return 2 * self.proj(states)
'''


@pytest.fixture
def custom_code_folder(tiny_t5_model, tmp_path):
    """The tiny T5 model with its projection replaced by the folder's own code (same weights, output x2)."""
    import json

    from cachetrain.models.t5 import T5Projection

    folder = tmp_path / "custom"
    shutil.copytree(tiny_t5_model, folder)
    shutil.rmtree(folder / "t5_projection")
    namespace: dict = {}
    exec(DOUBLING_PROJECTION_CODE, namespace)
    doubling = namespace["DoublingProjection"](16, 24)
    doubling.proj.load_state_dict(T5Projection.from_pretrained(tiny_t5_model, subfolder="t5_projection").linear.state_dict())
    doubling.save_pretrained(folder / "t5_projection")
    (folder / "t5_projection" / "doubling.py").write_text(DOUBLING_PROJECTION_CODE, encoding="utf-8")
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    index["t5_projection"] = ["doubling", "DoublingProjection"]
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    return folder


@pytest.mark.parametrize("custom_flag", [[], ["--custom"], ["--custom", "FOLDER"]],
                         ids=["implied", "bare --custom", "--custom FOLDER"])
def test_the_t5_cache_runs_a_folders_own_projection_code_as_custom_is_implied(custom_code_folder, t5_cached_template,
                                                                              tmp_path, custom_flag):
    from cachetrain.cache.t5_cache import main

    root = tmp_path / "data"
    shutil.copytree(t5_cached_template, root)
    flags = [str(custom_code_folder) if flag == "FOLDER" else flag for flag in custom_flag]
    model = "no/such-model" if "FOLDER" in custom_flag else custom_code_folder  # --custom FOLDER wins over --model
    assert main(cache_args(model, root, "--overwrite", *flags)) == 0
    caption = captions_of(root)[0]
    torch.testing.assert_close(sidecar.read_sidecar(text_sidecar(caption), "emb"),
                               2 * sidecar.read_sidecar(text_sidecar(t5_cached_template / caption.relative_to(root)), "emb"))


def test_a_folders_own_projection_code_is_not_run_by_other_loaders_without_trust(custom_code_folder):
    from cachetrain.models.t5 import load_t5_text_parts

    with pytest.raises(ValueError, match=r"t5_projection/doubling.py\); add --custom"):
        load_t5_text_parts(str(custom_code_folder))


def test_a_trusted_folders_projection_code_survives_a_save_and_reload(custom_code_folder, tmp_path):
    from cachetrain.models.t5 import StableDiffusionT5Pipeline

    original = StableDiffusionT5Pipeline.from_pretrained(custom_code_folder, trust_remote_code=True)
    assert type(original.t5_projection).__name__ == "DoublingProjection"
    original.save_pretrained(tmp_path / "saved")  # what every checkpoint of such a folder goes through
    assert (tmp_path / "saved" / "t5_projection" / "doubling.py").is_file()
    reloaded = StableDiffusionT5Pipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert type(reloaded.t5_projection).__name__ == "DoublingProjection"
    prompt = "a red circle on a blue background"
    torch.testing.assert_close(reloaded.encode_prompt(prompt, device="cpu")[0],
                               original.encode_prompt(prompt, device="cpu")[0])


def _unet_conditioning_while_sampling(pipeline, prompt: str, **sample_options) -> torch.Tensor:
    """The encoder_hidden_states the UNet receives when draw_samples draws ``prompt``."""
    import tempfile
    from pathlib import Path

    from cachetrain.models.sampling import draw_samples, read_sample_metadata

    seen = []
    hook = pipeline.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)),
        with_kwargs=True)
    try:
        with tempfile.TemporaryDirectory() as out:
            [png] = draw_samples(pipeline, [prompt], Path(out), step=0, seed=0, sampler_steps=1, guidance_scale=1.0,
                                 device=torch.device("cpu"), **sample_options)
            assert read_sample_metadata(png).token_length == sample_options.get("token_length")
    finally:
        hook.remove()
    return seen[0]


def test_force_toklen_conditions_the_unet_alike_in_training_and_sampling(tiny_t5_model, t5_cached_template):
    pipeline = _pipeline(tiny_t5_model)
    caption = max(captions_of(t5_cached_template),
                  key=lambda c: sidecar.read_sidecar(text_sidecar(c), "emb").shape[0])
    full_length = sidecar.read_sidecar(text_sidecar(caption), "emb").shape[0]
    for length in (3, full_length + 5):  # truncated, and padded with masked zeros
        trained_on = _collate_captions([caption], token_length=length)
        context, mask = pipeline.encode_prompt(_texts([caption]), device="cpu", token_length=length)
        torch.testing.assert_close(trained_on.embeddings, context, rtol=1e-5, atol=1e-6)
        assert (mask is None) == (trained_on.attention_mask is None) == (length < full_length)
        sampled_on = _unet_conditioning_while_sampling(pipeline, _texts([caption])[0], token_length=length)
        torch.testing.assert_close(sampled_on, trained_on.embeddings, rtol=1e-5, atol=1e-6)


def test_force_toklen_truncates_the_clip_conditioning_of_sd15_samples(tiny_sd_model):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_model, safety_checker=None)
    full, _ = pipeline.encode_prompt("a red circle", torch.device("cpu"), 1, False)
    assert _unet_conditioning_while_sampling(pipeline, "a red circle").shape[1] == full.shape[1]
    truncated = _unet_conditioning_while_sampling(pipeline, "a red circle", token_length=20)
    torch.testing.assert_close(truncated, full[:, :20])
    # a length beyond CLIP's 77 would only add masked padding: the prompt is encoded as usual
    assert torch.equal(_unet_conditioning_while_sampling(pipeline, "a red circle", token_length=100), full)
