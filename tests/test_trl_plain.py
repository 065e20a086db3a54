"""Our select stage's pairs file is plain TRL data: a DPOTrainer script that imports
nothing of ours trains on it (images opened from the paths in the file)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from mia_dpo.config import RunConfig, StoreConfig
from mia_dpo.records import AugmentedSample, Response, ScoredResponse, Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import StageContext
from mia_dpo.runtime.layout import trl_pairs_key
from mia_dpo.runtime.store import BlobReader, LocalStore
from mia_dpo.stages.select import run_shard

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220)}

PLAIN_SCRIPT = """
import json
import sys

from datasets import Dataset
from peft import LoraConfig
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl import DPOConfig, DPOTrainer

pairs, model_dir, out = sys.argv[1:4]
rows = [json.loads(line) for line in open(pairs) if line.strip()]
dataset = Dataset.from_list(
    [
        {
            "images": [Image.open(path).convert("RGB") for path in row["images"]],
            "prompt": row["prompt"],
            "chosen": row["chosen"],
            "rejected": row["rejected"],
        }
        for row in rows
    ]
)
processor = AutoProcessor.from_pretrained(model_dir)
model = AutoModelForImageTextToText.from_pretrained(model_dir)
args = DPOConfig(
    output_dir=out, max_steps=2, per_device_train_batch_size=2, learning_rate=5e-4,
    logging_steps=1, save_strategy="no", report_to=[], bf16=False,
    gradient_checkpointing=False, max_length=None,
)
lora = LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*_proj")
trainer = DPOTrainer(
    model=model, args=args, train_dataset=dataset, processing_class=processor, peft_config=lora
)
trainer.train()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print(f"pairs={len(rows)} steps={trainer.state.global_step} loss={losses[-1]:.6f}")
"""


def write_scored(store: LocalStore, images: Path) -> None:
    """Score output for 4 two-image prompts, each answered with Image1's colour."""
    records = []
    names = list(COLOURS)
    for i in range(4):
        first, second = names[i % 3], names[(i + 1) % 3]
        paths = []
        for k, colour in ((1, first), (2, second)):
            img = Image.new("RGB", (80, 64), (240, 240, 240))  # not square: padding is ours
            ImageDraw.Draw(img).ellipse([20, 12, 60, 52], fill=COLOURS[colour])
            paths.append(str(images / f"s{i}-{k}.png"))
            img.save(paths[-1])
        sample = AugmentedSample(
            sample_id=f"s{i}-sequence", source_id=f"s{i}", source="colors", format="sequence",
            images=paths, target_index=2, n_images=2,
            prompt="Image1:<image>\nImage2:<image>\nIn Image2, what colour is the circle?",
            chosen=second, target_image=f"colors/s{i}.png",
        )  # fmt: skip
        response = Response(text=first, token_ids=[5, 3], logprobs=[-0.7, -0.1], ppl=1.5)
        scored = ScoredResponse(
            sample=sample, response_index=0, response=response, layer=2, ratio=0.3,
            decision="rejected", reason="attention",
        )  # fmt: skip
        records.append(scored)
    store.put_jsonl(layout.shard_key("plain", "score", 0), [r.model_dump_json() for r in records])


def test_select_pairs_train_in_a_plain_trl_script(tmp_path: Path, tiny_model_dir: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    store = LocalStore(tmp_path / "store")
    write_scored(store, images)
    ctx = StageContext(store=store, blobs=BlobReader(StoreConfig()), config=RunConfig())
    assert run_shard(Task.make("plain", "select", 0), ctx).kept == 4
    pairs = Path(store.uri(trl_pairs_key("plain")))

    script = tmp_path / "plain_dpo.py"
    script.write_text(PLAIN_SCRIPT)
    assert "mia_dpo" not in script.read_text()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),  # nothing cached from our own runs
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
    }
    # -X importtime lists every module imported: proof that nothing of ours was.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(script), str(pairs), str(tiny_model_dir),
         str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"pairs=4 steps=2 loss=(\d+\.\d+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    assert float(m.group(1)) > 0
    assert "mia_dpo" not in proc.stderr
