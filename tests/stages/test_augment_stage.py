"""The augment stage end to end: controller, inline workers, store, real image files.

Every source image is one solid colour, unique in the data set, so a pixel of a
composed image tells which source image landed there.
"""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mia_dpo.config import load_config
from mia_dpo.controller import Controller
from mia_dpo.prompts import DEFAULT_PIP_PHRASINGS
from mia_dpo.records import AugmentedSample
from mia_dpo.runtime import layout
from mia_dpo.runtime.queue import MemoryQueue
from mia_dpo.runtime.store import LocalStore
from mia_dpo.stages import get_stage

LEVELS = (0, 85, 170, 255)
PALETTE = [c for c in itertools.product(LEVELS, repeat=3) if c != (255, 255, 255)]
SIZES = [(96, 64), (64, 96), (80, 80), (100, 70), (70, 100), (90, 66)]  # all <= 10_000 px
GRID = {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3), 9: (3, 3)}  # docs/method.md §1b
Q1, Q2 = "What colour is this picture?", "Is it Bright?"
BBOX = "[0.1, 0.2, 0.5, 0.6]"
SMALL = {"augment.grid_tile_px": 64, "augment.grid_margin_px": 16, "augment.grid_label_font_px": 12}


@dataclass
class Data:
    root: Path
    samples: list[dict] = field(default_factory=list)
    colour: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    size: dict[str, tuple[int, int]] = field(default_factory=dict)

    def image(self, rel: str, colour, size=(80, 80), mode="RGB", fmt="PNG", rgb=None) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size, colour).save(path, fmt)
        self.colour[rel], self.size[rel] = rgb or colour, size
        return rel

    def add(
        self, sid: str, rel: object, q: str = Q1, multi: bool = False, answer: str = ""
    ) -> dict:
        conv = [
            {"from": "human", "value": f"<image>\n{q}"},
            {"from": "gpt", "value": answer or f"A{sid}"},
        ]
        if multi:
            conv += [{"from": "human", "value": Q2}, {"from": "gpt", "value": "Yes"}]
        self.samples.append({"id": sid, "image": rel, "conversations": conv})
        return self.samples[-1]

    def write(self, jsonl: bool = False, broken_at: int | None = None) -> Path:
        path = self.root.parent / ("data.jsonl" if jsonl else "data.json")
        if not jsonl:
            path.write_text(json.dumps(self.samples))
            return path
        lines = [json.dumps(s) for s in self.samples]
        if broken_at is not None:
            lines.insert(broken_at, '{"id": "broken", ')
        path.write_text("\n".join(lines) + "\n")
        return path


def make_data(
    base: Path, n_samples: int = 20, sources=("coco", "gqa"), per_source: int = 10
) -> Data:
    d = Data(base / "images")
    colours = iter(PALETTE)
    rels = [
        d.image(f"{src}/c{i}.png", next(colours), SIZES[i % len(SIZES)])
        for src in sources
        for i in range(per_source)
    ]
    for i in range(n_samples):
        d.add(f"s{i}", rels[i % len(rels)], multi=i % 2 == 0)
    return d


@dataclass
class Run:
    records: list[AugmentedSample]
    drops: dict[str, str]
    stats: dict
    store: LocalStore
    run_id: str

    def by_id(self) -> dict[str, AugmentedSample]:
        return {r.source_id: r for r in self.records}


def run(d: Data, store_dir: Path, overrides: dict, run_id: str = "t1", **kw) -> Run:
    cfg = load_config(
        None,
        overrides={
            "input.path": str(d.write(**kw)),
            "input.image_root": str(d.root),
            "store.root": str(store_dir),
            "input.shard_size": 8,
            "stages": ["augment"],
            **SMALL,
            **overrides,
        },
    )
    store = LocalStore(cfg.store.root)
    Controller(cfg, run_id, store, MemoryQueue(cfg.queue), stages=get_stage, progress=False).run()
    n_shards = store.get_json(layout.plan_key(run_id))["n_shards"]
    records, drops = [], {}
    for i in range(n_shards):
        rows = store.get_jsonl(layout.shard_key(run_id, "augment", i))
        records += [AugmentedSample.model_validate_json(r) for r in rows]
        for row in store.get_jsonl(layout.dropped_key(run_id, "augment", i)):
            drop = json.loads(row)
            drops[drop["id"]] = drop["reason"]
    stats = store.get_json(layout.stage_stats_key(run_id, "augment"))
    return Run(records, drops, stats, store, run_id)


def close(px, colour, tol: int = 12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(px, colour, strict=True))


def ordered(rec: AugmentedSample) -> list[str]:
    """The pictures in slot order: the distractors with the target at its position."""
    order = list(rec.distractor_images)
    order.insert(rec.target_index - 1, rec.target_image)
    return order


def check_common(rec: AugmentedSample, d: Data, sample: dict) -> None:
    assert rec.chosen == sample["conversations"][1]["value"]
    assert rec.target_image == sample["image"] and rec.source == sample["image"].split("/")[0]
    assert rec.prompt.count("<image>") == len(rec.images)
    distractors = rec.distractor_images
    assert len(distractors) == rec.n_images - 1 == len(set(distractors))
    assert rec.target_image not in distractors
    assert all(rel in d.colour and rel.split("/")[0] == rec.source for rel in distractors)
    assert len(rec.turns) == (len(sample["conversations"]) - 2) // 2
    assert all(t.answer == "Yes" for t in rec.turns)


def check_sequence(rec: AugmentedSample, d: Data) -> None:
    n, k = rec.n_images, rec.target_index
    assert rec.images == [str(d.root.resolve() / rel) for rel in ordered(rec)]
    assert rec.images[k - 1] == str(d.root.resolve() / rec.target_image)
    header = "".join(f"Image{i}:<image>\n" for i in range(1, n + 1))
    assert rec.prompt == f"{header}In Image{k}, what colour is this picture?"
    assert [t.question for t in rec.turns] in ([], [f"In Image{k}, is it Bright?"])


def check_grid(rec: AugmentedSample, d: Data, tile: int = 64, margin: int = 16) -> None:
    rows, cols = GRID[rec.n_images]
    k = rec.target_index
    assert rec.layout == (rows, cols) and len(rec.images) == 1
    img = Image.open(rec.images[0]).convert("RGB")
    assert img.size == (cols * tile + (cols - 1) * margin, rows * (tile + margin))
    for j, rel in enumerate(ordered(rec)):
        row, col = divmod(j, cols)
        x0, y0 = col * (tile + margin), row * (tile + margin) + margin
        w, h = d.size[rel]
        scale = min(tile / w, tile / h)
        centre = (x0 + round(w * scale) // 2, y0 + round(h * scale) // 2)
        assert close(img.getpixel(centre), d.colour[rel]), (rel, j, img.getpixel(centre))
    x0, y0, x1, y1 = rec.target_box
    assert close(img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)), d.colour[rec.target_image])
    col, row = x0 // (tile + margin), (y0 - margin) // (tile + margin)
    assert row * cols + col == k - 1
    assert (x0, y0) == (col * (tile + margin), row * (tile + margin) + margin)
    assert x1 - x0 <= tile and y1 - y0 <= tile
    assert rec.prompt == f"<image>\nIn Image{k}, {Q1}"
    assert [t.question for t in rec.turns] in ([], [f"In Image{k}, {Q2}"])


def check_pip(rec: AugmentedSample, d: Data) -> None:
    assert rec.n_images == 2 and rec.target_index == 2 and len(rec.images) == 1
    (bg,) = rec.distractor_images
    img = Image.open(rec.images[0]).convert("RGB")
    bw, bh = img.size
    assert img.size == d.size[bg]
    x0, y0, x1, y1 = rec.target_box
    w, h = x1 - x0, y1 - y0
    assert abs(x0 + x1 - bw) <= 1 and abs(y0 + y1 - bh) <= 1  # centred
    max_w, max_h = 7 * bw // 10, 7 * bh // 10  # integer maths: 0.7 * 90 < 63 in floats
    assert w <= max_w and h <= max_h
    assert w >= max_w - 1 or h >= max_h - 1  # as large as fits
    tw, th = d.size[rec.target_image]
    assert abs(w / h - tw / th) < 0.05
    assert close(img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)), d.colour[rec.target_image])
    for corner in [(1, 1), (bw - 2, 1), (1, bh - 2), (bw - 2, bh - 2)]:
        assert close(img.getpixel(corner), d.colour[bg])
    phrasing = [
        p
        for p in DEFAULT_PIP_PHRASINGS
        if rec.prompt == "<image>\n" + p.format(question="what colour is this picture?")
    ]
    assert len(phrasing) == 1, rec.prompt
    assert [t.question for t in rec.turns] in ([], [phrasing[0].format(question="is it Bright?")])


def check(rec: AugmentedSample, d: Data) -> None:
    check_common(rec, d, next(s for s in d.samples if s["id"] == rec.source_id))
    {"sequence": check_sequence, "grid": check_grid, "pic_in_pic": check_pip}[rec.format](rec, d)


CASES = [("sequence", n) for n in (2, 3, 4, 5)] + [("grid", n) for n in (2, 3, 4, 6, 9)]


@pytest.mark.parametrize(("fmt", "n"), [*CASES, ("pic_in_pic", 2)])
def test_every_format_and_count_pixels_and_prompts(tmp_path: Path, fmt: str, n: int) -> None:
    d = make_data(tmp_path)
    over = {
        "augment.formats": {fmt: 1.0},
        "augment.sequence_counts": {n if fmt == "sequence" else 2: 1},
    }
    over["augment.grid_counts"] = {n if fmt == "grid" else 2: 1}
    r = run(d, tmp_path / "store", over)
    assert r.stats["kept"] == len(r.records) == 20 and r.drops == {}
    assert sorted(rec.source_id for rec in r.records) == sorted(s["id"] for s in d.samples)
    for rec in r.records:
        assert rec.format == fmt and rec.n_images == n and rec.sample_id == f"{rec.source_id}-{fmt}"
        check(rec, d)
    assert any(rec.turns for rec in r.records)  # multi-turn samples were checked too


def test_paper_default_canvas_sizes_tile_origins_and_labels(tmp_path: Path) -> None:
    d = make_data(tmp_path)
    over = {
        "augment.grid_tile_px": 448,
        "augment.grid_margin_px": 40,
        "augment.grid_label_font_px": 36,
        "augment.formats": {"grid": 1.0},
        "augment.grid_counts": dict.fromkeys(GRID, 1.0),
    }
    r = run(d, tmp_path / "store", over)
    expected = {2: (936, 488), 3: (1424, 488), 4: (936, 976), 6: (1424, 976), 9: (1424, 1464)}
    assert len(r.records) == 20 and len({rec.n_images for rec in r.records}) >= 3
    for rec in r.records:
        check_common(rec, d, next(s for s in d.samples if s["id"] == rec.source_id))
        check_grid(rec, d, tile=448, margin=40)
        img = np.asarray(Image.open(rec.images[0]).convert("L"))
        assert img.shape[::-1] == expected[rec.n_images]
        row, col = divmod(rec.target_index - 1, GRID[rec.n_images][1])
        assert rec.target_box[:2] == (col * 488, row * 488 + 40)
        for j in range(rec.n_images):  # a dark label in every band above a tile
            row, col = divmod(j, GRID[rec.n_images][1])
            assert img[row * 488 : row * 488 + 40, col * 488 : col * 488 + 448].min() < 80


def test_target_position_spread_and_format_mix(tmp_path: Path) -> None:
    d = make_data(tmp_path, n_samples=60)
    over = {"augment.formats": {"sequence": 1.0}, "augment.sequence_counts": {3: 1.0}}
    positions = Counter(rec.target_index for rec in run(d, tmp_path / "a", over).records)
    assert set(positions) == {1, 2, 3} and min(positions.values()) >= 10
    over = {"augment.formats": {"sequence": 3.0, "grid": 0.0, "pic_in_pic": 1.0}}
    formats = Counter(rec.format for rec in run(d, tmp_path / "b", over).records)
    assert "grid" not in formats and sum(formats.values()) == 60
    assert 30 <= formats["sequence"] <= 55 and formats["pic_in_pic"] >= 5


def normalised(r: Run) -> tuple[list[str], dict[str, bytes]]:
    prefix = f"{r.store.root}/runs/{r.run_id}/"
    recs = [rec.model_dump_json().replace(prefix, "") for rec in r.records]
    images = r.store.list(f"runs/{r.run_id}/augment/images/")
    return recs, {k.split("/images/")[1]: r.store.get_bytes(k) for k in images}


def test_determinism_across_workers_run_ids_and_stores(tmp_path: Path) -> None:
    d = make_data(tmp_path)
    a = normalised(run(d, tmp_path / "a", {"launcher.default_workers": 1}, run_id="t1"))
    b = normalised(run(d, tmp_path / "b", {"launcher.default_workers": 3}, run_id="t2"))
    assert a[0] == b[0] and len(a[0]) == 20
    assert a[1] and a[1].keys() == b[1].keys()
    assert all(a[1][k] == b[1][k] for k in a[1])  # byte-identical composed images
    c = normalised(run(d, tmp_path / "c", {"seed": 1}, run_id="t3"))
    assert c[0] != a[0]


def test_bbox_falls_back_to_sequence_or_is_dropped(tmp_path: Path) -> None:
    d = make_data(tmp_path, n_samples=10)
    rels = [s["image"] for s in d.samples]
    boxed = [d.add(f"b{i}", rels[i], q=f"What is in {BBOX}?") for i in range(1, 10)]
    boxed.append(d.add("b0", rels[0], answer=f"It is at {BBOX}."))  # coordinates in the answer
    mix = {"augment.formats": {"grid": 1.0, "sequence": 1.0}}
    r = run(d, tmp_path / "a", mix)
    assert len(r.records) == 20 and r.drops == {}
    assert all(rec.format == "sequence" for rec in r.records if rec.source_id.startswith("b"))
    for s in boxed:  # the same ids without coordinates: which ones draw grid?
        s["conversations"][0]["value"], s["conversations"][1]["value"] = f"<image>\n{Q1}", "A"
    plain = run(d, tmp_path / "b", mix)
    fell_back = sum(rec.format == "grid" for rec in plain.records if rec.source_id.startswith("b"))
    assert fell_back > 0 and r.stats["notes"]["bbox_to_sequence"] == fell_back
    for s in boxed:
        s["conversations"][0]["value"] = f"<image>\nWhat is in {BBOX}?"
    g = run(d, tmp_path / "c", {"augment.formats": {"grid": 1.0}})
    assert g.drops == {f"b{i}": "bbox_coordinates" for i in range(10)}
    assert g.stats["dropped"] == {"bbox_coordinates": 10} and g.stats["kept"] == 10
    assert all(rec.format == "grid" for rec in g.records)


def jpeg_noise(size=(96, 64)) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_bad_samples_are_dropped_with_reasons_good_ones_survive(tmp_path: Path) -> None:
    d = make_data(tmp_path)
    (d.root / "coco/empty.jpg").write_bytes(b"")
    (d.root / "coco/trunc.jpg").write_bytes(jpeg_noise()[:1500])
    (d.root / "coco/text.jpg").write_text("hello, I am not a picture\n")
    d.image("../escape.jpg", (1, 2, 3), fmt="JPEG")
    d.image("coco/big.png", (5, 5, 5), size=(200, 200))
    d.image("solo/only.png", (9, 9, 9))
    bad = {
        "missing": ("coco/nope.png", "image_missing"),
        "empty": ("coco/empty.jpg", "image_empty"),
        "trunc": ("coco/trunc.jpg", "image_truncated"),
        "text": ("coco/text.jpg", "image_unreadable"),
        "abs": (str(d.root / "coco/c1.png"), "unsafe_path"),
        "esc": ("../escape.jpg", "unsafe_path"),
        "big": ("coco/big.png", "image_too_large"),
        "solo": ("solo/only.png", "too_few_distractors"),
        "noconv": ("coco/c2.png", "missing_conversations"),
        "notag": ("coco/c3.png", "no_image_tag"),
    }
    for sid, (rel, _) in bad.items():
        d.add(sid, rel, multi=True)
    del d.samples[-2]["conversations"]
    d.samples[-1]["conversations"][0]["value"] = Q1
    d.add("s0", "gqa/c5.png")  # repeats the first sample's id
    over = {
        "input.max_image_pixels": 10_000,
        "augment.sequence_counts": {5: 1.0},
        "augment.grid_counts": {9: 1.0},
    }
    r = run(d, tmp_path / "store", over)
    expected = {sid: reason for sid, (_, reason) in bad.items()} | {"s0": "duplicate_id"}
    assert r.drops == expected
    assert r.stats["dropped"] == dict(Counter(expected.values()))
    assert r.stats["kept"] == 20 and r.stats["total"] == 20 + len(expected)
    assert sorted(rec.source_id for rec in r.records) == sorted(f"s{i}" for i in range(20))
    assert r.by_id()["s0"].target_image == "coco/c0.png"  # the first s0, not the duplicate
    bad_rels = {rel for rel, reason in bad.values() if reason.startswith("image_")}
    assert len(bad_rels) == 5
    for rec in r.records:
        assert not bad_rels & set(rec.distractor_images)
        check(rec, d)


def test_broken_jsonl_line_counted_by_plan_others_come_through(tmp_path: Path) -> None:
    d = make_data(tmp_path)
    r = run(d, tmp_path / "store", {}, jsonl=True, broken_at=7)
    assert r.store.get_json("runs/t1/plan/stats.json")["dropped"] == {"invalid_json": 1}
    assert r.stats["total"] == r.stats["kept"] == len(r.records) == 20
    for rec in r.records:
        check(rec, d)


def test_unreadable_distractor_candidate_is_skipped(tmp_path: Path) -> None:
    d = Data(tmp_path / "images")
    good = [d.image(f"mix/g{i}.png", PALETTE[i], SIZES[i]) for i in range(3)]
    (d.root / "mix/bad.jpg").write_bytes(jpeg_noise()[:1500])
    for i, rel in enumerate([*good, "mix/bad.jpg"] * 3):
        d.add(f"m{i}", rel)
    over = {"augment.formats": {"sequence": 1.0}, "augment.sequence_counts": {3: 1.0}}
    r = run(d, tmp_path / "store", over)
    assert len(r.records) == 9 and set(r.drops.values()) == {"image_truncated"}
    for rec in r.records:
        assert set(rec.distractor_images) == set(good) - {rec.target_image}
        check(rec, d)


def test_unusual_image_modes_keep_their_colours_in_the_collage(tmp_path: Path) -> None:
    d = Data(tmp_path / "images")
    d.image("modes/cmyk.jpg", (0, 200, 100, 30), (96, 64), "CMYK", "JPEG", rgb=(225, 49, 137))
    d.image("modes/grey.png", 100, (64, 96), "L", rgb=(100, 100, 100))
    d.image("modes/rgba.png", (200, 50, 120, 255), (80, 80), "RGBA", rgb=(200, 50, 120))
    d.image("modes/white16.png", 65535, (100, 70), "I;16", rgb=(255, 255, 255))
    d.image("modes/mid16.png", 32768, (70, 100), "I;16", rgb=(128, 128, 128))
    pal = Image.new("P", (90, 66), 0)
    pal.putpalette([10, 200, 30] * 256)
    pal.save(d.root / "modes/pal.png")
    d.colour["modes/pal.png"], d.size["modes/pal.png"] = (10, 200, 30), (90, 66)
    for rel in d.colour:
        d.add(rel.split("/")[1].split(".")[0], rel)
    over = {"augment.formats": {"grid": 1.0}, "augment.grid_counts": {3: 1.0}}
    r = run(d, tmp_path / "store", over)
    assert sorted(rec.target_image for rec in r.records) == sorted(d.colour)
    for rec in r.records:
        check(rec, d)  # every tile, target and distractors, has its expected colour
