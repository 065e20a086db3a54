"""The generate stage and its model inputs on the tiny LLaVA (docs/method.md §2).

Real inputs: synthetic data through the augment stage (controller, inline workers),
then `generate.run_shard` called directly. Log-probabilities are checked against an
independent teacher-forced forward pass of the saved model.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from mia_dpo.config import RunConfig, load_config
from mia_dpo.controller import Controller
from mia_dpo.data.images import pad_to_square
from mia_dpo.demo.synthetic import write_synthetic
from mia_dpo.models.prompting import chat_text
from mia_dpo.records import AugmentedSample, GeneratedSample, ShardStats, Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import StageContext
from mia_dpo.runtime.queue import MemoryQueue
from mia_dpo.runtime.store import BlobReader, LocalStore
from mia_dpo.stages import get_stage
from mia_dpo.stages.generate import split_response
from mia_dpo.stages.model_inputs import add_noise, cached_model, load_images

N_SOURCE = 40  # with formats 2:1:1 this seed gives every sequence count and grids of 2/4/9
MAX_NEW = 8


@dataclass
class Out:
    rows: list[str]
    stats: ShardStats
    drops: dict[str, str]

    def generated(self) -> list[GeneratedSample]:
        return [GeneratedSample.model_validate_json(r) for r in self.rows]


@dataclass
class Env:
    store: LocalStore
    overrides: dict
    rows: list[str]  # the augment shard
    ids: itertools.count = field(default_factory=itertools.count)

    def samples(self) -> list[AugmentedSample]:
        return [AugmentedSample.model_validate_json(r) for r in self.rows]

    def config(self, extra: dict | None = None) -> RunConfig:
        return load_config(None, overrides={**self.overrides, **(extra or {})})

    def ctx(self, extra: dict | None = None) -> StageContext:
        cfg = self.config(extra)
        return StageContext(store=self.store, blobs=BlobReader(cfg.store), config=cfg)

    def run(self, stage: str, rows: list[str], extra: dict | None = None) -> Out:
        """Run `stage` on `rows` (its input shard) under a fresh run id."""
        run_id = f"{stage}-{next(self.ids)}"
        source = "augment" if stage == "generate" else "generate"
        self.store.put_jsonl(layout.shard_key(run_id, source, 0), rows)
        stats = get_stage(stage)(Task.make(run_id, stage, 0), self.ctx(extra))
        drops = self.store.get_jsonl(layout.dropped_key(run_id, stage, 0))
        return Out(
            self.store.get_jsonl(layout.shard_key(run_id, stage, 0)),
            stats,
            {d["id"]: d["reason"] for d in map(json.loads, drops)},
        )


def make_env(base: Path, model_dir: Path) -> Env:
    write_synthetic(base / "src", N_SOURCE, seed=3)
    overrides = {
        "input.path": str(base / "src" / "data.json"),
        "input.image_root": str(base / "src" / "images"),
        "store.root": str(base / "store"),
        "input.shard_size": 100,
        "stages": ["augment"],
        "model.path": str(model_dir),
        "augment.grid_tile_px": 64,
        "augment.grid_margin_px": 16,
        "augment.grid_label_font_px": 12,
        "augment.formats": {"sequence": 2, "grid": 1, "pic_in_pic": 1},
        "augment.sequence_counts": {2: 1, 3: 1, 4: 1, 5: 1},
        "augment.grid_counts": {2: 1, 3: 0, 4: 1, 6: 0, 9: 1},
        "generate.max_new_tokens": MAX_NEW,
    }
    cfg = load_config(None, overrides=overrides)
    store = LocalStore(cfg.store.root)
    Controller(cfg, "aug", store, MemoryQueue(cfg.queue), stages=get_stage, progress=False).run()
    env = Env(store, overrides, store.get_jsonl(layout.shard_key("aug", "augment", 0)))
    kinds = {(s.format, s.n_images) for s in env.samples()}
    assert {("sequence", n) for n in (2, 3, 4, 5)} | {("grid", n) for n in (2, 4, 9)} <= kinds
    assert ("pic_in_pic", 2) in kinds
    return env


class Reference:
    """The saved tiny model, loaded on its own (eager, float32), teacher-forced."""

    def __init__(self, model_dir: Path) -> None:
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(
            model_dir, attn_implementation="eager", dtype=torch.float32
        ).eval()

    def forward(self, sample: AugmentedSample, token_ids: list[int], images=None, **kw):
        """(model output, prompt length, ids) over the prompt + `token_ids`."""
        if images is None:
            # as the model gets them: padded to a square with the processor's mean colour
            fill = tuple(round(255 * m) for m in self.processor.image_processor.image_mean)
            images = [pad_to_square(Image.open(u).convert("RGB"), fill) for u in sample.images]
        text = chat_text(self.processor, sample.prompt)
        enc = self.processor(text=[text], images=images, return_tensors="pt")
        n = enc["input_ids"].shape[1]
        ids = torch.cat([enc["input_ids"], torch.tensor([token_ids], dtype=torch.long)], 1)
        with torch.no_grad():
            out = self.model(input_ids=ids, pixel_values=enc["pixel_values"], **kw)
        return out, n, ids[0]

    def logprobs(self, sample: AugmentedSample, token_ids: list[int], images=None) -> np.ndarray:
        out, n, _ = self.forward(sample, token_ids, images)
        logits = out.logits[0, n - 1 : n - 1 + len(token_ids)]  # rows predicting each token
        lp = logits.log_softmax(-1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0]
        return lp.numpy()


def one_per_kind(records, key=lambda g: g.sample.format, k: int = 2) -> list:
    seen: Counter = Counter()
    picked = []
    for rec in records:
        if seen[key(rec)] < k:
            seen[key(rec)] += 1
            picked.append(rec)
    return picked


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Env:
    return make_env(tmp_path_factory.mktemp("generate"), tiny_model_dir)


@pytest.fixture(scope="module")
def ref(tiny_model_dir: Path) -> Reference:
    return Reference(tiny_model_dir)


@pytest.fixture(scope="module")
def greedy(env: Env) -> Out:
    return env.run("generate", env.rows)


def test_greedy_records_ppl_and_determinism(env: Env, greedy: Out) -> None:
    records = greedy.generated()
    assert [g.sample for g in records] == env.samples()  # input order, nothing dropped
    assert greedy.stats.total == greedy.stats.kept == len(env.rows) and not greedy.drops
    for g in records:
        assert len(g.responses) == 1 and g.noise is False
        (r,) = g.responses
        assert 1 <= len(r.token_ids) == len(r.logprobs)
        assert 3 not in r.token_ids[:-1]  # nothing after an EOS
        assert len(r.token_ids) == MAX_NEW or r.token_ids[-1] == 3
        assert r.ppl == pytest.approx(math.exp(-np.mean(r.logprobs)), rel=1e-5)
        assert all(lp <= 0 for lp in r.logprobs)
    assert env.run("generate", env.rows).rows == greedy.rows


def test_logprobs_equal_teacher_forced_forward(greedy: Out, ref: Reference) -> None:
    picked = one_per_kind(greedy.generated())
    assert {g.sample.format for g in picked} == {"sequence", "grid", "pic_in_pic"}
    for g in picked:
        r = g.responses[0]
        np.testing.assert_allclose(r.logprobs, ref.logprobs(g.sample, r.token_ids), atol=1e-4)


def test_response_ends_at_first_eos(env: Env, greedy: Out, monkeypatch) -> None:
    before = [g.responses[0].token_ids for g in greedy.generated()]
    # the untrained model hardly ever says </s>: make a word it often says a second EOS
    stop = Counter(t for ids in before for t in ids[1:]).most_common(1)[0][0]
    lm = cached_model(env.ctx())
    monkeypatch.setattr(lm.model.generation_config, "eos_token_id", [3, stop])
    after = env.run("generate", env.rows).generated()
    cut = 0
    for ids, g in zip(before, after, strict=True):
        r = g.responses[0]
        ends = [i for i, t in enumerate(ids) if t in (3, stop)]
        expected = ids[: ends[0] + 1] if ends else ids
        assert r.token_ids == expected
        assert r.ppl == pytest.approx(math.exp(-np.mean(r.logprobs)), rel=1e-5)
        cut += len(r.token_ids) < MAX_NEW
    assert cut > 0


def test_greedy_independent_of_batch_size(env: Env) -> None:
    one = env.run("generate", env.rows, {"generate.batch_size": 1}).generated()
    four = env.run("generate", env.rows, {"generate.batch_size": 4}).generated()
    # left padding leaves these prompts' greedy choices exactly equal on CPU float32
    for a, b in zip(one, four, strict=True):
        assert a.responses[0].token_ids == b.responses[0].token_ids
        np.testing.assert_allclose(a.responses[0].logprobs, b.responses[0].logprobs, atol=1e-5)
        assert a.responses[0].ppl == pytest.approx(b.responses[0].ppl, rel=1e-4)


def test_sampling_several_reproducible_responses(env: Env, greedy: Out, ref: Reference) -> None:
    extra = {"generate.temperature": 1.0, "generate.num_samples": 3, "generate.batch_size": 4}
    first = env.run("generate", env.rows, extra)
    records = first.generated()
    assert first.stats.kept == len(records) == len(env.rows)
    assert all(len(g.responses) == 3 for g in records)
    assert env.run("generate", env.rows, extra).rows == first.rows
    greedy_ids = [g.responses[0].token_ids for g in greedy.generated()]
    sampled = [[r.token_ids for r in g.responses] for g in records]
    assert any(ids != [gi] * 3 for ids, gi in zip(sampled, greedy_ids, strict=True))
    assert any(len({tuple(i) for i in ids}) > 1 for ids in sampled)
    # temperature 1, top_p 1: the sampling distribution is the model's own, so each
    # response's log-probs are those of ITS prompt (response rows map to the right sample)
    for g in one_per_kind(records, k=1):
        for r in g.responses:
            assert r.ppl == pytest.approx(math.exp(-np.mean(r.logprobs)), rel=1e-5)
            np.testing.assert_allclose(r.logprobs, ref.logprobs(g.sample, r.token_ids), atol=1e-4)


def test_long_ground_truth_and_missing_image_dropped(env: Env, tmp_path: Path) -> None:
    samples = env.samples()
    grid = next(s for s in samples[3:] if s.format == "grid")
    seq = next(s for s in samples[3:] if s.format == "sequence")
    edited = {
        samples[0].sample_id: samples[0].model_copy(update={"chosen": "x" * 511}),
        samples[1].sample_id: samples[1].model_copy(update={"chosen": "x" * 512}),
        samples[2].sample_id: samples[2].model_copy(update={"chosen": "x" * 900}),
        grid.sample_id: grid.model_copy(update={"images": [str(tmp_path / "gone.jpg")]}),
        seq.sample_id: seq.model_copy(
            update={"images": [*seq.images[:-1], str(tmp_path / "gone.png")]}
        ),
    }
    assert len(edited) == 5
    rows = [edited.get(s.sample_id, s).model_dump_json() for s in samples]
    out = env.run("generate", rows)
    assert out.drops == {
        samples[1].sample_id: "chosen_too_long",
        samples[2].sample_id: "chosen_too_long",
        grid.sample_id: "image_missing",
        seq.sample_id: "image_missing",
    }
    assert out.stats.dropped == {"chosen_too_long": 2, "image_missing": 2}
    assert out.stats.total == len(samples) and out.stats.kept == len(samples) - 4
    kept = [g.sample.sample_id for g in out.generated()]
    assert kept == [s.sample_id for s in samples if s.sample_id not in out.drops]


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for im in images]


def test_noise_grid_target_tile_pip_whole_sequence_none(env: Env) -> None:
    clean_ctx, noisy_ctx = env.ctx(), env.ctx({"generate.noise": True})
    kinds = set()
    for s in env.samples():
        clean = pixels(load_images(clean_ctx, s))
        noisy = pixels(load_images(noisy_ctx, s))
        changed = [np.any(a != b, axis=-1) for a, b in zip(clean, noisy, strict=True)]
        kinds.add(s.format)
        if s.format == "sequence":
            assert not any(c.any() for c in changed)
            continue
        (c,) = changed
        x0, y0, x1, y1 = s.target_box
        inside = np.zeros_like(c)
        inside[y0:y1, x0:x1] = True
        if s.format == "grid":
            assert not c[~inside].any() and c[inside].mean() > 0.5
        else:  # the whole picture: each quadrant and the background outside the inset
            h, w = c.shape
            quads = [c[: h // 2, : w // 2], c[: h // 2, w // 2 :], c[h // 2 :, : w // 2]]
            assert all(q.mean() > 0.2 for q in [*quads, c[h // 2 :, w // 2 :], c[~inside]])
    assert kinds == {"sequence", "grid", "pic_in_pic"}


def test_noise_is_seeded_per_run_and_sample(env: Env) -> None:
    s = next(s for s in env.samples() if s.format == "pic_in_pic")
    a = pixels(load_images(env.ctx({"generate.noise": True}), s))[0]
    b = pixels(load_images(env.ctx({"generate.noise": True}), s))[0]
    c = pixels(load_images(env.ctx({"generate.noise": True, "seed": 1}), s))[0]
    renamed = s.model_copy(update={"sample_id": s.sample_id + "x"})
    d = pixels(load_images(env.ctx({"generate.noise": True}), renamed))[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, d)


@pytest.mark.parametrize("level", [255, 0])
def test_noise_clips_instead_of_wrapping(level: int) -> None:
    img = Image.new("RGB", (64, 64), (level,) * 3)
    out = np.asarray(add_noise(img, 49.0, np.random.default_rng(0), None), dtype=np.int16)
    assert (out == level).mean() > 0.4  # half the draws push past the end and are clipped
    assert np.abs(out - level).max() < 230  # a wrap would send 255 + 3 to 2 (and 0 - 3 to 253)


def test_noise_reaches_generation_but_not_the_saved_image(env: Env, ref: Reference) -> None:
    picked = [
        next(s for s in env.samples() if s.format == "grid"),
        next(s for s in env.samples() if s.format == "pic_in_pic"),
    ]
    before = {uri: Path(uri).read_bytes() for s in picked for uri in s.images}
    rows = [s.model_dump_json() for s in picked]
    out = env.run("generate", rows, {"generate.noise": True}).generated()
    assert {uri: Path(uri).read_bytes() for uri in before} == before
    ctx = env.ctx({"generate.noise": True})
    for g in out:
        assert g.noise is True
        r = g.responses[0]
        noised = load_images(ctx, g.sample, cached_model(ctx))
        np.testing.assert_allclose(
            r.logprobs, ref.logprobs(g.sample, r.token_ids, noised), atol=1e-4
        )
        assert not np.allclose(r.logprobs, ref.logprobs(g.sample, r.token_ids), atol=1e-3)


def test_split_response_when_padding_is_the_eos() -> None:
    # Llama tokenizers pad with </s>: the first one ends the answer, the rest is padding
    assert split_response([7, 3, 3, 3], [-1, -2, -3, -4], {3}, 3) == ([7, 3], [-1, -2])
    assert split_response([7, 8, 0, 0], [-1, -2, -3, -4], {3}, 0) == ([7, 8], [-1, -2])


def test_pad_to_square_keeps_the_whole_collage() -> None:
    # A 2-image grid is wide: a centre crop would cut its outer tiles, padding does not.
    wide = Image.new("RGB", (144, 80), (255, 0, 0))
    out = pad_to_square(wide, (1, 2, 3))
    arr = np.asarray(out)
    assert out.size == (144, 144)
    assert (arr == [255, 0, 0]).all(axis=-1).sum() == 144 * 80
    assert tuple(arr[0, 0]) == (1, 2, 3) and tuple(arr[-1, -1]) == (1, 2, 3)
    assert tuple(arr[32, 0]) == (255, 0, 0)  # content centred: rows 32..111
    assert pad_to_square(Image.new("RGB", (50, 50)), (0, 0, 0)).size == (50, 50)
