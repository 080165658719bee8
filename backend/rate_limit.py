"""Sliding-window rate limits (login attempts per username + client IP, registrations per
client IP).

Two limiters with one interface (``hit(key) -> seconds to wait``, ``reset()``):

- :class:`SlidingWindowLimiter` keeps its windows in the process. With N API processes an
  attacker would get N times the budget.
- :class:`RedisWindowLimiter` keeps them in Redis (``PREFLOOP_RATE_LIMIT_REDIS_URL``), one
  sorted set per key updated by one atomic script on Redis's clock, so every process and
  host shares one budget. While Redis cannot be reached it falls back to an in-process
  window (and logs it), rather than refusing every login or letting every one through.

:func:`make_limiter` picks one from the settings.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Limiter(Protocol):
    def hit(self, key: str) -> int: ...

    def reset(self, key: str | None = None) -> None: ...


class SlidingWindowLimiter:
    def __init__(self, attempts: int, window_seconds: float, *, max_keys: int = 100_000) -> None:
        self.attempts = attempts
        self.window = window_seconds
        self.max_keys = max_keys
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str, now: float | None = None) -> int:
        """Record an attempt. Returns 0 when allowed, else the seconds to wait (>= 1)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._hits.get(key)
            if q is None:
                if len(self._hits) >= self.max_keys:
                    self._evict(now)
                q = self._hits[key] = deque()
            while q and q[0] <= now - self.window:
                q.popleft()
            if len(q) >= self.attempts:
                return max(1, math.ceil(q[0] + self.window - now))
            q.append(now)
            return 0

    def reset(self, key: str | None = None) -> None:
        with self._lock:
            if key is None:
                self._hits.clear()
            else:
                self._hits.pop(key, None)

    def _evict(self, now: float) -> None:
        stale = [k for k, q in self._hits.items() if not q or q[-1] <= now - self.window]
        for k in stale:
            del self._hits[k]
        if len(self._hits) >= self.max_keys:  # all live: drop the oldest half
            for k in sorted(self._hits, key=lambda k: self._hits[k][-1])[: self.max_keys // 2]:
                del self._hits[k]


# KEYS[1]: the window's sorted set. ARGV: window (s), attempts, a unique member.
# Returns 0 (allowed, recorded) or the seconds to wait. Time is Redis's, so hosts agree.
_HIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, math.ceil(tonumber(oldest[2]) + window - now))
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return 0
"""


class RedisWindowLimiter:
    """The same window as :class:`SlidingWindowLimiter`, shared through Redis."""

    def __init__(self, client: Any, attempts: int, window_seconds: float, *, prefix: str) -> None:
        self.attempts = attempts
        self.window = window_seconds
        self.prefix = prefix
        self._redis = client
        self._script = client.register_script(_HIT_SCRIPT)
        self._fallback = SlidingWindowLimiter(attempts, window_seconds)
        self._counter = 0

    def hit(self, key: str) -> int:
        self._counter += 1
        member = f"{os.getpid()}:{threading.get_ident()}:{self._counter}:{time.time_ns()}"
        try:
            return int(
                self._script(keys=[self.prefix + key], args=[self.window, self.attempts, member])
            )
        except Exception as exc:  # noqa: BLE001 - redis down: count in this process
            log.warning("rate limit store unreachable, counting in-process: %s", exc)
            return self._fallback.hit(key)

    def reset(self, key: str | None = None) -> None:
        self._fallback.reset(key)
        if key is not None:
            self._redis.delete(self.prefix + key)
            return
        batch = list(self._redis.scan_iter(match=self.prefix + "*", count=500))
        if batch:
            self._redis.delete(*batch)


def make_limiter(
    redis_url: str | None, attempts: int, window_seconds: float, *, name: str
) -> SlidingWindowLimiter | RedisWindowLimiter:
    """A limiter shared through Redis at ``redis_url``, else an in-process one. ``name``
    namespaces its keys (``prefloop:ratelimit:<name>:``)."""
    if not redis_url:
        return SlidingWindowLimiter(attempts, window_seconds)
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
    return RedisWindowLimiter(
        client, attempts, window_seconds, prefix=f"prefloop:ratelimit:{name}:"
    )
