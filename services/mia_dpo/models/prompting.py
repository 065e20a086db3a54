"""The one way our prompts become model text (docs/method.md §5: the template at
generation must equal the one at training; the reference code mixes two).

Our prompts are plain text with `<image>` tags where the pictures go, e.g.
`Image1:<image>\\nImage2:<image>\\nIn Image2, what colour is the square?`. They are
turned into chat messages with interleaved text and image parts, and the model's
own chat template renders them. Generation and scoring call `chat_text`; training
hands `prompt_messages` / `answer_messages` to TRL, whose collator renders them
with the same `processor.apply_chat_template`.
"""

from __future__ import annotations

from typing import Any

from mia_dpo.prompts import IMAGE_TAG

# Renders list content in order ("USER: Image1:<image>\nImage2:<image>\nIn Image2, ..."),
# " ASSISTANT:" as the generation prompt and an assistant turn as " {text}</s>". The BOS
# comes from the template, not the tokenizer: TRL's collator tokenizes with
# add_special_tokens=False and generation with True, and both must see the same ids.
# {% generation %} marks the answer for assistant-only SFT masks.
INTERLEAVED_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}"
    "{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'assistant' %} ASSISTANT:{% generation %} "
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "{% if message['role'] == 'user' %}{% if not loop.first %} {% endif %}USER: {% endif %}"
    "{% for part in parts %}"
    "{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'system' %} {% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def user_content(prompt: str) -> list[dict[str, Any]]:
    """Split `prompt` at each `<image>` tag into chat content parts, in order.

    Text keeps its newlines exactly (they separate `Image1:` from `Image2:`);
    empty text between adjacent tags or at either end is dropped.
    """
    parts: list[dict[str, Any]] = []
    for i, text in enumerate(prompt.split(IMAGE_TAG)):
        if i > 0:
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
    return parts


def prompt_messages(prompt: str) -> list[dict[str, Any]]:
    """The user turn of `prompt`, as TRL's `prompt` column expects it."""
    return [{"role": "user", "content": user_content(prompt)}]


def answer_messages(text: str) -> list[dict[str, Any]]:
    """An assistant turn, as TRL's `chosen` / `rejected` columns expect it."""
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def image_placeholder(processor: Any) -> str:
    """The string the processor's chat template writes for one image."""
    return getattr(processor, "image_token", None) or IMAGE_TAG


def chat_text(processor: Any, prompt: str) -> str:
    """`prompt` rendered by the processor's chat template, ending in the generation prompt.

    Raises ValueError when the template drops, duplicates or reorders images: a
    template that puts every image first (as some hub LLaVA templates do) would
    detach the `Image1:` labels from their pictures and silently change the task.
    """
    text = processor.apply_chat_template(
        prompt_messages(prompt), add_generation_prompt=True, tokenize=False
    )
    placeholder = image_placeholder(processor)
    chunks = prompt.split(IMAGE_TAG)
    segments = text.split(placeholder)
    if len(segments) != len(chunks):
        raise ValueError(
            f"chat template wrote {len(segments) - 1} image placeholder(s) {placeholder!r} "
            f"for a prompt with {len(chunks) - 1} {IMAGE_TAG} tag(s)"
        )
    # Each run of prompt text must land between the same two images as in the prompt.
    # Compared stripped: templates may trim or pad whitespace around a part.
    for i, (chunk, segment) in enumerate(zip(chunks, segments, strict=True)):
        if chunk.strip() and chunk.strip() not in segment:
            raise ValueError(
                f"chat template moved prompt text {chunk.strip()!r} away from image "
                f"position {i}: the template must keep text and images in prompt order"
            )
    return text


def encode(processor: Any, texts: list[str], images: Any, **kwargs: Any) -> Any:
    """The processor over texts that `chat_text` rendered: generation, scoring and
    evaluation all encode through here, with the tokenizer's own special tokens off,
    exactly as TRL's vision collator does at training. The template already wrote
    the BOS; a Llama-style tokenizer would otherwise add a second one
    (`<s><s>USER:` at generation against `<s>USER:` at training)."""
    return processor(text=texts, images=images, add_special_tokens=False, **kwargs)


def keeps_image_order(processor: Any) -> bool:
    """Whether the processor's chat template keeps text and images where the prompt has them."""
    try:
        chat_text(processor, "Image1:<image>\nImage2:<image>\nIn Image2, what is it?")
    except ValueError:
        return False
    return True


def batch_inputs(lm: Any, prompts: list[str], images: list[list[Any]]) -> Any:
    """One processor call for a batch, left-padded, images nested per prompt (as TRL's
    collator passes them: families that tile or count per prompt need to know which
    images are whose), every output kept and moved to the model; floating outputs
    (pixel values) in the model's dtype."""
    texts = [chat_text(lm.processor, p) for p in prompts]
    nested = images if any(images) else None
    enc = encode(lm.processor, texts, nested, padding=True, return_tensors="pt")
    enc.pop("labels", None)  # PaliGemma's processor adds a training target: not an input
    return to_model(enc, lm)


def to_model(enc: Any, lm: Any) -> Any:
    # tensors duck-typed: this module is imported by the select stage, which runs in the
    # light image without torch
    for key, value in list(enc.items()):
        if hasattr(value, "is_floating_point") and hasattr(value, "to"):
            dtype = lm.dtype if value.is_floating_point() else value.dtype
            enc[key] = value.to(lm.device, dtype)
    return enc


def answer_ids(processor: Any, prompt: str, answer: str) -> list[int]:
    """The ids TRL's vision collator trains on for `answer` after `prompt`: the part of
    the chat template after the generation prompt, tokenized on its own without special
    tokens (trl.data_utils.apply_chat_template, then the collator's processor call)."""
    from trl.data_utils import apply_chat_template  # the model extra: only when scoring

    example = {"prompt": prompt_messages(prompt), "completion": answer_messages(answer)}
    completion = apply_chat_template(example, processor)["completion"]
    return list(processor.tokenizer(completion, add_special_tokens=False)["input_ids"])


def reproduces(processor: Any, prompt: str, answer: str, generated: list[int]) -> bool:
    """Whether training will see exactly the generated ids for this answer (docs/method.md
    §5): decoding and re-encoding can differ (unknown or special tokens, odd merges)."""
    return answer_ids(processor, prompt, answer)[: len(generated)] == generated
