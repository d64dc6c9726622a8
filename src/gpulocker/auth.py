"""Signing in: a Linux account's password checked by PAM, with throttling of failures.

Two promises. No user enumeration: a wrong password and an unknown user get the same
answer after about the same time (every failure is padded to `FAILURE_FLOOR_SECONDS`,
which covers pam_unix's own delay). Throttling: after `USER_LIMIT` failures for one user
name, or `ADDRESS_LIMIT` from one client address, within `WINDOW_SECONDS`, further
attempts are refused with `Throttled` (and its `retry_after`) without asking PAM at all.
Failures are counted in Redis when there is one (shared by every worker), else in the
`login_failures` table.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select

from gpulocker.context import Context
from gpulocker.errors import GPULockerError
from gpulocker.models import LoginFailure, utcnow

log = logging.getLogger(__name__)

WINDOW_SECONDS = 15 * 60
USER_LIMIT = 5
ADDRESS_LIMIT = 20
FAILURE_FLOOR_SECONDS = 3.0
FAILED = "wrong user name or password"
REDIS_PREFIX = "gpulocker:login_failures:"

# libpam modules are not all thread-safe; one conversation at a time per process.
_pam_lock = threading.Lock()


class Throttled(GPULockerError):
    """Too many failed sign-ins; try again after `retry_after` seconds."""

    code = "throttled"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, retry_after=retry_after)
        self.retry_after = retry_after


class BadCredentials(GPULockerError):
    """The user name or password is wrong (deliberately not saying which)."""

    code = "unauthorized"


@dataclass(frozen=True)
class Attempt:
    """Who is trying to sign in, and from where (the keys failures are counted under)."""

    username: str
    address: str

    @property
    def keys(self) -> tuple[tuple[str, int], ...]:
        """(counter key, limit) for each thing we throttle on."""
        return (
            (f"user:{self.username.strip().lower()}", USER_LIMIT),
            (f"addr:{self.address}", ADDRESS_LIMIT),
        )


def pam_check(service: str, username: str, password: str) -> bool:
    """Ask PAM whether `password` is `username`'s. Any PAM trouble counts as a no."""
    import pam

    if not username or not password or "\x00" in username + password or len(username) > 255:
        return False
    with _pam_lock:
        try:
            return bool(pam.authenticate(username, password, service=service, resetcreds=False))
        except Exception:  # a misbehaving PAM module must not become a 500
            log.exception("PAM service %s failed", service)
            return False


def authenticate(
    ctx: Context,
    username: str,
    password: str,
    address: str,
    floor_seconds: float = FAILURE_FLOOR_SECONDS,
) -> str:
    """The signed-in user name, or raise Throttled / BadCredentials.

    Throttling is checked before PAM is asked, so a blocked guesser learns nothing.
    """
    attempt = Attempt(username.strip(), address or "unknown")
    check_throttle(ctx, attempt)
    started = time.monotonic()
    if pam_check(ctx.settings.pam_service, attempt.username, password):
        clear_failures(ctx, attempt)
        return attempt.username
    record_failure(ctx, attempt)
    log.info("failed sign-in for %r from %s", attempt.username, attempt.address)
    remaining = floor_seconds - (time.monotonic() - started)
    if remaining > 0:
        time.sleep(remaining)
    raise BadCredentials(FAILED)


def check_throttle(ctx: Context, attempt: Attempt) -> None:
    """Raise Throttled when either counter of this attempt is at its limit."""
    now = utcnow()
    for key, limit in attempt.keys:
        failures = _recent_failures(ctx, key, now)
        if len(failures) >= limit:
            oldest_counted = failures[-limit]
            wait = (oldest_counted + timedelta(seconds=WINDOW_SECONDS) - now).total_seconds()
            retry_after = max(1, math.ceil(wait))
            raise Throttled(
                f"too many failed sign-ins; try again in {retry_after} s", retry_after=retry_after
            )


def record_failure(ctx: Context, attempt: Attempt) -> None:
    """Count one failure under each key of the attempt."""
    now = utcnow()
    if ctx.redis is not None:
        pipe = ctx.redis.pipeline()
        for key, _limit in attempt.keys:
            stamp = now.timestamp()
            pipe.zadd(REDIS_PREFIX + key, {f"{stamp}:{time.monotonic_ns()}": stamp})
            pipe.expire(REDIS_PREFIX + key, WINDOW_SECONDS + 60)
        pipe.execute()
        return
    cutoff = now - timedelta(seconds=WINDOW_SECONDS)
    with ctx.db.transaction() as session:
        for key, _limit in attempt.keys:
            session.execute(
                delete(LoginFailure).where(LoginFailure.key == key, LoginFailure.at < cutoff)
            )
            session.add(LoginFailure(key=key, at=now))


def clear_failures(ctx: Context, attempt: Attempt) -> None:
    """A successful sign-in forgives the user name's failures (not the address's)."""
    key = attempt.keys[0][0]
    if ctx.redis is not None:
        ctx.redis.delete(REDIS_PREFIX + key)
        return
    with ctx.db.transaction() as session:
        session.execute(delete(LoginFailure).where(LoginFailure.key == key))


def _recent_failures(ctx: Context, key: str, now: datetime) -> list[datetime]:
    """Times of the failures under `key` within the window, oldest first."""
    cutoff = now - timedelta(seconds=WINDOW_SECONDS)
    if ctx.redis is not None:
        name = REDIS_PREFIX + key
        ctx.redis.zremrangebyscore(name, "-inf", cutoff.timestamp())
        scores = ctx.redis.zrangebyscore(name, cutoff.timestamp(), "+inf", withscores=True)
        return [datetime.fromtimestamp(score, now.tzinfo) for _member, score in scores]
    with ctx.db.session() as session:
        stmt = (
            select(LoginFailure.at)
            .where(LoginFailure.key == key, LoginFailure.at >= cutoff)
            .order_by(LoginFailure.at)
        )
        return list(session.scalars(stmt))


def failure_count(ctx: Context, key: str) -> int:
    """How many failures are counted under `key` now (for tests and the admin)."""
    if ctx.redis is not None:
        return len(_recent_failures(ctx, key, utcnow()))
    cutoff = utcnow() - timedelta(seconds=WINDOW_SECONDS)
    with ctx.db.session() as session:
        stmt = select(func.count()).where(LoginFailure.key == key, LoginFailure.at >= cutoff)
        return session.scalar(stmt) or 0
