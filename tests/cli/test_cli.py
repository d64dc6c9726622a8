"""The terminal commands: in-process (click's CliRunner, as root) and as real users in
child processes, over the agent's local socket and over HTTP with a token."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select
from werkzeug.serving import make_server

from gpulocker import allocations, live, lockouts
from gpulocker.agent import localapi
from gpulocker.cli import client
from gpulocker.cli.main import main
from gpulocker.cli.render import duration, staleness_note, time_left
from gpulocker.context import Context
from gpulocker.db import Database, upgrade
from gpulocker.gpus.simulated import SimulatedBackend, write_load
from gpulocker.models import ACTIVE, RELEASED, Allocation, Notification, utcnow
from tests.helpers import (
    ADMIN,
    ALICE,
    BOB,
    EACCES,
    TestUser,
    cuda,
    export,
    hold_open_as,
    try_open_as,
)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: the socket's own tests cover both databases; these test the printing."""
    url = f"sqlite:///{tmp_path}/cli.db"
    database = Database(url)
    upgrade(database.engine)
    database.dispose()
    return url


@pytest.fixture
def socket_path(device_dir: Path) -> Path:
    return device_dir.parent / "run" / "gl.sock"


@pytest.fixture
def server(ctx: Context, socket_path: Path) -> Iterator[localapi.Server]:
    srv = localapi.start(ctx, socket_path)
    yield srv
    srv.close()


@pytest.fixture
def runner(server: localapi.Server, socket_path: Path, tmp_path: Path) -> CliRunner:
    """CliRunner talking to the test's socket, with no stored login."""
    return CliRunner(
        env={
            "GPULOCKER_SOCKET": str(socket_path),
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "GPULOCKER_SERVER": None,
            "NO_COLOR": None,
        }
    )


def invoke(runner: CliRunner, *args: str, color: bool = False) -> Result:
    return runner.invoke(main, list(args), color=color, catch_exceptions=False)


def run_as(
    user: TestUser, *args: str, env: dict[str, str] | None = None, shell: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m gpulocker ARGS` (or a shell line) as a real user: the kernel says who."""
    command = [sys.executable, "-m", "gpulocker", *args] if shell is None else ["bash", "-c", shell]
    return subprocess.run(
        command,
        user=user.uid,
        group=user.gid,
        extra_groups=[],
        cwd="/",
        env={
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": user.home,
            **(env or {}),
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def state_of(ctx: Context, allocation_id: int) -> str:
    with ctx.db.session() as s:
        row = s.get(Allocation, allocation_id)
        assert row is not None
        return row.state


# --- in-process, as root -------------------------------------------------------------------


def test_it_requests_and_prints_the_export_line(runner: CliRunner, ctx: Context) -> None:
    result = invoke(runner, "request", "-t", "4090", "-n", "2", "--hours", "1.5")
    assert result.exit_code == 0, result.output
    assert result.stdout == export(0, 1) + "\n"
    assert "granted 2 4090 GPU(s) on testhost to root" in result.stderr
    assert "allocation 1: GPU 0" in result.stderr and "(1h29m left)" in result.stderr
    with ctx.db.session() as s:
        rows = s.scalars(select(Allocation).where(Allocation.state == ACTIVE)).all()
    assert {(r.user, r.gpu_id) for r in rows} == {("root", 0), ("root", 1)}


def test_it_requests_specific_gpus_as_json(runner: CliRunner) -> None:
    result = invoke(runner, "request", "-t", "a100", "--gpu-ids", "5", "--hours", "2", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["cuda_visible_devices"] == cuda(5)
    assert [(a["gpu_id"], a["state"]) for a in answer["allocations"]] == [(5, "active")]


def test_it_lists_extends_and_releases(runner: CliRunner, ctx: Context) -> None:
    invoke(runner, "request", "-t", "4090", "-n", "2", "--hours", "1")
    listed = invoke(runner, "list")
    lines = listed.stdout.splitlines()
    assert lines[0].split() == ["ID", "GPU", "TYPE", "HOST", "STATE", "ENDS", "LEFT"]
    assert [line.split()[:5] for line in lines[1:]] == [
        ["2", "1", "4090", "testhost", "active"],
        ["1", "0", "4090", "testhost", "active"],
    ]
    extended = invoke(runner, "extend", "1", "--hours", "2")
    assert extended.exit_code == 0
    assert "allocation 1 (GPU 0) now ends" in extended.stdout and "(2h59m left)" in extended.stdout
    released = invoke(runner, "release", "1")
    assert released.stdout == "released allocation 1 (GPU 0 on testhost)\n"
    assert state_of(ctx, 1) == RELEASED
    rows = json.loads(invoke(runner, "list", "--json").stdout)["allocations"]
    assert [r["id"] for r in rows] == [2]
    history = json.loads(invoke(runner, "list", "--state", "any", "--json").stdout)
    assert [(r["id"], r["state"]) for r in history["allocations"]] == [
        (2, "active"),
        (1, "released"),
    ]
    assert invoke(runner, "release", "--all").stdout == "released 1 allocation(s)\n"
    assert invoke(runner, "list").stdout == "no allocations\n"


def test_it_says_what_went_wrong_in_one_line(runner: CliRunner, ctx: Context) -> None:
    unknown = invoke(runner, "request", "-t", "h100", "-n", "1", "--hours", "1")
    assert unknown.exit_code == 1
    assert unknown.stderr == "gpulocker: unknown GPU type 'h100' (known: 4090, a100)\n"
    too_many = invoke(runner, "request", "-t", "a100", "-n", "3", "--hours", "1")
    assert too_many.stderr == "gpulocker: not enough free a100 GPUs: asked for 3, 2 free\n"
    missing = invoke(runner, "extend", "99", "--hours", "1")
    assert (missing.exit_code, missing.stderr) == (1, "gpulocker: no allocation 99\n")
    both = invoke(runner, "release")
    assert both.exit_code == 1 and "give allocation IDs or --all" in both.stderr
    bad_ids = invoke(runner, "request", "-t", "4090", "--gpu-ids", "0,x", "--hours", "1")
    assert bad_ids.exit_code == 2 and "comma-separated list of GPU ids" in bad_ids.output
    with ctx.db.session() as s:
        assert s.scalars(select(Allocation)).all() == []


def test_it_releases_what_it_can_and_fails_for_the_rest(runner: CliRunner, ctx: Context) -> None:
    (mine,) = allocations.request(ctx.db, ctx.settings, "root", "4090", 1, 1)
    (alices,) = allocations.request(ctx.db, ctx.settings, ALICE, "4090", 1, 1)
    result = invoke(runner, "release", str(alices.id), str(mine.id))
    assert result.exit_code == 1
    assert result.stdout == f"released allocation {mine.id} (GPU 0 on testhost)\n"
    assert result.stderr == f"gpulocker: no allocation {alices.id}\n"
    assert state_of(ctx, alices.id) == ACTIVE


def test_it_shows_every_gpu_with_holder_load_and_processes(
    runner: CliRunner, ctx: Context, users: dict[str, TestUser], device_dir: Path
) -> None:
    (row,) = allocations.request(ctx.db, ctx.settings, ALICE, "4090", gpu_ids=[1], hours=2)
    write_load(device_dir, 1, utilization=87, memory_mib=10240)
    write_load(device_dir, 5, error="GPU is lost")
    backend = SimulatedBackend(ctx.settings.gpu_config, device_dir)
    holder = hold_open_as(users[ALICE], row.device)
    try:
        live.publish(ctx, ctx.settings.gpu_host, backend.sample())
        status = json.loads(invoke(runner, "status", "--json").stdout)
        table = invoke(runner, "status")
        coloured = invoke(runner, "status", color=True)
    finally:
        holder.kill()
        holder.wait()
    gpus = {g["gpu_id"]: g for g in status["gpus"]}
    assert gpus[1]["holder"] == ALICE and gpus[1]["utilization"] == 87
    assert gpus[1]["processes"][0]["pid"] == holder.pid
    assert gpus[5]["healthy"] is False and gpus[5]["error"] == "GPU is lost"
    lines = table.stdout.splitlines()
    assert lines[0].split()[:7] == ["GPU", "TYPE", "UTIL", "MEMORY", "TEMP", "HOLDER", "LEFT"]
    gpu1 = lines[2].split()
    assert gpu1[:5] == ["1", "4090", "87%", "10.0/24.0", "GiB"]
    assert gpu1[6] == ALICE and gpu1[7] == "1h59m"
    assert gpu1[-1] == f"{ALICE}:{holder.pid}:10240M"
    assert all(line == line.rstrip() for line in lines)
    assert lines[1].split()[6] == "free"
    assert "error: GPU is lost" in lines[6]
    assert "\x1b[" not in table.stdout  # no colour when not on a terminal
    assert table.stderr == ""  # the readings are fresh
    assert "\x1b[" in coloured.stdout


def test_it_explains_when_no_agent_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The host's own /run/gpulocker may hold a live agent (or another test's): look elsewhere.
    monkeypatch.setattr(client, "ROOT_SOCKET", tmp_path / "run/gpulocker/gpulocker.sock")
    runner = CliRunner(
        env={
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "GPULOCKER_SOCKET": None,
            "GPULOCKER_SERVER": None,
        }
    )
    result = runner.invoke(main, ["status"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"gpulocker: no GPULocker agent socket at {tmp_path}/run/")
    gone = runner.invoke(main, ["list", "--socket", str(tmp_path / "gone.sock")])
    assert gone.exit_code == 1
    assert "cannot talk to the GPULocker agent" in gone.stderr
    remote = runner.invoke(main, ["list", "--server", "gpu1.lab:5151"])
    assert remote.stderr == (
        "gpulocker: not signed in to https://gpu1.lab:5151: "
        "run `gpulocker login --server https://gpu1.lab:5151`\n"
    )


def test_login_refuses_plain_http_off_loopback(runner: CliRunner) -> None:
    refused = runner.invoke(
        main,
        ["login", "--server", "http://gpu1.lab:5151", "--username", ALICE, "--password-stdin"],
        input="secret\n",
    )
    assert refused.exit_code == 1
    assert refused.stderr.startswith("gpulocker: refusing to send a password over plain HTTP")
    # told otherwise, it tries (and fails to connect: no such host), not refusing
    told = runner.invoke(
        main,
        [
            "login",
            "--server",
            "http://gpu1.invalid:5151",
            "--username",
            ALICE,
            "--password-stdin",
            "--insecure-http",
        ],
        input="secret\n",
    )
    assert "refusing" not in told.stderr


def test_it_warns_when_the_live_readings_are_missing_or_old(runner: CliRunner) -> None:
    result = invoke(runner, "status")
    assert result.exit_code == 0
    assert result.stderr == "no live readings yet (is the agent running?)\n"
    assert len(result.stdout.splitlines()) == 7  # the table is still shown
    old = [{"sampled_at": "2026-01-01T10:00:00+00:00"}]
    now = datetime(2026, 1, 1, 10, 5, tzinfo=UTC)
    assert staleness_note(old, now) == "the live readings are 5m old (is the agent running?)"
    assert staleness_note(old, datetime(2026, 1, 1, 10, 0, 30, tzinfo=UTC)) is None


def test_durations_read_well() -> None:
    assert [duration(s) for s in (30, 60, 3725, 90000)] == ["<1m", "1m", "1h02m", "1d01h"]
    assert time_left("2000-01-01T00:00:00+00:00") == "expired"
    assert time_left(None) == "-"


# --- as real users, in child processes -----------------------------------------------------


def test_eval_sets_cuda_visible_devices_in_the_users_shell(
    server: localapi.Server, socket_path: Path, users: dict[str, TestUser], ctx: Context
) -> None:
    env = {"GPULOCKER_SOCKET": str(socket_path)}
    line = 'eval "$(python -m gpulocker request -t a100 -n 2 --hours 1)"; echo "[$CUDA_VISIBLE_DEVICES]" "$CUDA_DEVICE_ORDER"'
    result = run_as(users[ALICE], shell=line, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"[{cuda(4, 5)}] PCI_BUS_ID\n"
    assert f"to {ALICE} until" in result.stderr
    whoami = run_as(users[ALICE], "whoami", env=env)
    assert whoami.stdout == f"{ALICE} via socket {socket_path}\n"
    with ctx.db.session() as s:
        assert {r.user for r in s.scalars(select(Allocation))} == {ALICE}


def test_bob_cannot_release_alices_gpu_but_an_admin_can(
    server: localapi.Server, socket_path: Path, users: dict[str, TestUser], ctx: Context
) -> None:
    env = {"GPULOCKER_SOCKET": str(socket_path)}
    granted = json.loads(
        run_as(
            users[ALICE], "request", "-t", "4090", "-n", "1", "--hours", "1", "--json", env=env
        ).stdout
    )
    allocation_id = granted["allocations"][0]["id"]
    refused = run_as(users[BOB], "release", str(allocation_id), env=env)
    assert (refused.returncode, refused.stderr) == (
        1,
        f"gpulocker: no allocation {allocation_id}\n",
    )
    assert run_as(users[BOB], "admin", "reset", "--yes", env=env).stderr == (
        "gpulocker: only admins can reset GPULocker\n"
    )
    assert state_of(ctx, allocation_id) == ACTIVE
    done = run_as(users[ADMIN], "admin", "release", str(allocation_id), env=env)
    assert done.returncode == 0 and f"released allocation {allocation_id}" in done.stdout
    assert state_of(ctx, allocation_id) == RELEASED


def test_an_admin_runs_the_admin_commands(
    server: localapi.Server, socket_path: Path, users: dict[str, TestUser], ctx: Context
) -> None:
    env = {"GPULOCKER_SOCKET": str(socket_path)}
    admin, bob = users[ADMIN], users[BOB]

    def adm(*args: str) -> subprocess.CompletedProcess[str]:
        result = run_as(admin, "admin", *args, env=env)
        assert result.returncode == 0, result.stderr
        return result

    assert adm("maintenance", "on", "--message", "driver update").stdout == "maintenance mode on\n"
    paused = run_as(bob, "request", "-t", "4090", "-n", "1", "--hours", "1", env=env)
    assert paused.stderr == (
        "gpulocker: GPULocker is in maintenance mode: new allocations are paused\n"
    )
    status = run_as(bob, "status", env=env).stdout
    assert status.startswith("maintenance mode: new allocations are paused\n")
    allocated = adm("allocate", BOB, "-t", "4090", "-n", "2", "--hours", "1")
    assert allocated.stdout == export(0, 1) + "\n"
    assert adm("maintenance", "off").stdout == "maintenance mode off\n"
    listed = adm("release", "--user", BOB, "--json")
    assert json.loads(listed.stdout) == {"released": 2}
    with ctx.db.transaction() as s:
        lockouts.lock_out(s, ctx.settings, ALICE, "used GPU 3 without holding it")
    table = adm("lockouts").stdout.splitlines()
    assert table[0].split() == ["USER", "UNTIL", "LEFT", "REASON"]
    assert table[1].split()[0] == ALICE and table[1].endswith("used GPU 3 without holding it")
    assert adm("lift", ALICE).stdout == f"lockout of {ALICE} lifted\n"
    assert adm("lockouts").stdout == "no lockouts\n"
    assert adm("notify", ALICE, "please free GPU 2").stdout == f"message sent to {ALICE}\n"
    with ctx.db.session() as s:
        inbox = s.scalars(select(Notification).where(Notification.user == ALICE)).all()
    assert [n.message for n in inbox] == [f"Message from {ADMIN}: please free GPU 2"]
    allocations.request(ctx.db, ctx.settings, ALICE, "a100", 1, 1)
    assert adm("reset", "--yes").stdout == "reset: 1 allocation(s) ended\n"


# --- over HTTP, with a token from `gpulocker login` ----------------------------------------


@pytest.fixture
def web_url(ctx: Context, pam_service: str) -> Iterator[str]:
    """The real web app (API) on a free port of 127.0.0.1, in a thread."""
    from gpulocker.web import create_app

    app = create_app(ctx=Context(ctx.settings.with_overrides(login_failure_floor_seconds=0.05)))
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    thread.join(timeout=10)


def test_login_stores_a_token_and_commands_go_over_http(
    web_url: str, users: dict[str, TestUser], ctx: Context
) -> None:
    alice = users[ALICE]
    login = subprocess.run(
        [sys.executable, "-m", "gpulocker", "login", "--server", web_url, "--username", ALICE],
        input=alice.password + "\n",
        user=alice.uid,
        group=alice.gid,
        extra_groups=[],
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "HOME": alice.home},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert login.returncode == 0, login.stderr
    creds_file = Path(alice.home) / ".config" / "gpulocker" / "credentials.json"
    info = creds_file.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == alice.uid
    creds = json.loads(creds_file.read_text())
    assert creds["server"] == web_url and creds["username"] == ALICE and creds["token"]

    def http(*args: str) -> subprocess.CompletedProcess[str]:
        return run_as(alice, *args)  # no socket in the environment: the stored login is used

    assert http("whoami").stdout == f"{ALICE} via {web_url}\n"
    granted = http("request", "-t", "4090", "-n", "2", "--hours", "1")
    assert granted.returncode == 0, granted.stderr
    assert granted.stdout == export(0, 1) + "\n"
    rows = json.loads(http("list", "--json").stdout)["allocations"]
    assert [(r["gpu_id"], r["user"]) for r in rows] == [(1, ALICE), (0, ALICE)]
    assert "now ends" in http("extend", str(rows[0]["id"]), "--hours", "1").stdout
    status = json.loads(http("status", "--json").stdout)
    assert {g["gpu_id"]: g["holder"] for g in status["gpus"]}[0] == ALICE
    assert http("release", str(rows[0]["id"])).returncode == 0
    assert http("release", "--all").stdout == "released 1 allocation(s)\n"
    history = json.loads(http("list", "--state", "any", "--json").stdout)["allocations"]
    assert sorted(r["state"] for r in history) == ["released", "released"]
    missing = http("extend", "999", "--hours", "1")
    assert (missing.returncode, missing.stderr) == (1, "gpulocker: no allocation 999\n")
    assert http("logout").stdout == f"removed {creds_file}\n"
    assert not creds_file.exists()


def test_login_with_a_wrong_password_stores_nothing(
    web_url: str, users: dict[str, TestUser], tmp_path: Path
) -> None:
    runner = CliRunner(env={"XDG_CONFIG_HOME": str(tmp_path / "config")})
    result = runner.invoke(
        main,
        ["login", "--server", web_url, "--username", ALICE, "--password-stdin"],
        input="not-the-password\n",
    )
    assert result.exit_code == 1
    assert result.stderr == "gpulocker: wrong user name or password\n"
    assert not (tmp_path / "config").exists()


def test_http_refusals_read_like_the_socket(
    web_url: str, users: dict[str, TestUser], ctx: Context, tmp_path: Path
) -> None:
    (alices,) = allocations.request(ctx.db, ctx.settings, ALICE, "a100", 1, 1)
    config = tmp_path / "config"
    runner = CliRunner(env={"XDG_CONFIG_HOME": str(config), "GPULOCKER_SOCKET": None})
    bob = users[BOB]
    signed_in = runner.invoke(
        main,
        ["login", "--server", web_url, "--username", BOB, "--password-stdin"],
        input=bob.password + "\n",
    )
    assert signed_in.exit_code == 0, signed_in.output
    refused = runner.invoke(main, ["release", str(alices.id)])
    assert (refused.exit_code, refused.stderr) == (1, f"gpulocker: no allocation {alices.id}\n")
    admin_only = runner.invoke(main, ["admin", "maintenance", "on"])
    assert admin_only.exit_code == 1 and admin_only.stderr.startswith("gpulocker: ")
    assert state_of(ctx, alices.id) == ACTIVE
    creds: dict[str, Any] = json.loads((config / "gpulocker" / "credentials.json").read_text())
    creds["token"] = "forged"
    (config / "gpulocker" / "credentials.json").write_text(json.dumps(creds))
    forged = runner.invoke(main, ["list"])
    assert forged.exit_code == 1
    assert forged.stderr.endswith("(run `gpulocker login --server URL` to sign in again)\n")
    assert os.path.exists(config / "gpulocker" / "credentials.json")


def test_the_terminal_commands_start_without_the_database_or_web_libraries() -> None:
    code = (
        "import sys, gpulocker.cli.main\n"
        "print(sorted(m for m in ('sqlalchemy', 'flask', 'urllib.request') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout == "[]\n"  # every command pays for what it imports at start


def test_gpulocker_agent_serves_the_commands_end_to_end(
    settings: Any, device_dir: Path, users: dict[str, TestUser], tmp_path: Path
) -> None:
    sock = device_dir.parent / "agent.sock"
    env = {
        "PATH": os.environ["PATH"],
        "DATABASE_URL": settings.database_url,
        "STATE_DIR": str(tmp_path / "state"),
        "DEVICE_DIR": str(device_dir),
        "GPU_BACKEND": "simulated",
        "GPU_CONFIG": json.dumps(settings.gpu_config),
        "GPU_HOST": settings.gpu_host,
        "PRIVILEGED_USERS": ADMIN,
        "SOCKET_PATH": str(sock),
        "RECONCILE_SECONDS": "1",
    }
    log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "gpulocker", "agent"], env=env, cwd="/", stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.is_socket():
            assert agent.poll() is None, (tmp_path / "agent.log").read_text()
            assert time.monotonic() < deadline, "the agent did not open its socket"
            time.sleep(0.1)
        user_env = {"GPULOCKER_SOCKET": str(sock)}
        granted = run_as(
            users[ALICE], "request", "-t", "a100", "-n", "1", "--hours", "1", env=user_env
        )
        assert granted.returncode == 0, granted.stderr
        assert granted.stdout == export(4) + "\n"
        assert "within seconds" not in granted.stderr  # it answered once access was applied
        assert try_open_as(users[ALICE], str(device_dir / "nvidia4")) == 0
        assert try_open_as(users[BOB], str(device_dir / "nvidia4")) == EACCES
        status = json.loads(run_as(users[BOB], "status", "--json", env=user_env).stdout)
        assert {g["gpu_id"]: g["holder"] for g in status["gpus"]}[4] == ALICE
        assert all(g["sampled_at"] for g in status["gpus"])  # the agent's live readings
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=30)
        log.close()
    assert not sock.exists()  # the agent removes its socket when it stops


def test_status_groups_gpus_by_host_with_each_agents_health(
    runner: CliRunner, ctx: Context
) -> None:
    """A second host whose agent went silent: each host under its own heading."""
    from gpulocker import heartbeat
    from gpulocker.gpus import GpuInfo
    from gpulocker.inventory import TypedGpu, register
    from gpulocker.models import Heartbeat

    with ctx.db.transaction() as session:
        register(session, "gpu-far", [TypedGpu(GpuInfo(0, "far", 0, "/dev/nvidia0", 1), "4090")])
        heartbeat.beat(session, heartbeat.agent_name(ctx.settings.gpu_host), {})
        session.add(Heartbeat(name="agent:gpu-far", at=utcnow() - timedelta(seconds=600)))
    table = invoke(runner, "status").stdout
    lines = table.splitlines()
    here = next(i for i, line in enumerate(lines) if line.startswith(ctx.settings.gpu_host))
    far = next(i for i, line in enumerate(lines) if line.startswith("gpu-far"))
    assert "agent ok" in lines[here]
    assert "agent unreachable" in lines[far] and "not granted" in lines[far]
    assert lines[far + 1].split()[0] == "GPU" and lines[far + 2].split()[:2] == ["0", "4090"]
    assert far < here  # hosts by name
    mine = [line for line in lines[here + 1 :] if line.startswith("  ") and "4090" in line]
    assert len(mine) == 4
