"""The select stage's TRL pairs file as a `datasets.Dataset` that TRL trains on.

Rows keep the messages exactly as `prompt_messages` / `answer_messages` built them
(the template at training must equal the one at generation, docs/method.md §5). Images
are checked once up front, so a pair whose images cannot be read is dropped with
a reason instead of crashing step 5,000, and are decoded again lazily when a batch
needs them: 27k pairs of 2-9 decoded images would not fit in memory, and encoding
them into Arrow would cost minutes on every (re)start.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import datasets
from PIL import Image

from mia_dpo.data.images import ImageLoader, pad_to_square
from mia_dpo.errors import SampleError, UserError
from mia_dpo.runtime.context import DropLog

MESSAGE_COLUMNS = ("prompt", "chosen", "rejected")


@dataclass
class PairImages:
    """A pair's images as the model saw them at generation and scoring: RGB, padded
    to a square with the processor's mean colour when `fill` is set."""

    loader: ImageLoader
    fill: tuple[int, int, int] | None

    def __call__(self, uris: list[str]) -> list[Image.Image]:
        images = self.loader.load_all(uris, "pair")
        if self.fill is None:
            return images
        return [pad_to_square(img, self.fill) for img in images]


def _image_parts(messages: list[dict[str, Any]]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    )


def _problem(row: Any) -> str | None:
    """Why a parsed line is not a TRL vision preference row, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    images = row.get("images")
    if not isinstance(images, list) or not all(isinstance(u, str) and u for u in images):
        return "images: expected a list of paths or URIs"
    for col in MESSAGE_COLUMNS:
        msgs = row.get(col)
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            return f"{col}: expected a non-empty list of chat messages"
    if (n := _image_parts(row["prompt"])) != len(images):
        return f"prompt has {n} image parts for {len(images)} images"
    return None


def read_pairs(lines: list[str], drops: DropLog, load: PairImages) -> list[dict[str, Any]]:
    """Parsed rows whose images all decode; every other line is dropped with its reason."""
    kept = []
    for n, line in enumerate(lines, 1):
        drops.stats.total += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            drops.drop(f"line-{n}", "invalid_pair", f"line {n}: not JSON: {e}")
            continue
        pid = str(row.get("id", f"line-{n}")) if isinstance(row, dict) else f"line-{n}"
        if (problem := _problem(row)) is not None:
            drops.drop(pid, "invalid_pair", f"line {n}: {problem}")
            continue
        try:
            load(row["images"])
        except SampleError as e:
            drops.drop(pid, e.reason, e.detail)
            continue
        kept.append(row)
    return kept


def build_dataset(rows: list[dict[str, Any]], method: str, load: PairImages) -> datasets.Dataset:
    """Exactly the columns TRL's vision collators read, so the Trainer removes none
    (removing columns would drop the lazy transform). DPO: images, prompt, chosen,
    rejected; SFT: images, prompt, completion (= the chosen answer)."""
    cols: dict[str, list[Any]] = {
        "images": [r["images"] for r in rows],
        "prompt": [r["prompt"] for r in rows],
    }
    if method == "dpo":
        cols["chosen"] = [r["chosen"] for r in rows]
        cols["rejected"] = [r["rejected"] for r in rows]
    else:
        cols["completion"] = [r["chosen"] for r in rows]

    def decode(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        batch["images"] = [load(uris) for uris in batch["images"]]
        return batch

    return datasets.Dataset.from_dict(cols).with_transform(decode)


def token_count(text: str, lm: Any, images: list[Image.Image] | None = None) -> int:
    """Tokens of a rendered text once the processor expands each image placeholder:
    arithmetic for a fixed count per image (LLaVA), else the processor itself on the
    images (tiling families: the count depends on each image's size)."""
    fixed = getattr(lm.family, "tokens_per_image", None)
    if isinstance(fixed, int) or not images:
        ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(ids) + ids.count(lm.image_token_id) * ((fixed or 1) - 1)
    enc = lm.processor(text=[text], images=[images], add_special_tokens=False)
    return len(enc["input_ids"][0])


@dataclass(frozen=True)
class Lengths:
    """Each row's tokens as the collator will cut it (prompt + the longer answer, at most
    max_length), and how many rows have an answer cut short."""

    tokens: list[int]
    truncated: int


def check_lengths(
    rows: list[dict[str, Any]], lm: Any, max_length: int, load: PairImages | None = None
) -> Lengths:
    """UserError if a prompt does not fit in max_length; counts the pairs that will
    have an answer cut short (allowed: TRL keeps the start, so no image token is lost).

    TRL's collators cut every sequence at max_length from the end. A prompt that
    does not fit would lose image tokens ("Image features and image tokens do not
    match") or, exactly fitting, leave no answer token to train on.
    """
    from trl.data_utils import apply_chat_template

    truncated, tokens = 0, []
    for row in rows:
        # TRL's own rendering, as its collator does it, so the counts are the collator's.
        text = apply_chat_template({c: row[c] for c in MESSAGE_COLUMNS}, lm.processor)
        tiled = load is not None and not isinstance(
            getattr(lm.family, "tokens_per_image", None), int
        )
        n_prompt = token_count(text["prompt"], lm, load(row["images"]) if tiled else None)
        if n_prompt >= max_length:
            raise UserError(
                f"train.max_length: {max_length} tokens cannot hold pair {row.get('id', '?')}: "
                f"its prompt alone is {n_prompt} tokens (images included); set train.max_length "
                f"above {n_prompt} (answers are cut, images never are)"
            )
        answer = max(token_count(text["chosen"], lm), token_count(text["rejected"], lm))
        truncated += int(n_prompt + answer > max_length)
        tokens.append(min(n_prompt + answer, max_length))
    return Lengths(tokens=tokens, truncated=truncated)


def pair_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and means of the kept pairs' selection metadata (absent fields skipped)."""

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        return sum(values) / len(values) if values else None

    formats = Counter(str(r.get("format", "unknown")) for r in rows)
    return {
        "count": len(rows),
        "per_format": dict(sorted(formats.items())),
        "mean_ratio": mean("ratio"),
        "mean_ppl": mean("ppl"),
        "images": sum(len(r["images"]) for r in rows),
    }
