"""Picks the configured launcher: the one place that knows every launcher class.

The Kubernetes launcher needs the optional `kubernetes` package, so it is imported
only when configured, and a missing package is a one-line configuration error.
"""

from __future__ import annotations

from mia_dpo.config import RunConfig
from mia_dpo.extras import require
from mia_dpo.runtime.context import StageResolver
from mia_dpo.runtime.launchers import ExternalLauncher, InlineLauncher, Launcher, LocalLauncher
from mia_dpo.runtime.queue import Queue
from mia_dpo.runtime.store import Store


def make_launcher(cfg: RunConfig, store: Store, queue: Queue, stages: StageResolver) -> Launcher:
    kind = cfg.launcher.kind
    if kind == "inline":
        return InlineLauncher(cfg, store, queue, stages)
    if kind == "local":
        return LocalLauncher(cfg)
    if kind == "kubernetes":
        require("kubernetes", "launcher.kind: kubernetes")
        from mia_dpo.runtime.k8s_launcher import KubernetesLauncher

        return KubernetesLauncher(cfg)
    return ExternalLauncher()
