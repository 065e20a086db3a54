"""The train stage on the tiny LLaVA: DPO + LoRA, the SFT term, the SFT baseline,
checkpoints in the store and resuming after a SIGKILL, and the standalone entry.

Pairs are written by hand in the select stage's TRL layout: two 64 px pictures of a
coloured square, "In Image2, what colour is the square?", chosen = Image2's colour,
rejected = Image1's (the confusion MIA-DPO targets).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from mia_dpo.config import RunConfig, StoreConfig
from mia_dpo.errors import UserError
from mia_dpo.models.loading import load_model
from mia_dpo.models.prompting import answer_messages, chat_text, prompt_messages
from mia_dpo.records import Task
from mia_dpo.runtime.context import StageContext
from mia_dpo.runtime.store import BlobReader, LocalStore
from mia_dpo.stages.train import run_shard, train_standalone
from mia_dpo.training.trainers import lora_target_modules

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 0),
}
NAMES = list(COLOURS)
PROMPT = "Image1:<image>\nImage2:<image>\nIn Image2, what colour is the square?"
PAIRS_KEY = "runs/r1/select/pairs.trl.jsonl"
TRAIN = "runs/r1/train/"
SMALL = {
    "lora_r": 8, "lora_alpha": 16, "learning_rate": 5e-4, "epochs": 1, "batch_size": 2,
    "gradient_accumulation_steps": 1, "max_length": 512, "save_steps": 2, "logging_steps": 1,
}  # fmt: skip


def square_png(path: Path, colour: str) -> str:
    img = Image.new("RGB", (64, 64), (240, 240, 240))
    ImageDraw.Draw(img).rectangle([16, 16, 47, 47], fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return str(path)


def pair_lines(folder: Path, n: int, missing: int = 0, relative: bool = False) -> list[str]:
    """n readable pairs, then `missing` pairs whose second image does not exist."""
    lines = []
    for i in range(n + missing):
        first, second = NAMES[i % 4], NAMES[(i + 1) % 4]
        images = [
            square_png(folder / f"{i}-1.png", first),
            square_png(folder / f"{i}-2.png", second),
        ]
        if i >= n:
            images[1] = str(folder / "gone.png")
        if relative:
            images = [str(Path(p).relative_to(folder.parent)) for p in images]
        row = {
            "images": images, "prompt": prompt_messages(PROMPT), "chosen": answer_messages(second),
            "rejected": answer_messages(first), "id": f"p{i}-sequence-r0", "format": "sequence",
            "n_images": 2, "target_index": 2, "ratio": 0.25, "ppl": 2.0 + i / 10,
        }  # fmt: skip
        lines.append(json.dumps(row))
    return lines


def run_config(model_dir: Path, **train: Any) -> RunConfig:
    return RunConfig.model_validate(
        {"seed": 3, "model": {"path": str(model_dir), "device": "cpu"}, "train": SMALL | train}
    )


def make_ctx(root: Path, cfg: RunConfig, lines: list[str] | None) -> StageContext:
    store = LocalStore(root / "store")
    if lines is not None:
        store.put_jsonl(PAIRS_KEY, lines)
    return StageContext(store=store, blobs=BlobReader(StoreConfig()), config=cfg)


def train(root: Path, model_dir: Path, n: int = 8, missing: int = 0, **train: Any):  # type: ignore[no-untyped-def]
    ctx = make_ctx(root, run_config(model_dir, **train), pair_lines(root / "img", n, missing))
    stats = run_shard(Task.make("r1", "train", 0), ctx)
    return ctx, stats, ctx.store.get_json(TRAIN + "metadata.json")


def losses(meta: dict) -> list[float]:
    return [h["loss"] for h in meta["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def dpo(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    """One DPO run (with a merged copy) over 8 good pairs and 1 with a missing image."""
    return train(tmp_path_factory.mktemp("dpo"), tiny_model_dir, missing=1, merge_adapter=True)


def test_dpo_logs_a_loss_and_writes_its_outputs(dpo) -> None:  # type: ignore[no-untyped-def]
    ctx, stats, meta = dpo
    assert (stats.total, stats.kept, stats.dropped) == (9, 8, {"image_missing": 1})
    assert stats.notes["steps"] == 4 and stats.notes["resumed_from_step"] == 0
    assert stats.notes["epochs"] == 1
    assert stats.notes["pairs_sequence"] == 8
    dropped = [json.loads(r) for r in ctx.store.get_jsonl(TRAIN + "shard-00000.dropped.jsonl")]
    assert [(d["id"], d["reason"]) for d in dropped] == [("p8-sequence-r0", "image_missing")]

    expected = {
        "method", "base_model", "pairs_source", "stage_params", "pairs", "versions",
        "lora_target_modules", "world_size", "steps", "max_steps", "epochs", "resumed_from_step",
        "final_loss", "train_loss", "log_history", "fingerprint", "outputs",
    }  # fmt: skip
    assert expected <= set(meta)
    assert meta["method"] == "dpo" and meta["steps"] == 4 and meta["resumed_from_step"] is None
    assert set(meta["versions"]) == {"mia_dpo", "trl", "peft", "transformers", "torch"}
    assert meta["pairs"] == {
        "count": 8, "per_format": {"sequence": 8}, "mean_ratio": 0.25,
        "mean_ppl": pytest.approx(2.35), "images": 16, "read": 9, "dropped": {"image_missing": 1},
    }  # fmt: skip
    assert meta["stage_params"]["train"]["lora_r"] == 8
    # Step 1 runs before any update, with LoRA's B at zero: policy == reference, loss = ln 2.
    logged = losses(meta)
    assert len(logged) == 4 and logged[0] == pytest.approx(math.log(2), abs=1e-4)
    assert meta["final_loss"] == logged[-1]
    # Warm-up leaves step 1 at lr 0; once LoRA moves, the policy leaves the reference.
    assert any(abs(v - math.log(2)) > 1e-4 for v in logged[2:])
    rows = [json.loads(r) for r in ctx.store.get_jsonl(TRAIN + "shard-00000.jsonl")]
    assert rows == meta["log_history"]
    latest = ctx.store.get_json(TRAIN + "checkpoints/latest.json")
    assert latest["step"] == 4 and "adapter_model.safetensors" in latest["files"]
    # Only the pointed-at checkpoint is kept.
    folders = {k.split("/")[4] for k in ctx.store.list(TRAIN + "checkpoints/checkpoint-")}
    assert folders == {"checkpoint-4"}


def test_lora_on_every_language_model_linear_only_and_trained(dpo, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    ctx, _, meta = dpo
    weights = load_file(Path(ctx.store.uri(TRAIN + "adapter/adapter_model.safetensors")))
    modules = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in weights}
    fresh = load_model(run_config(tiny_model_dir).model)
    targets = lora_target_modules(fresh.model)
    assert modules == set(targets) == set(meta["lora_target_modules"])
    assert len(targets) == 4 * 7  # 4 decoder layers x (q, k, v, o, gate, up, down)
    assert all(".language_model.layers." in m for m in modules)
    assert not any(w in m for m in modules for w in ("vision", "projector", "lm_head"))
    # lora_B starts at zero: every one of them moved.
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert len(lora_b) == len(targets)
    assert all(v.abs().max() > 0 for v in lora_b.values())


def _inputs(lm: Any, root: Path) -> Any:
    images = [Image.open(root / "img" / f"0-{k}.png").convert("RGB") for k in (1, 2)]
    return lm.processor(text=[chat_text(lm.processor, PROMPT)], images=images, return_tensors="pt")


def test_adapter_and_merged_model_reload_and_change_the_logits(dpo, tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    ctx, _, _ = dpo
    root = Path(ctx.store.uri("runs")).parent.parent
    lm = load_model(run_config(tiny_model_dir).model)
    inputs = _inputs(lm, root)
    with torch.no_grad():
        base = lm.model(**inputs).logits
        tuned = PeftModel.from_pretrained(lm.model, ctx.store.uri(TRAIN + "adapter")).eval()
        adapted = tuned(**inputs).logits
    assert (adapted - base).abs().max() > 1e-4
    merged = load_model(run_config(Path(ctx.store.uri(TRAIN + "merged"))).model)
    with torch.no_grad():
        assert torch.allclose(merged.model(**inputs).logits, adapted, atol=1e-4)


def test_sft_weight_adds_the_sft_term(tmp_path: Path, tiny_model_dir: Path) -> None:
    _, _, meta = train(tmp_path, tiny_model_dir, n=4, sft_weight=0.5)
    first = losses(meta)[0]
    # ln 2 from DPO plus 0.5 x the answers' mean NLL under an untrained model (~log V).
    assert first > math.log(2) + 1.0
    assert meta["stage_params"]["train"]["sft_weight"] == 0.5


def test_sft_method_trains_on_the_chosen_answers(tmp_path: Path, tiny_model_dir: Path) -> None:
    ctx, stats, meta = train(tmp_path, tiny_model_dir, n=4, method="sft")
    assert meta["method"] == "sft" and meta["steps"] == 2 and stats.kept == 4
    assert losses(meta) and all(v > 0 for v in losses(meta))
    weights = load_file(Path(ctx.store.uri(TRAIN + "adapter/adapter_model.safetensors")))
    assert all(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)


def one_image_lines(folder: Path, n: int) -> list[str]:
    """n pairs of a single picture: shorter than pair_lines' two-image ones by 64 tokens."""
    lines = []
    for i in range(n):
        colour, other = NAMES[i % 4], NAMES[(i + 2) % 4]
        row = {
            "images": [square_png(folder / f"{i}.png", colour)],
            "prompt": prompt_messages("<image>\nWhat colour is the square?"),
            "chosen": answer_messages(colour), "rejected": answer_messages(other),
            "id": f"q{i}-single-r0", "format": "single", "n_images": 1, "target_index": 1,
        }  # fmt: skip
        lines.append(json.dumps(row))
    return lines


@pytest.mark.parametrize("grouped", [True, False])
def test_group_by_length_batches_pairs_of_one_length(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, grouped: bool
) -> None:
    from mia_dpo.training import trainers
    from mia_dpo.training.sampler import LengthGroupedBatches

    made: list[Any] = []

    def spy(*args: Any, **kw: Any) -> Any:
        made.append(trainers_make(*args, **kw))
        return made[-1]

    trainers_make = trainers.make_trainer
    monkeypatch.setattr(trainers, "make_trainer", spy)
    # rows 0-3: two images; rows 4-7: one
    lines = pair_lines(tmp_path / "img2", 4) + one_image_lines(tmp_path / "img1", 4)
    ctx = make_ctx(tmp_path, run_config(tiny_model_dir, group_by_length=grouped), lines)
    run_shard(Task.make("r1", "train", 0), ctx)
    meta = ctx.store.get_json(TRAIN + "metadata.json")
    assert meta["steps"] == 4 and len(losses(meta)) == 4
    sampler = made[0]._get_train_sampler()
    assert isinstance(sampler, LengthGroupedBatches) is grouped
    if grouped:
        order = list(sampler)
        assert sorted(order) == list(range(8))
        assert all({i < 4 for i in order[k : k + 2]} in ({True}, {False}) for k in (0, 2, 4, 6))


WORKER_SCRIPT = """
import logging, os, sys, time
import trl
from mia_dpo.config import RunConfig, StoreConfig
from mia_dpo.records import Task
from mia_dpo.runtime.store import BlobReader, LocalStore
from mia_dpo.runtime.context import StageContext
from mia_dpo.stages.train import run_shard

rank = os.environ.get("RANK", "0")
logging.basicConfig(level=logging.INFO, format=f"rank{rank} %(message)s")
if os.environ.get("SLOW_STEPS"):  # a window for the test to kill us mid-run
    step = trl.DPOTrainer.training_step
    def slow_step(self, *args, **kwargs):
        time.sleep(1.0)
        return step(self, *args, **kwargs)
    trl.DPOTrainer.training_step = slow_step
cfg = RunConfig.model_validate_json(open(sys.argv[1]).read())
ctx = StageContext(store=LocalStore(sys.argv[2]), blobs=BlobReader(StoreConfig()), config=cfg)
run_shard(Task.make("r1", "train", 0), ctx)
"""
LATEST = TRAIN + "checkpoints/latest.json"


def worker_command(tmp_path: Path, cfg: RunConfig, ranks: int) -> list[str]:
    (tmp_path / "cfg.json").write_text(cfg.model_dump_json())
    (tmp_path / "worker.py").write_text(WORKER_SCRIPT)
    args = [str(tmp_path / "worker.py"), str(tmp_path / "cfg.json"), str(tmp_path / "store")]
    if ranks == 1:
        return [sys.executable, *args]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return [sys.executable, *launcher, *args]


def worker_env(**extra: str) -> dict[str, str]:
    services = str(Path(__file__).resolve().parents[2] / "services")
    return dict(os.environ, PYTHONPATH=services, HF_HUB_OFFLINE="1", **extra)


def descendants(pid: int) -> list[int]:
    """Process ids below pid (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_after_checkpoint(cmd: list[str], store: LocalStore, total_steps: int) -> int:
    """Run cmd (slowed down) until latest.json points at step >= 2, SIGKILL it and
    every process below it (a launcher and its ranks, as when a node dies), return
    the step the pointer names."""
    proc = subprocess.Popen(
        cmd, env=worker_env(SLOW_STEPS="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (store.exists(LATEST) and store.get_json(LATEST)["step"] >= 2):
            assert proc.poll() is None, f"trainer exited early: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        assert proc.poll() is None  # still training: the kill lands mid-run
    finally:
        for pid in [*descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
    step = store.get_json(LATEST)["step"]
    assert 2 <= step < total_steps
    return int(step)


def test_sigkilled_task_resumes_from_the_stored_checkpoint(
    tmp_path: Path, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = run_config(tiny_model_dir)
    ctx = make_ctx(tmp_path, cfg, pair_lines(tmp_path / "img", 12))  # 6 steps
    killed_at = kill_after_checkpoint(worker_command(tmp_path, cfg, 1), ctx.store, 6)

    caplog.set_level(logging.INFO, logger="mia_dpo")
    stats = run_shard(Task.make("r1", "train", 0), ctx)
    meta = ctx.store.get_json(TRAIN + "metadata.json")
    messages = [r.getMessage() for r in caplog.records]
    assert f"train: resuming from checkpoint-{killed_at}" in messages
    trained = [int(m.split()[2].split("/")[0]) for m in messages if m.startswith("train step ")]
    assert trained == list(range(killed_at + 1, 7))  # only the steps not yet done
    assert meta["resumed_from_step"] == stats.notes["resumed_from_step"] == killed_at
    assert meta["steps"] == meta["max_steps"] == 6
    # The history carried over from the checkpoint: every step logged exactly once.
    assert [h["step"] for h in meta["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert ctx.store.get_json(LATEST)["step"] == 6


def test_torchrun_two_ranks_rank0_writes_and_all_resume_together(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """DDP over 2 CPU processes (gloo): 12 pairs, 1 per rank per step -> 6 steps."""
    cfg = run_config(tiny_model_dir, batch_size=1)
    ctx = make_ctx(tmp_path, cfg, pair_lines(tmp_path / "img", 12))
    cmd = worker_command(tmp_path, cfg, 2)
    killed_at = kill_after_checkpoint(cmd, ctx.store, 6)
    # Each rank's RNG state went in before the pointer moved.
    files = ctx.store.get_json(LATEST)["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt"} <= set(files)

    proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        assert f"rank{r} train: resuming from checkpoint-{killed_at}" in proc.stderr
    # Only rank 0 logs steps (and writes): each remaining step once.
    steps = re.findall(r"rank(\d) train step (\d+)/6", proc.stderr)
    assert steps == [("0", str(s)) for s in range(killed_at + 1, 7)]
    meta = ctx.store.get_json(TRAIN + "metadata.json")
    assert (meta["world_size"], meta["steps"], meta["resumed_from_step"]) == (2, 6, killed_at)
    assert [h["step"] for h in meta["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]


def test_checkpoint_of_other_pairs_is_not_resumed(dpo, caplog) -> None:  # type: ignore[no-untyped-def]
    from mia_dpo.training.checkpoints import download_latest

    ctx, _, _ = dpo
    caplog.set_level(logging.WARNING, logger="mia_dpo")
    got = download_latest(
        ctx.store, TRAIN, Path("/nonexistent"), "other", logging.getLogger("mia_dpo.t")
    )
    assert got is None and "trained on other pairs" in caplog.text


def test_empty_or_missing_pairs_file_is_a_user_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    cfg = run_config(tiny_model_dir)
    with pytest.raises(UserError, match=r"^train: no pairs to train on; .*is empty") as err:
        run_shard(Task.make("r1", "train", 0), make_ctx(tmp_path, cfg, []))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="does not exist"):
        run_shard(Task.make("r1", "train", 0), make_ctx(tmp_path / "none", cfg, None))


def test_all_pairs_dropped_is_a_user_error(tmp_path: Path, tiny_model_dir: Path) -> None:
    ctx = make_ctx(tmp_path, run_config(tiny_model_dir), pair_lines(tmp_path, 0, missing=2))
    with pytest.raises(UserError, match=r"all 2 pairs .* dropped \(image_missing: 2\)"):
        run_shard(Task.make("r1", "train", 0), ctx)


def test_prompt_longer_than_max_length_names_the_field(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # Each 64 px image is 64 tokens: the prompt is ~146 tokens.
    ctx = make_ctx(tmp_path, run_config(tiny_model_dir, max_length=100), pair_lines(tmp_path, 2))
    with pytest.raises(UserError, match=r"^train\.max_length: 100 tokens cannot hold pair p0"):
        run_shard(Task.make("r1", "train", 0), ctx)


def test_train_standalone_writes_adapter_and_metadata(tmp_path: Path, tiny_model_dir: Path) -> None:
    pairs = tmp_path / "data" / "pairs.trl.jsonl"
    pairs.parent.mkdir()
    pairs.write_text("\n".join(pair_lines(tmp_path / "data" / "img", 4, relative=True)) + "\n")
    out = tmp_path / "out"
    cfg = RunConfig.model_validate({"train": SMALL, "model": {"device": "cpu"}})
    adapter = train_standalone(pairs, str(tiny_model_dir), out, cfg)
    assert adapter == out / "adapter" and (adapter / "adapter_model.safetensors").is_file()
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["base_model"] == str(tiny_model_dir) and meta["pairs"]["count"] == 4
    assert losses(meta) and len((out / "log_history.jsonl").read_text().splitlines()) == len(
        meta["log_history"]
    )


def test_run_shard_refuses_other_shards(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="shard 0"):
        run_shard(Task.make("r1", "train", 1), make_ctx(tmp_path, run_config(tiny_model_dir), []))
