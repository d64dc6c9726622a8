"""Several GPU hosts for real (SPEC §10): two `gpulocker agent` processes, each with its own
GPU_HOST, DEVICE_DIR and socket, and the web app, on one PostgreSQL and one Redis.

The agents are real processes (simulated GPUs); the web app runs in the test process on
the same database, as `gpulocker web` would. The ACLs are read from the device files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask.testing import FlaskClient

from gpulocker import tokens
from gpulocker.agent import access
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.models import Allocation
from gpulocker.web import create_app
from tests.conftest import PAM_SERVICE, REDIS_URL, _admin_conn, _pg_url, needs_root
from tests.helpers import ADMIN, ALICE, BOB, CAROL, TestUser, wait_for

pytestmark = needs_root

HOSTS = ("gpu-a", "gpu-b")
STALE_SECONDS = 8.0  # AGENT_STALE_SECONDS for this test: heartbeats come every 5 s


@dataclass
class AgentProcess:
    host: str
    dev: Path
    log: Path
    proc: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)

    def device(self, index: int) -> Path:
        return self.dev / f"nvidia{index}"

    def holders(self, index: int) -> set[str]:
        """The users whose entry is on the device file (read from its ACL)."""
        found = access.read(self.device(index))
        return {access.user_label(uid) for uid in found.users}


@dataclass
class Cluster:
    url: str
    agents: dict[str, AgentProcess]
    client: FlaskClient
    ctx: Context
    headers: dict[str, dict[str, str]]

    def request(self, user: str, **body: Any) -> Any:
        return self.client.post("/api/v1/allocations", json=body, headers=self.headers[user])

    def status(self) -> dict[str, Any]:
        return self.client.get("/api/v1/gpus", headers=self.headers[ADMIN]).get_json()


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    name = f"gltest_{uuid.uuid4().hex[:12]}"
    with _admin_conn() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    yield _pg_url(name)
    with _admin_conn() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _start_agent(tmp: Path, host: str, database_url: str) -> AgentProcess:
    base = tmp / host
    dev = base / "dev"
    dev.mkdir(parents=True)
    for folder in (tmp, base, dev):
        folder.chmod(0o755)  # the test users must reach the device files
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(base),
        "GPU_HOST": host,
        "STATE_DIR": str(base / "state"),
        "DEVICE_DIR": str(dev),
        "SOCKET_PATH": str(base / "gl.sock"),
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "PRIVILEGED_USERS": ADMIN,
        "PAM_SERVICE": PAM_SERVICE,
        "RECONCILE_SECONDS": "2",
        "KILL_GRACE_SECONDS": "1",
        "AGENT_STALE_SECONDS": str(STALE_SECONDS),
        "CHECK_FOR_IDLE_GPU_HOURS": "0.0005",  # the expiry policy runs every 1.8 s
    }
    log = base / "agent.log"
    command = [sys.executable, "-m", "gpulocker", "agent", "--simulate", '{"4090": 2}']
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT)
    return AgentProcess(host, dev, log, proc, env)


@pytest.fixture
def cluster(
    tmp_path: Path, pg_url: str, users: dict[str, TestUser], redis_client: object
) -> Iterator[Cluster]:
    tmp_path.chmod(0o755)
    agents = {host: _start_agent(tmp_path, host, pg_url) for host in HOSTS}
    settings = Settings(
        state_dir=tmp_path / "web-state",
        database_url=pg_url,
        redis_url=REDIS_URL,
        gpu_backend="simulated",
        gpu_host="web-host",  # the web host has no GPUs of its own
        privileged_users=(ADMIN,),
        pam_service=PAM_SERVICE,
        secret_key="test-secret-key",
        agent_stale_seconds=STALE_SECONDS,
        socket_path=tmp_path / "web.sock",
    )
    ctx = Context(settings)
    app = create_app(ctx=ctx)
    app.config.update(TESTING=True, LOGIN_FAILURE_FLOOR_SECONDS=0)
    headers = {}
    for user in (ALICE, BOB, CAROL, ADMIN):
        _row, raw = tokens.create(ctx.db, user, "test")
        headers[user] = {"Authorization": f"Bearer {raw}"}
    cluster = Cluster(pg_url, agents, app.test_client(), ctx, headers)
    try:
        wait_for(lambda: _both_registered(cluster), timeout=30, interval=0.2)
        yield cluster
    finally:
        for agent in agents.values():
            if agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGTERM)
                agent.proc.wait(30)
        ctx.close()
        for agent in agents.values():
            print(f"--- {agent.host}\n{agent.log.read_text()}")


def _both_registered(cluster: Cluster) -> bool:
    status = cluster.status()
    ok = {h["host"] for h in status.get("hosts", []) if h["agent"] == "ok"}
    return ok >= set(HOSTS) and len(status["gpus"]) == 4


def test_requests_land_on_one_host_race_fairly_and_releases_reach_that_host(
    cluster: Cluster,
) -> None:
    # Three GPUs exist on no single host: refused, saying why.
    refused = cluster.request(ALICE, gpu_type="4090", count=3, hours=1)
    assert refused.status_code == 409, refused.get_json()
    assert "free but not 3 on one host" in refused.get_json()["error"]["message"]

    # Two GPUs land together on one host; their device files say so.
    taken = cluster.request(ALICE, gpu_type="4090", count=2, hours=1)
    assert taken.status_code == 201, taken.get_json()
    body = taken.get_json()
    assert body["access"] == "applied"
    (host,) = {a["host"] for a in body["allocations"]}
    agent = cluster.agents[host]
    assert all(ALICE in agent.holders(i) for i in (0, 1))
    other = cluster.agents[next(h for h in HOSTS if h != host)]
    assert all(ALICE not in other.holders(i) for i in (0, 1))

    # A release on that host reaches that host's file, and only that host's.
    first = body["allocations"][0]
    released = cluster.client.delete(
        f"/api/v1/allocations/{first['id']}", headers=cluster.headers[ALICE]
    )
    assert released.status_code == 200
    wait_for(lambda: ALICE not in agent.holders(first["gpu_id"]), timeout=5)
    assert ALICE in agent.holders(body["allocations"][1]["gpu_id"])

    # A race for every GPU of both hosts: each GPU granted once.
    for allocation in body["allocations"][1:]:
        cluster.client.delete(
            f"/api/v1/allocations/{allocation['id']}", headers=cluster.headers[ALICE]
        )
    answers: list[Any] = []
    start = threading.Barrier(8)

    def ask(user: str) -> None:
        client = cluster.client.application.test_client()
        start.wait()
        answers.append(
            client.post(
                "/api/v1/allocations",
                json={"gpu_type": "4090", "count": 1, "hours": 1},
                headers=cluster.headers[user],
            )
        )

    threads = [threading.Thread(target=ask, args=(u,)) for u in (ALICE, BOB, CAROL, ADMIN) * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    granted = [a.get_json()["allocations"][0] for a in answers if a.status_code == 201]
    assert len(granted) == 4 and sum(a.status_code == 409 for a in answers) == 4
    assert len({(g["host"], g["gpu_id"]) for g in granted}) == 4
    for g in granted:
        wait_for(lambda g=g: g["user"] in cluster.agents[g["host"]].holders(g["gpu_id"]), 5)


def test_a_dead_agent_leaves_its_files_enforced_and_the_rest_working(cluster: Cluster) -> None:
    a, b = (cluster.agents[h] for h in HOSTS)
    # Alice holds a GPU on gpu-a for a few seconds: the policies must end it while gpu-a's
    # agent is dead, whichever agent held the policy lease.
    short = cluster.request(ALICE, gpu_type="4090", count=2, hours=0.002)
    assert short.status_code == 201, short.get_json()
    held = short.get_json()["allocations"]
    dead = cluster.agents[held[0]["host"]]
    alive = b if dead is a else a
    gpu = held[0]["gpu_id"]
    assert ALICE in dead.holders(gpu)

    dead.proc.send_signal(signal.SIGKILL)
    dead.proc.wait(10)
    # Its files stay as the agent left them: alice keeps her entry, strangers stay out.
    before = access.read(dead.device(gpu))
    assert ALICE in dead.holders(gpu) and before.mode & 0o007 == 0

    # The other host keeps working.
    on_alive = cluster.request(BOB, gpu_type="4090", count=2, hours=1)
    assert on_alive.status_code == 201, on_alive.get_json()
    assert {x["host"] for x in on_alive.get_json()["allocations"]} == {alive.host}
    assert all(BOB in alive.holders(i) for i in (0, 1))

    # The policies keep running: alice's short allocation expires although its host's
    # agent is dead (the survivor claims the policy slots).
    def expired() -> bool:
        with cluster.ctx.db.session() as session:
            row = session.get(Allocation, held[0]["id"])
            return row is not None and row.state == "expired"

    wait_for(expired, timeout=30, interval=0.5)
    assert ALICE in dead.holders(gpu)  # nobody touched the dead host's file meanwhile

    # After AGENT_STALE_SECONDS the dead host's GPUs are unreachable and not granted.
    def unreachable() -> bool:
        hosts = {h["host"]: h["agent"] for h in cluster.status()["hosts"]}
        return hosts.get(dead.host) == "unreachable"

    wait_for(unreachable, timeout=STALE_SECONDS + 10, interval=0.5)
    rows = [g for g in cluster.status()["gpus"] if g["host"] == dead.host]
    assert rows and not any(g["reachable"] for g in rows)
    assert cluster.status()["hosts"][HOSTS.index(alive.host)]["agent"] == "ok"
    refused = cluster.request(CAROL, gpu_type="4090", count=1, hours=1)
    assert refused.status_code == 409, refused.get_json()
    message = refused.get_json()["error"]["message"]
    assert dead.host in message and "AGENT_STALE_SECONDS" in message

    # Back again: the restarted agent ends alice's expired access on its file.
    restarted = _start_agent_again(dead)
    cluster.agents[dead.host] = restarted
    wait_for(lambda: ALICE not in restarted.holders(gpu), timeout=20, interval=0.2)
    wait_for(lambda: not unreachable(), timeout=10, interval=0.5)


def _start_agent_again(old: AgentProcess) -> AgentProcess:
    command = [sys.executable, "-m", "gpulocker", "agent", "--simulate", '{"4090": 2}']
    with old.log.open("ab") as out:
        proc = subprocess.Popen(
            command, cwd=old.dev.parent, env=old.env, stdout=out, stderr=subprocess.STDOUT
        )
    return AgentProcess(old.host, old.dev, old.log, proc, old.env)


def test_a_database_outage_mid_run_loses_nothing_and_revokes_nobody(cluster: Cluster) -> None:
    taken = {
        user: cluster.request(user, gpu_type="4090", count=1, hours=1).get_json()["allocations"][0]
        for user in (ALICE, BOB)
    }
    name = cluster.url.rsplit("/", 1)[1]
    # Every connection of every process to this database is cut (as a restart would).
    with _admin_conn() as conn:
        cut = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        ).fetchone()
    assert cut is not None and cut[0] >= 2  # the agents were connected
    # Nobody lost access, and both agents go on: a new grant reaches its host's file.
    for user, allocation in taken.items():
        agent = cluster.agents[allocation["host"]]
        assert user in agent.holders(allocation["gpu_id"])
    after = wait_for(lambda: _try_request(cluster, CAROL), timeout=15, interval=0.5)
    granted = after.get_json()["allocations"][0]  # type: ignore[attr-defined]
    wait_for(lambda: CAROL in cluster.agents[granted["host"]].holders(granted["gpu_id"]), timeout=5)
    with psycopg.connect(cluster.url.replace("+psycopg", "")) as conn:
        rows = conn.execute('SELECT "user", state FROM allocations ORDER BY id').fetchall()
    assert [r[1] for r in rows] == ["active", "active", "active"]
    for user, allocation in taken.items():
        assert user in cluster.agents[allocation["host"]].holders(allocation["gpu_id"])
    for agent in cluster.agents.values():
        assert agent.proc.poll() is None, agent.log.read_text()


def _try_request(cluster: Cluster, user: str) -> Any:
    answer = cluster.request(user, gpu_type="4090", count=1, hours=1)
    return answer if answer.status_code == 201 else None
