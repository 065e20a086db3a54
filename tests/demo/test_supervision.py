"""Attention supervision of the demo's base model: the loss equals the score stage's
target share on a hand-built attention map, and one gradient step on it moves a real
tiny model's attention at the supervised layer towards the target image."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mia_dpo.cli import main
from mia_dpo.demo.base_model import _pixels, collate, encode_example
from mia_dpo.demo.base_recipe import (
    BaseParams,
    group_by_source,
    read_records,
    sample_example,
    target_position,
)
from mia_dpo.demo.supervision import layers_share_loss, target_share_loss
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.models.ratios import sequence_ratio

IMG = 9  # image token id of the hand-built rows


def test_loss_is_minus_log_of_the_score_stages_target_share() -> None:
    # prompt: text, 2 tokens of image 1, text, 2 tokens of image 2, text; answer: 2 tokens
    ids = torch.tensor([[1, IMG, IMG, 2, IMG, IMG, 3, 4, 5, 6]])
    labels = torch.full_like(ids, -100)
    labels[0, 8:] = ids[0, 8:]  # rows 7 and 8 predict the answer
    attn = torch.full((1, 2, 10, 10), 0.01)
    # head 0 / head 1, rows 7-8: image 1's tokens get 0.3 and 0.1, image 2's 0.05 each
    attn[0, 0, 7:9, [1, 2]] = torch.tensor([0.3, 0.1])
    attn[0, 1, 7:9, [1, 2]] = torch.tensor([0.1, 0.3])
    attn[0, :, 7:9, [4, 5]] = 0.05
    attn[0, :, 6, [4, 5]] = 0.9  # a prompt row: not read
    loss = target_share_loss(attn, ids, labels, IMG, 2, [1])
    # per image mean over its tokens: image 1 0.2, image 2 0.05 -> share 0.8
    assert loss.item() == pytest.approx(-math.log(0.8))
    weights = attn[0].mean(0)[7:9].mean(0)[[1, 2, 4, 5]].numpy()
    assert sequence_ratio(weights, [(0, 2), (2, 4)], 1) == pytest.approx(0.8)
    assert target_share_loss(attn, ids, labels, IMG, 2, [2]).item() == pytest.approx(-math.log(0.2))
    # several layers: the mean of each layer's loss (here layer 1 is uniform: share 0.5)
    uniform = torch.full_like(attn, 0.1)
    inputs = {"input_ids": ids, "labels": labels}
    both = layers_share_loss([attn, uniform], inputs, IMG, 2, [1], (0, 1))
    assert both.item() == pytest.approx((-math.log(0.8) - math.log(0.5)) / 2)


def test_supervision_is_the_recipe_and_names_a_real_layer() -> None:
    # the demo's base (run N): layer 1 supervised, the answer then follows the routing
    assert (BaseParams().attention_supervision, BaseParams().supervised_layers) == (5.0, (1,))
    assert BaseParams(attention_supervision=0).attention_supervision == 0.0  # off
    with pytest.raises(ValueError, match=r"supervised_layers \[4\]"):
        BaseParams(supervised_layers=(1, 4), attention_supervision=1.0)


def test_one_step_on_the_loss_moves_attention_to_the_target(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(
        tiny_model_dir, attn_implementation="eager"
    )
    side = processor.image_processor.crop_size["height"]
    records = read_records(write_synthetic(tmp_path / "syn", 40, seed=3, image_px=side))
    rng = random.Random(0)
    batch = [
        sample_example(rng, records, group_by_source(records), 2, distinct=True) for _ in range(4)
    ]
    encoded = [encode_example(processor, prompt, answer) for prompt, answer, _ in batch]
    pixels = [_pixels(processor, records[i][0]) for _, _, idx in batch for i in idx]
    inputs = collate(encoded, pixels, processor.tokenizer.pad_token_id)
    targets = [target_position(prompt) for prompt, _, _ in batch]
    layer = 1

    def aux() -> torch.Tensor:
        out = model(**inputs, output_attentions=True)
        args = (inputs["input_ids"], inputs["labels"], model.config.image_token_id, 2, targets)
        return target_share_loss(out.attentions[layer], *args)

    before = aux()
    before.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    # the loss reaches the layer's query / key projections and the vision side feeding it
    moved = {n for n, g in grads.items() if g.abs().sum() > 0}
    assert any(f"language_model.layers.{layer}.self_attn.q_proj" in n for n in moved)
    assert any("vision_tower" in n for n in moved)
    assert not any(f"language_model.layers.{layer + 1}." in n for n in moved)  # past it
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    with torch.no_grad():
        after = aux()
    assert after.item() < before.item()  # the target's share grew


def test_cli_refuses_a_layer_the_model_lacks_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "base"
    argv = ["base-model", "--out", str(out), "--attention-supervision", "1"]
    assert main([*argv, "--supervised-layer", "1", "--supervised-layer", "7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "mia-dpo: error: base-model: (top level): supervised_layers [7] are not layers of the "
        "4 decoder layers"
    )
    assert main([*argv[:3], "--attention-supervision", "-1"]) == 2
    assert "attention_supervision: Input should be greater than or equal to 0" in (
        capsys.readouterr().err
    )
    assert not out.exists()  # refused before any training


def test_cli_sets_other_recipe_fields_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mia_dpo.demo import base_model

    seen: list[dict] = []

    def fake_ensure(out: Path, **params: object) -> Path:
        seen.append(params)
        return out

    monkeypatch.setattr(base_model, "ensure_base_model", fake_ensure)
    monkeypatch.setattr(base_model, "read_report", lambda out: None)  # stops after the call
    argv = ["base-model", "--out", str(tmp_path), "--attention-supervision", "5"]
    main([*argv, "--supervised-layer", "1", "--set", "lr=0.001", "--set", "schedule_steps=4000"])
    assert seen == [
        {
            "lr": 0.001,
            "schedule_steps": 4000,
            "seed": 0,
            "attention_supervision": 5.0,
            "supervised_layers": (1,),
        }
    ]
    capsys.readouterr()
    assert main([*argv, "--set", "lr"]) == 2
    assert capsys.readouterr().err.strip() == "mia-dpo: error: --set lr: expected FIELD=VALUE"
    assert main([*argv, "--set", "lrr=0.1"]) == 2
    assert capsys.readouterr().err.strip() == "mia-dpo: error: base-model: lrr: unknown key"
    assert len(seen) == 1  # refused before any training
