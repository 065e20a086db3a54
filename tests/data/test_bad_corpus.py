"""The bad-input corpus (tests/data/bad/make_corpus.py) through the real commands.

Every bad sample must be dropped with the reason its manifest names (recorded per
sample, one line of detail), every valid sample in the same file must come through,
and every bad index file or config must stop the command with one line naming the
file or field: never a traceback, never a hang (the subprocess timeout is only a
guard against one, not a measurement).
"""

from __future__ import annotations

import filecmp
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.data.bad.make_corpus import KEPT, Case, Manifest, make_corpus

HANG_GUARD_S = 300
RUN_ID = "bad-corpus"


@dataclass(frozen=True)
class Corpus:
    root: Path
    manifest: Manifest


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("bad") / "corpus"
    manifest = make_corpus(root)
    assert Manifest.from_json((root / "manifest.json").read_text(encoding="utf-8")) == manifest
    return Corpus(root, manifest)


def mia(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIA_DPO_")}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "mia_dpo", *map(str, args)],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=HANG_GUARD_S,
    )  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Exit 2, no traceback, and exactly one line on stderr: the error."""
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mia-dpo: error: "), proc.stderr
    return lines[0]


# --------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    kept: Counter[str]  # source ids of the augmented records
    drops: dict[str, list[dict]]  # label -> dropped rows (augment stage)
    problems: dict[int, dict]  # line -> unparseable-record row (plan)
    stats: dict  # augment/stats.json
    plan_stats: dict


def read_outcome(store_root: Path, run_id: str) -> Outcome:
    run = store_root / "runs" / run_id
    kept: Counter[str] = Counter()
    drops: dict[str, list[dict]] = {}
    for path in sorted((run / "augment").glob("shard-*.jsonl")):
        rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines()]
        if path.name.endswith(".dropped.jsonl"):
            for row in rows:
                drops.setdefault(row["id"], []).append(row)
        else:
            kept.update(row["source_id"] for row in rows)
    problems = {}
    for ln in (run / "plan/problems.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(ln)
        problems[row["line"]] = row
    return Outcome(
        kept=kept,
        drops=drops,
        problems=problems,
        stats=json.loads((run / "augment/stats.json").read_text(encoding="utf-8")),
        plan_stats=json.loads((run / "plan/stats.json").read_text(encoding="utf-8")),
    )


def check_outcome(out: Outcome, cases: list[Case]) -> None:
    wrong = []
    dropped_rows: list[tuple[Case, dict]] = []
    for c in cases:
        if c.expect == KEPT:
            if out.kept[c.id] != 1:
                wrong.append(f"{c.id} ({c.case}): not kept; drops {out.drops.get(c.id)}")
            continue
        if c.where == "plan":
            row = out.problems.get(c.line)
        else:  # a dropped record's label is unique (a repeated id: the first one is kept)
            rows = out.drops.get(c.id, [])
            row = rows[0] if len(rows) == 1 else None
        if row is None or row["reason"] != c.expect:
            wrong.append(f"{c.id} line {c.line} ({c.case}): want {c.expect}, got {row}")
            continue
        dropped_rows.append((c, row))
    assert not wrong, "\n".join(wrong)

    for c, row in dropped_rows:
        assert "\n" not in row["detail"] and "Traceback" not in row["detail"], row
        if c.detail:
            assert c.detail in row["detail"], (c, row)
    # Nothing else was dropped or kept: every record is accounted for, once.
    want_kept = Counter(c.id for c in cases if c.expect == KEPT)
    assert out.kept == want_kept
    want_drops = Counter(c.id for c in cases if c.expect != KEPT and c.where == "augment")
    assert Counter({k: len(v) for k, v in out.drops.items()}) == want_drops
    assert set(out.problems) == {c.line for c in cases if c.where == "plan"}
    # And the counters agree with the per-sample records.
    in_stage = [c for c in cases if c.where == "augment"]
    assert out.stats["kept"] == len(want_kept.keys()) == sum(want_kept.values())
    assert out.stats["total"] == len(in_stage)
    assert out.stats["dropped"] == dict(Counter(c.expect for c in in_stage if c.expect != KEPT))
    assert out.plan_stats["dropped"] == dict(Counter(c.expect for c in cases if c.where == "plan"))


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize("index", ["data.json", "data.jsonl"])
def test_augment_command_drops_each_bad_sample_with_its_reason(
    corpus: Corpus, tmp_path: Path, index: str
) -> None:
    out = tmp_path / "out"
    m = corpus.manifest
    proc = mia(
        "augment", "--input", index, "--image-root", m.image_root, "--out", out,
        "--config", m.good_config, "--workers", 2, "-q", cwd=corpus.root,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    cases = m.indexes[index]
    n_kept = sum(c.expect == KEPT for c in cases)
    assert f"{n_kept} augmented samples" in proc.stdout
    check_outcome(read_outcome(out, "augment"), cases)
    lines = (out / "augmented.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == n_kept
    # Nothing outside the image root was read into any record.
    assert "secret.png" not in "".join(lines)


def test_run_command_with_the_augment_stage(corpus: Corpus) -> None:
    m = corpus.manifest
    proc = mia("run", m.run_config, "--run-id", RUN_ID, "-q", cwd=corpus.root)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    cases = m.indexes[m.run_input]
    in_stage = [c for c in cases if c.where == "augment"]
    n_kept = sum(c.expect == KEPT for c in cases)
    assert f"augment: kept {n_kept} of {len(in_stage)}; dropped: " in proc.stdout
    in_plan = [c for c in cases if c.where == "plan"]
    plan_line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("plan: "))
    assert sum(int(n) for n in re.findall(r" (\d+)(?:,|$)", plan_line)) == len(in_plan)
    check_outcome(read_outcome(corpus.root / "store", RUN_ID), cases)
    # Resuming the finished run does no work and changes nothing.
    again = mia("run", m.run_config, "--run-id", RUN_ID, "-q", cwd=corpus.root)
    assert again.returncode == 0 and "(already done)" in again.stdout, again.stderr


def test_every_bad_index_file_is_one_line_error(corpus: Corpus, tmp_path: Path) -> None:
    m = corpus.manifest
    assert len(m.bad_indexes) >= 10
    for i, (name, fragment) in enumerate(sorted(m.bad_indexes.items())):
        out = tmp_path / f"out-{i}"
        proc = mia(
            "augment", "--input", name, "--image-root", m.image_root, "--out", out,
            "--config", m.good_config, "-q", cwd=corpus.root,
        )  # fmt: skip
        line = one_line_error(proc)
        assert name in line and fragment in line, (name, line)
        assert not (out / "augmented.jsonl").exists()


def test_unreadable_index_under_run_is_one_line_error(corpus: Corpus, tmp_path: Path) -> None:
    """`mia-dpo run` prints where the run's store is first; the error is the one other line."""
    cfg = (corpus.root / corpus.manifest.run_config).read_text(encoding="utf-8")
    cfg = cfg.replace(f"path: {corpus.manifest.run_input}", "path: bad-index/utf16.json")
    cfg = cfg.replace("root: store", f"root: {tmp_path / 'store'}")
    (tmp_path / "run.yaml").write_text(cfg, encoding="utf-8")
    proc = mia("run", tmp_path / "run.yaml", "--run-id", "x", "-q", cwd=corpus.root)
    assert "Traceback" not in proc.stderr and proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("mia-dpo: error: ")]
    assert errors == proc.stderr.splitlines()[-1:], proc.stderr
    assert "utf16.json" in errors[0] and "UTF-16" in errors[0]
    assert not (tmp_path / "store/runs/x/plan/plan.json").exists()


def test_every_bad_config_is_one_line_naming_the_field(corpus: Corpus) -> None:
    m = corpus.manifest
    assert len(m.bad_configs) >= 15
    for name, fragment in sorted(m.bad_configs.items()):
        line = one_line_error(mia("run", name, "--run-id", "x", "-q", cwd=corpus.root))
        assert line.startswith(f"mia-dpo: error: {name}: "), line
        assert fragment in line, (name, line)
        assert "hunter2" not in line
        stem = Path(name).stem
        assert not (corpus.root / f"store-{stem}").exists()  # nothing was started
    # The augment command reads its --config the same way.
    line = one_line_error(
        mia("augment", "--input", m.run_input, "--image-root", m.image_root, "--out", "o",
            "--config", "bad-config/unknown-nested.yaml", cwd=corpus.root)
    )  # fmt: skip
    assert "input.max_pixels: unknown key" in line


# --------------------------------------------------------------------------- the corpus


# Every item of the brief (issue 6, item 3) that has a per-sample outcome.
REQUIRED_CASES = {
    "record is a number": "not_an_object",
    "id is a float": "missing_id",
    "image is a number": "bad_image_field",
    "no conversations": "missing_conversations",
    "empty conversations": "bad_conversations",
    "missing file": "image_missing",
    "zero-byte file": "image_empty",
    "truncated PNG": "image_truncated",
    "truncated JPEG": "image_truncated",
    "text file named .jpg": "image_unreadable",
    "PNG header declaring 100000x100000": "image_too_large",
    "real 1100x1000 JPEG over max_image_pixels": "image_too_large",
    "1x1 image": "image_too_small",
    "valid: CMYK JPEG": KEPT,
    "valid: 16-bit PNG": KEPT,
    "valid: palette PNG, transparency": KEPT,
    "valid: RGBA PNG, half transparent": KEPT,
    "a 1 MB question": "prompt_too_long",
    "absolute path": "unsafe_path",
    "climbs out with ..": "unsafe_path",
    "symlink leaving the root": "unsafe_path",
}
REQUIRED_JSONL_LINES = {
    "line cut short": "invalid_json",
    "Latin-1 byte": "not_utf8",
    "UTF-16 bytes": "not_utf8",
}


def test_corpus_covers_the_brief(corpus: Corpus) -> None:
    m = corpus.manifest
    for index in ("data.json", "data.jsonl"):
        got = {c.case: c.expect for c in m.indexes[index]}
        assert REQUIRED_CASES.items() <= got.items(), index
        assert sum(c.expect == KEPT for c in m.indexes[index]) >= 20
    got = {c.case: c.expect for c in m.indexes["data.jsonl"]}
    assert REQUIRED_JSONL_LINES.items() <= got.items()
    assert (corpus.root / "images/coco/bad/bomb.png").stat().st_size < 100  # header only
    big = [c for c in m.indexes["data.json"] if c.expect == "prompt_too_long"]
    assert big and (corpus.root / "data.json").stat().st_size > 1_000_000
    # Small on disk apart from the 1 MB prompt inside each index.
    images = sum(p.stat().st_size for p in (corpus.root / "images").rglob("*") if p.is_file())
    assert images < 300_000


def test_corpus_is_deterministic(corpus: Corpus, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert make_corpus(again) == corpus.manifest
    files = 0
    for path in sorted(again.rglob("*")):
        rel = path.relative_to(again)
        if path.is_symlink():
            assert os.readlink(path) == os.readlink(corpus.root / rel)
        elif path.is_file():
            assert filecmp.cmp(path, corpus.root / rel, shallow=False), rel
            files += 1
    assert files > 50
