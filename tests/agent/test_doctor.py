"""`gpulocker doctor`: each check against real files, databases, Redis and filesystems."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import time_machine
from click.testing import CliRunner
from sqlalchemy import text

from gpulocker import heartbeat
from gpulocker.agent import doctor
from gpulocker.agent.doctor import FAIL, OK, WARN, Check, HostPaths
from gpulocker.cli.main import main
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.gpus import NO_DRIVER
from gpulocker.models import utcnow
from tests import fake_pynvml
from tests.conftest import REDIS_URL, TEST_HOST
from tests.fake_pynvml import Machine, machines

NVML_DEFAULTS = "DeviceFileUID: 0\nDeviceFileGID: 0\nDeviceFileMode: 438\nModifyDeviceFiles: 1\n"


@pytest.fixture
def host(tmp_path: Path) -> HostPaths:
    """Host files of our own: driver params, /etc/pam.d, /etc/group, /etc/passwd."""
    root = tmp_path / "host"
    (root / "pam.d").mkdir(parents=True)
    (root / "params").write_text(NVML_DEFAULTS)
    (root / "group").write_text("root:x:0:\nvideo:x:44:\n")
    (root / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return HostPaths(root / "params", root / "pam.d", root / "group", root / "passwd")


def real_gpus(tmp_path: Path, **changes: object) -> Settings:
    """Settings for a host with NVIDIA GPUs (the fake NVML), no database needed."""
    values: dict[str, object] = {
        "state_dir": tmp_path / "state",
        "database_url": f"sqlite:///{tmp_path}/none.db",
        "gpu_backend": "nvml",
        "device_dir": tmp_path / "dev",
        "gpu_host": TEST_HOST,
    }
    values.update(changes)
    return Settings(**values)  # type: ignore[arg-type]


def only(checks: list[Check], name: str) -> list[tuple[str, str]]:
    return [(c.status, c.message) for c in checks if c.name == name]


# --- GPUs and the driver


def test_it_reports_the_gpus_their_types_and_mig(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_pynvml.install(monkeypatch, machines.lab())
    checks = doctor.check_gpus(real_gpus(tmp_path))
    assert only(checks, "driver") == [(OK, "nvml: 4 GPU(s), driver 550.54.15")]
    assert only(checks, "gpu types") == [
        (OK, "4090: [0, 1], a100: [2, 3] (auto-detected (GPU_CONFIG is empty))")
    ]
    [(status, message)] = only(checks, "mig")
    assert status == WARN and message.startswith("GPU 2 (NVIDIA A100-SXM4-80GB) is in MIG mode")
    assert "one whole GPU" in message
    assert fake_pynvml.initialized == 0  # the backend was closed


def test_it_shows_the_device_file_of_each_gpu_and_the_ones_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_pynvml.install(monkeypatch, machines.h200x8())
    missing = only(doctor.check_gpus(real_gpus(tmp_path)), "device files")
    assert len(missing) == 8 and all(s == WARN for s, _ in missing)
    assert missing[0][1] == f"GPU 0: {tmp_path}/dev/nvidia2 does not exist yet (minor number 2)"
    (tmp_path / "dev").mkdir()
    for minor in range(8):
        (tmp_path / "dev" / f"nvidia{minor}").touch()
    [(status, message)] = only(doctor.check_gpus(real_gpus(tmp_path)), "device files")
    assert status == OK and message.startswith("GPU index -> device file: 0->nvidia2, 1->nvidia3")


def test_it_fails_on_a_lost_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_pynvml.install(monkeypatch, machines.lab(lost_before_start=True))
    checks = doctor.check_gpus(real_gpus(tmp_path))
    assert (FAIL, "GPU 3: GPU is lost; it is not managed") in only(checks, "driver")
    assert doctor.exit_status(checks) == 1


def test_it_fails_on_a_gpu_that_stops_answering(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_pynvml.install(monkeypatch, machines.lab())  # GPU 3 answers at start...
    original = fake_pynvml.nvmlDeviceGetTemperature

    def lost_on_sample(handle: fake_pynvml._Handle, sensor: int) -> int:
        handle.gpu.lost = handle.gpu.index == 3  # ...lost by the first sample
        return original(handle, sensor)

    monkeypatch.setattr(fake_pynvml, "nvmlDeviceGetTemperature", lost_on_sample)
    assert (FAIL, "GPU 3: GPU is lost") in only(doctor.check_gpus(real_gpus(tmp_path)), "driver")


def test_it_fails_on_a_configured_gpu_that_does_not_exist(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_pynvml.install(monkeypatch, machines.lab())
    settings = real_gpus(tmp_path, gpu_config={"4090": [0, 1], "h100": [9]})
    [(status, message)] = only(doctor.check_gpus(settings), "gpu types")
    assert status == FAIL and "[9]" in message and "found: 0, 1, 2, 3" in message


def test_it_warns_when_it_had_to_fall_back_to_nvidia_smi(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_pynvml.install(
        monkeypatch, Machine(gpus=[], missing=fake_pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)
    )
    machines.use_fake_smi(monkeypatch, machines.stage_capture("lab", tmp_path / "capture"))
    [(status, message)] = only(doctor.check_gpus(real_gpus(tmp_path)), "driver")[:1]
    assert status == WARN
    assert message == (
        "smi: 4 GPU(s), driver 550.54.15 through nvidia-smi, "
        "because NVML cannot start: NVML Shared Library Not Found"
    )


def test_it_fails_with_one_line_when_there_is_no_driver(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake_pynvml.install(
        monkeypatch, Machine(gpus=[], missing=fake_pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
    )
    monkeypatch.setenv("PATH", str(tmp_path))
    [check] = doctor.check_gpus(real_gpus(tmp_path))
    assert (check.status, check.message) == (FAIL, NO_DRIVER)
    assert "--simulate" in check.fix


@pytest.mark.parametrize(
    ("params", "status", "words"),
    [
        (NVML_DEFAULTS, FAIL, "sets /dev/nvidia* back to mode 0666"),
        (NVML_DEFAULTS.replace("438", "384"), FAIL, "sets /dev/nvidia* back to mode 0600"),
        (NVML_DEFAULTS.replace("438", "432"), OK, "keeps device files at mode 0660"),
        (NVML_DEFAULTS.replace("ModifyDeviceFiles: 1", "ModifyDeviceFiles: 0"), OK, "leaves"),
    ],
)
def test_it_reads_the_drivers_device_file_options(
    host: HostPaths, tmp_path: Path, params: str, status: str, words: str
) -> None:
    host.nvidia_params.write_text(params)
    [check] = doctor.check_driver_options(real_gpus(tmp_path), host)
    assert check.status == status and words in check.message
    if status == FAIL:
        assert "NVreg_DeviceFileMode=0660" in check.fix and "NVreg_ModifyDeviceFiles=0" in check.fix


def test_it_fails_on_device_files_given_to_a_user(host: HostPaths, tmp_path: Path) -> None:
    host.nvidia_params.write_text(
        NVML_DEFAULTS.replace("UID: 0", "UID: 1000").replace("438", "432")
    )
    checks = doctor.check_driver_options(real_gpus(tmp_path), host)
    assert [c.status for c in checks] == [OK, FAIL]
    assert "uid 1000" in checks[1].message


def test_it_warns_when_the_driver_params_cannot_be_read(host: HostPaths, tmp_path: Path) -> None:
    host.nvidia_params.unlink()
    [check] = doctor.check_driver_options(real_gpus(tmp_path), host)
    assert check.status == WARN and "cannot read" in check.message


# --- The host


def test_it_proves_acls_work_in_the_device_dir(device_dir: Path, tmp_path: Path) -> None:
    [check] = doctor.check_acl(real_gpus(tmp_path, device_dir=device_dir))
    assert (check.status, check.message) == (OK, f"POSIX ACLs work in {device_dir}")
    assert list(device_dir.iterdir()) == []  # the probe file is gone


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A mounted ramfs: a real filesystem without ACL support."""
    mount_point = tmp_path / "ramfs"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount ramfs here: {done.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_it_fails_on_a_filesystem_without_acls(ramfs: Path, tmp_path: Path) -> None:
    [check] = doctor.check_acl(real_gpus(tmp_path, device_dir=ramfs))
    assert (check.status, check.message) == (
        FAIL,
        f"the filesystem of {ramfs} does not support POSIX ACLs",
    )


def test_it_fails_on_a_device_dir_that_does_not_exist(tmp_path: Path) -> None:
    [check] = doctor.check_acl(real_gpus(tmp_path, device_dir=tmp_path / "nope"))
    assert check.status == FAIL and "does not exist" in check.message


def test_it_checks_the_pam_service_file(host: HostPaths, tmp_path: Path) -> None:
    settings = real_gpus(tmp_path, pam_service="gpulocker")
    assert doctor.check_pam(settings, host)[0].status == FAIL
    (host.pam_dir / "other").write_text("auth required pam_deny.so\n")
    [check] = doctor.check_pam(settings, host)
    assert check.status == WARN and "falls back" in check.message and "PAM_SERVICE" in check.fix
    (host.pam_dir / "gpulocker").write_text("@include common-auth\n")
    assert doctor.check_pam(settings, host)[0].status == OK


def test_it_warns_about_members_of_the_docker_group(host: HostPaths) -> None:
    assert doctor.check_docker(host)[0].status == OK
    with host.group_file.open("a") as group:
        group.write("docker:x:998:alice,bob\n")
    with host.passwd_file.open("a") as passwd:
        passwd.write("carol:x:1003:998::/home/carol:/bin/bash\n")
    [check] = doctor.check_docker(host)
    assert check.status == WARN and check.message.endswith(": alice, bob, carol")
    assert "rootless" in check.fix


def test_it_wants_nvidia_persistenced_exempt(host: HostPaths, tmp_path: Path) -> None:
    assert doctor.check_exempt(real_gpus(tmp_path), host) == [
        Check("exempt", OK, "nvidia-persistenced is in EXEMPT_USERS")
    ]
    not_exempt = real_gpus(tmp_path, exempt_users=("root",))
    assert doctor.check_exempt(not_exempt, host)[0].status == WARN  # no such user here
    with host.passwd_file.open("a") as passwd:
        passwd.write("nvidia-persistenced:x:120:127::/nonexistent:/usr/sbin/nologin\n")
    [check] = doctor.check_exempt(not_exempt, host)
    assert check.status == FAIL and check.fix == "add nvidia-persistenced to EXEMPT_USERS"


def test_it_fails_on_a_clock_in_the_past(tmp_path: Path) -> None:
    with time_machine.travel("2001-01-01 00:00:00+00:00", tick=False):
        [check] = doctor.check_clock(real_gpus(tmp_path))
    assert (check.status, check.message) == (FAIL, "the clock says 2001-01-01 00:00 UTC")


def test_it_reads_the_kernels_clock_synchronization_state() -> None:
    assert doctor.ntp_synchronized() in (True, False)


# --- Database, Redis, agent


def test_it_finds_the_database_migrated(database_url: str, tmp_path: Path) -> None:
    [check] = doctor.check_database(real_gpus(tmp_path, database_url=database_url))
    assert check.status == OK and "(current)" in check.message
    clock = doctor.check_clock(real_gpus(tmp_path, database_url=database_url))
    assert not [c for c in clock if "database server" in c.message]  # same host, same clock


def test_it_warns_about_a_database_not_yet_created_or_migrated(tmp_path: Path) -> None:
    settings = real_gpus(tmp_path)
    [check] = doctor.check_database(settings)
    assert check.status == WARN and check.message.startswith("no database yet")
    with Database(settings.database_url).engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (x INTEGER)"))
    [check] = doctor.check_database(settings)
    assert check.status == WARN and check.message.endswith("has no schema yet")
    assert "gpulocker db upgrade" in check.fix


def test_it_fails_on_a_database_of_a_newer_version(database_url: str, tmp_path: Path) -> None:
    database = Database(database_url)
    with database.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00dface0001'"))
    database.dispose()
    [check] = doctor.check_database(real_gpus(tmp_path, database_url=database_url))
    assert check.status == FAIL and "unknown to this version" in check.message


def test_it_fails_on_a_database_it_cannot_reach(tmp_path: Path) -> None:
    url = "postgresql://gpulocker:secret@127.0.0.1:1/gpulocker"
    [check] = doctor.check_database(real_gpus(tmp_path, database_url=url))
    assert check.status == FAIL and check.message.startswith("cannot reach")
    assert "secret" not in check.message


def test_it_checks_redis_when_configured(tmp_path: Path) -> None:
    assert doctor.check_redis(real_gpus(tmp_path))[0].message.startswith("not configured")
    assert doctor.check_redis(real_gpus(tmp_path, redis_url=REDIS_URL))[0].status == OK
    [check] = doctor.check_redis(real_gpus(tmp_path, redis_url="redis://127.0.0.1:1/0"))
    assert check.status == FAIL and "does not answer" in check.message


def test_it_checks_the_agents_heartbeat(database_url: str, tmp_path: Path) -> None:
    settings = real_gpus(tmp_path, database_url=database_url)
    assert doctor.check_heartbeat(settings)[0].status == WARN  # never ran
    database = Database(database_url)
    with database.transaction() as session:
        heartbeat.beat(session, heartbeat.agent_name(TEST_HOST))
    database.dispose()
    assert doctor.check_heartbeat(settings)[0].status == OK
    with time_machine.travel(utcnow() + timedelta(minutes=5)):
        [check] = doctor.check_heartbeat(settings)
    assert check.status == FAIL and "not being enforced" in check.message


# --- The command


def test_the_command_prints_every_check_and_exits_by_the_worst(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    env = {
        "STATE_DIR": str(tmp_path / "state"),
        "DATABASE_URL": database_url,
        "GPU_HOST": TEST_HOST,
    }
    result = CliRunner().invoke(main, ["doctor", "--simulate", '{"4090": 2}'], env=env)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "ok    driver        simulated: 2 GPU(s)" in lines  # after the trust checks
    assert any(line.startswith("ok    database") for line in lines)
    assert lines[-1].startswith("doctor: ") and lines[-1].endswith(" 0 fail")
    env["REDIS_URL"] = "redis://127.0.0.1:1/0"
    result = CliRunner().invoke(main, ["doctor", "--simulate", '{"4090": 2}'], env=env)
    assert result.exit_code == 1
    assert any(line.startswith("fail  redis") for line in result.output.splitlines())


def test_it_warns_when_the_database_servers_clock_disagrees(
    database_url: str, tmp_path: Path
) -> None:
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite has no clock of its own")
    settings = real_gpus(tmp_path, database_url=database_url)
    with time_machine.travel(utcnow() + timedelta(minutes=2)):
        checks = doctor.check_clock(settings)
    [skew] = [c for c in checks if "database server" in c.message]
    assert skew.status == WARN and "-120 s" in skew.message


def test_fix_writes_the_modprobe_lines_after_asking(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str
) -> None:
    fake_pynvml.install(monkeypatch, machines.lab())
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    params = root / "proc/driver/nvidia/params"
    params.parent.mkdir(parents=True)
    params.write_text(NVML_DEFAULTS)  # the driver's defaults: it resets files to 0666
    (root / "etc/modprobe.d").mkdir(parents=True)
    conf = root / "etc/modprobe.d/gpulocker.conf"
    env = {
        "STATE_DIR": str(tmp_path / "state"),
        "DATABASE_URL": database_url,
        "GPU_HOST": TEST_HOST,
        "GPU_BACKEND": "nvml",
        "DEVICE_DIR": str(tmp_path / "dev"),
    }
    args = ["doctor", "--root", str(root), "--fix"]
    line = "options nvidia NVreg_DeviceFileMode=0660 NVreg_DeviceFileUID=0 NVreg_DeviceFileGID=0"

    refused = CliRunner().invoke(main, args, env=env, input="n\n")
    assert refused.exit_code == 1
    assert any(x.startswith("fail  device files") for x in refused.output.splitlines())
    assert line in refused.output and "write " in refused.output
    assert not conf.exists()  # asked, answered no

    # A link planted at the target is replaced, never followed.
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    conf.symlink_to(victim)
    done = CliRunner().invoke(main, args, env=env, input="y\n")
    assert f"wrote {conf}" in done.output, done.output
    assert victim.read_text() == "keep\n" and not conf.is_symlink()
    assert line in conf.read_text().splitlines()
    assert conf.stat().st_mode & 0o777 == 0o644

    conf.unlink()
    scripted = CliRunner().invoke(main, [*args, "--yes"], env=env)
    assert "write " not in scripted.output.split("wrote")[0].splitlines()[-1]
    assert line in conf.read_text()
    params.write_text(NVML_DEFAULTS.replace("438", "432"))  # fixed and rebooted: nothing to do
    after = CliRunner().invoke(main, args, env=env, input="y\n")
    assert "should say" not in after.output
