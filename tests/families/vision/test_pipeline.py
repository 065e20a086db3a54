"""tests/families/test_pipeline.py for the families whose processors need torchvision,
run in the vision environment (`make test` runs this folder with `.venv-vision`)."""

from __future__ import annotations

import pytest

from tests.families.factory_vision import VISION_FAMILIES
from tests.families.test_pipeline import (  # noqa: F401  (collected here, with our `family`)
    model_dir,
    run,
    test_batch_sizes_1_and_4_give_the_same_greedy_answers,
    test_every_stage_runs,
    test_shares_equal_an_eager_computation,
    test_the_self_check_reads_both_probe_images,
    test_training_sees_the_generation_tokens,
)


@pytest.fixture(scope="module", params=sorted(VISION_FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param
