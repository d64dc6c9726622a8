"""Root follows no link it did not expect and trusts no file it does not own (SPEC §12).

Each attack is done as the student would: a real account, real files and symlinks, and the
`gpulocker` command itself run by root in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpulocker.agent import access
from gpulocker.config import ConfigError, read_environment
from gpulocker.gpus.simulated import ensure_device_file
from gpulocker.safefs import UnsafePath
from tests.helpers import CAROL, TestUser


@pytest.fixture
def victim() -> Iterator[Path]:
    """A root-owned temp folder standing for /etc: the link target the student aims at."""
    base = Path(tempfile.mkdtemp(prefix="gl-victim-"))
    yield base / "ld.so.preload"
    subprocess.run(["rm", "-rf", str(base)], check=False)


@pytest.fixture
def trap(users: dict[str, TestUser], victim: Path) -> Iterator[Path]:
    """A world-writable folder (sticky, like /tmp) holding carol's `.env`, whose DEVICE_DIR
    is a folder of hers with a dangling `nvidia0` symlink to the victim file."""
    carol = users[CAROL]
    shared = Path(tempfile.mkdtemp(prefix="gl-shared-", dir="/tmp"))
    shared.chmod(0o1777)
    evil_dev = shared / "dev"
    script = (
        f"import os; os.mkdir({str(evil_dev)!r}, 0o777); "
        f"os.symlink({str(victim)!r}, {str(evil_dev / 'nvidia0')!r}); "
        f"open({str(shared / '.env')!r}, 'w').write("
        f"'GPU_BACKEND=simulated\\nGPU_CONFIG={{\"4090\": [0]}}\\nDEVICE_DIR={evil_dev}\\n')"
    )
    subprocess.run(
        [sys.executable, "-c", script],
        user=carol.uid,
        group=carol.gid,
        extra_groups=[],
        check=True,
        cwd="/",
    )
    assert (shared / ".env").stat().st_uid == carol.uid
    yield shared
    subprocess.run(["rm", "-rf", str(shared)], check=False)


def gpulocker_as_root(
    args: list[str], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "HOME": "/root"}
    return subprocess.run(
        [sys.executable, "-m", "gpulocker", *args],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_root_never_reads_the_env_of_the_folder_it_was_started_in(
    trap: Path, victim: Path, tmp_path: Path
) -> None:
    env = {"STATE_DIR": str(tmp_path / "state"), "GPULOCKER_ENV_FILE": ""}
    result = gpulocker_as_root(["doctor"], trap, env)
    assert not victim.exists() and not os.path.lexists(victim), result.stdout + result.stderr
    assert str(trap / "dev") not in result.stdout + result.stderr


def test_root_refuses_a_named_env_file_owned_by_a_student(
    trap: Path, victim: Path, tmp_path: Path
) -> None:
    for command in (["doctor"], ["agent"], ["serve"]):
        env = {"STATE_DIR": str(tmp_path / "state"), "GPULOCKER_ENV_FILE": str(trap / ".env")}
        result = gpulocker_as_root(command, trap, env)
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if "refusing" in line]
        assert lines and str(trap / ".env") in lines[0] and "owned by uid" in lines[0]
        assert "Traceback" not in result.stderr
    assert not os.path.lexists(victim)


def test_a_config_file_others_may_write_is_refused(tmp_path: Path) -> None:
    env_file = tmp_path / "gpulocker.env"
    env_file.write_text("PORT=6000\n")
    env_file.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by group or others"):
        read_environment({}, env_file)
    env_file.chmod(0o600)
    assert read_environment({}, env_file)["PORT"] == "6000"


def test_the_device_dir_of_a_student_is_refused_and_its_link_not_followed(
    trap: Path, victim: Path, tmp_path: Path
) -> None:
    # Even an admin who names that DEVICE_DIR (trusted environment) gets one line, no file.
    env = {
        "STATE_DIR": str(tmp_path / "state"),
        "GPU_BACKEND": "simulated",
        "GPU_CONFIG": '{"4090": [0]}',
        "DEVICE_DIR": str(trap / "dev"),
    }
    result = gpulocker_as_root(["doctor"], tmp_path, env)
    assert result.returncode != 0
    assert not os.path.lexists(victim)
    assert "DEVICE_DIR" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(UnsafePath):
        ensure_device_file(trap / "dev" / "nvidia0")
    assert not os.path.lexists(victim)


def test_the_acl_writer_neither_chowns_nor_sets_an_acl_through_a_link(
    device_dir: Path, victim: Path
) -> None:
    victim.write_text("root only\n")
    victim.chmod(0o600)
    link = device_dir / "nvidia7"
    link.symlink_to(victim)
    with pytest.raises(UnsafePath):
        access.apply(link, [12345])
    with pytest.raises(UnsafePath):
        access.read(link)
    assert (
        subprocess.run(
            ["getfacl", "-cp", str(victim)], capture_output=True, text=True, check=True
        ).stdout.count("user:12345")
        == 0
    )
    assert victim.stat().st_mode & 0o777 == 0o600


def test_a_fifo_in_a_device_files_place_does_not_hang_the_writer(device_dir: Path) -> None:
    fifo = device_dir / "nvidia8"
    os.mkfifo(fifo)
    with pytest.raises(UnsafePath):
        access.apply(fifo, [])
