"""Redis queue on Streams with one consumer group per (run, stage).

Why Streams: XREADGROUP moves an entry into the group's pending list (PEL)
atomically with delivering it, so a task is never only in a worker's memory; the
PEL's idle time is the lease, XCLAIM renews it, XAUTOCLAIM reclaims it. Every
state change is one Lua script, so a worker killed between two commands cannot
leave a task half-moved.

Keys, all under `{namespace}:{run_id}:{stage}:`
  stream    entries {id, task}; an entry is deleted when acked or dead-lettered
  live      hash task_id -> entry id of tasks queued or leased (idempotent enqueue)
  attempts  hash task_id -> claims so far
  dead      hash task_id -> DeadLetter JSON
  state     hash opened / closed
  cursor    XAUTOCLAIM scan position, so reclaiming walks the whole PEL
"""

from __future__ import annotations

import json
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from mia_dpo.config import QueueConfig
from mia_dpo.errors import UserError
from mia_dpo.runtime.queue import DeadLetter, Lease, Queue, QueueCounts

GROUP = "workers"
# Owner check shared by the scripts that act on a lease: the entry must still be
# pending for this consumer (another worker may have reclaimed it).
_OWNED = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #p == 0 or p[1][2] ~= ARGV[2] then return 'lost' end
"""

_ENQUEUE = """
local added = 0
for i = 1, #ARGV, 2 do
  local tid = ARGV[i]
  if redis.call('HEXISTS', KEYS[2], tid) == 0 and redis.call('HEXISTS', KEYS[3], tid) == 0 then
    local eid = redis.call('XADD', KEYS[1], '*', 'id', tid, 'task', ARGV[i + 1])
    redis.call('HSET', KEYS[2], tid, eid)
    added = added + 1
  end
end
return added
"""

# KEYS: stream live dead attempts cursor; ARGV: group consumer lease_ms max_attempts now
_CLAIM = """
local maxa = tonumber(ARGV[4])
for _ = 1, 16 do
  local cur = redis.call('GET', KEYS[5]) or '0-0'
  local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], cur, 'COUNT', 1)
  redis.call('SET', KEYS[5], r[1])
  local e = r[2][1]
  if not e then
    if r[1] == '0-0' then break end
  else
    local eid, tid, body = e[1], e[2][2], e[2][4]
    local n = redis.call('HINCRBY', KEYS[4], tid, 1)
    if n <= maxa then return {eid, tid, body, n} end
    redis.call('XACK', KEYS[1], ARGV[1], eid)
    redis.call('XDEL', KEYS[1], eid)
    redis.call('HDEL', KEYS[2], tid)
    redis.call('HSET', KEYS[3], tid, cjson.encode({task_id = tid, task = body, attempts = n - 1,
      error = 'lease expired ' .. (n - 1) .. ' times (worker lost)', traceback = '',
      at = tonumber(ARGV[5])}))
  end
end
local rd = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
if not rd then return false end
local e = rd[1][2][1]
local n = redis.call('HINCRBY', KEYS[4], e[2][2], 1)
return {e[1], e[2][2], e[2][4], n}
"""

_HEARTBEAT = (
    _OWNED
    + """
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 'ok'
"""
)

# KEYS: stream live attempts; ARGV: group consumer eid tid
_ACK = (
    _OWNED
    + """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[4])
redis.call('HDEL', KEYS[3], ARGV[4])
return 'ok'
"""
)

# KEYS: stream live dead attempts; ARGV: group consumer eid tid mode max error tb now
# mode: 'fail' (retry or dead by attempts), 'dead' (dead now), 'release' (uncounted retry)
_SETTLE = (
    _OWNED
    + """
local tid, mode = ARGV[4], ARGV[5]
local body = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])[1][2][4]
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
local n = tonumber(redis.call('HGET', KEYS[4], tid) or '0')
if mode == 'dead' or (mode == 'fail' and n >= tonumber(ARGV[6])) then
  redis.call('HDEL', KEYS[2], tid)
  redis.call('HSET', KEYS[3], tid, cjson.encode({task_id = tid, task = body, attempts = n,
    error = ARGV[7], traceback = ARGV[8], at = tonumber(ARGV[9])}))
  return 'dead'
end
if mode == 'release' then redis.call('HINCRBY', KEYS[4], tid, -1) end
local neid = redis.call('XADD', KEYS[1], '*', 'id', tid, 'task', body)
redis.call('HSET', KEYS[2], tid, neid)
return 'retry'
"""
)

_REQUEUE_DEAD = """
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local d = cjson.decode(all[i + 1])
  local eid = redis.call('XADD', KEYS[1], '*', 'id', all[i], 'task', d.task)
  redis.call('HSET', KEYS[2], all[i], eid)
  redis.call('HDEL', KEYS[4], all[i])
end
redis.call('DEL', KEYS[3])
return #all / 2
"""


# KEYS: stream live attempts; ARGV: group, task ids...
_DISCARD = """
local found = 0
for i = 2, #ARGV do
  local tid = ARGV[i]
  local eid = redis.call('HGET', KEYS[2], tid)
  if eid then
    redis.pcall('XACK', KEYS[1], ARGV[1], eid)
    redis.call('XDEL', KEYS[1], eid)
    redis.call('HDEL', KEYS[2], tid)
    found = found + 1
  end
  redis.call('HDEL', KEYS[3], tid)
end
return found
"""


class _Retry(Retry):
    """Retry connection blips, but not a refused password: redis-py counts an
    authentication failure as a ConnectionError and would back off for a minute."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):  # type: ignore[no-untyped-def]
        def retryable(e: Exception) -> bool:
            if isinstance(e, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
                return False
            return is_retryable(e) if is_retryable else True

        return super().call_with_retry(do, fail, retryable, with_failure_count)


class RedisQueue(Queue):
    def __init__(self, cfg: QueueConfig, client: redis.Redis | None = None) -> None:
        super().__init__(cfg)
        password = cfg.password.get_secret_value() if cfg.password else None
        # Connection errors are retried with backoff for ~a minute, which rides
        # out a Redis restart; the scripts make each retried call safe to repeat
        # except a claim, whose lost reply only costs a lease timeout.
        self.r = client or redis.Redis.from_url(
            cfg.url,
            password=password,
            decode_responses=True,
            socket_timeout=30,
            socket_connect_timeout=5,
            health_check_interval=15,
            retry=_Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=40),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        if client is None:
            try:
                self.r.ping()
            except redis.AuthenticationError:
                raise UserError(
                    f"queue.url {cfg.url}: Redis refused the password (MIA_DPO_REDIS_PASSWORD)"
                ) from None
            except redis.ConnectionError as e:
                raise UserError(f"queue.url {cfg.url}: cannot reach Redis: {e}") from None
        self._enqueue = self.r.register_script(_ENQUEUE)
        self._claim = self.r.register_script(_CLAIM)
        self._heartbeat = self.r.register_script(_HEARTBEAT)
        self._ack = self.r.register_script(_ACK)
        self._settle = self.r.register_script(_SETTLE)
        self._requeue = self.r.register_script(_REQUEUE_DEAD)
        self._discard = self.r.register_script(_DISCARD)

    def _k(self, run_id: str, stage: str, name: str) -> str:
        return f"{self.cfg.namespace}:{run_id}:{stage}:{name}"

    def _keys(self, run_id: str, stage: str, *names: str) -> list[str]:
        return [self._k(run_id, stage, n) for n in names]

    def open_stage(self, run_id: str, stage: str) -> None:
        try:
            self.r.xgroup_create(self._k(run_id, stage, "stream"), GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self.r.hset(self._k(run_id, stage, "state"), mapping={"opened": 1, "closed": 0})

    def close_stage(self, run_id: str, stage: str) -> None:
        self.r.hset(self._k(run_id, stage, "state"), "closed", 1)

    def enqueue(self, run_id: str, stage: str, tasks: list[tuple[str, str]]) -> int:
        keys = self._keys(run_id, stage, "stream", "live", "dead")
        added = 0
        for i in range(0, len(tasks), 500):  # bounded script runs on huge plans
            argv = [x for pair in tasks[i : i + 500] for x in pair]
            added += int(self._enqueue(keys=keys, args=argv))
        return added

    def claim(self, run_id: str, stage: str, consumer: str) -> Lease | None:
        keys = self._keys(run_id, stage, "stream", "live", "dead", "attempts", "cursor")
        lease_ms = int(self.cfg.lease_seconds * 1000)
        try:
            got = self._claim(
                keys=keys, args=[GROUP, consumer, lease_ms, self.cfg.max_attempts, time.time()]
            )
        except redis.ResponseError as e:
            if "NOGROUP" in str(e):  # stage not opened yet
                return None
            raise
        if not got:
            return None
        eid, tid, body, n = got
        return Lease(task_json=body, task_id=tid, attempt=int(n), consumer=consumer, handle=eid)

    def heartbeat(self, run_id: str, stage: str, lease: Lease) -> bool:
        keys = self._keys(run_id, stage, "stream")
        ok = self._heartbeat(keys=keys, args=[GROUP, lease.consumer, lease.handle]) == "ok"
        lease.lost = lease.lost or not ok
        return ok

    def ack(self, run_id: str, stage: str, lease: Lease) -> bool:
        keys = self._keys(run_id, stage, "stream", "live", "attempts")
        return (
            self._ack(keys=keys, args=[GROUP, lease.consumer, lease.handle, lease.task_id]) == "ok"
        )

    def _do_settle(
        self, run_id: str, stage: str, lease: Lease, mode: str, error: str, tb: str
    ) -> str:
        keys = self._keys(run_id, stage, "stream", "live", "dead", "attempts")
        args = [
            GROUP,
            lease.consumer,
            lease.handle,
            lease.task_id,
            mode,
            self.cfg.max_attempts,
            error,
            tb,
            time.time(),
        ]
        return str(self._settle(keys=keys, args=args))

    def fail(
        self, run_id: str, stage: str, lease: Lease, error: str, tb: str, final: bool = False
    ) -> str:
        return self._do_settle(run_id, stage, lease, "dead" if final else "fail", error, tb)

    def release(self, run_id: str, stage: str, lease: Lease) -> None:
        self._do_settle(run_id, stage, lease, "release", "", "")

    def counts(self, run_id: str, stage: str) -> QueueCounts:
        stream, dead, state = self._keys(run_id, stage, "stream", "dead", "state")
        pipe = self.r.pipeline(transaction=False)
        pipe.xlen(stream)
        pipe.hlen(dead)
        pipe.hgetall(state)
        length, n_dead, st = pipe.execute()
        leased = 0
        if length:
            try:
                leased = int(self.r.xpending(stream, GROUP)["pending"])
            except redis.ResponseError:
                leased = 0
        return QueueCounts(
            queued=length - leased,
            leased=leased,
            dead=n_dead,
            opened=st.get("opened") == "1",
            closed=st.get("closed") == "1",
        )

    def dead_letters(self, run_id: str, stage: str) -> list[DeadLetter]:
        raw = self.r.hgetall(self._k(run_id, stage, "dead"))
        return [DeadLetter.model_validate(json.loads(v)) for _, v in sorted(raw.items())]

    def requeue_dead(self, run_id: str, stage: str) -> int:
        keys = self._keys(run_id, stage, "stream", "live", "dead", "attempts")
        return int(self._requeue(keys=keys))

    def discard(self, run_id: str, stage: str, task_ids: list[str]) -> int:
        keys = self._keys(run_id, stage, "stream", "live", "attempts")
        found = 0
        for i in range(0, len(task_ids), 500):
            found += int(self._discard(keys=keys, args=[GROUP, *task_ids[i : i + 500]]))
        return found
