"""Sign-in throttling that parallel guessing cannot beat, and logs that keep what was
typed into the user-name box to themselves (SPEC §12)."""

from __future__ import annotations

import logging
import threading

import pytest

from gpulocker import auth
from gpulocker.context import Context
from tests.helpers import ALICE, TestUser

PARALLEL = 20


def test_parallel_guesses_reach_pam_at_most_the_limit(
    ctx: Context, users: dict[str, TestUser], pam_service: str
) -> None:
    start = threading.Barrier(PARALLEL)
    outcomes: list[str] = []

    def guess(n: int) -> None:
        start.wait()
        try:
            auth.authenticate(ctx, ALICE, f"guess-{n}", f"203.0.113.{n}", floor_seconds=0)
        except auth.BadCredentials:
            outcomes.append("asked PAM")
        except auth.Throttled:
            outcomes.append("throttled")

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(PARALLEL)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(outcomes) == PARALLEL
    assert outcomes.count("asked PAM") <= auth.USER_LIMIT
    assert outcomes.count("throttled") >= PARALLEL - auth.USER_LIMIT
    # every guess that reached PAM is counted; the refused ones are not
    assert auth.failure_count(ctx, f"user:{ALICE}") == outcomes.count("asked PAM")


def test_a_success_forgives_its_own_count_under_the_address(
    ctx: Context, users: dict[str, TestUser], pam_service: str
) -> None:
    for _ in range(auth.ADDRESS_LIMIT + 3):
        assert auth.authenticate(ctx, ALICE, users[ALICE].password, "10.9.9.9", 0) == ALICE
    assert auth.failure_count(ctx, "addr:10.9.9.9") == 0


def test_a_failed_sign_in_does_not_log_what_was_typed(
    ctx: Context, users: dict[str, TestUser], pam_service: str, caplog: pytest.LogCaptureFixture
) -> None:
    typed = "Tr0ub4dor&3-typed-in-the-wrong-box"
    with caplog.at_level(logging.DEBUG), pytest.raises(auth.BadCredentials):
        auth.authenticate(ctx, typed, "anything", "10.1.1.1", floor_seconds=0)
    with caplog.at_level(logging.DEBUG), pytest.raises(auth.BadCredentials):
        auth.authenticate(ctx, ALICE, typed, "10.1.1.1", floor_seconds=0)
    assert caplog.records, "a failed sign-in is logged"
    assert all(typed not in record.getMessage() for record in caplog.records)
    assert any(ALICE in record.getMessage() for record in caplog.records)  # a real account is
