"""Signing in: a Linux account's password checked by PAM, with throttling of failures.

Two promises. No user enumeration: a wrong password and an unknown user get the same
answer after about the same time (every failure is padded to LOGIN_FAILURE_FLOOR_SECONDS, 3 s,
which covers pam_unix's own delay). Throttling: after `USER_LIMIT` failures for one user
name, or `ADDRESS_LIMIT` from one client address, within `WINDOW_SECONDS`, further
attempts are refused with `Throttled` (and its `retry_after`) without asking PAM at all.

Failures are counted in the `login_failures` table, never in Redis: Redis is a cache that
a local user may reach, and a counter there could be wiped between guesses or stuffed to
lock a victim out (SPEC §12). Each attempt is counted *before* PAM is asked and forgiven
after a success, so parallel attempts cannot all pass the check before any is counted.
"""

from __future__ import annotations

import logging
import math
import pwd
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
FAILED = "wrong user name or password"

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
    floor_seconds: float | None = None,
) -> str:
    """The signed-in user name, or raise Throttled / BadCredentials. A failure is padded to
    `floor_seconds` (LOGIN_FAILURE_FLOOR_SECONDS when None).

    Throttling is checked before PAM is asked, so a blocked guesser learns nothing.
    """
    if floor_seconds is None:
        floor_seconds = ctx.settings.login_failure_floor_seconds
    attempt = Attempt(username.strip(), address or "unknown")
    check_throttle(ctx, attempt)
    counted = reserve(ctx, attempt)
    started = time.monotonic()
    if pam_check(ctx.settings.pam_service, attempt.username, password):
        clear_failures(ctx, attempt, counted)
        return attempt.username
    # The typed name is not logged: it is often a password typed into the wrong box.
    log.info("failed sign-in from %s (%s)", attempt.address, _known(attempt.username))
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
            raise _throttled(failures[-limit], now)


def _throttled(oldest_counted: datetime, now: datetime) -> Throttled:
    """The refusal, saying when the oldest counted failure leaves the window."""
    wait = (oldest_counted + timedelta(seconds=WINDOW_SECONDS) - now).total_seconds()
    retry_after = max(1, math.ceil(wait))
    return Throttled(
        f"too many failed sign-ins; try again in {retry_after} s", retry_after=retry_after
    )


def reserve(ctx: Context, attempt: Attempt) -> list[int]:
    """Count this attempt as a failure now, before PAM is asked; refuse it when that puts
    either counter over its limit. Returns the ids of the rows written (for forgiving).

    Each attempt commits its own rows and then counts: the k-th attempt to commit sees at
    least k, so of any number of parallel attempts at most the limit reach PAM.
    """
    ids = record_failure(ctx, attempt)
    now = utcnow()
    for key, limit in attempt.keys:
        failures = _recent_failures(ctx, key, now)
        if len(failures) > limit:
            _forget(ctx, ids)
            raise _throttled(failures[-limit - 1], now)
    return ids


def record_failure(ctx: Context, attempt: Attempt) -> list[int]:
    """Count one failure under each key of the attempt; the new rows' ids."""
    now = utcnow()
    cutoff = now - timedelta(seconds=WINDOW_SECONDS)
    with ctx.db.transaction() as session:
        rows = []
        for key, _limit in attempt.keys:
            session.execute(
                delete(LoginFailure).where(LoginFailure.key == key, LoginFailure.at < cutoff)
            )
            rows.append(LoginFailure(key=key, at=now))
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def clear_failures(ctx: Context, attempt: Attempt, counted: list[int] | None = None) -> None:
    """A successful sign-in forgives the user name's failures, and this attempt's own count
    under its address (not the address's earlier failures)."""
    key = attempt.keys[0][0]
    with ctx.db.transaction() as session:
        session.execute(delete(LoginFailure).where(LoginFailure.key == key))
    _forget(ctx, counted or [])


def _forget(ctx: Context, ids: list[int]) -> None:
    """Remove the failure rows `ids` (an attempt that was refused or succeeded)."""
    if ids:
        with ctx.db.transaction() as session:
            session.execute(delete(LoginFailure).where(LoginFailure.id.in_(ids)))


def _known(username: str) -> str:
    """Whether the typed name is an account here, without repeating what was typed."""
    try:
        pwd.getpwnam(username)
    except (KeyError, ValueError, OSError):
        return "no such account"
    return f"account {username}"


def _recent_failures(ctx: Context, key: str, now: datetime) -> list[datetime]:
    """Times of the failures under `key` within the window, oldest first."""
    cutoff = now - timedelta(seconds=WINDOW_SECONDS)
    with ctx.db.session() as session:
        stmt = (
            select(LoginFailure.at)
            .where(LoginFailure.key == key, LoginFailure.at >= cutoff)
            .order_by(LoginFailure.at)
        )
        return list(session.scalars(stmt))


def failure_count(ctx: Context, key: str) -> int:
    """How many failures are counted under `key` now (for tests and the admin)."""
    cutoff = utcnow() - timedelta(seconds=WINDOW_SECONDS)
    with ctx.db.session() as session:
        stmt = select(func.count()).where(LoginFailure.key == key, LoginFailure.at >= cutoff)
        return session.scalar(stmt) or 0
