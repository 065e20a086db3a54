"""Score-stage forward pass: time and peak memory of the one-layer probe, side by side.

    .venv/bin/python bench/score.py [--layers 8] [--image-size 224] [--batch 2] [--reps 10]
                                    [--threads 0]

One random-weight tiny LLaVA (hidden 256, 8 heads, 2-layer vision tower) and one
left-padded batch of 4-image sequence prompts with a teacher-forced response appended,
built as `stages/score.py:score_batch` builds them. Variants, on the same inputs:
- (a) plain forward, sdpa, no attentions: the floor;
- (p) the probe, `capture_layer_attention` at layer num_layers // 2, response rows;
- (b) naive: the model loaded with eager attention, `output_attentions=True`, then
  layer L sliced to the response rows and averaged over heads (what the reference does).

Time: warm-up, then --reps rounds, each running every variant once in a rotated order
(fair on a noisy 2-core machine); the median and the minimum per variant are reported.
With 2 threads on 2 cores, any other busy process stalls torch's thread barriers and a
pass can take 5-10x longer: check the load average printed, or compare with --threads 1.

Peak memory, two measures, each variant in a fresh subprocess after one warm-up pass:
- RSS: glibc is started with a fixed MALLOC_MMAP_THRESHOLD_, so every large tensor is
  mmapped and returned to the OS when freed and RSS follows live memory; the kernel's
  high-water mark is reset (/proc/self/clear_refs, Linux >= 4.0), the pass runs, and
  VmHWM - VmRSS before is the pass's extra peak. Includes kernel scratch buffers and
  allocator slack; RSS is sampled by the kernel per page, so it is real but coarse.
- tensors: a TorchDispatchMode adds up the storages that ops create and that are still
  alive, and keeps the maximum. Exact for tensors, blind to buffers allocated inside a
  kernel (e.g. sdpa's on CPU).
With CUDA, `torch.cuda.max_memory_allocated` over the pass is reported as well.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # a local tiny model only: never reach for the hub

import torch
from PIL import Image, ImageDraw
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mia_dpo.config import ModelConfig
from mia_dpo.demo.tiny import build_tiny_model
from mia_dpo.models.attention import capture_layer_attention
from mia_dpo.models.loading import LoadedModel, load_model
from mia_dpo.models.prompting import chat_text
from mia_dpo.prompts import sequence_prompt

VARIANTS = {
    "a": "(a) plain forward, sdpa",
    "p": "(p) probe, one layer",
    "b": "(b) naive eager, all layers",
}
N_IMAGES = 4
RESPONSE_LENGTHS = (40, 24, 32, 20)  # tokens, cycled over the batch: rows differ, so padding
_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
MIB = 2**20


# Inputs


def synthetic_images(item: int) -> list[Image.Image]:
    images = []
    for j in range(N_IMAGES):
        img = Image.new("RGB", (256, 256), "white")
        x = 20 + 40 * ((item + j) % 4)
        colour = _COLOURS[(item * N_IMAGES + j) % len(_COLOURS)]
        ImageDraw.Draw(img).rectangle([x, x, x + 80, x + 80], fill=colour)
        images.append(img)
    return images


def build_inputs(lm: LoadedModel, batch: int) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """A left-padded teacher-forced batch and the response rows, as score_batch builds them."""
    words = lm.tokenizer("the square is red and the circle is blue in the picture .")["input_ids"]
    encoded = []
    for i in range(batch):
        prompt = sequence_prompt(N_IMAGES, 1 + i % N_IMAGES, "What colour is the square?")
        enc = lm.processor(
            text=[chat_text(lm.processor, prompt)],
            images=synthetic_images(i),
            return_tensors="pt",
        )
        n_resp = RESPONSE_LENGTHS[i % len(RESPONSE_LENGTHS)]
        response = torch.tensor([words[k % len(words)] for k in range(n_resp)])
        ids = torch.cat([enc["input_ids"][0], response.to(enc["input_ids"].dtype)])
        encoded.append((ids, len(enc["input_ids"][0]), enc["pixel_values"]))
    width = max(len(ids) for ids, _, _ in encoded)
    input_ids = torch.full((batch, width), lm.tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    rows = []
    for i, (ids, n_prompt, _) in enumerate(encoded):
        offset = width - len(ids)
        input_ids[i, offset:] = ids
        mask[i, offset:] = 1
        rows.append((offset + n_prompt - 1, offset + len(ids) - 1))
    inputs = {
        "input_ids": input_ids.to(lm.device),
        "attention_mask": mask.to(lm.device),
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(lm.device),
        "pixel_values": torch.cat([pv for _, _, pv in encoded]).to(lm.device, lm.dtype),
    }
    return inputs, (min(r for r, _ in rows), max(r for _, r in rows))


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


def load(model_dir: Path, variant: str) -> LoadedModel:
    attn = "eager" if variant == "b" else "sdpa"
    return load_model(ModelConfig(path=str(model_dir), attn_implementation=attn))


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


def measure_memory(model_dir: Path, variant: str, batch: int) -> dict[str, float]:
    """In this (fresh) process: the variant's extra peak memory over one pass, in MiB."""
    lm = load(model_dir, variant)
    inputs, rows = build_inputs(lm, batch)
    layer = lm.num_layers // 2
    fn = RUN[variant]
    fn(lm.model, inputs, layer, rows)  # warm-up: lazy kernel set-up is not the pass's cost
    result: dict[str, float] = {}
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kib("VmRSS")
        kept = fn(lm.model, inputs, layer, rows)
        result["rss"] = (_status_kib("VmHWM") - before) / 1024
        del kept
    except OSError:
        result["rss"] = float("nan")  # not Linux, or /proc read-only
    with LiveTensorPeak() as tracker:
        kept = fn(lm.model, inputs, layer, rows)
    result["tensors"] = tracker.peak / MIB
    del kept
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(lm.model, inputs, layer, rows)
        torch.cuda.synchronize()
        result["cuda"] = (torch.cuda.max_memory_allocated() - base) / MIB
    return result


def memory_in_subprocess(model_dir: Path, variant: str, batch: int) -> dict[str, float]:
    # a fixed threshold also turns off glibc's sliding one, which would keep freed tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--measure", variant, "--model-dir", str(model_dir)]
    cmd += ["--batch", str(batch), "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"memory run of {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Time


def time_variants(model_dir: Path, batch: int, reps: int) -> tuple[dict[str, list[float]], dict]:
    sdpa, eager = load(model_dir, "a"), load(model_dir, "b")
    inputs, rows = build_inputs(sdpa, batch)
    layer = sdpa.num_layers // 2
    models = {"a": sdpa.model, "p": sdpa.model, "b": eager.model}
    for v in VARIANTS:  # warm-up
        RUN[v](models[v], inputs, layer, rows)
    order = list(VARIANTS)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for rep in range(reps):
        for v in order[rep % 3 :] + order[: rep % 3]:
            sync(sdpa.device)
            t0 = time.perf_counter()
            RUN[v](models[v], inputs, layer, rows)
            sync(sdpa.device)
            times[v].append(time.perf_counter() - t0)
    p_w = probe(sdpa.model, inputs, layer, rows)
    b_w = naive(eager.model, inputs, layer, rows)
    shape = {
        "B": batch,
        "T": inputs["input_ids"].shape[1],
        "R": rows[1] - rows[0],
        "H": sdpa.model.config.text_config.num_attention_heads,
        "layers": sdpa.num_layers,
        "layer": layer,
        "image_tokens": sdpa.tokens_per_image,
        "elem": torch.finfo(sdpa.dtype).bits // 8,
        "diff": float((p_w - b_w.to(p_w)).abs().max()),
        "device": str(sdpa.device),
    }
    return {v: [x * 1000 for x in t] for v, t in times.items()}, shape


def _ratio(a: float, b: float) -> float:
    """On a GPU the host-side numbers can be 0: no ratio then, not a crash."""
    return a / b if b else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the tiny model")
    ap.add_argument("--image-size", type=int, default=224, help="pixels; patch 16 (or 14)")
    ap.add_argument("--batch", type=int, default=2, help="responses per pass")
    ap.add_argument("--reps", type=int, default=10, help="timed rounds per variant")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: its default)")
    ap.add_argument("--measure", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.measure:  # child: one variant's memory, as one JSON line
        print(json.dumps(measure_memory(args.model_dir, args.measure, args.batch)))
        return

    patch = 16 if args.image_size % 16 == 0 else 14
    with tempfile.TemporaryDirectory() as d:
        model_dir = build_tiny_model(
            Path(d) / "model", seed=0, image_size=args.image_size, patch_size=patch,
            text_layers=args.layers, hidden=256, heads=8, vision_layers=2, vision_hidden=128,
        )  # fmt: skip
        runs, s = time_variants(model_dir, args.batch, args.reps)
        mem = {v: memory_in_subprocess(model_dir, v, args.batch) for v in VARIANTS}

    print(
        f"tiny LLaVA: {s['layers']} decoder layers (probe at {s['layer']}), hidden 256, "
        f"{s['H']} heads; {N_IMAGES} images x {s['image_tokens']} tokens; "
        f"B={s['B']}, T={s['T']}, R={s['R']} response rows; {s['device']}, "
        f"torch threads {torch.get_num_threads()}, median of {args.reps}; "
        f"load average {os.getloadavg()[0]:.2f} at the end (other processes make times noisy)\n"
    )
    cuda = "cuda" in mem["a"]
    ms = {v: statistics.median(t) for v, t in runs.items()}
    best = {v: min(t) for v, t in runs.items()}
    head = f"{'variant':<30}{'median ms':>10}{'/ (a)':>7}{'min ms':>8}{'/ (a)':>7}"
    head += f"{'RSS MB':>8}{'/ (b)':>7}"
    head += f"{'tensor MB':>11}{'/ (b)':>7}"
    print(head + (f"{'cuda MB':>9}{'/ (b)':>7}" if cuda else ""))
    for v, name in VARIANTS.items():
        m, nb = mem[v], mem["b"]
        line = f"{name:<30}{ms[v]:>10.1f}{ms[v] / ms['a']:>7.2f}"
        line += f"{best[v]:>8.1f}{best[v] / best['a']:>7.2f}"
        line += f"{m['rss']:>8.1f}{_ratio(m['rss'], nb['rss']):>7.2f}"
        line += f"{m['tensors']:>11.1f}{_ratio(m['tensors'], nb['tensors']):>7.2f}"
        if cuda:
            line += f"{m['cuda']:>9.1f}{_ratio(m['cuda'], nb['cuda']):>7.2f}"
        print(line)

    b, h, t, r, e = s["B"], s["H"], s["T"], s["R"], s["elem"]
    all_layers = s["layers"] * b * h * t * t * e / MIB
    print(
        f"\nattention tensors, analytic: (b) layers x B x H x T x T x {e} B = {all_layers:.1f} MB"
        f" kept; (p) B x H x R x T x 4 B = {b * h * r * t * 4 / MIB:.2f} MB transient,"
        f" B x R x T x 4 B = {b * r * t * 4 / MIB:.3f} MB kept"
    )
    print(f"probe vs naive weights: max |diff| = {s['diff']:.2e}")
    print(
        f"probe time / plain forward time: {ms['p'] / ms['a']:.2f}x (target <= 1.15x); "
        f"of the minima: {best['p'] / best['a']:.2f}x"
    )
    cuda_txt = (
        f", {_ratio(mem['p']['cuda'], mem['b']['cuda']):.2f} (CUDA)" if "cuda" in mem["p"] else ""
    )
    rss = _ratio(mem["p"]["rss"], mem["b"]["rss"])
    tensors = _ratio(mem["p"]["tensors"], mem["b"]["tensors"])
    print(f"probe memory / naive memory: {rss:.2f} (RSS), {tensors:.2f} (tensors){cuda_txt}")


if __name__ == "__main__":
    main()
