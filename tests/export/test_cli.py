"""`mia-dpo export` on the command line: what it writes, and every refusal in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mia_dpo.cli import main
from mia_dpo.config import RunConfig
from mia_dpo.export.common import MANIFEST
from mia_dpo.records import Pair
from mia_dpo.runtime import layout
from mia_dpo.runtime.store import LocalStore
from tests.servers import free_port


@pytest.fixture
def cli(run_store: tuple[LocalStore, RunConfig], tmp_path: Path, capsys: pytest.CaptureFixture):
    """Runs `mia-dpo export ... --run-id exp --config <the run's store>`:
    (exit code, stdout, stderr)."""
    store, _ = run_store
    config = tmp_path / "run.yaml"
    config.write_text(f"store:\n  backend: local\n  root: {store.root}\n")

    def run(*args: str, run_id: str = "exp") -> tuple[int, str, str]:
        code = main(["export", *args, "--run-id", run_id, "--config", str(config)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def one_error(result: tuple[int, str, str], *needles: str) -> str:
    code, _, err = result
    assert code == 2, result
    line = err.strip()
    assert line.startswith("mia-dpo: error: ") and "\n" not in line, err
    for needle in needles:
        assert needle in line, line
    return line


@pytest.mark.parametrize("fmt", ["trl", "llamafactory", "hf"])
def test_each_format_prints_what_it_wrote(cli, tmp_path: Path, fmt: str) -> None:
    code, out, err = cli("--format", fmt, "--out", str(tmp_path / fmt))
    assert code == 0, err
    manifest = json.loads((tmp_path / fmt / MANIFEST).read_text())
    assert manifest["format"] == fmt
    per = ", ".join(f"{f} {n}" for f, n in manifest["per_format"].items())
    images = manifest["images"]
    assert (
        out.strip()
        == f"{manifest['pairs']} pairs ({per}), {images} images -> {tmp_path / fmt} ({fmt})"
    )
    assert err == ""


def test_unknown_run_and_unknown_format(cli, tmp_path: Path) -> None:
    out = str(tmp_path / "o")
    one_error(cli("--format", "trl", "--out", out, run_id="nope"), "'nope'", "not found")
    one_error(cli("--format", "csv", "--out", str(tmp_path / "o")), "--format 'csv'", "trl")
    assert not (tmp_path / "o").exists()


def test_a_run_whose_select_stage_has_not_finished(cli, run_store, tmp_path: Path) -> None:
    store, _ = run_store
    store.delete(layout.stage_done_key("exp", "select"))
    one_error(cli("--format", "trl", "--out", str(tmp_path / "o")), "select stage has not finished")


def test_out_must_be_empty_unless_force_replaces_an_earlier_export(cli, tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert cli("--format", "trl", "--out", str(out))[0] == 0
    one_error(cli("--format", "hf", "--out", str(out)), "not empty", "--force")
    assert (out / "pairs.trl.jsonl").is_file()  # left alone
    assert cli("--format", "hf", "--out", str(out), "--force")[0] == 0
    assert json.loads((out / MANIFEST).read_text())["format"] == "hf"
    assert not (out / "pairs.trl.jsonl").exists()  # replaced, not mixed

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused = cli("--format", "trl", "--out", str(mine), "--force")
    one_error(refused, "not an earlier mia-dpo export")
    assert (mine / "notes.txt").read_text() == "keep me"


def test_a_missing_image_names_the_pair_and_the_uri(cli, run_store, tmp_path: Path) -> None:
    store, _ = run_store
    pair = Pair.model_validate_json(store.get_jsonl(layout.pairs_key("exp"))[2])
    Path(pair.image[0]).unlink()
    out = tmp_path / "o"
    refused = cli("--format", "llamafactory", "--out", str(out))
    one_error(refused, pair.id, pair.image[0], "not found")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".o.")] == []  # no leftovers


def test_push_offline_fails_in_one_line_after_the_export(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "o"
    line = one_error(
        cli("--format", "hf", "--out", str(out), "--push-to-hub", "someone/pairs"),
        "--push-to-hub someone/pairs", "HF_HUB_OFFLINE", "hf upload someone/pairs",
    )  # fmt: skip
    assert "--repo-type dataset" in line
    assert json.loads((out / MANIFEST).read_text())["format"] == "hf"  # the work is kept


def _online(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_push_without_a_token_or_reachable_hub(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _online(monkeypatch, tmp_path)
    one_error(cli("--format", "trl", "--out", str(tmp_path / "a"), "--push-to-hub", "me/p"),
              "no hub token", "HF_TOKEN")  # fmt: skip
    assert (tmp_path / "a" / MANIFEST).is_file()
    # A token, but the hub is a closed port on this machine: no request leaves it.
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    one_error(cli("--format", "trl", "--out", str(tmp_path / "b"), "--push-to-hub", "me/p"),
              "--push-to-hub me/p: ", "hf upload me/p")  # fmt: skip
    assert (tmp_path / "b" / MANIFEST).is_file()


def test_a_bad_repo_id_is_refused_before_any_work(cli, tmp_path: Path) -> None:
    one_error(cli("--format", "trl", "--out", str(tmp_path / "o"), "--push-to-hub", "no-owner"),
              "OWNER/NAME")  # fmt: skip
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--adapter", "--format", "trl"], "exclude each other"),
        ([], "say what to export"),
        (["--format", "trl", "--merged"], "--merged applies to --adapter only"),
        (["--adapter", "--force"], "--force applies to pairs"),
    ],
)
def test_argument_combinations(cli, tmp_path: Path, args: list[str], needle: str) -> None:
    one_error(cli(*args, "--out", str(tmp_path / "o")), needle)


def test_adapter_calls_export_adapter_and_pushes_a_model_repo(
    cli, run_store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mia_dpo.export.adapter as adapter

    calls: list[tuple[Any, ...]] = []

    def fake(cfg: RunConfig, run_id: str, store: Any, out: Path, merged: bool) -> Path:
        calls.append((run_id, Path(store.root), out, merged))
        out.mkdir()
        (out / "adapter_config.json").write_text("{}")
        return out

    monkeypatch.setattr(adapter, "export_adapter", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "ad"
    code, stdout, err = cli("--adapter", "--merged", "--out", str(out), "--push-to-hub", "me/m")
    assert calls == [("exp", run_store[0].root, out, True)]
    assert stdout.strip() == f"adapter of run exp -> {out}"
    one_error((code, "", err), "--repo-type model")


BLOCKED = ("torch", "transformers", "peft", "trl", "datasets", "huggingface_hub")


def test_pairs_export_runs_without_torch_and_names_what_hf_needs(
    run_store: tuple[LocalStore, RunConfig], tmp_path: Path
) -> None:
    """The light install: none of the model packages importable (blocked at import)."""
    store, _ = run_store
    config = tmp_path / "run.yaml"
    config.write_text(f"store:\n  backend: local\n  root: {store.root}\n")
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {BLOCKED!r}:\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from mia_dpo.cli import main\n"
        "code = main(sys.argv[1:])\n"
        f"assert not [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r}]\n"
        "raise SystemExit(code)\n"
    )

    def export(*args: str) -> subprocess.CompletedProcess:
        argv = ["export", *args, "--run-id", "exp", "--config", str(config)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIA_DPO_")}
        return subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
            timeout=120,
        )  # fmt: skip

    for fmt in ("trl", "llamafactory"):
        proc = export("--format", fmt, "--out", str(tmp_path / fmt))
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / fmt / MANIFEST).is_file()
    for args, needle in (
        (["--format", "hf"], "export --format hf needs the datasets package"),
        (["--format", "trl", "--push-to-hub", "me/p"], "--push-to-hub needs the huggingface_hub"),
    ):
        proc = export(*args, "--out", str(tmp_path / "o"))
        one_error((proc.returncode, proc.stdout, proc.stderr), needle)
        assert not (tmp_path / "o").exists()
