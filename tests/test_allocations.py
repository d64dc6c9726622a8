"""The allocation core (SPEC section 5), on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import time_machine
from sqlalchemy import select

from gpulocker import allocations, events, lockouts, maintenance
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.errors import (
    Conflict,
    Forbidden,
    Invalid,
    LockedOut,
    Maintenance,
    NotEnoughGPUs,
    NotFound,
)
from gpulocker.models import ACTIVE, Allocation, Event, Notification, utcnow
from tests.helpers import ADMIN, ALICE, BOB, cuda


def test_it_grants_the_lowest_free_gpus(db: Database, settings: Settings) -> None:
    rows = allocations.request(db, settings, ALICE, "4090", 2, 1.5)
    assert [r.gpu_id for r in rows] == [0, 1]
    assert all(r.state == ACTIVE and r.user == ALICE for r in rows)
    assert rows[0].device.endswith("/nvidia0")
    assert rows[0].expires_at - rows[0].created_at == timedelta(hours=1.5)
    assert allocations.cuda_visible_devices(db, rows) == cuda(0, 1)


def test_it_records_an_event_and_a_notification(db: Database, settings: Settings) -> None:
    rows = allocations.request(db, settings, ALICE, "a100", 1, 2)
    with db.session() as s:
        kinds = [e.kind for e in s.scalars(select(Event).where(Event.kind == "granted"))]
        inbox = s.scalars(select(Notification).where(Notification.user == ALICE)).all()
    assert kinds == ["granted"]
    assert len(inbox) == 1 and f"CUDA_VISIBLE_DEVICES={cuda(4)}" in inbox[0].message
    assert rows[0].gpu_id == 4


def test_it_is_all_or_nothing(db: Database, settings: Settings) -> None:
    allocations.request(db, settings, BOB, "4090", 3, 1)
    with pytest.raises(NotEnoughGPUs, match="asked for 2, 1 free"):
        allocations.request(db, settings, ALICE, "4090", 2, 1)
    with db.session() as s:
        assert allocations.count_active(s, ALICE) == 0


def test_it_grants_specific_gpu_ids(db: Database, settings: Settings) -> None:
    rows = allocations.request(db, settings, ALICE, "4090", gpu_ids=[3, 1], hours=1)
    assert sorted(r.gpu_id for r in rows) == [1, 3]
    with pytest.raises(NotEnoughGPUs, match=r"\[3\]"):
        allocations.request(db, settings, BOB, "4090", gpu_ids=[3], hours=1)
    with pytest.raises(Invalid, match="count is 2"):
        allocations.request(db, settings, BOB, "4090", 2, gpu_ids=[0], hours=1)


@pytest.mark.parametrize(
    ("gpu_type", "count", "hours", "message"),
    [
        ("h100", 1, 1, "unknown GPU type 'h100'"),
        ("4090", 0, 1, "at least 1"),
        ("4090", 1, 0, "more than 0"),
        ("4090", 1, -2, "more than 0"),
        ("4090", 1, 169, "at most 168"),
        ("4090", 1, float("nan"), "must be a number"),
    ],
)
def test_it_refuses_invalid_requests(
    db: Database, settings: Settings, gpu_type: str, count: int, hours: float, message: str
) -> None:
    with pytest.raises(Invalid, match=message):
        allocations.request(db, settings, ALICE, gpu_type, count, hours)


def test_it_enforces_max_gpus_per_user(db: Database, settings: Settings) -> None:
    limited = settings.with_overrides(max_gpus_per_user=2)
    allocations.request(db, limited, ALICE, "4090", 1, 1)
    with pytest.raises(Forbidden, match="at most 2 per user"):
        allocations.request(db, limited, ALICE, "a100", 2, 1)


def test_it_lets_admins_allocate_for_a_user(db: Database, settings: Settings) -> None:
    rows = allocations.request(db, settings, ADMIN, "4090", 1, 1, user=BOB)
    assert rows[0].user == BOB
    with pytest.raises(Forbidden):
        allocations.request(db, settings, ALICE, "4090", 1, 1, user=BOB)


def test_it_refuses_a_locked_out_user_saying_until_when(db: Database, settings: Settings) -> None:
    with db.transaction() as s:
        lockouts.lock_out(s, settings, ALICE, "used GPU 2 without an allocation")
    with pytest.raises(LockedOut, match=r"locked out until .* UTC"):
        allocations.request(db, settings, ALICE, "4090", 1, 1)
    lockouts.lift(db, settings, ADMIN, ALICE)
    assert allocations.request(db, settings, ALICE, "4090", 1, 1)


def test_it_pauses_non_admins_in_maintenance(db: Database, settings: Settings) -> None:
    held = allocations.request(db, settings, BOB, "4090", 1, 1)
    maintenance.set_enabled(db, settings, ADMIN, True)
    with pytest.raises(Maintenance):
        allocations.request(db, settings, ALICE, "4090", 1, 1)
    assert allocations.request(db, settings, ADMIN, "4090", 1, 1)
    with db.session() as s:
        assert s.get(Allocation, held[0].id).state == ACTIVE  # existing ones stay
    with pytest.raises(Forbidden):
        maintenance.set_enabled(db, settings, ALICE, False)


def test_it_extends_within_the_maximum(db: Database, settings: Settings) -> None:
    (row,) = allocations.request(db, settings, ALICE, "4090", 1, 10)
    extended = allocations.extend(db, settings, ALICE, row.id, 5)
    assert extended.expires_at - row.expires_at == timedelta(hours=5)
    with pytest.raises(Invalid, match="MAX_ALLOCATION_HOURS"):
        allocations.extend(db, settings, ALICE, row.id, 160)
    with pytest.raises(NotFound):
        allocations.extend(db, settings, BOB, row.id, 1)


def test_it_releases_once_and_only_for_the_holder_or_an_admin(
    db: Database, settings: Settings
) -> None:
    (row,) = allocations.request(db, settings, ALICE, "4090", 1, 1)
    with pytest.raises(NotFound):
        allocations.release(db, settings, BOB, row.id)
    released = allocations.release(db, settings, ALICE, row.id)
    assert released.state == "released" and released.release_reason == "released"
    assert released.released_at is not None
    with pytest.raises(Conflict, match="already released"):
        allocations.release(db, settings, ALICE, row.id)
    with pytest.raises(Conflict):
        allocations.extend(db, settings, ALICE, row.id, 1)
    # The GPU is free again.
    assert allocations.request(db, settings, BOB, "4090", gpu_ids=[row.gpu_id], hours=1)


def test_an_admin_releases_any_and_resets_everything(db: Database, settings: Settings) -> None:
    (row,) = allocations.request(db, settings, ALICE, "4090", 1, 1)
    allocations.request(db, settings, BOB, "a100", 2, 1)
    allocations.release(db, settings, ADMIN, row.id)
    with pytest.raises(Forbidden):
        allocations.reset(db, settings, ALICE)
    assert allocations.reset(db, settings, ADMIN) == 2
    with db.session() as s:
        assert allocations.list_for(s, settings, ADMIN, all_users=True) == []
        kinds = [e.kind for e in events.query(s, limit=10)]
        inbox = s.scalars(select(Notification).where(Notification.user == ALICE)).all()
    assert kinds[0] == "reset" and "revoked" in kinds and "released" in kinds
    assert any(f"by {ADMIN}" in n.message for n in inbox)


def test_users_see_only_their_own(db: Database, settings: Settings) -> None:
    allocations.request(db, settings, ALICE, "4090", 1, 1)
    allocations.request(db, settings, BOB, "4090", 1, 1)
    with db.session() as s:
        assert {r.user for r in allocations.list_for(s, settings, ALICE, all_users=True)} == {ALICE}
        assert len(allocations.list_for(s, settings, ADMIN, all_users=True)) == 2


def test_it_releases_all_of_a_user(db: Database, settings: Settings) -> None:
    allocations.request(db, settings, ALICE, "4090", 2, 1)
    assert allocations.release_all(db, settings, ALICE) == 2
    with pytest.raises(Forbidden):
        allocations.release_all(db, settings, ALICE, user=BOB)


def test_extending_counts_from_now_once_expired(db: Database, settings: Settings) -> None:
    (row,) = allocations.request(db, settings, ALICE, "4090", 1, 1)
    with time_machine.travel(utcnow() + timedelta(hours=3), tick=False):
        extended = allocations.extend(db, settings, ALICE, row.id, 1)
        assert extended.expires_at == utcnow() + timedelta(hours=1)


def test_unhealthy_gpus_are_not_granted(db: Database, settings: Settings) -> None:
    from gpulocker import inventory

    with db.transaction() as s:
        inventory.set_health(s, settings.gpu_host, 0, False, "GPU is lost")
    rows = allocations.request(db, settings, ALICE, "4090", 3, 1)
    assert [r.gpu_id for r in rows] == [1, 2, 3]


def test_concurrent_requests_never_share_a_gpu(db: Database, settings: Settings) -> None:
    """32 threads race for the 4 GPUs of type 4090: exactly 4 win, the rest are refused."""
    outcomes: list[str] = []
    barrier = threading.Barrier(32)

    def take(i: int) -> None:
        barrier.wait()
        try:
            allocations.request(db, settings, f"user{i}", "4090", 1, 1)
            outcomes.append("granted")
        except NotEnoughGPUs:
            outcomes.append("refused")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("granted") == 4 and outcomes.count("refused") == 28
    with db.session() as s:
        active = s.scalars(select(Allocation).where(Allocation.state == ACTIVE)).all()
    assert sorted(a.gpu_id for a in active) == [0, 1, 2, 3]


def test_one_users_concurrent_requests_respect_the_per_user_limit(
    db: Database, settings: Settings
) -> None:
    """With MAX_GPUS_PER_USER=1, a second request of the same user for another GPU waits
    for the first transaction and is then refused, instead of both counting 0 held."""
    limited = settings.with_overrides(max_gpus_per_user=1)
    outcome: dict[str, object] = {}

    def second() -> None:
        try:
            outcome["granted"] = allocations.request(db, limited, ALICE, "4090", gpu_ids=[1])
        except Forbidden as exc:
            outcome["refused"] = exc.message

    with db.transaction() as session:  # the first request, still uncommitted
        allocations._grant(session, limited, ALICE, ALICE, "4090", 1, 1.0, [0])
        racer = threading.Thread(target=second)
        racer.start()
        racer.join(0.5)
        assert racer.is_alive(), f"the second request did not wait: {outcome}"
    racer.join(10)
    assert "at most 1 per user" in str(outcome.get("refused")), outcome
    with db.session() as s:
        assert allocations.count_active(s, ALICE) == 1
