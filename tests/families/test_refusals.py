"""No architecture is accepted and then fails inside a stage: every family the factory
builds that the stages cannot drive is refused by the self-check (config and
processor, no weights) with one line naming model.path and the model type."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mia_dpo.config import ModelConfig
from mia_dpo.errors import UserError
from mia_dpo.models.families import SUPPORTED
from mia_dpo.models.loading import check_model
from tests.families.factory import FAMILIES

REFUSED = {
    "mllama": "cross-attention",  # no image tokens in the decoder
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_unsupported_families_are_refused_up_front(
    family: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = FAMILIES[family](tmp_path_factory.mktemp(family) / "model")
    with pytest.raises(UserError) as err:
        check_model(ModelConfig(path=str(path)))
    msg = str(err.value)
    assert msg.startswith(f"model.path: {path}") and "\n" not in msg
    assert REFUSED[family] in msg and f"supported: {SUPPORTED}" in msg


def test_the_refused_and_supported_families_cover_the_factory() -> None:
    from tests.families.test_pipeline import PARAMS

    assert set(FAMILIES) == set(REFUSED) | set(PARAMS)


def test_a_processor_that_needs_torchvision_names_the_vision_extra(tmp_path: Path) -> None:
    """Without torchvision (this environment), a Qwen2-VL checkpoint's processor cannot
    be built: the self-check says what to install, in one line. The checkpoint is the
    real config plus the processor's JSON files, written by hand (building the processor
    itself needs torchvision)."""
    from transformers import Qwen2VLConfig

    from tests.families.tokenizer import TokenizerSpec, build_tokenizer

    if importlib.util.find_spec("torchvision") is not None:
        pytest.fail("this test belongs to the environment without torchvision (.venv)")
    Qwen2VLConfig().save_pretrained(tmp_path)
    build_tokenizer(TokenizerSpec(bos=None, eos="<|im_end|>", pad="<|endoftext|>")).save_pretrained(
        tmp_path
    )
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_processor_type": "Qwen2VLImageProcessor"})
    )
    (tmp_path / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen2VLProcessor"})
    )
    with pytest.raises(UserError) as err:
        check_model(ModelConfig(path=str(tmp_path)))
    msg = str(err.value)
    assert msg.startswith(f"model.path: {str(tmp_path)!r}: ") and "\n" not in msg
    assert "needs torchvision" in msg and "pip install 'mia-dpo[model,vision]'" in msg
