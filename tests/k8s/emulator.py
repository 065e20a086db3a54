"""The Kubernetes API for tests: the kmock emulator (nothing real can run here).

kmock is an in-memory, asyncio API server that the official client talks to over
HTTP: create, read, list, patch (status too), delete. It is not a cluster: it
schedules nothing, ignores label selectors, and runs no controllers; see
kubelet.py for the stand-in that runs a Job's pods. It is served from a thread
with its own event loop so the synchronous `kubernetes` client can use it.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import kmock
import yaml
from kubernetes import client


class KubeEmulator:
    def __init__(self) -> None:
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self.handler: Any = None
        self.url = ""
        self._thread = threading.Thread(target=self._serve, name="kmock", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("kmock emulator did not start")

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as handler, kmock.Server(handler) as server:
            self.handler, self.url = handler, str(server.url).rstrip("/")
            # Known before any object exists, as on a real server (else: 404 on list).
            handler.resources["batch/v1/jobs"] = {"namespaced": True, "kind": "Job"}
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def api_client(self) -> client.ApiClient:
        cfg = client.Configuration()
        cfg.host = self.url
        return client.ApiClient(cfg)

    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api_client())

    def write_kubeconfig(self, path: Path, namespace: str) -> Path:
        """A kubeconfig a separate process (the controller) loads to reach the emulator."""
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": self.url}}],
            "users": [{"name": "kmock", "user": {"token": "test"}}],
            "contexts": [
                {"name": "kmock", "context": {"cluster": "kmock", "user": "kmock",
                                              "namespace": namespace}}
            ],
            "current-context": "kmock",
        }  # fmt: skip
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return path
