"""The chat template every stage renders with: the model's own when it keeps images in
place, else the interleaved fallback in the model's own role format; one BOS always."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoProcessor

from mia_dpo.config import ModelConfig
from mia_dpo.models.loading import check_model, choose_chat_template, ensure_bos
from mia_dpo.models.prompting import INTERLEAVED_CHAT_TEMPLATE, chat_text, keeps_image_order
from mia_dpo.models.templates import role_format
from tests.families.factory import FAMILIES

PROMPT = "Image1:<image>\nImage2:<image>\nIn Image2, what is it?"
# llava-v1.6-mistral's role format, but rendering a turn's images before its text (as
# several llava-hf hub templates do)
IMAGES_FIRST = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST] "
    "{% for p in m['content'] if p['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for p in m['content'] if p['type'] == 'text' %}{{ p['text'] }}{% endfor %} [/INST]"
    "{% else %} {% for p in m['content'] %}{{ p['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}"
)


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return FAMILIES["llava-next"](tmp_path_factory.mktemp("next") / "model")


def test_the_fallback_keeps_the_models_role_format(next_dir: Path) -> None:
    proc = AutoProcessor.from_pretrained(next_dir)
    proc.chat_template = IMAGES_FIRST
    assert not keeps_image_order(proc)
    fmt = role_format(proc)
    assert fmt is not None
    assert (fmt.prefix, fmt.generation, fmt.reply, fmt.close, fmt.image) == (
        "[INST] ",
        " [/INST]",
        " [/INST] ",
        "</s>",
        "<image>\n",
    )
    choose_chat_template(proc, "auto", "m")
    assert proc.chat_template != INTERLEAVED_CHAT_TEMPLATE
    assert chat_text(proc, PROMPT) == (
        "[INST] Image1:<image>\n\nImage2:<image>\n\nIn Image2, what is it? [/INST]"
    )
    # TRL splits prompt and answer by rendering both: the answer follows the prompt
    from trl.data_utils import apply_chat_template

    from mia_dpo.models.prompting import answer_messages, prompt_messages

    out = apply_chat_template(
        {"prompt": prompt_messages(PROMPT), "completion": answer_messages("red")}, proc
    )
    assert out["completion"] == " red</s>"


def test_a_template_without_bos_gets_the_one_its_tokenizer_adds(next_dir: Path) -> None:
    proc = AutoProcessor.from_pretrained(next_dir)
    assert not chat_text(proc, PROMPT).startswith("<s>")  # its template writes none
    ensure_bos(proc)
    text = chat_text(proc, PROMPT)
    assert text.startswith("<s>[INST]") and text.count("<s>") == 1
    ensure_bos(proc)  # idempotent
    assert chat_text(proc, PROMPT) == text
    # and the self-check applies it: one BOS in the probe's ids
    family = check_model(ModelConfig(path=str(next_dir)))
    ids = proc.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(proc.tokenizer.bos_token_id) == 1
    assert family.processor.chat_template.startswith("{{ bos_token }}")
