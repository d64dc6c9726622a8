"""`gpulocker install` / `uninstall` into a staging tree (--root), and --dry-run."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gpulocker.cli.main import main
from gpulocker.install import devices, files
from gpulocker.install.files import WriteFile

EXE = str(Path(sys.executable).parent / "gpulocker")
UNITS = ("gpulocker-web.service", "gpulocker-agent.service")


def install(root: Path, *args: str) -> str:
    result = CliRunner().invoke(
        main, ["install", "--root", str(root), "--yes", "--executable", EXE, *args]
    )
    assert result.exit_code == 0, result.output
    return result.output


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_dry_run_writes_nothing_and_names_every_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    output = install(root, "--dry-run")
    assert tree(root) == []
    for path in (
        "/etc/gpulocker/gpulocker.env",
        "/etc/systemd/system/gpulocker-web.service",
        "/etc/systemd/system/gpulocker-agent.service",
        "/etc/pam.d/gpulocker",
        "/etc/modprobe.d/gpulocker-nvidia.conf",
        "/etc/gpulocker/tls/cert.pem",
    ):
        assert f"would write {path}" in output
    assert "would run systemctl daemon-reload" in output
    result = CliRunner().invoke(main, ["uninstall", "--root", str(root), "--dry-run", "--purge"])
    assert result.exit_code == 0, result.output
    assert "would remove /etc/gpulocker/gpulocker.env" in result.output
    assert tree(root) == []


def test_without_the_nvidia_options_it_writes_none_and_asks_for_no_driver_reload(
    tmp_path: Path,
) -> None:
    output = install(tmp_path, "--no-nvidia-options")
    assert not (tmp_path / "etc/modprobe.d/gpulocker-nvidia.conf").exists()
    assert "Reload the NVIDIA driver" not in output
    assert "  1. Edit /etc/gpulocker/gpulocker.env" in output
    assert "  3. gpulocker doctor" in output  # renumbered
    assert "Reload the NVIDIA driver" in install(tmp_path / "with")


def test_install_writes_the_files_keeps_the_env_file_and_a_certificate(tmp_path: Path) -> None:
    install(tmp_path)
    env = tmp_path / "etc/gpulocker/gpulocker.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o640
    assert "SSL_CERT=/etc/gpulocker/tls/cert.pem" in env.read_text()
    key = tmp_path / "etc/gpulocker/tls/key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o640
    assert b"BEGIN PRIVATE KEY" in key.read_bytes()
    assert stat.S_IMODE((tmp_path / "etc").stat().st_mode) == 0o755
    env.write_text("PORT=6000\n")
    cert = (tmp_path / "etc/gpulocker/tls/cert.pem").read_bytes()
    output = install(tmp_path)
    assert "keep /etc/gpulocker/gpulocker.env" in output
    assert env.read_text() == "PORT=6000\n"
    assert (tmp_path / "etc/gpulocker/tls/cert.pem").read_bytes() == cert  # not regenerated
    web = (tmp_path / "etc/systemd/system/gpulocker-web.service").read_text()
    assert "User=gpulocker" in web and "CapabilityBoundingSet=\n" in web
    assert f"ExecStart={EXE} web" in web


def test_uninstall_removes_what_install_wrote_and_keeps_the_env_file(tmp_path: Path) -> None:
    install(tmp_path)
    result = CliRunner().invoke(main, ["uninstall", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for unit in UNITS:
        assert not (tmp_path / "etc/systemd/system" / unit).exists()
    assert not (tmp_path / "etc/pam.d/gpulocker").exists()
    assert (tmp_path / "etc/gpulocker/gpulocker.env").exists()


def test_writing_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/pam.d").symlink_to(outside)  # a link planted where a directory belongs
    with pytest.raises(OSError):
        files.write_file(root, WriteFile("/etc/pam.d/gpulocker", b"x"))
    (root / "etc/pam.d").unlink()
    (root / "etc/pam.d").mkdir()
    (root / "etc/pam.d/gpulocker").symlink_to(outside / "victim")
    files.write_file(root, WriteFile("/etc/pam.d/gpulocker", b"x"))  # replaces the link
    assert not (outside / "victim").exists()
    assert (root / "etc/pam.d/gpulocker").read_bytes() == b"x"
    assert list(outside.iterdir()) == []


def test_uninstall_gives_device_files_back_the_driver_mode(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    node = dev / "nvidia0"
    os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    subprocess.run(["setfacl", "-m", "u:nobody:rw", str(node)], check=True)
    (dev / "nvidiactl").symlink_to("/etc/passwd")  # not a device: left alone
    lines = devices.restore(tmp_path, dry_run=False)
    assert lines == [f"reset {node} to 0666, no ACL"]
    assert stat.S_IMODE(node.stat().st_mode) == 0o666
    acl = subprocess.run(["getfacl", "-c", str(node)], capture_output=True, text=True).stdout
    assert "nobody" not in acl
    assert stat.S_IMODE(os.stat("/etc/passwd").st_mode) == 0o644


def test_driver_mode_reads_the_params(tmp_path: Path) -> None:
    params = tmp_path / "params"
    params.write_text("ResmanDebugLevel: 4294967295\nDeviceFileMode: 432\n")
    assert devices.driver_mode(params) == 0o660
    assert devices.driver_mode(tmp_path / "none") == 0o666


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_pass_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    install(tmp_path)
    paths = [str(tmp_path / "etc/systemd/system" / unit) for unit in UNITS]
    done = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    scores = {}
    for unit in UNITS:
        out = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", f"--root={tmp_path}", unit],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        line = next(line for line in out.splitlines() if "Overall exposure level" in line)
        print(line)
        scores[unit] = float(line.split(":")[1].split()[0])
    assert scores["gpulocker-web.service"] <= 2.5
    assert scores["gpulocker-agent.service"] <= 3.5


def test_deploy_holds_what_install_writes() -> None:
    """deploy/ is rendered from install (scripts/render_deploy.py): one source of truth."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import render_deploy

    for name, text in render_deploy.render().items():
        assert (render_deploy.DEPLOY / name).read_text() == text, f"rerun render_deploy: {name}"
