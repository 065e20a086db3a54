"""The stateless worker loop: claim, skip if done, run, write marker, ack.

Everything per shard lives here (as datatrove's executor does it), so launchers
only decide where workers run. The order matters: outputs, then the marker
(holding the shard's stats), then the ack. A crash before the marker redoes the
shard into the same keys; a crash after it only redelivers a task that the
marker check then skips.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
from types import FrameType

from pydantic import ValidationError

from mia_dpo.config import RunConfig
from mia_dpo.errors import NotFound, UserError
from mia_dpo.records import Task
from mia_dpo.runtime import layout
from mia_dpo.runtime.context import StageContext, StageFn
from mia_dpo.runtime.queue import Lease, Queue
from mia_dpo.runtime.store import BlobReader, OutsideScope, Store

log = logging.getLogger("mia_dpo.worker")


class Heartbeat:
    """Renews a lease every lease/3 seconds while the task runs, in a thread."""

    def __init__(self, queue: Queue, run_id: str, stage: str, lease: Lease) -> None:
        self._stop = threading.Event()
        self._args = (queue, run_id, stage, lease)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="heartbeat")

    def _loop(self) -> None:
        queue, run_id, stage, lease = self._args
        interval = queue.cfg.lease_seconds / 3
        while not self._stop.wait(interval):
            try:
                if not queue.heartbeat(run_id, stage, lease):
                    lease.lost = True
                    log.warning("lease on %s lost to another worker", lease.task_id)
                    return
            except Exception as e:  # a blip: the next beat (or the lease timeout) decides
                log.warning("heartbeat for %s failed: %s", lease.task_id, e)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def consumer_name() -> str:
    """Unique per process and thread: the lease owner in the queue."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def load_run_config(store: Store, run_id: str, local: RunConfig) -> RunConfig:
    """The stage parameters come from the run's stored config (one truth for all
    workers); connections come from this process's own config and environment."""
    try:
        stored = store.get_json(layout.config_key(run_id))
    except NotFound:
        raise UserError(
            f"run {run_id!r} has no stored config: start it with `mia-dpo run`"
        ) from None
    cfg = RunConfig.model_validate(stored)
    return cfg.model_copy(
        update={"store": local.store, "queue": local.queue, "launcher": local.launcher}
    )


class Worker:
    def __init__(
        self,
        cfg: RunConfig,
        run_id: str,
        stage: str,
        store: Store,
        queue: Queue,
        *,
        stage_fn: StageFn,
        stop: threading.Event | None = None,
        consumer: str | None = None,
    ) -> None:
        self.cfg, self.run_id, self.stage, self.stage_fn = cfg, run_id, stage, stage_fn
        self.store, self.queue = store, queue
        self.stop = stop or threading.Event()
        self.consumer = consumer or consumer_name()
        self.processed = 0
        self._ctx: StageContext | None = None

    def _context(self) -> StageContext:
        if self._ctx is None:
            run_cfg = load_run_config(self.store, self.run_id, self.cfg)
            blobs = scoped_reader(self.store, run_cfg, self.run_id)
            self._ctx = StageContext(store=self.store, blobs=blobs, config=run_cfg)
        return self._ctx

    def run(self) -> int:
        """Process tasks until the stage is closed and drained (or stop is set). Returns 0."""
        while not self.stop.is_set():
            lease = self.queue.wait_for_work(self.run_id, self.stage, self.consumer, self.stop)
            if lease is None:
                break
            self._process(lease)
        return 0

    def _process(self, lease: Lease) -> None:
        q, run_id, stage = self.queue, self.run_id, self.stage
        try:
            task = Task.model_validate_json(lease.task_json)
            if task.run_id != run_id or task.stage != stage or task.task_id != lease.task_id:
                raise ValueError(f"task {task.task_id} does not belong to {run_id}/{stage}")
        except (ValidationError, ValueError) as e:
            # A malformed message will not get better on retry: dead-letter it now.
            first = str(e).splitlines()[0]
            q.fail(run_id, stage, lease, f"invalid task message: {first}", "", final=True)
            log.error("dead-lettered invalid message %s: %s", lease.task_id, first)
            return
        marker = layout.marker_key(run_id, stage, task.shard)
        try:
            with Heartbeat(q, run_id, stage, lease):
                if self.store.exists(marker):
                    log.info("%s already done, skipping", task.task_id)
                else:
                    t0 = time.monotonic()
                    stats = self.stage_fn(task, self._context())
                    stats.seconds = round(time.monotonic() - t0, 4)
                    if lease.lost:
                        # Another worker owns it now and writes the same keys; we
                        # must not mark it done under its feet.
                        log.warning(
                            "%s finished after its lease was lost; leaving it", task.task_id
                        )
                        return
                    self.store.put_text(marker, stats.model_dump_json())
                    self.processed += 1
            q.ack(run_id, stage, lease)
        except Exception as e:
            # Neither reading outside the run's scope nor a configuration error (a
            # UserError: an unsupported model, a bad field) gets better on retry.
            outcome = q.fail(
                run_id, stage, lease, f"{type(e).__name__}: {e}", traceback.format_exc(),
                final=isinstance(e, (OutsideScope, UserError)),
            )  # fmt: skip
            log.error("%s attempt %d failed (%s): %s", task.task_id, lease.attempt, outcome, e)
        except BaseException:
            # Second SIGTERM or Ctrl-C: hand the task back uncounted, then go.
            try:
                q.release(run_id, stage, lease)
            finally:
                raise


def scoped_reader(store: Store, cfg: RunConfig, run_id: str) -> BlobReader:
    """What a worker may read: its own run's prefix in the store and the configured
    input (index and image root); a record naming anything else is refused."""
    image_root = cfg.input.image_root or os.getcwd()  # '' resolves against the cwd
    roots = [store.uri(layout.run_prefix(run_id).rstrip("/")), cfg.input.path, image_root]
    return BlobReader(cfg.store, roots=roots)


def run_task_directly(
    cfg: RunConfig, run_id: str, stage: str, shard: int, store: Store, stage_fn: StageFn
) -> bool:
    """Run one task without the queue: how a multi-process launch (torchrun,
    accelerate) trains, since every rank must run the same task. Every rank runs
    it; rank 0 alone writes the marker. Returns False when it was already done."""
    marker = layout.marker_key(run_id, stage, shard)
    if store.exists(marker):
        return False
    run_cfg = load_run_config(store, run_id, cfg)
    ctx = StageContext(store=store, blobs=scoped_reader(store, run_cfg, run_id), config=run_cfg)
    t0 = time.monotonic()
    stats = stage_fn(Task.make(run_id, stage, shard), ctx)
    stats.seconds = round(time.monotonic() - t0, 4)
    if int(os.environ.get("RANK", "0")) == 0:
        store.put_text(marker, stats.model_dump_json())
    return True


class GracefulExit(BaseException):
    """Raised by the second SIGTERM to abandon the current task (it is released)."""


def install_signal_handlers(stop: threading.Event) -> None:
    """First SIGTERM/SIGINT: finish the current task, then exit 0. Second: release it now."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise GracefulExit()
        log.warning("signal %d: finishing the current task, then exiting", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
