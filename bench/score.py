"""Score-stage forward pass: time and peak memory of the one-layer probe, per model.

    .venv/bin/python bench/score.py [--models demo families] [--batch 2] [--reps 10]
                                    [--threads 0] [--device cpu]
    .venv/bin/python bench/score.py --models all --reps 5 --threads 1  # + the 32-layer shape

`--models` takes any of: demo (the demo's tiny LLaVA, 8 layers, 224 px images),
real (LLaVA-1.5-7b's token shape: 4 x 576 image tokens, 32 decoder layers, at a
reduced width: --real-hidden, --real-heads), families (every family tiny model of
tests/families/factory.py that the stage accepts), one family by name, or all.

Each model gets the score stage's own batch: `stages/score.py:teacher_forced` over
--batch 4-image sequence samples with teacher-forced responses of different lengths
(left padding), the probe at layer num_layers // 2 over the union of the answer rows,
as `score_batch` reads it. Variants, on the same inputs:
- (a) plain forward, sdpa, no attentions: the floor;
- (p) the probe, `capture_layer_attention`;
- (b) naive: the model loaded with eager attention, `output_attentions=True`, then
  the layer sliced to the answer rows and averaged over heads (what the reference does).

Time: warm-up, then rounds, each running every variant once in a rotated order (fair
on a noisy machine); at least --reps rounds, more for fast models, until the plain
forward has had about --min-time seconds. Median and minimum per variant. With 2
threads on 2 cores any other busy process stalls torch's thread barriers and a pass
can take 5-10x longer: check the load average printed, or compare with --threads 1.

Peak memory, two measures, each variant in a fresh subprocess after one warm-up pass:
- RSS: glibc is started with a fixed MALLOC_MMAP_THRESHOLD_, so every large tensor is
  mmapped and returned to the OS when freed and RSS follows live memory; the kernel's
  high-water mark is reset (/proc/self/clear_refs, Linux >= 4.0), the pass runs, and
  VmHWM - VmRSS before is the pass's extra peak. Includes kernel scratch buffers and
  allocator slack; RSS is sampled by the kernel per page, so it is real but coarse.
- tensors: a TorchDispatchMode adds up the storages that ops create and that are still
  alive, and keeps the maximum. Exact for tensors, blind to buffers allocated inside a
  kernel (e.g. sdpa's on CPU).
With CUDA, `torch.cuda.max_memory_allocated` over the pass is reported as well and is
the memory figure the goal is judged on; on CPU, the tensor figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # local random models only: never reach for the hub

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))  # score_models, run from anywhere
from score_models import Spec, build_items, refusal, select

from mia_dpo.config import ModelConfig
from mia_dpo.models.attention import capture_layer_attention
from mia_dpo.models.loading import LoadedModel, load_model
from mia_dpo.stages.score import TeacherForced, teacher_forced

VARIANTS = {
    "a": "(a) plain forward, sdpa",
    "p": "(p) probe, one layer",
    "b": "(b) naive eager, all layers",
}
TIME_GOAL, MEMORY_GOAL = 1.15, 0.05  # issue 11: probe / plain time, probe / naive memory
GOALS = (("time", TIME_GOAL), ("memory", MEMORY_GOAL))
MIB = 2**20


# Variants: each returns what scoring keeps (None for the floor)


def plain(model: Any, inputs: dict, layer: int, rows: tuple[int, int]) -> None:
    with torch.no_grad():
        model(**inputs, use_cache=False)


def probe(model: Any, inputs: dict, layer: int, rows: tuple[int, int]) -> torch.Tensor:
    return capture_layer_attention(model, inputs, layer, rows)  # (B, R, T)


def naive(model: Any, inputs: dict, layer: int, rows: tuple[int, int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs, use_cache=False, output_attentions=True)
    return out.attentions[layer][:, :, rows[0] : rows[1]].float().mean(1)  # (B, R, T)


RUN: dict[str, Callable[..., Any]] = {"a": plain, "p": probe, "b": naive}


def load(model_dir: Path, variant: str, device: str) -> LoadedModel:
    attn = "eager" if variant == "b" else "sdpa"
    return load_model(ModelConfig(path=str(model_dir), attn_implementation=attn, device=device))


def prepare(lm: LoadedModel, batch: int) -> tuple[TeacherForced, int, tuple[int, int]]:
    """The stage's batch, its probe layer and the union of its answer rows."""
    tf = teacher_forced(lm, build_items(lm, batch))
    rows = (min(r for r, _ in tf.rows), max(r for _, r in tf.rows))
    return tf, lm.num_layers // 2, rows


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# Memory


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the mode and still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        flat_in = tree_flatten((args, kwargs))[0]
        # in-place ops and views hand back an input's storage: nothing new
        reused = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or ptr in reused or ptr in self._seen:
                continue
            self._seen.add(ptr)
            self.live += size
            self.peak = max(self.peak, self.live)
            # fires when the storage itself dies, whatever views of it were made
            weakref.finalize(storage, self._free, ptr, size)
        return out

    def _free(self, ptr: int, size: int) -> None:
        self._seen.discard(ptr)
        self.live -= size


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_memory(model_dir: Path, variant: str, batch: int, device: str) -> dict[str, float]:
    """In this (fresh) process: the variant's extra peak memory over one pass, in MiB."""
    lm = load(model_dir, variant, device)
    tf, layer, rows = prepare(lm, batch)
    fn = RUN[variant]
    fn(lm.model, tf.inputs, layer, rows)  # warm-up: lazy kernel set-up is not the pass's cost
    result: dict[str, float] = {}
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kib("VmRSS")
        kept = fn(lm.model, tf.inputs, layer, rows)
        result["rss"] = (_status_kib("VmHWM") - before) / 1024
        del kept
    except OSError:
        result["rss"] = float("nan")  # not Linux, or /proc read-only
    with LiveTensorPeak() as tracker:
        kept = fn(lm.model, tf.inputs, layer, rows)
    result["tensors"] = tracker.peak / MIB
    del kept
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(lm.model, tf.inputs, layer, rows)
        torch.cuda.synchronize()
        result["cuda"] = (torch.cuda.max_memory_allocated() - base) / MIB
    return result


def memory_in_subprocess(model_dir: Path, variant: str, args: argparse.Namespace) -> dict:
    # a fixed threshold also turns off glibc's sliding one, which would keep freed tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--measure", variant, "--model-dir", str(model_dir)]
    cmd += ["--batch", str(args.batch), "--threads", str(torch.get_num_threads())]
    cmd += ["--device", args.device]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory run of {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Time


def time_variants(model_dir: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    sdpa, eager = load(model_dir, "a", args.device), load(model_dir, "b", args.device)
    tf, layer, rows = prepare(sdpa, args.batch)
    inputs = tf.inputs
    models = {"a": sdpa.model, "p": sdpa.model, "b": eager.model}

    def timed(v: str) -> float:
        sync(sdpa.device)
        t0 = time.perf_counter()
        RUN[v](models[v], inputs, layer, rows)
        sync(sdpa.device)
        return time.perf_counter() - t0

    first = {v: timed(v) for v in VARIANTS}  # warm-up, and how long a pass takes
    # tiny models pass in milliseconds: more rounds, or one hiccup decides the median
    rounds = max(args.reps, min(200, math.ceil(args.min_time / max(first["a"], 1e-4))))
    order = list(VARIANTS)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for n in range(rounds):
        for v in order[n % 3 :] + order[: n % 3]:
            times[v].append(timed(v) * 1000)
    p_w = probe(sdpa.model, inputs, layer, rows)
    b_w = naive(eager.model, inputs, layer, rows)
    shape = {
        "B": args.batch,
        "T": inputs["input_ids"].shape[1],
        "R": rows[1] - rows[0],
        "H": sdpa.model.config.get_text_config().num_attention_heads,
        "layers": sdpa.num_layers,
        "layer": layer,
        "image_tokens": sum(t.n_tokens for t in tf.images[0]),
        "elem": torch.finfo(sdpa.dtype).bits // 8,
        "diff": float((p_w - b_w.to(p_w)).abs().max()),
        "device": str(sdpa.device),
        "rounds": rounds,
    }
    return times, shape


def _ratio(a: float, b: float) -> float:
    """On a GPU the host-side numbers can be 0: no ratio then, not a crash."""
    return a / b if b else float("nan")


def measure_model(spec: Spec, args: argparse.Namespace, workdir: Path) -> dict | str:
    """Build, time and measure one model; print its detail block. A refusal by the
    stage comes back as a string (a skip, not a failure)."""
    model_dir = spec.build(workdir / spec.name)
    why = refusal(model_dir)
    if why is not None:
        return why
    runs, s = time_variants(model_dir, args)
    mem = {v: memory_in_subprocess(model_dir, v, args) for v in VARIANTS}
    ms = {v: statistics.median(t) for v, t in runs.items()}
    best = {v: min(t) for v, t in runs.items()}

    print(f"== {spec.name}: {spec.about}")
    print(
        f"   {s['layers']} decoder layers (probe at {s['layer']}), {s['H']} heads; "
        f"{s['image_tokens']} image tokens per sample; B={s['B']}, T={s['T']}, "
        f"R={s['R']} answer rows; {s['device']}, median of {s['rounds']} rounds; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    cuda = "cuda" in mem["a"]
    head = f"   {'variant':<30}{'median ms':>10}{'/ (a)':>7}{'min ms':>8}{'/ (a)':>7}"
    head += f"{'RSS MB':>8}{'/ (b)':>7}{'tensor MB':>11}{'/ (b)':>7}"
    print(head + (f"{'cuda MB':>9}{'/ (b)':>7}" if cuda else ""))
    for v, name in VARIANTS.items():
        m, nb = mem[v], mem["b"]
        line = f"   {name:<30}{ms[v]:>10.1f}{ms[v] / ms['a']:>7.2f}"
        line += f"{best[v]:>8.1f}{best[v] / best['a']:>7.2f}"
        line += f"{m['rss']:>8.1f}{_ratio(m['rss'], nb['rss']):>7.2f}"
        line += f"{m['tensors']:>11.1f}{_ratio(m['tensors'], nb['tensors']):>7.2f}"
        if cuda:
            line += f"{m['cuda']:>9.1f}{_ratio(m['cuda'], nb['cuda']):>7.2f}"
        print(line)
    b, h, t, r, e = s["B"], s["H"], s["T"], s["R"], s["elem"]
    print(
        f"   attention tensors, analytic: (b) layers x B x H x T x T x {e} B = "
        f"{s['layers'] * b * h * t * t * e / MIB:.1f} MB kept; (p) B x H x R x T x 4 B = "
        f"{b * h * r * t * 4 / MIB:.2f} MB transient, B x R x T x 4 B = "
        f"{b * r * t * 4 / MIB:.3f} MB kept; probe vs naive max |diff| {s['diff']:.1e}\n",
        flush=True,
    )
    key = "cuda" if cuda else "tensors"
    return {
        **s, "about": spec.about, "ms": ms, "best": best, "mem": mem, "key": key,
        "time": ms["p"] / ms["a"], "time_min": best["p"] / best["a"],
        "naive_time": ms["b"] / ms["a"],
        "memory": _ratio(mem["p"][key], mem["b"][key]),
        "rss": _ratio(mem["p"]["rss"], mem["b"]["rss"]),
    }  # fmt: skip


def print_table(results: dict[str, dict]) -> None:
    key = next(iter(results.values()))["key"]
    cols = [
        ("model", 17), ("layers", 7), ("B", 3), ("T", 6), ("R", 4),
        ("(a) ms", 9), ("(p) ms", 9), ("(b) ms", 9), ("p/a", 7), ("p/a min", 8), ("b/a", 7),
        ("(a) MB", 8), ("(p) MB", 8), ("(b) MB", 9), ("p/b", 7), ("p/b RSS", 8),
        ("extra", 7), ("time", 6), ("mem", 5),
    ]  # fmt: skip
    print(
        f"time: median ms per pass; p/a = probe over plain forward (goal <= {TIME_GOAL}x), "
        "p/a min = the same of the minima, b/a = naive over plain.\n"
        f"memory: {key} peak MB of one pass; p/b = probe over naive all-layer attentions "
        f"(goal <= {MEMORY_GOAL}), p/b RSS = the same of the RSS peaks, extra = what reading "
        "attention adds over the plain forward: ((p) - (a)) / ((b) - (a))."
    )
    widths = [w for _, w in cols]
    print(_row(widths, [c for c, _ in cols]))
    for name, s in results.items():
        m = {v: s["mem"][v][key] for v in VARIANTS}
        extra = _ratio(m["p"] - m["a"], m["b"] - m["a"])
        goals = ["ok" if s[k] <= g else "over" for k, g in GOALS]
        cells = [
            name, f"{s['layers']}@{s['layer']}", s["B"], s["T"], s["R"],
            f"{s['ms']['a']:.1f}", f"{s['ms']['p']:.1f}", f"{s['ms']['b']:.1f}",
            f"{s['time']:.2f}x", f"{s['time_min']:.2f}x", f"{s['naive_time']:.2f}x",
            f"{m['a']:.1f}", f"{m['p']:.1f}", f"{m['b']:.1f}",
            f"{s['memory']:.3f}", f"{s['rss']:.3f}", f"{extra:.3f}", *goals,
        ]  # fmt: skip
        print(_row(widths, cells))
    for name, s in results.items():  # what each row is: the real shape's reduced width above all
        print(f"  {name}: {s['about']}")


def _row(widths: list[int], cells: list[Any]) -> str:
    """The first cell left-aligned (names), the rest right-aligned (numbers)."""
    first = f"{cells[0]!s:<{widths[0]}}"
    return first + "".join(f"{c!s:>{w}}" for w, c in zip(widths[1:], cells[1:], strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", nargs="+", default=["demo", "families"],
        help="any of: all, demo, real, families, or a family name (default: demo families)",
    )  # fmt: skip
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the demo model")
    ap.add_argument("--image-size", type=int, default=224, help="demo model pixels; patch 16/14")
    ap.add_argument("--real-hidden", type=int, default=256, help="width of the real shape")
    ap.add_argument("--real-heads", type=int, default=8, help="heads of the real shape")
    ap.add_argument("--batch", type=int, default=2, help="responses per pass")
    ap.add_argument("--reps", type=int, default=10, help="timed rounds, at least")
    ap.add_argument("--min-time", type=float, default=2.0, help="seconds of plain forwards, about")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: its default)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--measure", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:  # child: one variant's memory, as one JSON line
        print(json.dumps(measure_memory(args.model_dir, args.measure, args.batch, args.device)))
        return

    specs = select(args.models, args.layers, args.image_size, args.real_hidden, args.real_heads)
    print(f"torch threads {torch.get_num_threads()}, device {args.device}, batch {args.batch}\n")
    results: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as d:
        for spec in specs:
            try:
                out = measure_model(spec, args, Path(d))
            except Exception as e:  # one model failing must not hide the others' figures
                traceback.print_exc()
                skipped[spec.name] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0]}"
                continue
            if isinstance(out, str):
                skipped[spec.name] = f"refused by the stage: {out}"
            else:
                results[spec.name] = out
    if results:
        print_table(results)
    for name, why in skipped.items():
        print(f"{name}: {why}")
    print(f"load average at the end {os.getloadavg()[0]:.2f} (other processes make times noisy)")


if __name__ == "__main__":
    main()
