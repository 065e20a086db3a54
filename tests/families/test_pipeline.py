"""Every supported family runs every stage on its tiny model (tests/families/factory.py):
the self-check reads the probe's two images, the score stage's attention and shares
equal an independent eager forward pass with output_attentions (sequence, grid and
pic-in-pic), greedy answers do not depend on the batch size, and TRL's collator
builds the very prompt and answer ids that generation and scoring saw.

"Independent" means the eager check does not use the family layer: it finds each
image's tokens from the `ImageK` labels in the token stream and takes the picture's
view from `VIEWS`, written from each architecture's model code.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from mia_dpo.config import ModelConfig, RunConfig
from mia_dpo.controller import Controller
from mia_dpo.data.images import pad_to_square
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.models import ratios
from mia_dpo.models.loading import check_model, probe_image_tokens
from mia_dpo.models.prompting import chat_text, encode
from mia_dpo.records import GeneratedSample, ScoredResponse
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import StageContext
from mia_dpo.runtime.queue import MemoryQueue
from mia_dpo.runtime.store import BlobReader, LocalStore
from mia_dpo.stages import get_stage
from tests.families.factory import FAMILIES
from tests.families.factory_vision import VISION_FAMILIES
from tests.integration.test_pairs_pipeline import COMMON

GRID = (4, 4)


def _first(n: int) -> tuple[int, int]:
    return (0, 16)


def _last(n: int) -> tuple[int, int]:
    return (n - 16, n)


# Family -> (tokens of the one picture -> the (start, end) of its 4x4 patch view).
VIEWS: dict[str, Callable[[int], tuple[int, int]]] = {
    "llava-interleave": _first,  # SigLIP, no CLS: all 16 tokens are the grid
    "llava-next": _first,  # the base view comes first, then anyres tiles and newlines
    "idefics3": _last,  # the global view closes the image, after its tiles
    "gemma3": _first,  # 16 pooled soft tokens
    "paligemma": _first,  # SigLIP, no CLS: all 16 tokens are the grid
    "qwen2-vl": _first,  # 4x4 merged tokens of a 64-pixel square picture
    "qwen2.5-vl": _first,
    "llava-onevision": _first,  # base view first, as LLaVA-NeXT
    "smolvlm": _last,  # Idefics3's global view
    "internvl": _last,  # the thumbnail closes a tiled image (a small one is one tile)
    "mistral3": _first,  # 4x4 merged patches of a 64-pixel square picture
}
BUILDERS = FAMILIES | VISION_FAMILIES
# The families whose processors build without torchvision; the others run in
# tests/families/vision/ in the vision environment (tests/families/factory_vision.py).
PARAMS = sorted(f for f in VIEWS if f in FAMILIES)


@pytest.fixture(scope="module", params=PARAMS)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, family: str) -> Path:
    return BUILDERS[family](tmp_path_factory.mktemp(family) / "model")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, model_dir: Path, family: str) -> LocalStore:
    root = tmp_path_factory.mktemp(f"{family}-run")
    write_synthetic(root / "src", 40, seed=11)
    cfg = RunConfig.model_validate(
        {**COMMON, "model": {"path": str(model_dir)},
         "input": {"path": str(root / "src" / "data.json"),
                   "image_root": str(root / "src" / "images"),
                   "shard_size": 20, "holdout_fraction": 0.2},
         "store": {"backend": "local", "root": str(root / "store")},
         "launcher": {"default_workers": 1}}
    )  # fmt: skip
    store = LocalStore(root / "store")
    outcomes = Controller(
        cfg, "fam", store, MemoryQueue(cfg.queue), stages=get_stage, progress=False
    ).run()
    assert [o.stage for o in outcomes] == COMMON["stages"]
    assert all(not o.dead_shards for o in outcomes)
    return store


CLASSES = {"llava-interleave": "Llava", "llava-next": "LlavaNext", "idefics3": "Idefics3",
           "gemma3": "Gemma3", "paligemma": "PaliGemma", "qwen2-vl": "Qwen2VL",
           "qwen2.5-vl": "Qwen2VL",
           "llava-onevision": "LlavaNext", "smolvlm": "Idefics3", "internvl": "InternVL",
           "mistral3": "Pixtral"}  # fmt: skip


def test_the_self_check_reads_both_probe_images(model_dir: Path, family: str) -> None:
    found = check_model(ModelConfig(path=str(model_dir)))
    assert type(found).__name__ == CLASSES[family]
    images = probe_image_tokens(found.processor, found)
    # the probe's 64x48 and 48x64 pictures: dynamic-resolution families keep the shape
    dynamic = family.startswith("qwen") or family == "mistral3"
    expected = [(3, 4), (4, 3)] if dynamic else [GRID, GRID]
    assert [t.picture.grid for t in images] == expected
    # every image token of the probe belongs to exactly one image, in order
    columns = [c for t in images for c in t.columns]
    assert columns == sorted(set(columns))
    assert images[0].columns[-1] < images[1].columns[0]


def test_every_stage_runs(run: LocalStore) -> None:
    assert run.get_jsonl(layout.trl_pairs_key("fam"))
    assert run.exists(layout.adapter_prefix(layout.train_prefix("fam")) + "adapter_config.json")
    assert run.exists(layout.evaluate_key("fam", "report.json"))


def _rows(store: LocalStore, stage: str) -> list[str]:
    rows = []
    for key in sorted(store.list(layout.stage_prefix("fam", stage))):
        if key.endswith(".jsonl") and not key.endswith(".dropped.jsonl"):
            rows += store.get_jsonl(key)
    return rows


def _processor(model_dir: Path) -> Any:
    """The processor as every stage uses it: the template the self-check settled on
    (images in place, one BOS)."""
    return check_model(ModelConfig(path=str(model_dir))).processor


def _model_images(processor: Any, uris: list[str]) -> list[Image.Image]:
    fill = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    return [pad_to_square(Image.open(u).convert("RGB"), fill) for u in uris]


def _image_token_id(model: Any) -> int:
    cfg = model.config
    return cfg.image_token_id if getattr(cfg, "image_token_id", None) else cfg.image_token_index


def _eager(model_dir: Path, rec: ScoredResponse, family: str) -> tuple[np.ndarray, list[list[int]]]:
    """attentions[layer], head mean, over the rows predicting the response, at each
    image's columns (found by the `ImageK` label before them): the stages' input,
    through an eager model given every processor output."""
    processor = _processor(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    images = _model_images(processor, rec.sample.images)
    enc = encode(
        processor, [chat_text(processor, rec.sample.prompt)], [images], return_tensors="pt"
    )
    n = enc["input_ids"].shape[1]
    answer = torch.tensor([rec.response.token_ids])
    inputs = dict(enc)
    inputs.pop("labels", None)  # PaliGemma's processor adds them; this pass computes no loss
    inputs["input_ids"] = torch.cat([enc["input_ids"], answer], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    for key in ("token_type_ids", "mm_token_type_ids"):  # answer tokens are text: 0 ...
        if key in enc:
            # ... except in PaliGemma's prefix-LM, where 1 marks the suffix (the answer)
            fill = 1 if key == "token_type_ids" and family == "paligemma" else 0
            inputs[key] = torch.cat([enc[key], torch.full_like(answer, fill)], 1)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    att = out.attentions[rec.layer][0].mean(0)  # (T, T)
    rows = att[n - 1 : n - 1 + answer.shape[1]].mean(0)  # (T,)
    ids = inputs["input_ids"][0].tolist()
    tokens = processor.tokenizer.convert_ids_to_tokens(ids)
    per_image: dict[str, list[int]] = {}
    label = "single"
    for col, (tok, tid) in enumerate(zip(tokens, ids, strict=True)):
        if tok.startswith("Image") and tok[5:].isdigit():
            label = tok
        if tid == _image_token_id(model):
            per_image.setdefault(label, []).append(col)
    columns = list(per_image.values())
    assert len(columns) == rec.sample.n_images if rec.sample.format == "sequence" else 1
    return rows.numpy(), columns


def test_shares_equal_an_eager_computation(run: LocalStore, model_dir: Path, family: str) -> None:
    recs = [ScoredResponse.model_validate_json(r) for r in _rows(run, "score")]
    picked: dict[str, ScoredResponse] = {}
    for rec in recs:
        if rec.ratio is not None:
            picked.setdefault(rec.sample.format, rec)
    assert set(picked) == {"sequence", "grid", "pic_in_pic"}
    for rec in picked.values():
        rows, columns = _eager(model_dir, rec, family)
        att = rows[[c for cols in columns for c in cols]]
        np.testing.assert_allclose(rec.token_attention, att, rtol=1e-4, atol=1e-7)
        s = rec.sample
        if s.format == "sequence":
            bounds = np.cumsum([0] + [len(c) for c in columns])
            shares = ratios.sequence_shares(att, list(itertools.pairwise(bounds)))
        else:
            a, b = VIEWS[family](len(att))
            if s.format == "grid":
                blocks = ratios.grid_block_sums(att[a:b], GRID, s.layout)
                shares = (blocks / blocks.sum()).flatten().tolist()
            else:
                r = ratios.pip_ratio(att[a:b], GRID, 1 / 6)
                shares = [1 - r, r]
        np.testing.assert_allclose(rec.image_shares, shares, atol=1e-5)
        assert rec.ratio == pytest.approx(shares[s.target_index - 1], abs=1e-5)


def test_batch_sizes_1_and_4_give_the_same_greedy_answers(run: LocalStore, model_dir: Path) -> None:
    from mia_dpo.models.loading import load_model
    from mia_dpo.stages.generate import generate_batch
    from mia_dpo.stages.model_inputs import load_images

    gens = [GeneratedSample.model_validate_json(r) for r in _rows(run, "generate")][:4]
    cfg = RunConfig.model_validate({**COMMON, "model": {"path": str(model_dir)}})
    ctx = StageContext(store=run, blobs=BlobReader(cfg.store), config=cfg)
    lm = load_model(cfg.model)
    batch = [(g.sample, load_images(ctx, g.sample, lm)) for g in gens]
    together = generate_batch(lm, ctx, batch)
    alone = [generate_batch(lm, ctx, [item])[0] for item in batch]
    assert [[r.token_ids for r in rs] for rs in together] == [
        [r.token_ids for r in rs] for rs in alone
    ]
    # and the stage's own answers (batch size 3 in the run) are the same ones
    assert [rs[0].token_ids for rs in alone] == [g.responses[0].token_ids for g in gens]


def test_training_sees_the_generation_tokens(run: LocalStore, model_dir: Path) -> None:
    """TRL's collator builds the prompt ids generation and scoring saw (one BOS), and
    the rejected answer's ids are the generated ids."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from mia_dpo.models.prompting import answer_messages, prompt_messages

    processor = _processor(model_dir)
    # a response the score stage kept (answers that do not survive decoding and
    # re-encoding are dropped there as answer_not_reproducible)
    scored = [ScoredResponse.model_validate_json(r) for r in _rows(run, "score")]
    rec = next(r for r in scored if r.ratio is not None)
    gen, response = rec, rec.response
    images = _model_images(processor, gen.sample.images)
    prompt = encode(processor, [chat_text(processor, gen.sample.prompt)], [images],
                    return_tensors="pt")["input_ids"][0]  # fmt: skip
    bos = processor.tokenizer.bos_token_id
    if bos is not None:
        assert prompt.tolist().count(bos) <= 1
    example = {"images": images, "prompt": prompt_messages(gen.sample.prompt),
               "chosen": answer_messages(gen.sample.chosen),
               "rejected": answer_messages(response.text)}  # fmt: skip
    family = check_model(ModelConfig(path=str(model_dir)))
    batch = DataCollatorForVisionPreference(family.training_processor(processor))([example])
    rejected = batch["input_ids"][1]
    assert torch.equal(rejected[: len(prompt)], prompt)
    completion = rejected[batch["completion_mask"][1].bool()].tolist()
    n = len(response.token_ids)
    assert completion[:n] == response.token_ids
    # what follows closes the assistant turn (a cut answer has no EOS)
    tail = processor.tokenizer.decode(completion[n:]).split()
    markers = set(processor.tokenizer.get_added_vocab())  # turn markers, EOS
    assert all(t in markers for t in tail), tail
