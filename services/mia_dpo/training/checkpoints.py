"""Trainer checkpoints kept in the store, so a restarted (stateless) worker resumes.

Keys under the stage prefix (`runs/{run_id}/train/`, or "" in a standalone folder):

    checkpoints/checkpoint-N/...   the Trainer's checkpoint folder, file for file
    checkpoints/latest.json        {"step": N, "files": [...], "fingerprint": "..."}

The pointer is written after every file of its checkpoint, so a worker killed
mid-upload leaves the previous pointer behind: a half-uploaded checkpoint is never
resumed from. Once the pointer has moved, older checkpoints (and any half-uploaded
one) are deleted. The fingerprint names the pairs and settings the checkpoint was
trained on; a checkpoint of other inputs is ignored rather than resumed.

Under torchrun / accelerate every rank writes its own `rng_state_{rank}.pth`: each
rank uploads that file, rank 0 uploads the rest, and rank 0 writes the pointer after
a barrier. Every rank then resumes from the same pointer. (DDP only: DeepSpeed and
FSDP shard the optimizer state across ranks, which this does not collect.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from mia_dpo.errors import NotFound
from mia_dpo.runtime import layout
from mia_dpo.runtime.store import Store


def upload_dir(store: Store, local: Path, folder: str) -> list[str]:
    """Put every file under `local` at `folder` + its relative path; return the names."""
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    for name in names:
        store.put_bytes(folder + name, (local / name).read_bytes())
    return names


@dataclass(frozen=True)
class Resume:
    step: int
    path: Path  # the downloaded checkpoint-N folder


def download_latest(
    store: Store, prefix: str, out_dir: Path, fingerprint: str, log: logging.Logger
) -> Resume | None:
    """The checkpoint latest.json points at, copied to out_dir/checkpoint-N; None if
    there is none, or it was trained on other pairs or settings."""
    try:
        latest = store.get_json(layout.latest_checkpoint_key(prefix))
    except NotFound:
        return None
    step = int(latest["step"])
    if latest.get("fingerprint") != fingerprint:
        log.warning(
            "train: ignoring checkpoint-%d in the store: it was trained on other pairs or "
            "settings; starting from step 0",
            step,
        )
        return None
    folder = layout.checkpoint_prefix(prefix, step)
    local = out_dir / f"checkpoint-{step}"
    for name in latest["files"]:
        dest = local / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(store.get_bytes(folder + name))
    return Resume(step=step, path=local)


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class StoreCheckpoints(TrainerCallback):
    """Copies each checkpoint the Trainer writes locally into the store, then moves
    the pointer to it."""

    def __init__(self, store: Store, prefix: str, fingerprint: str, log: logging.Logger) -> None:
        self.store, self.prefix, self.fingerprint, self.log = store, prefix, fingerprint, log

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        folder = layout.checkpoint_prefix(self.prefix, step)
        if state.is_world_process_zero:
            upload_dir(self.store, local, folder)
        elif (rng := local / f"rng_state_{args.process_index}.pth").is_file():
            self.store.put_bytes(folder + rng.name, rng.read_bytes())
        _barrier(args.world_size)  # every rank's files are in before the pointer moves
        if not state.is_world_process_zero:
            return
        files = [k[len(folder) :] for k in self.store.list(folder)]
        self.store.put_json(
            layout.latest_checkpoint_key(self.prefix),
            {"step": step, "files": files, "fingerprint": self.fingerprint},
        )
        self.log.info("train: checkpoint-%d stored (%d files)", step, len(files))
        # Only now may older (or half-uploaded) checkpoints go.
        base = layout.checkpoints_prefix(self.prefix)
        for key in self.store.list(base):
            if not key.startswith(folder) and key != layout.latest_checkpoint_key(self.prefix):
                self.store.delete(key)
