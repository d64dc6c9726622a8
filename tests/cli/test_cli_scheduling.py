# ruff: noqa: F811  (the fixtures of test_cli are imported, then used as arguments)
"""The scheduling commands over HTTP with a stored token (the real web app in a thread):
`request --wait` showing its position as it moves until granted, Ctrl-C cancelling it,
and `queue`, `book`, `bookings`, `cancel` along the HTTP client's routes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpulocker import allocations, queue, reservations, scheduler, tokens
from gpulocker.cli.client import Credentials, save_credentials
from gpulocker.cli.main import main
from gpulocker.context import Context
from gpulocker.models import ACTIVE, CANCELLED, GRANTED, Allocation, utcnow
from gpulocker.scheduling_models import QueuedRequest
from tests.cli.test_cli import database_url, web_url  # noqa: F401
from tests.helpers import ADMIN, ALICE, BOB, CAROL, export, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def config_of(ctx: Context, web_url: str, tmp_path: Path, users: dict):  # type: ignore[no-untyped-def]
    """`config_of(user)` -> an XDG_CONFIG_HOME whose stored login is `user`'s on web_url
    (a real account: a token of a vanished account is refused)."""

    def make(user: str) -> Path:
        home = tmp_path / f"config-{user}"
        _row, raw = tokens.create(ctx.db, user, "cli test")
        save_credentials(Credentials(web_url, raw, user), home / "gpulocker" / "credentials.json")
        return home

    return make


def spawn(config: Path, *args: str) -> subprocess.Popen[str]:
    """`python -m gpulocker ARGS` in a child process, over HTTP with the stored login."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULOCKER_")}
    return subprocess.Popen(
        [sys.executable, "-m", "gpulocker", *args],
        env={**env, "XDG_CONFIG_HOME": str(config), "NO_COLOR": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def waiting_of(ctx: Context, user: str) -> list[QueuedRequest]:
    return [r for r in queue.list_for(ctx.db, ctx.settings, user) if r.state == "waiting"]


def test_request_wait_shows_the_position_as_it_moves_then_prints_the_grant(
    ctx: Context, config_of, web_url: str
) -> None:
    held = allocations.request(ctx.db, ctx.settings, CAROL, "a100", 2, 1)
    ahead = queue.submit(ctx.db, ctx.settings, BOB, "a100", 1, 1)
    proc = spawn(config_of(ALICE), "request", "-t", "a100", "--hours", "1", "--wait")
    assert proc.stderr is not None
    try:
        first = proc.stderr.readline()  # behind bob
        queue.cancel(ctx.db, ctx.settings, BOB, ahead.id)
        second = proc.stderr.readline()  # the next poll sees it move up
        allocations.release(ctx.db, ctx.settings, CAROL, held[1].id)
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            scheduler.run_pass(ctx.db, ctx.settings)
            time.sleep(0.2)
        out, rest = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    (mine,) = queue.list_for(ctx.db, ctx.settings, ALICE)
    assert mine.state == GRANTED
    assert (first, second) == (
        f"waiting: request {mine.id}, position 2 in the line\n",
        f"waiting: request {mine.id}, position 1 in the line\n",
    )
    err = first + second + rest
    assert err.count("waiting:") == 2  # printed when it moves, not at every poll
    assert f"granted 1 a100 GPU(s) on testhost to {ALICE}" in err
    assert f"allocation {mine.allocation_ids[0]}: GPU 5" in err
    assert out == export(5) + "\n"  # what `request` prints on a grant


def test_request_wait_is_granted_at_once_when_gpus_are_free_and_speaks_json(
    ctx: Context, config_of
) -> None:
    config = config_of(ALICE)
    done = spawn(config, "request", "-t", "4090", "--hours", "1", "--wait", "--json")
    out, err = done.communicate(timeout=60)
    assert done.returncode == 0, err
    answer = json.loads(out)
    assert [a["gpu_id"] for a in answer["allocations"]] == [0] and "waiting" not in err
    assert queue.list_for(ctx.db, ctx.settings, ALICE) == []
    lonely = spawn(config, "request", "-t", "4090", "--hours", "1", "--wait-hours", "2")
    assert lonely.communicate(timeout=60)[1].endswith("--wait-hours goes with --wait\n")


def test_ctrl_c_cancels_the_waiting_request(ctx: Context, config_of) -> None:
    allocations.request(ctx.db, ctx.settings, CAROL, "a100", 2, 1)
    proc = spawn(
        config_of(ALICE), "request", "-t", "a100", "--hours", "1", "--wait", "--wait-hours", "3"
    )
    try:
        (row,) = wait_for(lambda: waiting_of(ctx, ALICE), timeout=20)  # type: ignore[misc]
        assert (row.wait_until - row.created_at) == timedelta(hours=3)
        assert proc.stderr is not None
        assert "position 1 in the line" in proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert out == "" and err.endswith(f"gpulocker: request {row.id} cancelled\n")
    (after,) = queue.list_for(ctx.db, ctx.settings, ALICE)
    assert after.state == CANCELLED
    with ctx.db.session() as session:
        assert session.query(Allocation).filter_by(user=ALICE, state=ACTIVE).count() == 0


def test_queue_book_bookings_and_cancel_go_over_http(ctx: Context, config_of) -> None:
    allocations.request(ctx.db, ctx.settings, CAROL, "a100", 2, 1)
    theirs = queue.submit(ctx.db, ctx.settings, BOB, "a100", 1, 2)
    runner = CliRunner(env={"XDG_CONFIG_HOME": str(config_of(ALICE)), "GPULOCKER_SOCKET": None})

    def cli(*args: str) -> str:
        result = runner.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    waiting = queue.submit(ctx.db, ctx.settings, ALICE, "a100", 1, 1)
    line = cli("queue").splitlines()
    assert line[0].split() == ["#", "TYPE", "GPUS", "HOURS", "USER", "REQUEST"]
    assert [row.split() for row in line[1:]] == [
        ["1", "a100", "1", "2", "(someone)"],  # bob's, but not his name
        ["2", "a100", "1", "1", ALICE, str(waiting.id)],
    ]
    start = (utcnow() + timedelta(days=2)).replace(microsecond=0)
    booked = cli("book", "-t", "a100", "--start", start.isoformat(), "--hours", "2")
    (row,) = reservations.list_for(ctx.db, ctx.settings, ALICE)
    assert booked.startswith("booked 1 a100 GPU(s) on testhost from ")
    assert booked.endswith(f"(booking {row.id})\n")
    table = cli("bookings").splitlines()
    assert table[0].split() == ["ID", "USER", "TYPE", "GPUS", "START", "HOURS", "STATE"]
    assert table[1].split()[:4] == [str(row.id), ALICE, "a100", "1"]
    assert table[1].split()[-2:] == ["2", "booked"]
    assert cli("cancel", "--booking", str(row.id)) == f"booking {row.id} cancelled\n"
    assert cli("cancel", str(waiting.id)) == f"request {waiting.id} cancelled\n"
    refused = runner.invoke(main, ["cancel", str(theirs.id)])
    assert (refused.exit_code, refused.stderr) == (1, f"gpulocker: no request {theirs.id}\n")
    assert cli("bookings").splitlines()[1].split()[-1] == "cancelled"
    admin = CliRunner(env={"XDG_CONFIG_HOME": str(config_of(ADMIN)), "GPULOCKER_SOCKET": None})
    seen = admin.invoke(main, ["queue"], catch_exceptions=False).stdout
    assert BOB in seen and ALICE not in seen  # alice's was cancelled
