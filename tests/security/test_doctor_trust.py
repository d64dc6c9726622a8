"""`gpulocker doctor` fails on what a local student could read, write or reach (SPEC §12)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gpulocker.agent.doctor import FAIL, OK, run_checks
from gpulocker.config import Settings


def trust(settings: Settings) -> dict[str, tuple[str, str]]:
    names = {"state", "device dir", "socket dir", "redis auth"}
    return {c.name: (c.status, c.message) for c in run_checks(settings) if c.name in names}


def test_it_passes_a_private_state_and_root_only_folders(settings: Settings) -> None:
    settings.state_dir.mkdir(mode=0o700)
    found = trust(settings)
    assert found["state"][0] == OK and found["device dir"][0] == OK
    assert found["socket dir"][0] == OK and "redis auth" not in found


def test_it_fails_on_a_state_folder_or_database_others_can_read(settings: Settings) -> None:
    settings.state_dir.mkdir(mode=0o700)
    db = settings.state_dir / "gpulocker.db"
    db.write_text("")
    db.chmod(0o644)
    settings = settings.with_overrides(database_url=f"sqlite:///{db}")
    status, message = trust(settings)["state"]
    assert status == FAIL and str(db) in message
    settings.state_dir.chmod(0o755)
    db.chmod(0o600)
    status, message = trust(settings)["state"]
    assert status == FAIL and str(settings.state_dir) in message


def test_it_fails_on_a_device_dir_or_socket_folder_others_can_write(settings: Settings) -> None:
    settings.device_path.chmod(0o777)
    settings.local_socket_path.parent.chmod(0o1777)
    found = trust(settings)
    assert (
        found["device dir"][0] == FAIL and "writable by group or others" in found["device dir"][1]
    )
    assert found["socket dir"][0] == FAIL


def test_the_command_fails_on_a_redis_that_answers_without_a_password(
    settings: Settings, redis_client: object, tmp_path: Path
) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": "/root",
        "GPULOCKER_ENV_FILE": os.devnull,
        "STATE_DIR": str(tmp_path / "st"),
        "GPU_BACKEND": "simulated",
        "GPU_CONFIG": '{"4090": [0]}',
        "DEVICE_DIR": str(settings.device_path),
        "SOCKET_PATH": str(settings.socket_path),
        "REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "gpulocker", "doctor"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    line = next(x for x in result.stdout.splitlines() if "redis auth" in x)
    assert line.startswith(FAIL) and "without a password" in line
    assert result.returncode != 0
