"""An ACL user instead of the default user: the user name stays in MIA_DPO_REDIS_URL,
its password is split out of it (or comes from MIA_DPO_REDIS_PASSWORD), and the
user needs no more than the run's own keys. Real redis-server."""

from __future__ import annotations

import threading

import pytest
import redis

from mia_dpo.config import load_config
from mia_dpo.errors import UserError
from mia_dpo.records import Task
from mia_dpo.runtime.queue_factory import open_queue

pytestmark = pytest.mark.integration


def test_a_least_privilege_acl_user_runs_the_queue(redis_server, redis_url, tmp_path) -> None:
    admin = redis_server.client()
    # keys of its namespace only, and only the commands the queue uses
    admin.execute_command(
        "ACL", "SETUSER", "mia-worker", "on", ">s3cret-acl", "~mia-dpo:*", "resetchannels",
        "+@read", "+@write", "+@stream", "+@hash", "+@scripting", "+ping", "+info",
    )  # fmt: skip
    try:
        cfg_file = tmp_path / "run.yaml"
        cfg_file.write_text("queue: {backend: redis}\n")
        url = f"redis://mia-worker:s3cret-acl@127.0.0.1:{redis_server.port}/0"
        cfg = load_config(cfg_file, environ={"MIA_DPO_REDIS_URL": url})
        assert "s3cret" not in cfg.queue.url and cfg.queue.url.startswith("redis://mia-worker@")
        q = open_queue(cfg.queue)
        q.open_stage("acl", "augment")
        task = Task.make("acl", "augment", 0)
        assert q.enqueue("acl", "augment", [(task.task_id, task.model_dump_json())]) == 1
        q.close_stage("acl", "augment")
        lease = q.wait_for_work("acl", "augment", "c1", threading.Event())
        assert lease is not None and lease.task_id == task.task_id
        q.ack("acl", "augment", lease)
        assert q.counts("acl", "augment").queued == 0
        # the user cannot touch anything outside its namespace
        user = redis.Redis.from_url(url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.set("other-app:key", "x")
        bad = load_config(cfg_file, environ={"MIA_DPO_REDIS_URL": url.replace("s3cret", "wrong")})
        with pytest.raises(UserError, match="Redis refused the password"):
            open_queue(bad.queue).counts("acl", "augment")
    finally:
        admin.execute_command("ACL", "DELUSER", "mia-worker")
