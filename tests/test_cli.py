"""The `mia-dpo` command line, run as a subprocess: exit codes, one-line errors, a full run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

RUN_ID = "cli-run"
GRID_SIZES = {2: (936, 488), 3: (1424, 488), 4: (936, 976)}  # canvas by image count (method 1b)


def mia(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIA_DPO_")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "mia_dpo", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=600,
    )  # fmt: skip


def error_line(proc: subprocess.CompletedProcess[str], only_line: bool = True) -> str:
    """Exit 2 with one `mia-dpo: error:` line, last on stderr, and no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    if only_line:
        assert len(lines) == 1, proc.stderr
    assert [ln for ln in lines if ln.startswith("mia-dpo: error:")] == lines[-1:], proc.stderr
    return lines[-1]


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "D"
    proc = mia("synth", "--out", out, "--n", 12)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads((out / "data.json").read_text())) == 12
    return out


def run_config(synth: Path, root: Path, **augment: object) -> dict:
    return {
        "seed": 1,
        "stages": ["augment"],
        "input": {"path": str(synth / "data.json"), "image_root": str(synth / "images"),
                  "shard_size": 5},
        "store": {"backend": "local", "root": str(root)},
        "queue": {"backend": "memory"},
        "augment": augment,
    }  # fmt: skip


@pytest.fixture(scope="module")
def done_run(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of the synthetic data; returns its config file."""
    work = tmp_path_factory.mktemp("run")
    cfg = write_config(work / "run.yaml", run_config(synth, work / "store"))
    proc = mia("run", cfg, "--run-id", RUN_ID, "-q")
    assert proc.returncode == 0, proc.stderr
    assert "augment: kept 12 of 12; dropped: none" in proc.stdout
    assert "(already done)" not in proc.stdout
    return cfg


# --------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("augment:\n  grid_tile: 448\n", "augment.grid_tile: unknown key"),
        ("seed: [1, 2\naugment: {\n", "not valid YAML"),
        ("augment:\n  pip_scale: 1.5\n", "augment.pip_scale"),
        ("- seed: 1\n", "top level must be a mapping"),
        ("store:\n  access_key: AKIA-leak\n", "MIA_DPO_S3_ACCESS_KEY"),
        (None, "config file not found"),
    ],
)
def test_bad_config_is_one_line(tmp_path: Path, text: str | None, needle: str) -> None:
    cfg = tmp_path / "run.yaml"
    if text is not None:
        cfg.write_text(text, encoding="utf-8")
    line = error_line(mia("run", cfg, "--run-id", "x"))
    assert line.startswith(f"mia-dpo: error: {cfg}: ")
    assert needle in line
    assert "AKIA-leak" not in line
    assert not (tmp_path / "mia-dpo-data").exists()  # nothing was started


def test_missing_input_names_input_path(synth: Path, tmp_path: Path) -> None:
    data = run_config(synth, tmp_path / "store")
    data["input"]["path"] = str(tmp_path / "nope.json")
    proc = mia("run", write_config(tmp_path / "run.yaml", data), "--run-id", "x", "-q")
    line = error_line(proc, only_line=False)
    assert line.startswith("mia-dpo: error: input.path: ")
    assert "nope.json" in line and "not found" in line


def test_bad_run_id(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "run.yaml", {"store": {"root": str(tmp_path / "s")}})
    line = error_line(mia("run", cfg, "--run-id", "Bad_ID"))
    assert "--run-id" in line and "'Bad_ID'" in line
    assert not (tmp_path / "s" / "runs").exists()


def test_worker_needs_redis(done_run: Path) -> None:
    line = error_line(mia("worker", "--stage", "augment", "--run-id", RUN_ID, "--config", done_run))
    assert "queue.backend" in line and "redis" in line


def test_status_of_unknown_run(done_run: Path) -> None:
    line = error_line(mia("status", "--run-id", "no-such-run", "--config", done_run))
    assert "no-such-run" in line and "not found" in line


# --------------------------------------------------------------------------- working commands


def test_synth_then_augment_grid(synth: Path, tmp_path: Path) -> None:
    # Each synthetic sub-source has 4 images here, so 6- and 9-tile grids lack distractors.
    aug_cfg = write_config(tmp_path / "aug.yaml", {"augment": {"grid_counts": {2: 1, 3: 1, 4: 1}}})
    out = tmp_path / "O"
    proc = mia(
        "augment", "--input", synth / "data.json", "--image-root", synth / "images",
        "--out", out, "--formats", "grid", "--config", aug_cfg, "-q",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "augmented.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert f"12 augmented samples -> {out / 'augmented.jsonl'}" in proc.stdout
    assert len({r["source_id"] for r in rows}) == 12
    for row in rows:
        assert row["format"] == "grid"
        assert row["prompt"].startswith(f"<image>\nIn Image{row['target_index']}, ")
        assert len(row["images"]) == 1 and Path(row["images"][0]).is_file()
        with Image.open(row["images"][0]) as im:
            assert im.size == GRID_SIZES[row["n_images"]]
        assert len(row["distractor_images"]) == row["n_images"] - 1
        assert row["target_image"] not in row["distractor_images"]


def test_status_after_run(done_run: Path) -> None:
    root = Path(yaml.safe_load(done_run.read_text())["store"]["root"])
    plan = json.loads((root / "runs" / RUN_ID / "plan" / "plan.json").read_text())
    assert plan["n_shards"] == 3  # 12 samples, 5 per shard

    proc = mia("status", "--run-id", RUN_ID, "--config", done_run)
    assert proc.returncode == 0, proc.stderr
    assert f"run {RUN_ID}: 12 input records" in proc.stdout
    row = [ln for ln in proc.stdout.splitlines() if ln.startswith("augment ")]
    assert len(row) == 1
    n = plan["n_shards"]
    assert re.match(rf"augment\s+done\s+{n}/{n}\s+0\s+0\s+0\s+12\s+0$", row[0]), row[0]

    proc = mia("status", "--run-id", RUN_ID, "--config", done_run, "--json")
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["run_id"] == RUN_ID and st["n_records"] == 12
    (stage,) = st["stages"]
    assert stage["stage"] == "augment" and stage["state"] == "done"
    assert stage["shards_done"] == stage["shards_total"] == n
    assert stage["stats"]["kept"] == 12 and stage["dead"] == []


def test_rerun_is_already_done(done_run: Path) -> None:
    proc = mia("run", done_run, "--run-id", RUN_ID, "-q")
    assert proc.returncode == 0, proc.stderr
    assert "augment: kept 12 of 12 (already done); dropped: none" in proc.stdout


def test_rerun_with_changed_seed_is_refused(done_run: Path, tmp_path: Path) -> None:
    data = yaml.safe_load(done_run.read_text())
    data["seed"] = 2
    proc = mia("run", write_config(tmp_path / "changed.yaml", data), "--run-id", RUN_ID, "-q")
    line = error_line(proc, only_line=False)
    assert f"run {RUN_ID!r} already exists with different seed settings" in line
    # the refused rerun did not touch the finished run
    assert "(already done)" in mia("run", done_run, "--run-id", RUN_ID, "-q").stdout


def test_evaluate_without_holdout_is_refused_before_any_work(tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "eval.yaml",
        {"stages": ["augment", "generate", "score", "select", "train", "evaluate"],
         "model": {"path": str(tmp_path / "model")},
         "input": {"path": str(tmp_path / "data.json")},
         "store": {"backend": "local", "root": str(tmp_path / "store")}},
    )  # fmt: skip
    proc = mia("run", str(cfg), "--run-id", "noeval")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("mia-dpo: error: input.holdout_fraction:")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "store" / "runs" / "noeval").exists()  # nothing was written


# --------------------------------------------------------------------------- conventions


def test_old_positional_run_id_still_works_with_a_deprecation_line(done_run: Path) -> None:
    proc = mia("status", RUN_ID, "--config", done_run, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["run_id"] == RUN_ID
    (line,) = [ln for ln in proc.stderr.splitlines() if "deprecated" in ln]
    assert f"status --run-id {RUN_ID}" in line
    clash = mia("status", RUN_ID, "--run-id", "other", "--config", done_run)
    assert "two run ids" in error_line(clash, only_line=False)


def test_a_run_id_is_required_where_nothing_can_supply_one(done_run: Path) -> None:
    line = error_line(mia("status", "--config", done_run))
    assert "--run-id is required" in line


def test_run_and_retry_speak_json(done_run: Path) -> None:
    proc = mia("run", done_run, "--run-id", RUN_ID, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["run_id"] == RUN_ID and out["plan"]["total"] == 12
    (stage,) = out["stages"]
    assert stage["stage"] == "augment" and stage["skipped"] and stage["kept"] == 12
    proc = mia("retry", "--run-id", RUN_ID, "--dead", "--config", done_run, "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["run_id"] == RUN_ID and plan["requeued"] == {}


def test_a_missing_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    """Without torch (blocked at import), model commands name the extra to install."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from mia_dpo.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIA_DPO_")}
    proc = subprocess.run(
        [sys.executable, "-c", code, "tiny-model", "--out", str(tmp_path / "m")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    line = error_line(proc)
    assert "pip install 'mia-dpo[model]'" in line and "torch" in line


def test_calibrate_needs_generate_then_prints_the_auc_table(
    synth: Path, done_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # a run without answers: one line naming what is missing
    line = error_line(mia("calibrate", "--run-id", RUN_ID, "--config", done_run))
    assert f"run {RUN_ID!r} has no finished generate stage" in line

    data = run_config(synth, tmp_path / "store")
    data |= {
        "stages": ["augment", "generate"],
        "model": {"path": str(tiny_model_dir)},
        "generate": {"max_new_tokens": 3},
        "calibrate": {"min_answers_per_cell": 2},
    }
    cfg = write_config(tmp_path / "gen.yaml", data)
    assert mia("run", cfg, "--run-id", "cal", "-q").returncode == 0
    proc = mia("calibrate", "--run-id", "cal", "--config", cfg)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("calibration: layer ")
    assert re.search(r"^pooled\s+\d+\s+\d+ \| ", out, re.M), out  # one AUC column per layer
    assert "thresholds at layer" in out and "calibration.json" in out
    stored = json.loads((tmp_path / "store/runs/cal/calibrate/calibration.json").read_text())
    assert stored["n_answers"] == stored["n_right"] + stored["n_wrong"] > 0
    proc = mia("calibrate", "--run-id", "cal", "--config", cfg, "--json", "--force")
    assert json.loads(proc.stdout)["auc_by_layer"] == stored["auc_by_layer"]  # deterministic
