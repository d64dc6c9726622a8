"""Outside systemd too, the state folder, database, WAL/SHM and log are not readable by
others (SPEC §12): modes left open by an older version are fixed at start."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gpulocker.config import ConfigError, Settings
from gpulocker.context import configure_logging, open_context
from gpulocker.db import Database
from tests.helpers import ALICE, TestUser


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_state_is_private_after_a_start(settings: Settings, tmp_path: Path) -> None:
    state = tmp_path / "open-state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    db = state / "gpulocker.db"
    db.touch()
    db.chmod(0o644)
    log_file = tmp_path / "gl.log"
    settings = settings.with_overrides(
        state_dir=state, database_url=f"sqlite:///{db}", log_file=str(log_file)
    )
    configure_logging(settings, stream=False)
    ctx = open_context(settings)
    with ctx.db.session() as s:
        s.connection().exec_driver_sql("select 1")
    assert mode(state) & 0o007 == 0
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), log_file):
        if path.exists():
            assert mode(path) & 0o077 == 0, f"{path} is {mode(path):04o}"
    ctx.close()


def test_root_opens_a_shared_database_whose_wal_the_web_half_made(
    tmp_path: Path, users: dict[str, TestUser]
) -> None:
    """`serve` as root with an unprivileged web half (or the two units) share STATE_DIR
    through the web's group; SQLite's WAL belongs to whoever opened the database first."""
    web = users[ALICE]  # stands for the web user: a member of the folder's group
    state = tmp_path / "shared"
    state.mkdir()
    os.chown(state, 0, web.gid)
    state.chmod(0o2770)
    url = f"sqlite:///{state / 'gpulocker.db'}"
    Database(url).dispose()
    wal = state / "gpulocker.db-wal"
    wal.touch()
    os.chown(wal, web.uid, web.gid)  # made by the web half: in the folder's group
    database = Database(url)
    with database.session() as session:
        session.connection().exec_driver_sql("select 1")
    database.dispose()
    os.chown(wal, web.uid, 0)  # someone else's file, not in the folder's group: refused
    with pytest.raises(ConfigError, match="STATE_DIR"):
        Database(url)
