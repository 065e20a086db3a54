"""No architecture is accepted and then fails inside a stage: every family the factory
builds that the stages cannot drive is refused by the self-check (config and
processor, no weights) with one line naming model.path and the model type."""

from __future__ import annotations

import pytest

from mia_dpo.config import ModelConfig
from mia_dpo.errors import UserError
from mia_dpo.models.families import SUPPORTED
from mia_dpo.models.loading import check_model
from tests.families.factory import FAMILIES

REFUSED = {
    "paligemma": "prefix-LM",  # token_type_ids not carried through scoring and training
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
