"""The adapter ready to share, on the tiny LLaVA: the model card and the hub id in
adapter_config.json, LoRA targets by pattern, `export_adapter`, and TensorBoard
tracking stored with the run (train.report_to).

Two trained runs: one with a hub id, a license and report_to tensorboard; one as a
pod-local model would be (no hub id), report_to none, with train.merge_adapter.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor

from mia_dpo.config import ModelConfig, RunConfig, StoreConfig, load_config
from mia_dpo.errors import UserError
from mia_dpo.export.adapter import export_adapter
from mia_dpo.models.prompting import chat_text
from mia_dpo.records import Task
from mia_dpo.report_html import write_report
from mia_dpo.runtime.store import BlobReader, LocalStore
from mia_dpo.stages.train import run_shard
from mia_dpo.training import trainers
from tests.families.factory import FAMILIES
from tests.stages.test_train import PROMPT, SMALL, TRAIN, make_ctx, pair_lines

HUB_ID = "llava-hf/llava-1.5-7b-hf"


def config(model_dir: Path, model: dict[str, Any] | None = None, **train: Any) -> RunConfig:
    return RunConfig.model_validate(
        {
            "seed": 3,
            "model": {"path": str(model_dir), "device": "cpu", **(model or {})},
            "train": SMALL | train,
        }
    )


def trained(root: Path, cfg: RunConfig):  # type: ignore[no-untyped-def]
    ctx = make_ctx(root, cfg, pair_lines(root / "img", 6))
    run_shard(Task.make("r1", "train", 0), ctx)
    return ctx.store, ctx.store.get_json(TRAIN + "metadata.json")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    cfg = config(tiny_model_dir, {"hub_id": HUB_ID, "license": "llama2"}, report_to="tensorboard")
    return trained(tmp_path_factory.mktemp("tracked"), cfg)


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    return trained(tmp_path_factory.mktemp("local"), config(tiny_model_dir, merge_adapter=True))


def front_matter(card: str) -> dict[str, Any]:
    m = re.match(r"---\n(.*?)\n---\n", card, flags=re.S)
    assert m, card[:200]
    return yaml.safe_load(m.group(1))


def square(colour: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (64, 64), (240, 240, 240))
    ImageDraw.Draw(img).rectangle([16, 16, 47, 47], fill=colour)
    return img


def losses(meta: dict) -> list[float]:
    return [h["loss"] for h in meta["log_history"] if "loss" in h]


# --- the card and the base model id -------------------------------------------------


def test_card_and_adapter_config_name_the_hub_id(tracked, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    store, meta = tracked
    assert meta["base_model"] == str(tiny_model_dir) and meta["base_model_hub_id"] == HUB_ID
    adapter_config = store.get_json(TRAIN + "adapter/adapter_config.json")
    assert adapter_config["base_model_name_or_path"] == HUB_ID
    card = store.get_text(TRAIN + "adapter/README.md")
    head = front_matter(card)
    assert head["base_model"] == HUB_ID and head["library_name"] == "peft"
    assert head["license"] == "llama2"
    assert set(head["tags"]) == {"dpo", "lora", "mia-dpo", "trl"}
    # Numbers from this run's records.
    assert f"| sequence | {meta['pairs']['per_format']['sequence']} |" in card
    assert f"| steps | {meta['steps']} |" in card
    assert f"| final loss | {meta['final_loss']:.4g} |" in card
    assert (
        f"| LoRA r / alpha / dropout | {SMALL['lora_r']} / {SMALL['lora_alpha']} / 0.05 |" in card
    )
    assert f"| trl | {meta['versions']['trl']} |" in card
    assert "Not evaluated" in card


def test_local_base_keeps_its_path_and_the_card_says_so(local, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    store, meta = local
    assert meta["base_model_hub_id"] is None
    adapter_config = store.get_json(TRAIN + "adapter/adapter_config.json")
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    card = store.get_text(TRAIN + "adapter/README.md")
    assert "base_model" not in front_matter(card) and "a local model" in card
    assert str(tiny_model_dir) in card


def test_hub_id_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ModelConfig(path=HUB_ID).base_model_id() == HUB_ID
    assert ModelConfig(path="/models/llava", hub_id=HUB_ID).base_model_id() == HUB_ID
    assert ModelConfig(path="/models/llava").base_model_id() is None
    (tmp_path / "owner" / "name").mkdir(parents=True)  # a local folder that reads as an id
    assert ModelConfig(path="owner/name").base_model_id() is None
    with pytest.raises(UserError, match=r"^config: model\.hub_id: not a hub id") as e:
        load_config(None, {"model.hub_id": "no-owner"})
    assert "\n" not in str(e.value)


# --- LoRA targets by pattern ----------------------------------------------------------


def test_lora_pattern_matches_exactly_the_full_names(tracked, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    store, meta = tracked
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    targets = trainers.lora_targets(model)
    assert isinstance(targets.target_modules, str)
    assert targets.matched == trainers.lora_target_modules(model)
    assert meta["lora_target_pattern"] == targets.target_modules
    assert meta["lora_target_count"] == len(targets.matched) == 28
    assert meta["lora_target_modules"] == targets.matched
    adapter_config = store.get_json(TRAIN + "adapter/adapter_config.json")
    assert adapter_config["target_modules"] == targets.target_modules
    weights = load_file(Path(store.uri(TRAIN + "adapter/adapter_model.safetensors")))
    trained_modules = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in weights}
    assert trained_modules == set(targets.matched)


class _OldLayout(nn.Module):
    """LLaVA as transformers 4.x laid it out: language_model.model.layers.N,
    language_model.lm_head, vision_tower and multi_modal_projector at the top."""

    def __init__(self, new: nn.Module) -> None:
        super().__init__()
        self.vision_tower = new.model.vision_tower
        self.multi_modal_projector = new.model.multi_modal_projector
        self.language_model = nn.Module()
        self.language_model.model = new.model.language_model
        self.language_model.lm_head = new.lm_head


def _old_name(name: str) -> str:
    return name.replace("model.language_model.", "language_model.model.", 1)


def test_lora_pattern_still_matches_when_the_language_model_moves(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    targets = trainers.lora_targets(model)
    expected = {_old_name(n) for n in targets.matched}
    old = _OldLayout(model)
    names = [n for n, _ in old.named_modules()]
    assert expected <= set(names) and not any(n.startswith("model.") for n in names)
    assert not set(targets.matched) & set(names)  # the full-name list would match nothing
    # PEFT itself, on the moved layout: the pattern wraps exactly the same layers.
    peft_model = get_peft_model(old, LoraConfig(r=2, target_modules=targets.target_modules))
    wrapped = {
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and not n.endswith((".lora_A", ".lora_B"))
    }
    assert wrapped == expected
    assert not any(w in n for n in wrapped for w in ("vision", "projector", "lm_head"))


# --- tracking -------------------------------------------------------------------------


def test_tensorboard_events_in_the_store_hold_the_loss(tracked, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, meta = tracked
    prefix = TRAIN + "tensorboard/"
    keys = list(store.list(prefix))
    assert keys and all("events.out.tfevents" in k for k in keys)
    assert meta["report_to"] == ["tensorboard"] and meta["outputs"]["tensorboard"] == prefix
    for key in keys:
        dest = tmp_path / key[len(prefix) :]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(store.get_bytes(key))
    acc = EventAccumulator(str(dest.parent))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"]
    logged = [e.value for e in acc.Scalars("train/loss")]
    assert logged == pytest.approx(losses(meta), rel=1e-5)


def test_report_to_none_leaves_no_event_files(local) -> None:  # type: ignore[no-untyped-def]
    store, meta = local
    assert list(store.list(TRAIN + "tensorboard/")) == []
    assert meta["report_to"] == [] and meta["outputs"]["tensorboard"] is None


def test_report_to_is_validated() -> None:
    assert load_config(None, {"train.report_to": "tensorboard"}).train.report_to == ["tensorboard"]
    assert load_config(None).train.trackers == []
    with pytest.raises(UserError, match=r"^config: train\.report_to: 'comet' is not a tracker"):
        load_config(None, {"train.report_to": ["wandb", "comet"]})


def test_a_missing_tracker_package_is_a_one_line_user_error(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    ctx = make_ctx(tmp_path, config(tiny_model_dir, report_to="wandb"), pair_lines(tmp_path, 2))
    with pytest.raises(UserError) as e:
        run_shard(Task.make("r1", "train", 0), ctx)
    assert str(e.value).startswith("train.report_to: wandb is not installed")
    assert "pip install wandb" in str(e.value) and "\n" not in str(e.value)


def test_html_report_links_the_tensorboard_logs(tracked, local, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, _ = tracked
    page = write_report(store, BlobReader(StoreConfig()), "r1", tmp_path / "a.html").read_text()
    logdir = store.uri(TRAIN + "tensorboard")
    assert f"tensorboard --logdir {logdir}" in page and 'href="file://' in page
    other, _ = local
    page = write_report(other, BlobReader(StoreConfig()), "r1", tmp_path / "b.html").read_text()
    assert "tensorboard --logdir" not in page


# --- export_adapter -------------------------------------------------------------------


def test_exported_folder_alone_loads_with_plain_peft(tracked, tiny_model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, _ = tracked
    cfg = config(tiny_model_dir, {"hub_id": HUB_ID})
    out = export_adapter(cfg, "r1", store, tmp_path / "out", merged=True)
    names = {p.name for p in out.iterdir()}
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= names
    assert {"processor_config.json", "tokenizer.json"} <= names
    assert "training_args.bin" not in names  # a pickle: left out of what is shared
    assert not list(tmp_path.glob(".out.partial-*"))
    assert front_matter((out / "README.md").read_text())["base_model"] == HUB_ID
    stored = load_file(Path(store.uri(TRAIN + "adapter/adapter_model.safetensors")))
    exported = load_file(out / "adapter_model.safetensors")
    assert stored.keys() == exported.keys()
    assert all(torch.equal(stored[k], exported[k]) for k in stored)

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, out).eval()
    processor = AutoProcessor.from_pretrained(out)
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(lora) == len(stored)
    images = [square(c) for c in ((220, 30, 30), (30, 60, 220))]
    inputs = processor(text=[chat_text(processor, PROMPT)], images=images, return_tensors="pt")
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        adapted = model(**inputs).logits
        assert torch.allclose(merged(**inputs).logits, adapted, atol=1e-4)
        with model.disable_adapter():
            assert (model(**inputs).logits - adapted).abs().max() > 1e-4


def test_export_copies_the_stored_merged_model(local, tiny_model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store, _ = local
    out = export_adapter(config(tiny_model_dir), "r1", store, tmp_path / "x", merged=True)
    for key in store.list(TRAIN + "merged/"):
        assert (out / "merged" / key[len(TRAIN + "merged/") :]).read_bytes() == store.get_bytes(key)
    config_json = json.loads((out / "adapter_config.json").read_text())
    assert config_json["base_model_name_or_path"] == str(tiny_model_dir)


def test_export_refuses_an_untrained_run_and_a_full_folder(
    tracked, tiny_model_dir, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    store, _ = tracked
    cfg = config(tiny_model_dir)
    with pytest.raises(UserError, match=r"^run 'nope' is not trained yet: ") as e:
        export_adapter(cfg, "nope", store, tmp_path / "a", merged=False)
    assert "\n" not in str(e.value)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UserError, match=r"^export --out .*full: not empty"):
        export_adapter(cfg, "r1", store, tmp_path / "full", merged=False)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_adapter(cfg, "r1", store, empty, merged=False) / "README.md").is_file()
    assert LocalStore(tmp_path).exists("empty/adapter_config.json")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_targets_its_language_model_only(family: str, tmp_path: Path) -> None:
    """Mllama's text layers interleave cross-attention layers (no self_attn): the layer
    lookup must still find them, not the vision encoder's (the pipeline refuses Mllama
    today, but the targets must not depend on that)."""
    model = AutoModelForImageTextToText.from_pretrained(FAMILIES[family](tmp_path / family))
    targets = trainers.lora_targets(model)
    assert isinstance(targets.target_modules, str) and targets.matched
    linear = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(targets.matched) <= linear
    text = model.get_decoder()
    text_prefix = next(n for n, m in model.named_modules() if m is text)
    assert all(n.startswith(text_prefix + ".layers.") for n in targets.matched)
    in_text = {n for n in linear if n.startswith(text_prefix + ".layers.")}
    assert set(targets.matched) == in_text  # every linear layer of the decoder layers
