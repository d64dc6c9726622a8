"""Tokens and web sessions end: after TOKEN_DAYS, and when their account is locked,
expired or deleted (SPEC §12), tried with real accounts changed by the real tools."""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Iterator
from datetime import timedelta

import pytest
import time_machine

from gpulocker import accounts, tokens
from gpulocker.context import Context
from gpulocker.models import ApiToken, utcnow
from gpulocker.web import create_app
from gpulocker.web import session as web_session
from tests.conftest import needs_root
from tests.helpers import RUN

_names = itertools.count()


@pytest.fixture
def account() -> Iterator[str]:
    """A throwaway Linux account (this test may lock, expire or delete it)."""
    name = f"glt{RUN}_acct{next(_names)}"
    subprocess.run(["useradd", "-M", "-s", "/bin/bash", name], check=True, capture_output=True)
    subprocess.run(["chpasswd"], input=f"{name}:pw-{name}-X1\n", text=True, check=True)
    yield name
    subprocess.run(["userdel", "-f", name], check=False, capture_output=True)


def _me(ctx: Context, raw: str) -> int:
    """/api/v1/me with the token, past the web's few-second memory of known tokens."""
    web_session._known.clear()
    client = create_app(ctx=ctx).test_client()
    return client.get("/api/v1/me", headers={"Authorization": f"Bearer {raw}"}).status_code


def test_an_api_token_ends_after_token_days(ctx: Context, account: str) -> None:
    _row, raw = tokens.create(ctx.db, account, "laptop", token_days=ctx.settings.token_days)
    assert tokens.authenticate(ctx.db, raw) is not None
    with time_machine.travel(utcnow() + timedelta(days=89), tick=False):
        assert tokens.authenticate(ctx.db, raw) is not None
    with time_machine.travel(utcnow() + timedelta(days=91), tick=False):
        assert tokens.authenticate(ctx.db, raw) is None


def test_a_token_made_before_lifetimes_ends_too(ctx: Context, account: str) -> None:
    row, raw = tokens.create(ctx.db, account, "old")
    with ctx.db.transaction() as session:
        session.get(ApiToken, row.id).expires_at = None  # type: ignore[union-attr]
    with time_machine.travel(utcnow() + timedelta(days=3), tick=False):
        assert tokens.authenticate(ctx.db, raw, token_days=2) is None
        assert tokens.authenticate(ctx.db, raw, token_days=5) is not None


@needs_root
@pytest.mark.parametrize(
    ("change", "standing"),
    [(["usermod", "-L"], accounts.LOCKED), (["usermod", "-e", "1970-01-02"], accounts.EXPIRED)],
    ids=["locked", "expired"],
)
def test_a_locked_or_expired_account_loses_its_tokens_and_sessions(
    ctx: Context, account: str, change: list[str], standing: str
) -> None:
    _api, raw = tokens.create(ctx.db, account, "script")
    _web, web_raw = tokens.create(ctx.db, account, kind=tokens.WEB, hours=24)
    assert _me(ctx, raw) == 200
    subprocess.run([*change, account], check=True, capture_output=True)
    assert accounts.standing(account) == standing
    assert _me(ctx, raw) == 401
    with ctx.db.session() as session:
        rows = session.query(ApiToken).filter(ApiToken.user == account).all()
        assert rows and all(r.revoked_at is not None for r in rows)  # the web one too
    subprocess.run(["usermod", "-U", "-e", "", account], check=True, capture_output=True)
    assert accounts.standing(account) == accounts.OK
    assert tokens.authenticate(ctx.db, raw) is None  # lost for good, not just paused
    assert tokens.authenticate(ctx.db, web_raw) is None


@needs_root
def test_a_deleted_account_cannot_use_its_token(ctx: Context, account: str) -> None:
    _row, raw = tokens.create(ctx.db, account, "script")
    assert _me(ctx, raw) == 200
    subprocess.run(["userdel", "-f", account], check=True, capture_output=True)
    assert accounts.standing(account) == accounts.GONE
    assert _me(ctx, raw) == 401
