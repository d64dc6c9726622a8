"""What `gpulocker install` and `gpulocker uninstall` do, as a list of actions (files.py)."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from gpulocker.install import files, units
from gpulocker.install.files import Action, MakeDir, RemoveFile, Run, WriteFile

ETC = "/etc/gpulocker"
ENV_FILE = f"{ETC}/gpulocker.env"
CERT = f"{ETC}/tls/cert.pem"
KEY = f"{ETC}/tls/key.pem"
UNIT_DIR = "/etc/systemd/system"
WEB_UNIT = f"{UNIT_DIR}/gpulocker-web.service"
AGENT_UNIT = f"{UNIT_DIR}/gpulocker-agent.service"
PAM_FILE = "/etc/pam.d/gpulocker"
NVIDIA_FILE = "/etc/modprobe.d/gpulocker-nvidia.conf"
STATE_DIR = "/var/lib/gpulocker"


@dataclass(frozen=True)
class InstallOptions:
    root: Path = Path("/")
    user: str = "gpulocker"
    executable: str | None = None
    ssl_cert: str | None = None
    ssl_key: str | None = None
    nvidia_options: bool = True
    hostname: str | None = None
    port: int = 5151


def find_executable() -> str:
    """The `gpulocker` command of this installation (the venv pipx made, or PATH)."""
    beside = Path(sys.executable).parent / "gpulocker"
    if beside.exists():
        return str(beside)
    found = shutil.which("gpulocker")
    return found or str(beside)


def shadow_group() -> str | None:
    """The group that may read /etc/shadow (Debian, Ubuntu: shadow), None where there is none."""
    try:
        return grp.getgrnam("shadow").gr_name
    except KeyError:
        return None


def env_text(opts: InstallOptions, cert: str, key: str) -> str:
    return f"""\
# /etc/gpulocker/gpulocker.env, written by `gpulocker install` (kept on reinstall).
# The keys are in README.md (Configuration).
HOST=0.0.0.0
PORT={opts.port}
STATE_DIR={STATE_DIR}
PAM_SERVICE=gpulocker
WEB_USER={opts.user}
SSL_CERT={cert}
SSL_KEY={key}
# GPU_CONFIG='{{"4090": [0,1,2,3]}}'
# PRIVILEGED_USERS="admin1,admin2"
# DATABASE_URL=postgresql://gpulocker@localhost/gpulocker
# REDIS_URL=redis://localhost:6379/0
# TRUSTED_PROXY=1   (a TLS proxy in front: drop SSL_CERT/SSL_KEY, HOST=127.0.0.1)
# Days kept before pruning (0 = for ever; docs/operations.md, Retention):
# EVENT_RETENTION_DAYS=365  GPU_UTILIZATION_HISTORY_DAYS=7
# NOTIFICATION_RETENTION_DAYS=90  OUTBOX_RETENTION_DAYS=30
"""


def unit_options(opts: InstallOptions, shadow: str | None) -> units.UnitOptions:
    exe = opts.executable or find_executable()
    in_home = exe.startswith(("/home/", "/root/"))
    return units.UnitOptions(
        executable=exe,
        env_file=ENV_FILE,
        user=opts.user,
        shadow_group=shadow,
        state_dir=STATE_DIR,
        protect_home="read-only" if in_home else "yes",
    )


def install_actions(
    opts: InstallOptions, shadow: str | None = None, certificate: bool = True
) -> list[Action]:
    """Every file install writes and every command it runs, in order (shadow: the group that
    reads /etc/shadow, found on this system by default; certificate=False: none made)."""
    uo = unit_options(opts, shadow or shadow_group())
    actions: list[Action] = []
    if not _user_exists(opts.user):
        groups = ["--groups", uo.shadow_group] if uo.shadow_group else []
        actions.append(
            Run(
                (
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--home-dir",
                    STATE_DIR,
                    "--shell",
                    "/usr/sbin/nologin",
                    "--user-group",
                    *groups,
                    opts.user,
                )
            )
        )
    elif uo.shadow_group:
        actions.append(Run(("usermod", "--append", "--groups", uo.shadow_group, opts.user)))
    actions.append(MakeDir(ETC, 0o750, group=opts.user))
    cert, key = opts.ssl_cert or CERT, opts.ssl_key or KEY
    if opts.ssl_cert is None:
        actions.append(MakeDir(f"{ETC}/tls", 0o750, group=opts.user))
        made = files.exists(opts.root, CERT) and files.exists(opts.root, KEY)
        if certificate and not made:
            cert_pem, key_pem = _certificate(opts.hostname)
            actions.append(WriteFile(KEY, key_pem, 0o640, group=opts.user))
            actions.append(WriteFile(CERT, cert_pem, 0o644))
    env = env_text(opts, cert, key).encode()
    actions.append(WriteFile(ENV_FILE, env, 0o640, group=opts.user, keep_existing=True))
    actions.append(MakeDir(STATE_DIR, 0o2770, group=opts.user))
    actions.append(WriteFile(WEB_UNIT, units.web_unit(uo).encode()))
    actions.append(WriteFile(AGENT_UNIT, units.agent_unit(uo).encode()))
    actions.append(WriteFile(PAM_FILE, units.PAM_SERVICE.encode()))
    if opts.nvidia_options:
        actions.append(WriteFile(NVIDIA_FILE, units.NVIDIA_OPTIONS.encode()))
    actions.append(Run(("systemctl", "daemon-reload")))
    return actions


def uninstall_actions(root: Path, purge: bool) -> list[Action]:
    """Stop and remove what install wrote; the env file, certificate and data stay unless purge."""
    actions: list[Action] = [
        Run(("systemctl", "disable", "--now", "gpulocker-web", "gpulocker-agent")),
    ]
    for path in (WEB_UNIT, AGENT_UNIT, PAM_FILE, NVIDIA_FILE):
        actions.append(RemoveFile(path))
    if purge:
        for path in (ENV_FILE, CERT, KEY):
            actions.append(RemoveFile(path))
        actions.append(Run(("rm", "-rf", "--one-file-system", "--", STATE_DIR)))
    actions.append(Run(("systemctl", "daemon-reload")))
    return actions


def next_steps(opts: InstallOptions) -> str:
    """What the admin does after install, numbered; the driver step only when install wrote
    the module options (without them `gpulocker doctor` says what to write)."""
    steps = [f"Edit {ENV_FILE}: GPU_CONFIG, PRIVILEGED_USERS (and DATABASE_URL for several hosts)."]
    if opts.nvidia_options:
        steps.append(f"Reload the NVIDIA driver (or reboot) so {NVIDIA_FILE} applies.")
    steps += [
        "systemctl enable --now gpulocker-agent gpulocker-web",
        "gpulocker doctor",
        f"Open https://{opts.hostname or os.uname().nodename}:{opts.port}/ (a self-signed\n"
        "     certificate unless you gave one: docs/operations.md says how to use a real one).",
    ]
    return "Next:\n" + "\n".join(f"  {n}. {step}" for n, step in enumerate(steps, 1))


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


def _certificate(hostname: str | None) -> tuple[bytes, bytes]:
    from gpulocker.install import tls

    return tls.self_signed(hostname)
