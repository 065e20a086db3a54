"""LLaVA-Interleave (a SigLIP tower: no CLS token, the "full" feature strategy) runs
every stage: the self-check reads its 16 tokens per image as a whole 4x4 patch grid,
and the score stage's attention and shares equal an independent eager forward pass
with output_attentions (sequence, grid and pic-in-pic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from mia_dpo.config import ModelConfig, RunConfig
from mia_dpo.controller import Controller
from mia_dpo.data.images import pad_to_square
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.models import ratios
from mia_dpo.models.loading import check_model
from mia_dpo.models.prompting import chat_text, encode
from mia_dpo.records import ScoredResponse
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import StageContext
from mia_dpo.runtime.queue import MemoryQueue
from mia_dpo.runtime.store import BlobReader, LocalStore
from mia_dpo.stages import get_stage
from tests.families.factory import FAMILIES
from tests.integration.test_pairs_pipeline import COMMON

GRID = (4, 4)  # 32 px images, 8 px patches, every token a patch


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return FAMILIES["llava-interleave"](tmp_path_factory.mktemp("interleave") / "model")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> tuple[LocalStore, list]:
    root = tmp_path_factory.mktemp("interleave-run")
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
        cfg, "il", store, MemoryQueue(cfg.queue), stages=get_stage, progress=False
    ).run()
    return store, outcomes


def test_the_self_check_reads_a_whole_grid_without_cls(model_dir: Path) -> None:
    layout_ = check_model(ModelConfig(path=str(model_dir)))
    assert (layout_.tokens_per_image, layout_.patch_grid) == (16, GRID)


def test_every_stage_runs(run: tuple[LocalStore, list]) -> None:
    store, outcomes = run
    assert [o.stage for o in outcomes] == COMMON["stages"]
    assert all(not o.dead_shards for o in outcomes)
    assert store.get_jsonl(layout.trl_pairs_key("il"))
    assert store.exists(layout.adapter_prefix(layout.train_prefix("il")) + "adapter_config.json")
    assert store.exists(layout.evaluate_key("il", "report.json"))


def _scored(store: LocalStore) -> list[ScoredResponse]:
    rows = []
    for key in store.list(layout.stage_prefix("il", "score")):
        if key.endswith(".jsonl") and not key.endswith(".dropped.jsonl"):
            rows += [ScoredResponse.model_validate_json(r) for r in store.get_jsonl(key)]
    return [r for r in rows if r.ratio is not None]


def _eager_attention(model_dir: Path, rec: ScoredResponse, layer: int) -> np.ndarray:
    """attentions[layer], head mean, over the rows predicting the response, at the
    image columns: the same input the stages build, through an eager model."""
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    fill = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    images = [pad_to_square(Image.open(u).convert("RGB"), fill) for u in rec.sample.images]
    enc = encode(processor, [chat_text(processor, rec.sample.prompt)], images, return_tensors="pt")
    n = enc["input_ids"].shape[1]
    ids = torch.cat([enc["input_ids"], torch.tensor([rec.response.token_ids])], 1)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=enc["pixel_values"], output_attentions=True)
    att = out.attentions[layer][0].mean(0)  # (T, T)
    rows = att[n - 1 : n - 1 + len(rec.response.token_ids)].mean(0)  # (T,)
    cols = (ids[0] == model.config.image_token_id).numpy()
    assert cols.sum() == 16 * len(rec.sample.images)
    return rows.numpy()[cols]


def test_shares_equal_an_eager_computation(run: tuple[LocalStore, list], model_dir) -> None:
    recs = _scored(run[0])
    picked = {}
    for rec in recs:
        picked.setdefault(rec.sample.format, rec)
    assert set(picked) == {"sequence", "grid", "pic_in_pic"}
    for rec in picked.values():
        att = _eager_attention(model_dir, rec, rec.layer)
        np.testing.assert_allclose(rec.token_attention, att, rtol=1e-4, atol=1e-7)
        s = rec.sample
        if s.format == "sequence":
            spans = [(i * 16, (i + 1) * 16) for i in range(s.n_images)]
            shares = ratios.sequence_shares(att, spans)
        elif s.format == "grid":
            blocks = ratios.grid_block_sums(att, GRID, s.layout)  # all 16 tokens are patches
            shares = (blocks / blocks.sum()).flatten().tolist()
        else:
            r = ratios.pip_ratio(att, GRID, 1 / 6)
            shares = [1 - r, r]
        np.testing.assert_allclose(rec.image_shares, shares, atol=1e-5)
        assert rec.ratio == pytest.approx(shares[s.target_index - 1], abs=1e-5)


def _generated(store: LocalStore) -> list:
    from mia_dpo.records import GeneratedSample

    rows = []
    for key in sorted(store.list(layout.stage_prefix("il", "generate"))):
        if key.endswith(".jsonl") and not key.endswith(".dropped.jsonl"):
            rows += [GeneratedSample.model_validate_json(r) for r in store.get_jsonl(key)]
    return rows


def test_batch_sizes_1_and_4_give_the_same_greedy_answers(
    run: tuple[LocalStore, list], model_dir: Path
) -> None:
    from mia_dpo.models.loading import load_model
    from mia_dpo.stages.generate import generate_batch
    from mia_dpo.stages.model_inputs import load_images

    store = run[0]
    gens = _generated(store)[:4]
    cfg = RunConfig.model_validate({**COMMON, "model": {"path": str(model_dir)}})
    ctx = StageContext(store=store, blobs=BlobReader(cfg.store), config=cfg)
    lm = load_model(cfg.model)
    batch = [(g.sample, load_images(ctx, g.sample, lm)) for g in gens]
    together = generate_batch(lm, ctx, batch)
    alone = [generate_batch(lm, ctx, [item])[0] for item in batch]
    assert [[r.token_ids for r in rs] for rs in together] == [
        [r.token_ids for r in rs] for rs in alone
    ]
    # and the stage's own answers (batch size 3 in the run) are the same ones
    assert [rs[0].token_ids for rs in alone] == [g.responses[0].token_ids for g in gens]


def test_training_sees_the_generation_tokens(run: tuple[LocalStore, list], model_dir) -> None:
    """TRL's collator builds the prompt ids generation and scoring saw, and the
    rejected answer's ids are the generated ids."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from mia_dpo.models.prompting import answer_messages, prompt_messages

    processor = AutoProcessor.from_pretrained(model_dir)
    fill = tuple(round(255 * m) for m in processor.image_processor.image_mean)
    gen = next(g for g in _generated(run[0]) if g.responses[0].text.strip())
    response = gen.responses[0]
    images = [pad_to_square(Image.open(u).convert("RGB"), fill) for u in gen.sample.images]
    prompt = encode(processor, [chat_text(processor, gen.sample.prompt)], images,
                    return_tensors="pt")["input_ids"][0]  # fmt: skip
    example = {"images": images, "prompt": prompt_messages(gen.sample.prompt),
               "chosen": answer_messages(gen.sample.chosen),
               "rejected": answer_messages(response.text)}  # fmt: skip
    batch = DataCollatorForVisionPreference(processor)([example])
    rejected = batch["input_ids"][1]
    assert torch.equal(rejected[: len(prompt)], prompt)
    completion = rejected[batch["completion_mask"][1].bool()].tolist()
    n = len(response.token_ids)
    assert completion[:n] == response.token_ids
    # what follows is the template's end of the assistant turn (a cut answer has no EOS)
    assert processor.tokenizer.decode(completion[n:]).strip() in (processor.tokenizer.eos_token, "")
