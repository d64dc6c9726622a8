"""The simulated backend (SPEC section 4): real files, real processes, load files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from gpulocker.gpus.simulated import SimulatedBackend, device_file, load_file, write_load
from gpulocker.inventory import assign_types, auto_type
from gpulocker.procfs import holders
from tests.conftest import needs_root
from tests.helpers import TestUser, hold_open_as


def test_it_creates_device_files_0666_like_the_driver(device_dir: Path) -> None:
    backend = SimulatedBackend({"4090": [0, 1], "a100": [5]}, device_dir)
    gpus = backend.inventory()
    assert [g.index for g in gpus] == [0, 1, 5]
    for gpu in gpus:
        mode = os.stat(gpu.device).st_mode
        assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o666
    assert gpus[2].device == str(device_dir / "nvidia5") and gpus[2].memory_total_mib == 81920


def test_a_deleted_device_file_comes_back_0666(device_dir: Path) -> None:
    backend = SimulatedBackend({"4090": [0]}, device_dir)
    backend.inventory()
    device_file(device_dir, 0).unlink()
    backend.sample()
    assert stat.S_IMODE(os.stat(device_file(device_dir, 0)).st_mode) == 0o666


def test_load_comes_from_the_load_file(device_dir: Path) -> None:
    backend = SimulatedBackend({"4090": [0, 1, 2]}, device_dir)
    write_load(device_dir, 1, utilization=80, memory_mib=10240)
    write_load(device_dir, 2, error="GPU is lost")
    by_id = {s.index: s for s in backend.sample()}
    assert (by_id[0].ok, by_id[0].utilization, by_id[0].memory_used_mib) == (True, 0.0, 0.0)
    assert (by_id[1].utilization, by_id[1].memory_used_mib) == (80.0, 10240.0)
    assert by_id[1].temperature_c is not None and by_id[1].power_w is not None
    assert (by_id[2].ok, by_id[2].error) == (False, "GPU is lost")


def test_a_corrupt_load_file_fails_only_that_gpu(device_dir: Path) -> None:
    backend = SimulatedBackend({"4090": [0, 1]}, device_dir)
    backend.inventory()
    load_file(device_dir, 0).write_text("{not json")
    by_id = {s.index: s for s in backend.sample()}
    assert not by_id[0].ok and "unreadable" in (by_id[0].error or "")
    assert by_id[1].ok


def test_processes_are_the_real_holders_of_the_file(device_dir: Path) -> None:
    backend = SimulatedBackend({"4090": [0, 1]}, device_dir)
    backend.inventory()
    code = f"import time; f = open({str(device_file(device_dir, 1))!r}, 'r+'); print('x', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline()
        by_id = {s.index: s for s in backend.sample()}
        assert by_id[0].processes == []
        (process,) = by_id[1].processes
        assert process.pid == proc.pid and process.uid == os.getuid()
    finally:
        proc.kill()
        proc.wait()


@needs_root
def test_holders_have_their_real_owner(device_dir: Path, users: dict[str, TestUser]) -> None:
    from tests.helpers import ALICE

    path = device_file(device_dir, 3)
    path.touch(mode=0o666)
    path.chmod(0o666)
    proc = hold_open_as(users[ALICE], str(path))
    try:
        (holder,) = holders([str(path)])[str(path)]
        assert (holder.pid, holder.uid, holder.user) == (proc.pid, users[ALICE].uid, ALICE)
    finally:
        proc.kill()
        proc.wait()


def test_gpu_types_come_from_the_config_or_the_model_name(device_dir: Path) -> None:
    gpus = SimulatedBackend({"4090": [0, 1]}, device_dir).inventory()
    assert [t.gpu_type for t in assign_types({"fast": [1], "slow": [0]}, gpus)] == ["slow", "fast"]
    assert {t.gpu_type for t in assign_types({}, gpus)} == {"4090"}
    assert auto_type("NVIDIA A100-SXM4-80GB") == "a100"
    assert auto_type("NVIDIA GeForce RTX 4090") == "4090"


def test_sim_load_writes_the_load_file(tmp_path: Path, device_dir: Path) -> None:
    env = {**os.environ, "DEVICE_DIR": str(device_dir), "STATE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "gpulocker", "sim", "load", "2", "--util", "55", "--mem-mib", "512"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "nvidia2.load" in proc.stdout
    backend = SimulatedBackend({"4090": [2]}, device_dir)
    (sample,) = backend.sample()
    assert (sample.utilization, sample.memory_used_mib) == (55.0, 512.0)
