"""One layer's attention captured under sdpa equals what eager reports for that layer.

A tiny LLaVA (CLIP tower 32 px / 8 px patches -> 16 image tokens, Llama with GQA)
is built here from config; the same weights run once with eager and
``output_attentions=True`` as the reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mia_dpo.models import attention as attention_mod
from mia_dpo.models.attention import (
    CAPTURE_IMPLEMENTATION,
    AttentionProbe,
    capture_attention_forward,
    capture_layer_attention,
    decoder_layers,
)

IMAGE_TOKEN = 63
TOKENS_PER_IMAGE = 16
N_LAYERS = 4


def tiny_config() -> LlavaConfig:
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        ),
        text_config=LlamaConfig(
            vocab_size=64,
            hidden_size=64,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,  # GQA: 2 query heads per key/value head
            intermediate_size=128,
            max_position_embeddings=512,
        ),
        image_token_id=IMAGE_TOKEN,
        image_seq_length=TOKENS_PER_IMAGE,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )


def build(attn: str, state: dict[str, torch.Tensor] | None = None) -> LlavaForConditionalGeneration:
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(tiny_config(), attn_implementation=attn)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> tuple[LlavaForConditionalGeneration, LlavaForConditionalGeneration]:
    sdpa = build("sdpa")
    eager = build("eager", sdpa.state_dict())
    return sdpa, eager


def sequence(n_images: int, gen: torch.Generator) -> list[int]:
    """Text, then per image a short label and its 16 image tokens, a question, a response."""
    ids = torch.randint(1, IMAGE_TOKEN, (3,), generator=gen).tolist()
    for _ in range(n_images):
        ids += torch.randint(1, IMAGE_TOKEN, (2,), generator=gen).tolist()
        ids += [IMAGE_TOKEN] * TOKENS_PER_IMAGE
    ids += torch.randint(1, IMAGE_TOKEN, (4 + n_images,), generator=gen).tolist()
    return ids


def make_inputs(image_counts: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded batch (as batched generation pads), positions as generate() makes them."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [sequence(n, gen) for n in image_counts]
    width = max(len(s) for s in seqs)
    input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "pixel_values": torch.randn(sum(image_counts), 3, 32, 32, generator=gen),
    }


BATCHES = {"b1": [3], "b3": [1, 4, 2]}


def test_sdpa_model_runs(models) -> None:
    sdpa, _ = models
    inputs = make_inputs(BATCHES["b3"])
    with torch.no_grad():
        out = sdpa(**inputs)
    assert out.logits.shape == (3, inputs["input_ids"].shape[1], 64)
    assert torch.isfinite(out.logits).all()


def test_decoder_layers_finds_the_language_model(models) -> None:
    sdpa, _ = models
    layers = decoder_layers(sdpa)
    assert layers is sdpa.model.language_model.layers
    assert len(layers) == N_LAYERS
    assert layers[0].self_attn.num_key_value_groups == 2


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("layer", [0, 2, 3])
def test_probe_matches_eager_attentions(models, monkeypatch, batch: str, layer: int) -> None:
    sdpa, eager = models
    masks: list[torch.dtype | None] = []
    original = attention_mod._row_weights

    def recording(module, query, key, mask, *args, **kwargs):  # type: ignore[no-untyped-def]
        masks.append(None if mask is None else mask.dtype)
        return original(module, query, key, mask, *args, **kwargs)

    monkeypatch.setattr(attention_mod, "_row_weights", recording)
    inputs = make_inputs(BATCHES[batch], seed=layer)
    width = inputs["input_ids"].shape[1]
    # rows from the middle (inside the left padding of the shorter rows) to the end
    r0, r1 = width // 3, width
    got = capture_layer_attention(sdpa, inputs, layer, (r0, r1))  # (B, R, T)
    # no padding: sdpa gets no mask (is_causal), the probe applies the causal rule itself
    assert masks == ([None] if batch == "b1" else [torch.bool])
    assert got.dtype == torch.float32
    assert got.shape == (len(BATCHES[batch]), r1 - r0, width)
    with torch.no_grad():
        ref = eager(**inputs, output_attentions=True).attentions[layer]  # (B, H, T, T)
    ref = ref.mean(1)[:, r0:r1, :]  # (B, R, T)
    real = inputs["attention_mask"][:, r0:r1].bool()  # (B, R): rows of real tokens
    if batch == "b3":
        assert not real.all(), "the rows should include padding of the shorter sequences"
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-4)
    # real rows are distributions over real keys only
    torch.testing.assert_close(got[real].sum(-1), torch.ones(int(real.sum())))
    keys = inputs["attention_mask"].bool()[:, None, :].expand_as(got)  # (B, R, T)
    assert (got[~keys] == 0).all()


def test_probe_leaves_logits_and_implementation_unchanged(models) -> None:
    sdpa, _ = models
    inputs = make_inputs(BATCHES["b3"], seed=7)
    with torch.no_grad():
        plain = sdpa(**inputs).logits
        with AttentionProbe(sdpa, 1, (5, 20)) as probe:
            assert sdpa.config.text_config._attn_implementation == CAPTURE_IMPLEMENTATION
            assert sdpa.config.vision_config._attn_implementation == "sdpa"
            probed = sdpa(**inputs).logits
    torch.testing.assert_close(probed, plain, atol=1e-6, rtol=0)
    assert probe.weights.shape == (3, 15, inputs["input_ids"].shape[1])
    assert sdpa.config._attn_implementation == "sdpa"
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    assert sdpa.config.vision_config._attn_implementation == "sdpa"
    assert not hasattr(decoder_layers(sdpa)[1].self_attn, "_mia_probe")


def test_probe_on_eager_model_restores_eager(models) -> None:
    _, eager = models
    inputs = make_inputs(BATCHES["b1"])
    got = capture_layer_attention(eager, inputs, 2, (10, 30))
    assert eager.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        ref = eager(**inputs, output_attentions=True).attentions[2].mean(1)[:, 10:30]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_implementation_restored_after_an_error(models) -> None:
    sdpa, _ = models
    with pytest.raises(RuntimeError, match="boom"), AttentionProbe(sdpa, 0, (0, 4)):
        raise RuntimeError("boom")
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    assert not hasattr(decoder_layers(sdpa)[0].self_attn, "_mia_probe")


def test_only_one_layer_is_computed_and_no_attentions_returned(models, monkeypatch) -> None:
    sdpa, _ = models
    seen: list[int] = []
    original = attention_mod._row_weights

    def counting(module, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(module.layer_idx)
        return original(module, *args, **kwargs)

    monkeypatch.setattr(attention_mod, "_row_weights", counting)
    inputs = make_inputs(BATCHES["b3"], seed=3)
    with torch.no_grad(), AttentionProbe(sdpa, 2, (0, 10)) as probe:
        out = sdpa(**inputs, use_cache=False)
    assert seen == [2]
    assert probe.calls == 1
    assert not out.attentions  # None or empty: no layer's full attention was kept


def test_bad_layer_or_rows_raise(models) -> None:
    sdpa, _ = models
    for layer in (-1, N_LAYERS, 100):
        with pytest.raises(ValueError, match="out of range"):
            AttentionProbe(sdpa, layer, (0, 1))
    with pytest.raises(ValueError, match="rows"):
        AttentionProbe(sdpa, 0, (5, 5))
    inputs = make_inputs(BATCHES["b1"])
    width = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match="outside"):
        capture_layer_attention(sdpa, inputs, 0, (0, width + 1))
    assert sdpa.config.text_config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="no forward pass"):
        _ = AttentionProbe(sdpa, 0, (0, 1)).weights


class FakeAttention(nn.Module):
    """What the capture function reads from an attention module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def reference_rows(q, k, mask_add, rows):  # type: ignore[no-untyped-def]
    """Eager-style weights with an additive (B, 1, Q, T) mask: (B, R, T)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + mask_add
    return torch.softmax(scores, -1).mean(1)[:, rows[0] : rows[1]]


@pytest.mark.parametrize("form", ["none", "bool", "float"])
def test_capture_function_mask_forms(form: str) -> None:
    gen = torch.Generator().manual_seed(1)
    b, h, h_kv, t, d = 2, 4, 2, 9, 8
    q = torch.randn(b, h, t, d, generator=gen)
    k = torch.randn(b, h_kv, t, d, generator=gen)
    v = torch.randn(b, h_kv, t, d, generator=gen)
    causal = torch.ones(t, t).tril().bool()
    allowed = causal[None, None].expand(b, 1, t, t).clone()  # (B, 1, Q, T)
    if form != "none":
        allowed[1, :, :, :3] = False  # row 1 left-padded by 3
        allowed[1, :, :3, :3] = causal[:3, :3]  # keep padded rows non-empty for the reference
    mask_add = torch.zeros(b, 1, t, t).masked_fill(~allowed, torch.finfo(torch.float32).min)
    mask = {"none": None, "bool": allowed, "float": mask_add}[form]
    module = FakeAttention(h // h_kv)
    probe = AttentionProbe.__new__(AttentionProbe)
    probe.rows, probe.calls, probe._weights = (2, 7), 0, {}
    probe.layers, probe._attns = [0], [module]
    module._mia_probe = probe
    out, none = capture_attention_forward(module, q, k, v, mask, scaling=d**-0.5)
    ref_out, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=d**-0.5)
    assert none is None
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(probe.weights, reference_rows(q, k, mask_add, (2, 7)))
    assert probe.calls == 1


def test_several_layers_in_one_pass_equal_one_layer_each(models) -> None:
    from mia_dpo.models.attention import capture_layers_attention

    sdpa, _ = models
    inputs = make_inputs(BATCHES["b3"], seed=7)
    width = inputs["input_ids"].shape[1]
    rows = (width // 2, width)
    together = capture_layers_attention(sdpa, inputs, [3, 0, 2], rows)
    assert len(together) == 3
    for layer, got in zip([3, 0, 2], together, strict=True):
        alone = capture_layer_attention(sdpa, inputs, layer, rows)
        torch.testing.assert_close(got, alone, rtol=0, atol=0)
    assert not torch.equal(together[0], together[1])  # each layer its own weights
    assert not any(hasattr(layer.self_attn, "_mia_probe") for layer in decoder_layers(sdpa))
