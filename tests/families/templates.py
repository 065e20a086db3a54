"""Chat templates in each hub checkpoint's role format, with images kept in place.

Several hub templates (llava-hf's, for instance) render a turn's images before its
text; ours write each image's placeholder exactly where the `{"type": "image"}` part
sits, so `Image1:<img>\\nImage2:<img>` keeps every image next to its label. Only the
role markup differs between families, so one Jinja skeleton serves them all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

# Writes every part of one message in order; `IMG` is replaced by the placeholder.
_PARTS = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMG"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
)


def chat_template(
    placeholder: str,
    opens: Mapping[str, str],
    close: str,
    generation_prompt: str,
    prefix: str = "",
    closes: Mapping[str, str] | None = None,
) -> str:
    """A template writing `prefix`, then per message `opens[role]`, its parts, and a
    close (`closes[role]` when given, else `close`), then `generation_prompt` when asked.

    `opens`/`closes` are literal strings; `{{ bos_token }}` may appear in `prefix`.
    """
    # JSON literals are valid Jinja dict literals: no escaping of our own needed.
    close_map = json.dumps(dict(closes or {}))
    return (
        prefix
        + "{% set opens = "
        + json.dumps(dict(opens))
        + " %}{% set closes = "
        + close_map
        + " %}"
        + "{% for message in messages %}{{ opens[message['role']] }}"
        + _PARTS.replace("IMG", placeholder)
        + "{{ closes.get(message['role'], "
        + json.dumps(close)
        + ") }}{% endfor %}"
        + "{% if add_generation_prompt %}"
        + json.dumps(generation_prompt).join(["{{ ", " }}"])
        + "{% endif %}"
    )


def chatml(placeholder: str) -> str:
    """Qwen / LLaVA-OneVision / InternVL / SmolLM style: `<|im_start|>role\\n...<|im_end|>`."""
    roles = ("system", "user", "assistant")
    return chat_template(
        placeholder,
        opens={r: f"<|im_start|>{r}\n" for r in roles},
        close="<|im_end|>\n",
        generation_prompt="<|im_start|>assistant\n",
    )


def llava_next_mistral(placeholder: str) -> str:
    """llava-v1.6-mistral: `[INST] ... [/INST]`, no BOS in the template (the tokenizer
    adds it), answers closed by `</s>`."""
    return chat_template(
        placeholder,
        opens={"system": "<<SYS>>\n", "user": "[INST] ", "assistant": " "},
        close="",
        closes={"system": "\n<</SYS>>\n\n", "user": " [/INST]", "assistant": "</s>"},
        generation_prompt="",
    )
