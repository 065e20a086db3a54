"""The interleaved fallback template, in the model's own role format (docs/method.md §5).

Some hub templates render a turn's images before its text, which detaches each picture
from its `Image{k}:` label. The fallback keeps images where the prompt has them but
otherwise writes what the model's own template writes: its prefix (BOS, system
prompt), its user turn markers, its generation prompt, its answer closing and its
rendering of one image. Those pieces are read off the model's template by rendering
a one-turn conversation with sentinel texts and cutting at them. Only when the pieces
do not fit together (a template that renders the answer in a way that does not start
with its own generation prompt) does the generic USER:/ASSISTANT: template remain.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_USER, _ANSWER = "MIAUSERTEXT", "MIAANSWERTEXT"


@dataclass(frozen=True)
class RoleFormat:
    """The literal pieces of a single-turn conversation in a model's template."""

    prefix: str  # before the user's content (BOS, system prompt, user turn opening)
    generation: str  # after the user's content when a reply is asked for
    reply: str  # after the user's content, before the answer (starts with `generation`)
    close: str  # after the answer
    image: str  # one image part, as the template writes it


def _render(processor: Any, messages: list[dict[str, Any]], generation: bool) -> str:
    return processor.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)


def role_format(processor: Any) -> RoleFormat | None:
    """The model's own role format, or None when its template cannot be read this way."""
    user = [{"role": "user", "content": [{"type": "text", "text": _USER}]}]
    answer = [{"role": "assistant", "content": [{"type": "text", "text": _ANSWER}]}]
    image = [{"role": "user", "content": [{"type": "image"}]}]
    try:
        prompt = _render(processor, user, True)
        full = _render(processor, user + answer, False)
        alone = _render(processor, image, True)
    except Exception:
        return None
    if prompt.count(_USER) != 1 or full.count(_USER) != 1 or full.count(_ANSWER) != 1:
        return None
    prefix, generation = prompt.split(_USER)
    prefix_full, rest = full.split(_USER)
    reply, close = rest.split(_ANSWER)
    if prefix_full != prefix or not reply.startswith(generation):
        return None
    if not (alone.startswith(prefix) and alone.endswith(generation)):
        return None
    picture = alone[len(prefix) : len(alone) - len(generation)]
    if not picture:
        return None
    return RoleFormat(prefix, generation, reply, close, picture)


def _literal(text: str) -> str:
    # a JSON string is a valid Jinja string literal: no escaping of our own
    return "{{ " + json.dumps(text) + " }}"


def interleaved_template(fmt: RoleFormat) -> str:
    """A chat template for one user turn (and its answer) with images in place; the
    answer is marked {% generation %} for assistant-only masks."""
    parts = (
        "{% for part in parts %}"
        "{% if part['type'] == 'image' %}" + _literal(fmt.image) + ""
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}"
    )
    return (
        _literal(fmt.prefix) + "{% for message in messages %}"
        "{% if message['content'] is string %}"
        "{% set parts = [{'type': 'text', 'text': message['content']}] %}"
        "{% else %}{% set parts = message['content'] %}{% endif %}"
        "{% if message['role'] == 'assistant' %}"
        + _literal(fmt.reply)
        + "{% generation %}"
        + parts
        + _literal(fmt.close)
        + "{% endgeneration %}"
        "{% else %}" + parts + "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}" + _literal(fmt.generation) + "{% endif %}"
    )
