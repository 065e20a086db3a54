"""GPU check of the model stages, for a machine with CUDA (CI has none).

    python bench/gpu_check.py [--out DIR]

1. The one-layer probe on CUDA equals eager `output_attentions` (float32, bfloat16).
2. augment -> generate -> score -> select end to end on the tiny model, on CUDA in
   bfloat16 (the GPU default), through the same Controller and stage code as on CPU.
Prints what it measured; exits non-zero on a mismatch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from mia_dpo.config import ModelConfig, load_config
from mia_dpo.controller import Controller
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.demo.tiny import build_tiny_model
from mia_dpo.models.attention import capture_layer_attention
from mia_dpo.models.loading import load_model
from mia_dpo.models.prompting import chat_text
from mia_dpo.runtime.queue import MemoryQueue
from mia_dpo.runtime.store import LocalStore
from mia_dpo.stages import get_stage


def probe_vs_eager(model_dir: Path, dtype: str, src: Path, device: str = "cuda") -> float:
    from PIL import Image

    sdpa = load_model(ModelConfig(path=str(model_dir), device=device, dtype=dtype))
    eager = load_model(
        ModelConfig(path=str(model_dir), device=device, dtype=dtype, attn_implementation="eager")
    )
    images = [Image.open(p).convert("RGB") for p in sorted((src / "images").rglob("*.png"))[:3]]
    prompt = "Image1:<image>\nImage2:<image>\nImage3:<image>\nIn Image2, what colour is the circle?"
    enc = sdpa.processor(
        text=[chat_text(sdpa.processor, prompt)], images=images, return_tensors="pt"
    )
    response = sdpa.tokenizer(" red blue green", add_special_tokens=False)["input_ids"]
    ids = torch.cat([enc["input_ids"][0], torch.tensor(response)])[None].to(sdpa.device)
    n = enc["input_ids"].shape[1]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": enc["pixel_values"].to(sdpa.device, sdpa.dtype)}  # fmt: skip
    worst = 0.0
    for layer in range(sdpa.num_layers):
        got = capture_layer_attention(sdpa.model, inputs, layer, (n - 1, ids.shape[1] - 1))
        with torch.no_grad():
            ref = eager.model(**inputs, output_attentions=True).attentions[layer]
        ref = ref.float().mean(1)[:, n - 1 : ids.shape[1] - 1]
        worst = max(worst, (got.float() - ref).abs().max().item())
    return worst


def pipeline(tmp: Path, src: Path, model_dir: Path) -> None:
    cfg = load_config(None, environ={}, overrides={
        "input.path": str(src / "data.json"), "input.image_root": str(src / "images"),
        "input.shard_size": 40, "store.root": str(tmp / "store"), "model.path": str(model_dir),
        "augment.grid_tile_px": 224, "generate.max_new_tokens": 8, "generate.batch_size": 16,
        "score.batch_size": 16,
    })  # fmt: skip
    t0 = time.perf_counter()
    outcomes = Controller(cfg, "gpu", LocalStore(cfg.store.root), MemoryQueue(cfg.queue),
                          stages=get_stage, progress=False).run()  # fmt: skip
    seconds = time.perf_counter() - t0
    for o in outcomes:
        print(f"  {o.stage}: kept {o.stats.kept} of {o.stats.total}, "
              f"dropped {dict(o.stats.dropped)}, {o.stats.seconds:.1f}s in shards")  # fmt: skip
    print(f"  whole pipeline {seconds:.1f}s on {torch.cuda.get_device_name()}")
    assert outcomes[-1].stats.total > 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name()}")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = tmp / "src"
        write_synthetic(src, 240, seed=0)
        model_dir = build_tiny_model(tmp / "tiny", seed=0, text_layers=8, hidden=256, heads=8)
        ok = True
        for dtype, tol in (("float32", 1e-5), ("bfloat16", 2e-2)):
            worst = probe_vs_eager(model_dir, dtype, src)
            good = worst <= tol
            ok &= good
            print(f"probe vs eager on CUDA, {dtype}: max |diff| {worst:.2e} (tol {tol}) "
                  f"{'ok' if good else 'MISMATCH'}")  # fmt: skip
        print("pipeline on CUDA, bfloat16:")
        pipeline(tmp, src, model_dir)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
