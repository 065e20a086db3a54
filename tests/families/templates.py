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


def idefics3(placeholder: str) -> str:
    """HuggingFaceM4/Idefics3-8B-Llama3: `<|begin_of_text|>User: ...<end_of_utterance>`."""
    return chat_template(
        placeholder,
        opens={"system": "System: ", "user": "User: ", "assistant": "Assistant: "},
        close="<end_of_utterance>\n",
        generation_prompt="Assistant:",
        prefix="{{ bos_token }}",
    )


def gemma(placeholder: str) -> str:
    """google/gemma-3-*-it: `<bos><start_of_turn>user\\n...<end_of_turn>`, `model` role."""
    return chat_template(
        placeholder,
        opens={r: f"<start_of_turn>{r}\n" for r in ("system", "user")}
        | {"assistant": "<start_of_turn>model\n"},
        close="<end_of_turn>\n",
        generation_prompt="<start_of_turn>model\n",
        prefix="{{ bos_token }}",
    )


def plain(placeholder: str) -> str:
    """PaliGemma has no hub chat template: the prompt is the user text, the answer
    follows it (the processor itself writes BOS after the last image and `\\n`)."""
    return chat_template(
        placeholder,
        opens={"system": "", "user": "", "assistant": ""},
        close="",
        generation_prompt="",
    )


def mistral3(placeholder: str) -> str:
    """mistralai/Mistral-Small-3.1-*: `<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]`."""
    return chat_template(
        placeholder,
        opens={"system": "[SYSTEM_PROMPT]", "user": "[INST]", "assistant": ""},
        close="",
        closes={"system": "[/SYSTEM_PROMPT]", "user": "[/INST]", "assistant": "</s>"},
        generation_prompt="",
        prefix="{{ bos_token }}",
    )


def llama3(placeholder: str) -> str:
    """meta-llama/Llama-3.2-*-Vision-Instruct: `<|begin_of_text|><|start_header_id|>role
    <|end_header_id|>\\n\\n...<|eot_id|>`."""
    roles = ("system", "user", "assistant")
    return chat_template(
        placeholder,
        opens={r: f"<|start_header_id|>{r}<|end_header_id|>\n\n" for r in roles},
        close="<|eot_id|>",
        generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
        prefix="{{ bos_token }}",
    )
