"""The configs: the good ones (`augment.yaml`, `run.yaml`) with lowered image limits,
and bad ones that must stop the command with one line naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.data.bad.manifest import GOOD_INPUT, MAX_IMAGE_PIXELS, MIN_SIDE, Manifest


def _good_config(store: str, index: str = GOOD_INPUT) -> dict[str, Any]:
    return {
        "seed": 3,
        "stages": ["augment"],
        "input": {
            "path": index,
            "image_root": "images",
            "shard_size": 8,
            "max_image_pixels": MAX_IMAGE_PIXELS,
            "min_image_side_px": MIN_SIDE,
        },
        "store": {"backend": "local", "root": store},
        "queue": {"backend": "memory"},
        "launcher": {"kind": "inline", "default_workers": 2},
        "augment": {
            "sequence_counts": {2: 0.6, 3: 0.4},
            "grid_counts": {2: 0.6, 3: 0.4},
            "grid_tile_px": 64,
            "grid_margin_px": 16,
            "grid_label_font_px": 12,
        },
    }


def write_configs(out: Path, m: Manifest) -> None:
    def dump(path: Path, data: object) -> None:
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    dump(out / "augment.yaml", {k: v for k, v in _good_config("unused").items()
                                if k in ("input", "augment")})  # fmt: skip
    dump(out / "run.yaml", _good_config("store"))
    folder = out / "bad-config"
    folder.mkdir()

    def bad(name: str, case: str, fragment: str, edit: Any) -> None:
        data = _good_config(f"store-{name}")
        edit(data)
        dump(folder / f"{name}.yaml", data)
        m.bad_configs[f"bad-config/{name}.yaml"] = fragment
        m.cases[f"bad-config/{name}.yaml"] = case

    def setter(dotted: str, value: object) -> Any:
        def edit(data: dict[str, Any]) -> None:
            *parents, leaf = dotted.split(".")
            for key in parents:
                data = data.setdefault(key, {})
            data[leaf] = value

        return edit

    bad("unknown-top", "unknown top-level key", "stagez: unknown key", setter("stagez", ["x"]))
    bad("unknown-nested", "unknown key in a section", "input.max_pixels: unknown key",
        setter("input.max_pixels", 5))  # fmt: skip
    bad("unknown-section", "unknown section", "augmentation: unknown key",
        setter("augmentation", {"formats": {"grid": 1}}))  # fmt: skip
    bad("shard-size-zero", "input.shard_size 0", "input.shard_size",
        setter("input.shard_size", 0))  # fmt: skip
    bad("max-pixels-negative", "input.max_image_pixels -1", "input.max_image_pixels",
        setter("input.max_image_pixels", -1))  # fmt: skip
    bad("min-side-text", "input.min_image_side_px is text", "input.min_image_side_px",
        setter("input.min_image_side_px", "big"))  # fmt: skip
    bad("seed-negative", "seed -3", "seed", setter("seed", -3))
    bad("pip-scale", "augment.pip_scale 1.5", "augment.pip_scale",
        setter("augment.pip_scale", 1.5))  # fmt: skip
    bad("formats-zero", "every format weight 0", "augment.formats",
        setter("augment.formats", {"sequence": 0, "grid": 0, "pic_in_pic": 0}))  # fmt: skip
    bad("format-unknown", "unknown format name", "augment.formats",
        setter("augment.formats", {"mosaic": 1.0}))  # fmt: skip
    bad("grid-count", "grid of 5 images", "augment.grid_counts",
        setter("augment.grid_counts", {5: 1.0}))  # fmt: skip
    bad("workers-zero", "launcher.default_workers 0", "launcher.default_workers",
        setter("launcher.default_workers", 0))  # fmt: skip
    bad("stage-unknown", "unknown stage", "stages", setter("stages", ["augment", "frobnicate"]))
    bad("holdout-one", "input.holdout_fraction 1.0", "input.holdout_fraction",
        setter("input.holdout_fraction", 1.0))  # fmt: skip

    def raw(name: str, case: str, fragment: str, data: bytes) -> None:
        (folder / f"{name}.yaml").write_bytes(data)
        m.bad_configs[f"bad-config/{name}.yaml"] = fragment
        m.cases[f"bad-config/{name}.yaml"] = case

    raw("not-yaml", "not YAML", "not valid YAML", b"seed: [1, 2\ninput: {\n")
    raw("not-utf8", "Latin-1 bytes", "not valid YAML", b"input:\n  path: donn\xe9es.json\n")
    raw("list", "a YAML list", "top level must be a mapping", b"- seed: 1\n")
    laughs = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 10):
        laughs += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n"
    raw("alias-bomb", "YAML aliases expanding to 10^10 items", "a0: unknown key",
        laughs.encode())  # fmt: skip
    raw("secret", "a credential in the file", "MIA_DPO_S3_SECRET_KEY",
        b"store:\n  secret_key: hunter2\n")  # fmt: skip
    m.cases["augment.yaml"] = "good: lowered image limits, small grid tiles (augment --config)"
    m.cases["run.yaml"] = f"good: stages [augment] on {GOOD_INPUT}, local store, memory queue"
