"""The evaluate stage on the tiny LLaVA: a held-out benchmark built by the augment
code, base vs base + LoRA adapter on identical items, and the accuracy report.

Real inputs: synthetic data planned by the controller with a hold-out fraction
(augment stage only), then `evaluate.run_shard` called directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForImageTextToText, AutoProcessor

from mia_dpo.augmentation.sampler import choose_format, sample_rng
from mia_dpo.config import RunConfig, load_config
from mia_dpo.controller import Controller
from mia_dpo.data.source import SourceSample, SourceTurn
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.errors import SampleError
from mia_dpo.evaluation import (
    EvalItem,
    EvalReport,
    Prediction,
    accuracy_cells,
    evaluate_models,
    format_report,
    items_digest,
)
from mia_dpo.records import AugmentedSample, ShardStats, Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import DropLog, StageContext
from mia_dpo.runtime.queue import MemoryQueue
from mia_dpo.runtime.store import BlobReader, LocalStore
from mia_dpo.stages import get_stage
from mia_dpo.stages.evaluate import (
    blob_images,
    build_benchmark,
    read_items,
    run_shard,
)

N_SOURCE = 90  # 0.3 held out: 5 to 10 images per sub-source, enough for the mix below
FORMATS = ("sequence", "grid", "pic_in_pic")


@dataclass
class Env:
    store: LocalStore
    overrides: dict
    data: list[dict]  # the source records

    def config(self, extra: dict | None = None) -> RunConfig:
        return load_config(None, overrides={**self.overrides, **(extra or {})})

    def ctx(self, extra: dict | None = None) -> StageContext:
        cfg = self.config(extra)
        return StageContext(store=self.store, blobs=BlobReader(cfg.store), config=cfg)

    def plan(self, run_id: str) -> None:
        cfg = self.config()
        Controller(
            cfg, run_id, self.store, MemoryQueue(cfg.queue), stages=get_stage, progress=False
        ).run()

    def evaluate(self, run_id: str, extra: dict | None = None) -> ShardStats:
        return run_shard(Task.make(run_id, "evaluate", 0), self.ctx(extra))

    def held_out(self, run_id: str) -> list[dict]:
        return [json.loads(r)["raw"] for r in self.store.get_jsonl(layout.holdout_key(run_id))]

    def augmented(self, run_id: str) -> list[AugmentedSample]:
        n = self.store.get_json(layout.plan_key(run_id))["n_shards"]
        return [
            AugmentedSample.model_validate_json(r)
            for i in range(n)
            for r in self.store.get_jsonl(layout.shard_key(run_id, "augment", i))
        ]

    def predictions(self, run_id: str) -> list[Prediction]:
        rows = self.store.get_jsonl(f"runs/{run_id}/evaluate/predictions.jsonl")
        return [Prediction.model_validate_json(r) for r in rows]

    def report(self, run_id: str) -> EvalReport:
        return EvalReport.model_validate(self.store.get_json(f"runs/{run_id}/evaluate/report.json"))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Env:
    base = tmp_path_factory.mktemp("evaluate")
    data_path = write_synthetic(base / "src", N_SOURCE, seed=5)
    overrides = {
        "input.path": str(data_path),
        "input.image_root": str(base / "src" / "images"),
        "input.holdout_fraction": 0.3,
        "store.root": str(base / "store"),
        "input.shard_size": 100,
        "stages": ["augment"],
        "model.path": str(tiny_model_dir),
        "augment.grid_tile_px": 64,
        "augment.grid_margin_px": 16,
        "augment.grid_label_font_px": 12,
        # Within what 5+ held-out images per sub-source can supply as distractors.
        "augment.grid_counts": {2: 1, 3: 1, 4: 1, 6: 0, 9: 0},
        "evaluate.max_new_tokens": 4,
        "evaluate.batch_size": 8,
    }
    e = Env(LocalStore(base / "store"), overrides, json.loads(data_path.read_text()))
    for run_id in ("noad", "withad", "adonly"):
        e.plan(run_id)
    return e


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A LoRA adapter on the language model's attention whose B matrices are non-zero,
    so it really changes the model (a fresh LoRA is the identity: B = 0)."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 2.0)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


def upload_adapter(env: Env, run_id: str, adapter_dir: Path) -> None:
    for path in adapter_dir.iterdir():
        env.store.put_bytes(
            layout.adapter_prefix(layout.train_prefix(run_id)) + path.name, path.read_bytes()
        )


# --- the benchmark ------------------------------------------------------------------


def test_benchmark_shares_nothing_with_training(env: Env) -> None:
    held = env.held_out("noad")
    items = build_benchmark(env.ctx(), "noad", DropLog(ShardStats(stage="evaluate", shard=0)))
    train = env.augmented("noad")
    assert held and items and train
    eval_ids = {it.source_id for it in items}
    assert eval_ids == {r["id"] for r in held}
    assert not eval_ids & {s.source_id for s in train}
    # Distractors come only from held-out images, never from the training side.
    held_images = {r["image"] for r in held}
    train_images = {s.target_image for s in train} | {d for s in train for d in s.distractor_images}
    used = {d for it in items for d in it.distractor_images}
    assert used and used <= held_images and not used & train_images
    for it in items:
        if it.format in ("grid", "pic_in_pic"):
            assert "/runs/noad/evaluate/images/" in it.images[0]


def test_items_per_format_with_source_answers(env: Env) -> None:
    items = build_benchmark(
        env.ctx(), "noad", DropLog(stats := ShardStats(stage="evaluate", shard=0))
    )
    held = {r["id"]: r for r in env.held_out("noad")}
    assert not stats.dropped  # the grid mix above fits the held-out pools
    by_kind: dict[str, set[str]] = {}
    for it in items:
        by_kind.setdefault(it.format, set()).add(it.source_id)
        source = held[it.source_id]
        question = source["conversations"][0]["value"].replace("<image>", "").strip()
        assert it.answer == source["conversations"][1]["value"]
        assert it.id == f"{it.source_id}-{it.format}"
        assert it.prompt.count("<image>") == len(it.images)
        assert question[1:] in it.prompt  # rewritten around the first letter, never replaced
        if it.format == "single":
            assert it.prompt == f"<image>\n{question}" and it.n_images == 1
            assert it.images[0].endswith(source["image"])
        elif it.format == "sequence":
            assert len(it.images) == it.n_images and 2 <= it.n_images <= 5
        else:
            assert len(it.images) == 1
            assert it.n_images == 2 if it.format == "pic_in_pic" else it.n_images in (2, 3, 4)
    assert by_kind == {k: set(held) for k in (*FORMATS, "single")}


def test_benchmark_is_deterministic_and_configurable(env: Env) -> None:
    def build(extra: dict | None = None) -> list[EvalItem]:
        return build_benchmark(
            env.ctx(extra), "noad", DropLog(ShardStats(stage="evaluate", shard=0))
        )

    first = build()
    assert first == build()
    only = build({"evaluate.formats": ["grid"], "evaluate.single_image": False})
    assert {it.format for it in only} == {"grid"}
    assert only == [it for it in first if it.format == "grid"]


def test_distractor_shortage_is_dropped_with_its_reason(env: Env) -> None:
    stats = ShardStats(stage="evaluate", shard=0)
    extra = {
        "augment.grid_counts": {9: 1},
        "evaluate.formats": ["grid"],
        "evaluate.single_image": False,
    }
    items = build_benchmark(env.ctx(extra), "noad", DropLog(stats))
    pools = env.store.get_json(layout.holdout_pools_key("noad"))
    # 8 distractors: only a sub-source with 9 or more held-out images has them.
    short = sum(len(p) for p in pools.values() if len(p) < 9)
    assert short and stats.dropped == {"too_few_distractors": short}
    assert {it.source_id.split("-")[0] for it in items} == {
        s for s, p in pools.items() if len(p) >= 9
    }


def test_forced_format_never_falls_back_on_bbox() -> None:
    sample = SourceSample(
        id="b", image="x/b.png", source="x", line=1,
        turns=[SourceTurn(question="<image>\nWhere is [0.1, 0.2, 0.3, 0.4]?", answer="left")],
    )  # fmt: skip
    cfg = load_config(None).augment
    assert choose_format(sample_rng(0, "b"), sample, cfg, "sequence") == ("sequence", False)
    with pytest.raises(SampleError) as e:
        choose_format(sample_rng(0, "b"), sample, cfg, "grid")
    assert e.value.reason == "bbox_coordinates"


# --- scoring ------------------------------------------------------------------------


def item(i: int, fmt: str, n: int, answer: str = "red") -> EvalItem:
    return EvalItem(
        id=f"s{i}-{fmt}", source_id=f"s{i}", format=fmt, n_images=n,
        images=["x"] * (1 if fmt in ("single", "grid", "pic_in_pic") else n),
        prompt="<image>" * (1 if fmt in ("single", "grid", "pic_in_pic") else n), answer=answer,
    )  # fmt: skip


def test_accuracy_cells_by_hand() -> None:
    pairs = [
        (item(0, "single", 1), "Red."),
        (item(1, "single", 1), "blue"),
        (item(0, "sequence", 2), "the red"),
        (item(1, "sequence", 2), "green"),
        (item(2, "sequence", 3), "red"),
        (item(0, "grid", 4), "red"),
        (item(0, "pic_in_pic", 2, answer="circle"), "square"),
    ]
    cells = accuracy_cells(pairs)
    got = {c: (v.n, v.correct) for c, v in cells.items()}
    assert got == {
        "single": (2, 1),
        "sequence": (3, 2),
        "sequence/2": (2, 1),
        "sequence/3": (1, 1),
        "grid": (1, 1),
        "grid/4": (1, 1),
        "pic_in_pic": (1, 0),
        "multi_image": (5, 3),
    }
    assert list(cells) == list(got)  # report order: single, per format, all multi-image
    assert cells["multi_image"].accuracy == pytest.approx(0.6)
    assert accuracy_cells([]) == {}


# --- models and the report ----------------------------------------------------------


def test_without_adapter_only_base(env: Env) -> None:
    stats = env.evaluate("noad")
    report = env.report("noad")
    items = read_items(env.store, "noad")
    assert list(report.models) == ["base"] and report.adapter is None and not report.delta
    assert report.n_items == len(items) == stats.kept == stats.total
    assert stats.notes["adapter"] == 0 and stats.notes["items_single"] == len(env.held_out("noad"))
    preds = env.predictions("noad")
    assert [p.item_id for p in preds] == [it.id for it in items]
    assert report.models["base"]["multi_image"].n == sum(it.format != "single" for it in items)
    assert report.models["base"]["single"].correct == sum(
        p.correct for p in preds if p.item_id.endswith("-single")
    )


def test_adapter_evaluated_against_base_on_identical_items(env: Env, adapter_dir: Path) -> None:
    upload_adapter(env, "withad", adapter_dir)
    stats = env.evaluate("withad")
    report = env.report("withad")
    assert set(report.models) == {"base", "adapted"} and report.adapter
    assert stats.notes["adapter"] == 1 and stats.notes["models"] == 2
    preds = env.predictions("withad")
    base = {p.item_id: p.prediction for p in preds if p.model == "base"}
    adapted = {p.item_id: p.prediction for p in preds if p.model == "adapted"}
    assert base.keys() == adapted.keys() == {it.id for it in read_items(env.store, "withad")}
    assert any(base[k] != adapted[k] for k in base)  # the adapter changes answers
    # Same held-out samples and seed as run "noad": the same questions, and the cached
    # base model, which the adapter must not have touched, gives the same answers.
    assert base == {p.item_id: p.prediction for p in env.predictions("noad")}
    for cell, got in report.models["adapted"].items():
        assert got.n == report.models["base"][cell].n
        expected = got.accuracy - report.models["base"][cell].accuracy
        assert report.delta["adapted"][cell] == pytest.approx(expected, abs=1e-6)

    md = env.store.get_text("runs/withad/evaluate/report.md")
    assert "| cell | n | base | adapted | delta |" in md
    for label in ("single image", "sequence (all)", "sequence, 2 images", "grid, 3 images"):
        assert f"| {label} |" in md
    multi = report.models["base"]["multi_image"]
    assert f"| multi-image (all) | {multi.n} | {multi.accuracy:.3f} |" in md
    assert md == format_report(report)


def test_compare_base_off_evaluates_only_the_adapter(env: Env, adapter_dir: Path) -> None:
    upload_adapter(env, "adonly", adapter_dir)
    env.evaluate("adonly", {"evaluate.compare_base": False})
    report = env.report("adonly")
    assert list(report.models) == ["adapted"] and not report.delta
    assert "| cell | n | adapted |" in env.store.get_text("runs/adonly/evaluate/report.md")


def test_evidence_api_scores_a_bare_model_on_stored_items(env: Env, tiny_model_dir: Path) -> None:
    """An evidence script: stored items, a (model, processor) pair, its own report."""
    env.evaluate("noad")
    items = read_items(env.store, "noad")[:6]
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pair = (model, AutoProcessor.from_pretrained(tiny_model_dir))
    preds: list[Prediction] = []
    report = evaluate_models(
        items, blob_images(env.ctx()), {"bare": pair}, env.config(), predictions=preds
    )
    assert report.n_items == 6 and report.items_sha256 == items_digest(items)
    # Same weights, same template, same padded images: the stage's base answers.
    stage = {p.item_id: p.prediction for p in env.predictions("noad")}
    assert {p.item_id: p.prediction for p in preds} == {it.id: stage[it.id] for it in items}


def test_evaluate_puts_its_table_into_the_adapters_card(env: Env, adapter_dir: Path) -> None:
    """The train stage's card says "not evaluated"; evaluate rewrites it with the table."""
    env.plan("card")
    upload_adapter(env, "card", adapter_dir)
    train = layout.train_prefix("card")
    meta = {"method": "dpo", "base_model": "m", "base_model_hub_id": None, "steps": 7}
    env.store.put_json(layout.train_metadata_key(train), meta)
    card_key = layout.adapter_prefix(train) + "README.md"
    env.store.put_text(card_key, "stale")
    env.evaluate("card")
    card = env.store.get_text(card_key)
    table = [x for x in env.store.get_text("runs/card/evaluate/report.md").splitlines() if x]
    rows = [x for x in table if x.startswith("| ")]
    assert len(rows) > 3 and all(r in card for r in rows)
    assert "Not evaluated" not in card and "| steps | 7 |" in card
