"""Identity by uid, with no remembered failures (SPEC §12): real processes, real accounts."""

from __future__ import annotations

import pwd
import signal
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from gpulocker import allocations, procfs
from gpulocker.agent import access
from gpulocker.agent.loop import Agent
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.gpus.simulated import device_file
from gpulocker.models import Event
from tests.helpers import ALICE, TestUser, hold_open_as


def violations(db: Database) -> list[Event]:
    with db.session() as s:
        return list(s.scalars(select(Event).where(Event.kind == "violation")))


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


class Outage:
    """NSS (LDAP/SSSD) answering nothing for one account while `down` is true."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, user: TestUser) -> None:
        self.down = True
        real_uid, real_nam = pwd.getpwuid, pwd.getpwnam

        def getpwuid(uid: int) -> Any:
            if self.down and uid == user.uid:
                raise KeyError(f"getpwuid(): uid not found: {uid}")
            return real_uid(uid)

        def getpwnam(name: str) -> Any:
            if self.down and name == user.name:
                raise KeyError(f"getpwnam(): name not found: {name!r}")
            return real_nam(name)

        monkeypatch.setattr(pwd, "getpwuid", getpwuid)
        monkeypatch.setattr(pwd, "getpwnam", getpwnam)


def test_a_lookup_outage_neither_kills_the_holder_nor_drops_her_access(
    settings: Settings, db: Database, users: dict, procs: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = users[ALICE]
    path = str(device_file(settings.device_path, 0))
    allocations.request(db, settings, ALICE, "4090", gpu_ids=[0], hours=1)
    ctx = Context(settings)
    agent = Agent(ctx)
    agent.tick()
    job = hold_open_as(alice, path)
    procs.append(job)
    outage = Outage(monkeypatch, alice)
    agent.tick(force=True)
    assert job.poll() is None
    assert alice.uid in access.read(path).users
    assert violations(db) == []
    outage.down = False
    agent.tick(force=True)
    assert job.poll() is None and alice.uid in access.read(path).users
    ctx.close()


def test_a_failed_name_lookup_is_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"glid{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", name], check=True)
    try:
        entry = pwd.getpwnam(name)
        user = TestUser(name, "", entry.pw_uid, entry.pw_gid, "/")
        outage = Outage(monkeypatch, user)
        assert procfs.known_name(user.uid) is None  # never looked up before: the outage shows
        outage.down = False
        assert procfs.user_name(user.uid) == name  # the failure was not cached
    finally:
        subprocess.run(["userdel", "-f", name], check=False)


def test_a_process_of_a_uid_without_a_passwd_entry_is_not_punished(
    settings: Settings, db: Database, procs: list
) -> None:
    uid = 4_100_000 + uuid.uuid4().int % 100_000
    with pytest.raises(KeyError):
        pwd.getpwuid(uid)
    path = str(device_file(settings.device_path, 1))
    ctx = Context(settings)
    agent = Agent(ctx)
    ghost = TestUser(str(uid), "", uid, uid, "/")
    access.apply(path, [uid])  # as if the file had been left open to it
    job = hold_open_as(ghost, path)
    procs.append(job)
    agent.tick(force=True)
    assert job.poll() is None, "a process of an unnamed uid was killed"
    assert violations(db) == []
    assert uid not in access.read(path).users  # the ACL still keeps strangers out
    job.send_signal(signal.SIGTERM)
    ctx.close()
