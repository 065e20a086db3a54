"""The augment stage: sequence, grid collage and pic-in-pic (method.md section 1)."""

from mia_dpo.stages.augment.stage import run_shard

__all__ = ["run_shard"]
