"""Bearer tokens: API tokens a user makes and revokes, and the tokens behind web sign-ins.

Only a token's SHA-256 is stored, so a copy of the database lets nobody in. A web
sign-in is a token too (kind "web", kept in the signed session cookie): signing out
revokes it, so a copied cookie stops working the moment its owner signs out.

Lifetimes (SPEC §12): an API token works for `TOKEN_DAYS` after it was made, a web
sign-in for `WEB_SESSION_HOURS`; and only while its account stands (accounts.py): a
locked or expired account's tokens are revoked at their next use, and a token of an
account that cannot be found is refused (not revoked: a directory outage must not sign
everybody out for good).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from gpulocker import accounts, events
from gpulocker.db import Database
from gpulocker.errors import Invalid, NotFound
from gpulocker.models import ApiToken, utcnow

API = "api"
WEB = "web"
PREFIX = "glk_"
WEB_SESSION_HOURS = 7 * 24.0
TOKEN_DAYS = 90.0  # the default of the TOKEN_DAYS setting
TOUCH_EVERY = timedelta(minutes=1)
PRUNE_AFTER = timedelta(days=1)


@dataclass(frozen=True)
class Identity:
    """Who a token belongs to, and which token it was."""

    user: str
    token_id: int
    kind: str


def hash_token(raw: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def create(
    db: Database,
    user: str,
    name: str = "",
    kind: str = API,
    hours: float | None = None,
    token_days: float = TOKEN_DAYS,
) -> tuple[ApiToken, str]:
    """A new token for `user`; returns the row and the raw token (shown once, never stored).
    It ends after `hours`, or `token_days` for an API token."""
    if hours is None:
        hours = token_days * 24
    name = name.strip()
    if len(name) > 255:
        raise Invalid("a token name is at most 255 characters")
    raw = PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    row = ApiToken(
        user=user,
        name=name,
        kind=kind,
        token_hash=hash_token(raw),
        created_at=now,
        expires_at=now + timedelta(hours=hours) if hours else None,
    )
    with db.transaction() as session:
        if kind == WEB:
            _prune_web_sessions(session, user, now)
        session.add(row)
        session.flush()
        if kind == API:
            events.record(session, "token_created", user, f"API token {row.id} {name!r}", user=user)
    return row, raw


def _prune_web_sessions(session: Session, user: str, now: datetime) -> None:
    """Each sign-in makes a token: forget the user's ended ones (a day after they ended)."""
    cutoff = now - PRUNE_AFTER
    session.execute(
        delete(ApiToken).where(
            ApiToken.user == user,
            ApiToken.kind == WEB,
            or_(ApiToken.revoked_at < cutoff, ApiToken.expires_at < cutoff),
        )
    )


def authenticate(db: Database, raw: str, token_days: float = TOKEN_DAYS) -> Identity | None:
    """The identity behind a raw token, or None if it is unknown, revoked, expired, or its
    account no longer stands. Tokens made before lifetimes existed end `token_days` after
    they were made."""
    if not raw.startswith(PREFIX) or len(raw) > 200:
        return None
    now = utcnow()
    with db.session() as session:
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(raw)))
    if row is None or row.revoked_at is not None:
        return None
    ends = row.expires_at or row.created_at + timedelta(days=token_days)
    if ends <= now:
        return None
    standing = accounts.standing(row.user)
    if standing in (accounts.LOCKED, accounts.EXPIRED):
        revoke_all(db, row.user, f"the account is {standing}")
        return None
    if standing != accounts.OK:
        return None
    if row.last_used_at is None or now - row.last_used_at > TOUCH_EVERY:
        _touch(db, row.id)
    return Identity(row.user, row.id, row.kind)


def _touch(db: Database, token_id: int) -> None:
    """Note when a token was last used (at most once a minute: it is a write)."""
    with db.transaction() as session:
        session.execute(
            update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=utcnow())
        )


def list_for(session: Session, user: str) -> list[ApiToken]:
    """The user's API tokens that still work, newest first (web sign-ins are not listed)."""
    now = utcnow()
    stmt = (
        select(ApiToken)
        .where(ApiToken.user == user, ApiToken.kind == API, ApiToken.revoked_at.is_(None))
        .order_by(ApiToken.id.desc())
    )
    return [t for t in session.scalars(stmt) if t.expires_at is None or t.expires_at > now]


def revoke(db: Database, user: str, token_id: int) -> ApiToken:
    """Revoke one of `user`'s own tokens; another user's token is NotFound."""
    with db.transaction() as session:
        row = session.get(ApiToken, token_id)
        if row is None or row.user != user or row.revoked_at is not None:
            raise NotFound(f"no token {token_id}")
        row.revoked_at = utcnow()
        if row.kind == API:
            events.record(session, "token_revoked", user, f"API token {row.id}", user=user)
    return row


def revoke_all(db: Database, user: str, why: str) -> int:
    """Revoke every token and web session of `user` (an account that no longer stands)."""
    with db.transaction() as session:
        result: Any = session.execute(
            update(ApiToken)
            .where(ApiToken.user == user, ApiToken.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        done = result.rowcount
        if done:
            events.record(
                session,
                "tokens_revoked",
                "system",
                f"{done} token(s) and sessions: {why}",
                user=user,
            )
    return int(done or 0)


def end_web_session(db: Database, token_id: int) -> None:
    """Sign-out: the web session's token stops working now."""
    with db.transaction() as session:
        session.execute(
            update(ApiToken)
            .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )


def to_dict(row: ApiToken) -> dict[str, object]:
    """The public shape of a token (never its hash)."""
    return {
        "id": row.id,
        "name": row.name,
        "created_at": row.created_at.isoformat(),
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
        "last_used_at": row.last_used_at.isoformat() if row.last_used_at else None,
    }
