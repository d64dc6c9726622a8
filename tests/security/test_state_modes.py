"""Outside systemd too, the state folder, database, WAL/SHM and log are not readable by
others (SPEC §12): modes left open by an older version are fixed at start."""

from __future__ import annotations

import stat
from pathlib import Path

from gpulocker.config import Settings
from gpulocker.context import configure_logging, open_context


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
