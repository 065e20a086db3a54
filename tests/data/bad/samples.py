"""The index records: valid samples mixed with every way a LLaVA record can be wrong,
each with the outcome the manifest expects of it."""

from __future__ import annotations

import os

from tests.data.bad.manifest import KEPT, PROMPT_CHARS


def _conv(*pairs: tuple[str, object]) -> list[dict[str, object]]:
    return [{"from": f, "value": v} for f, v in pairs]


def ok(sid: object, image: object, question: str = "<image>\nWhat is shown?") -> dict:
    return {"id": sid, "image": image, "conversations": _conv(("human", question), ("gpt", "It."))}


_DROP = object()

# (raw record, case, expected outcome, detail fragment)
Record = tuple[object, str, str, str | None]


def _with(sid: object, image: object = "coco/ok-0.png", **fields: object) -> dict:
    rec = ok(sid, image)
    rec.update(fields)
    return {k: v for k, v in rec.items() if v is not _DROP}


def records(valid: dict[str, str]) -> list[Record]:
    """(raw record, case, expected outcome, detail fragment), in index order. The label
    (id in outputs) is worked out later from the record and its line."""
    out: list[Record] = []

    def add(raw: object, case: str, expect: str = KEPT, detail: str | None = None) -> None:
        out.append((raw, case, expect, detail))

    # Valid samples, one per valid image, spread through the file.
    for i, (rel, what) in enumerate(sorted(valid.items())):
        add(ok(f"ok-{i:02d}", rel), f"valid: {what}")
    add(ok(42, "coco/ok-1.png"), "valid: integer id")
    add(
        {**ok("ok-multi", "coco/ok-2.png"),
         "conversations": _conv(("human", "<image>\nWhat colour?"), ("gpt", "Blue."),
                                ("human", "Sure?"), ("gpt", "Yes."), ("human", "Unanswered?"))},
        "valid: several turns and a trailing unanswered question",
    )  # fmt: skip
    add(
        ok("ok-unicode-✓", "coco/ok-3.png", "<image>\nQu'est-ce que c'est ? 日本語 😀"),
        "valid: non-ASCII id and text (emoji as a surrogate pair escape)",
    )
    add({**ok("ok-source", "coco/ok-4.png"), "source": "coco"}, "valid: explicit source field")

    # The record itself.
    add(17, "record is a number", "not_an_object", "not an object")
    add("just text", "record is a string", "not_an_object", "not an object")
    add(None, "record is null", "not_an_object", "not an object")
    add([ok("in-a-list", "coco/ok-0.png")], "record is a list", "not_an_object", "list")
    add(_with(_DROP), "no id", "missing_id", "'id'")
    add(_with(""), "empty id", "missing_id", "'id'")
    add(_with(1.5), "id is a float", "missing_id", "'id'")
    add(_with(True), "id is a boolean", "missing_id", "'id'")
    add(_with(["x"]), "id is a list", "missing_id", "'id'")
    add(ok("dup", "coco/ok-5.png"), "valid: first use of an id")
    add(ok("dup", "coco/ok-6.png"), "the same id again", "duplicate_id", "already used")

    # The image field.
    add(_with("no-image", _DROP), "no image field", "missing_image", "'image'")
    add(_with("empty-image", ""), "empty image field", "missing_image", "'image'")
    add(_with("int-image", 7), "image is a number", "bad_image_field", "'image'")
    add(_with("dict-image", {"path": "x.png"}), "image is an object", "bad_image_field", "'image'")
    add(
        _with("list-image", ["coco/ok-0.png", "coco/ok-1.png"]),
        "image is a list",
        "multi_image_source",
        "'image'",
    )

    # Conversations.
    add(_with("no-conv", conversations=_DROP), "no conversations", "missing_conversations",
        "'conversations'")  # fmt: skip
    add(_with("empty-conv", conversations=[]), "empty conversations", "bad_conversations",
        "'conversations'")  # fmt: skip
    add(_with("str-conv", conversations="<image> hi"), "conversations is a string",
        "bad_conversations", "'conversations'")  # fmt: skip
    add(_with("dict-conv", conversations={"from": "human", "value": "<image>"}),
        "conversations is an object", "bad_conversations", "'conversations'")  # fmt: skip
    add(_with("turn-not-object", conversations=["<image>\nQ?", "A."]), "a turn is a string",
        "bad_conversations", "conversations[0]")  # fmt: skip
    add(_with("value-int", conversations=_conv(("human", "<image>\nQ?"), ("gpt", 3))),
        "an answer is a number", "bad_conversations", "conversations[1].value")  # fmt: skip
    add(_with("user-assistant", conversations=_conv(("user", "<image>\nQ?"), ("assistant", "A"))),
        "user/assistant roles", "bad_conversations", "conversations[0].from")  # fmt: skip
    add(_with("question-only", conversations=_conv(("human", "<image>\nQ?"))),
        "a question with no answer", "bad_conversations", "no answered turn")  # fmt: skip
    add(_with("no-tag", conversations=_conv(("human", "What is it?"), ("gpt", "A."))),
        "no <image> tag", "no_image_tag", "conversations[0].value")  # fmt: skip
    add(_with("two-tags", conversations=_conv(("human", "<image><image>\nQ?"), ("gpt", "A."))),
        "two <image> tags", "too_many_image_tags", "2 <image> tags")  # fmt: skip
    nested: list = []
    for _ in range(500):
        nested = [nested]
    add(_with("deep-conv", conversations=nested), "conversations nested 500 levels deep",
        "bad_conversations", "conversations[0]")  # fmt: skip
    huge = "<image>\n" + "x" * PROMPT_CHARS
    add(_with("prompt-1mb", conversations=_conv(("human", huge), ("gpt", "A."))),
        "a 1 MB question", "prompt_too_long", "conversations[0].value")  # fmt: skip
    add(_with("lone-surrogate", conversations=_conv(("human", "<image>\nQ \ud800?"), ("gpt", "A"))),
        "text with an unpaired UTF-16 surrogate escape", "not_utf8", "surrogate")  # fmt: skip

    # Paths.
    add(_with("abs-etc", "/etc/passwd"), "absolute path", "unsafe_path", "absolute")
    add(_with("abs-root", "/srv/images/coco/ok-0.png"), "absolute path to a real-looking file",
        "unsafe_path", "absolute")  # fmt: skip
    add(_with("climb", "../outside/secret.png"), "climbs out with ..", "unsafe_path", "climbs out")
    add(_with("climb-deep", "coco/../../outside/secret.png"), "climbs out from a folder",
        "unsafe_path", "climbs out")  # fmt: skip
    add(_with("drive", "C:\\images\\x.png"), "Windows drive path", "unsafe_path", "backslash")
    add(_with("nul", "coco/ok-0.png\u0000.txt"), "NUL byte in path", "unsafe_path", "NUL")
    add(_with("symlink-out", "coco/bad/escape/secret.png"), "symlink leaving the root",
        "unsafe_path", "outside the image root")  # fmt: skip

    # Image files.
    bad = "coco/bad"
    for sid, rel, case, reason in [
        ("img-missing", f"{bad}/nope.png", "missing file", "image_missing"),
        ("img-dir", f"{bad}/a-directory.png", "path is a directory", "image_missing"),
        ("img-empty", f"{bad}/empty.png", "zero-byte file", "image_empty"),
        ("img-trunc-png", f"{bad}/trunc.png", "truncated PNG", "image_truncated"),
        ("img-trunc-jpg", f"{bad}/trunc.jpg", "truncated JPEG", "image_truncated"),
        ("img-trunc-jpg-header", f"{bad}/trunc-header.jpg", "JPEG cut inside its header",
         "image_truncated"),
        ("img-trunc-gif", f"{bad}/trunc.gif", "truncated GIF", "image_truncated"),
        ("img-trunc-webp", f"{bad}/trunc.webp", "truncated WebP", "image_truncated"),
        ("img-header-only", f"{bad}/header-only.png", "PNG with no pixel data", "image_truncated"),
        ("img-corrupt", f"{bad}/corrupt-idat.png", "PNG with corrupt pixel data",
         "image_unreadable"),
        ("img-text", f"{bad}/text.jpg", "text file named .jpg", "image_unreadable"),
        ("img-eps", f"{bad}/ghost.eps", "EPS (never handed to Ghostscript)", "image_unreadable"),
        ("img-svg", f"{bad}/vector.svg", "SVG", "image_unreadable"),
        ("img-bomb", f"{bad}/bomb.png", "PNG header declaring 100000x100000",
         "image_too_large"),
        ("img-bomb-small", f"{bad}/bomb-under-pil.png", "PNG header declaring 4000x4000",
         "image_too_large"),
        ("img-big", f"{bad}/big.jpg", "real 1100x1000 JPEG over max_image_pixels",
         "image_too_large"),
        ("img-1x1", f"{bad}/one-pixel.png", "1x1 image", "image_too_small"),
        ("img-thin", f"{bad}/thin.png", "4x200 image", "image_too_small"),
        ("img-fifo", f"{bad}/fifo.png", "a named pipe (FIFO)", "image_unreadable"),
        ("solo", "solo/only.png", "the only image of its source subset", "too_few_distractors"),
    ]:  # fmt: skip
        add(ok(sid, rel), case, reason, rel if reason.startswith("image_") else None)
    if not hasattr(os, "mkfifo"):
        out[:] = [r for r in out if not (isinstance(r[0], dict) and r[0].get("id") == "img-fifo")]
    # Valid samples after all the bad ones still come through.
    add(ok("ok-last", "coco/ok-7.png"), "valid: last record")
    return out
