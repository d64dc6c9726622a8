"""PAM sign-in with real users, no user enumeration, throttling (database and Redis)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
import time_machine

from gpulocker import auth, tokens
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.models import utcnow
from tests.conftest import REDIS_URL
from tests.helpers import ALICE, BOB, TestUser


@pytest.fixture(params=["database", "redis"])
def auth_ctx(
    request: pytest.FixtureRequest, settings: Settings, db: Database, pam_service: str
) -> Iterator[Context]:
    """A Context counting failures in the database, or in Redis."""
    if request.param == "redis":
        request.getfixturevalue("redis_client")
        settings = settings.with_overrides(redis_url=REDIS_URL)
    context = Context(settings)
    yield context
    context.close()


def sign_in(ctx: Context, user: str, password: str, address: str = "10.0.0.1") -> str:
    return auth.authenticate(ctx, user, password, address, floor_seconds=0)


def test_it_signs_in_a_real_user(auth_ctx: Context, users: dict[str, TestUser]) -> None:
    assert sign_in(auth_ctx, ALICE, users[ALICE].password) == ALICE


def test_it_answers_the_same_for_a_wrong_password_and_an_unknown_user(
    auth_ctx: Context, users: dict[str, TestUser]
) -> None:
    answers, times = [], []
    for name in (ALICE, "nosuchuser_glt"):
        started = time.monotonic()
        with pytest.raises(auth.BadCredentials) as refused:
            auth.authenticate(auth_ctx, name, "wrong-password", "10.0.0.2", floor_seconds=0.3)
        times.append(time.monotonic() - started)
        answers.append((refused.value.code, refused.value.message))
    assert answers[0] == answers[1] == ("unauthorized", auth.FAILED)
    assert all(0.3 <= t < 0.6 for t in times)
    assert abs(times[0] - times[1]) < 0.15


def test_it_throttles_a_user_name_and_says_when_to_retry(
    auth_ctx: Context, users: dict[str, TestUser]
) -> None:
    for _ in range(auth.USER_LIMIT):
        with pytest.raises(auth.BadCredentials):
            sign_in(auth_ctx, BOB, "wrong")
    with pytest.raises(auth.Throttled) as throttled:
        sign_in(auth_ctx, BOB, users[BOB].password)  # even the right password: PAM not asked
    assert auth.WINDOW_SECONDS - 5 <= throttled.value.retry_after <= auth.WINDOW_SECONDS
    assert sign_in(auth_ctx, ALICE, users[ALICE].password) == ALICE  # others unaffected
    with time_machine.travel(utcnow() + timedelta(seconds=auth.WINDOW_SECONDS + 1)):
        assert sign_in(auth_ctx, BOB, users[BOB].password) == BOB


def test_it_throttles_an_address_across_user_names(
    auth_ctx: Context, users: dict[str, TestUser]
) -> None:
    for i in range(auth.ADDRESS_LIMIT):
        with pytest.raises(auth.BadCredentials):
            sign_in(auth_ctx, f"guess{i}", "wrong", address="10.9.9.9")
    with pytest.raises(auth.Throttled):
        sign_in(auth_ctx, ALICE, users[ALICE].password, address="10.9.9.9")
    assert sign_in(auth_ctx, ALICE, users[ALICE].password, address="10.9.9.10") == ALICE


def test_it_forgives_a_user_names_failures_after_a_success(
    auth_ctx: Context, users: dict[str, TestUser]
) -> None:
    for _ in range(auth.USER_LIMIT - 1):
        with pytest.raises(auth.BadCredentials):
            sign_in(auth_ctx, ALICE, "wrong")
    assert auth.failure_count(auth_ctx, f"user:{ALICE}") == auth.USER_LIMIT - 1
    sign_in(auth_ctx, ALICE, users[ALICE].password)
    assert auth.failure_count(auth_ctx, f"user:{ALICE}") == 0


def test_it_refuses_empty_and_nul_credentials(
    auth_ctx: Context, users: dict[str, TestUser]
) -> None:
    for name, password in ((ALICE, ""), ("", "x"), (ALICE, "a\x00b")):
        with pytest.raises(auth.BadCredentials):
            sign_in(auth_ctx, name, password)


def test_it_stores_only_the_hash_of_a_token(db: Database) -> None:
    row, raw = tokens.create(db, ALICE, "laptop")
    assert raw.startswith(tokens.PREFIX) and row.token_hash == tokens.hash_token(raw)
    assert raw not in row.token_hash
    identity = tokens.authenticate(db, raw)
    assert identity is not None and identity.user == ALICE
    tokens.revoke(db, ALICE, row.id)
    assert tokens.authenticate(db, raw) is None


def test_it_expires_web_sessions(db: Database) -> None:
    _row, raw = tokens.create(db, ALICE, kind=tokens.WEB, hours=1)
    assert tokens.authenticate(db, raw) is not None
    with time_machine.travel(utcnow() + timedelta(hours=1, seconds=1)):
        assert tokens.authenticate(db, raw) is None


def test_it_forgets_ended_web_sessions_at_the_next_sign_in(db: Database) -> None:
    old, _raw = tokens.create(db, ALICE, kind=tokens.WEB, hours=1)
    kept, _raw = tokens.create(db, ALICE, kind=tokens.WEB, hours=1)
    tokens.end_web_session(db, old.id)
    with time_machine.travel(utcnow() + timedelta(minutes=30)):
        tokens.create(db, ALICE, kind=tokens.WEB, hours=1)
    with time_machine.travel(utcnow() + timedelta(days=1, hours=1, minutes=10)):
        tokens.create(db, ALICE, kind=tokens.WEB, hours=1)
        tokens.create(db, BOB, kind=tokens.WEB, hours=1)
    with db.session() as session:
        from sqlalchemy import select

        from gpulocker.models import ApiToken

        left = set(session.scalars(select(ApiToken.id).where(ApiToken.user == ALICE)))
    assert old.id not in left and kept.id not in left and len(left) == 2
