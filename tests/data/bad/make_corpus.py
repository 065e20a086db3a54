"""Write the bad-input corpus: every way a LLaVA index, an image or a config can be wrong,
mixed with valid samples, plus a manifest of what must happen to each.

    python tests/data/bad/make_corpus.py --out DIR

Importable as `make_corpus(out_dir) -> Manifest`. The output is deterministic and built
from Pillow and bytes at run time (nothing binary is committed). Layout of DIR:

    images/                 the image root (valid and broken images, a FIFO, a symlink)
    outside/secret.png      a real image outside the root, which must never be read
    data.json, data.jsonl   the same records as a JSON list and as JSONL (plus bad lines)
    bad-index/*             index files that stop the command with one line
    augment.yaml, run.yaml  the good configs (`mia-dpo augment --config`, `mia-dpo run`)
    bad-config/*.yaml       configs that stop the command with one line naming the field
    manifest.json           expected outcome of every sample, index file and config

Run the commands with the corpus folder as the working directory: configs use
relative paths.

The parts, next to this file: manifest.py (the expected outcomes), images.py,
samples.py (the index records), index_files.py, config_files.py.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

if not __package__:  # run as a file: make `tests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.data.bad.config_files import write_configs
from tests.data.bad.images import write_images
from tests.data.bad.index_files import write_bad_indexes, write_indexes
from tests.data.bad.manifest import KEPT, Case, Manifest
from tests.data.bad.samples import records

__all__ = ["KEPT", "Case", "Manifest", "main", "make_corpus"]


def make_corpus(out_dir: str | Path) -> Manifest:
    """Write the corpus into `out_dir` and return its manifest. An earlier corpus there
    is replaced; any other non-empty folder is refused, never emptied."""
    out = Path(out_dir)
    if out.exists():
        if any(out.iterdir()) and not (out / "manifest.json").is_file():
            raise FileExistsError(f"{out}: not empty and not a corpus; choose another --out")
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    (out / "outside").mkdir()
    m = Manifest()
    valid = write_images(out / "images", out / "outside")
    write_indexes(out, records(valid), m)
    write_bad_indexes(out, m)
    write_configs(out, m)
    (out / "manifest.json").write_text(m.to_json(), encoding="utf-8")
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(Path(__file__).with_name("corpus")), help="folder")
    args = p.parse_args(argv)
    try:
        m = make_corpus(args.out)
    except FileExistsError as e:
        print(f"make_corpus: error: {e}", file=sys.stderr)
        return 2
    n = sum(len(v) for v in m.indexes.values())
    print(f"{n} index records, {len(m.bad_indexes)} bad index files, "
          f"{len(m.bad_configs)} bad configs -> {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
