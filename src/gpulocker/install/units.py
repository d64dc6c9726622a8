"""The systemd units install writes (and deploy/ holds a copy of: scripts/render-deploy).

The web runs as its own user with no capabilities at all; pam_unix reads /etc/shadow through
the `shadow` group (NoNewPrivileges stops the setgid unix_chkpwd helper, so the group is how it
works). The agent is root but keeps only the capabilities it uses (docs/operations.md)."""

from __future__ import annotations

from dataclasses import dataclass

#: What the agent does as root, and the capability each needs (docs/operations.md says why).
AGENT_CAPABILITIES = (
    "CAP_FOWNER",  # set ACLs/modes on /dev/nvidia* and files it does not own
    "CAP_CHOWN",  # give device files back to root when they were changed
    "CAP_KILL",  # stop processes that use a GPU they hold no allocation for
    "CAP_DAC_READ_SEARCH",  # read /proc/<pid>/fd of other users' processes
    "CAP_SYS_PTRACE",  # /proc/<pid>/fd of other users' processes
    "CAP_SETUID",  # the disk scanner drops to the user whose home it measures
    "CAP_SETGID",  # ... with that user's groups
)

_COMMON_SANDBOX = """\
NoNewPrivileges=yes
PrivateTmp=yes
ProtectClock=yes
ProtectHostname=yes
ProtectKernelLogs=yes
ProtectKernelModules=yes
ProtectKernelTunables=yes
ProtectControlGroups=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @obsolete @mount @debug @cpu-emulation @raw-io @reboot @swap @module @clock
SystemCallErrorNumber=EPERM
UMask=0007
"""
# No MemoryDenyWriteExecute: python-pam's conversation callback is a ctypes (libffi) closure,
# and @resources stays allowed (gunicorn, Python set rlimits and priorities): neither could be
# tried under systemd here, and a web that cannot sign anyone in is worse than 0.2 points.


@dataclass(frozen=True)
class UnitOptions:
    """What the units depend on: the command, the user, the paths."""

    executable: str
    env_file: str = "/etc/gpulocker/gpulocker.env"
    user: str = "gpulocker"
    shadow_group: str | None = "shadow"
    state_dir: str = "/var/lib/gpulocker"
    protect_home: str = "yes"


def web_unit(opts: UnitOptions) -> str:
    """gpulocker-web.service: gunicorn as the unprivileged user, no capabilities."""
    groups = f"SupplementaryGroups={opts.shadow_group}\n" if opts.shadow_group else ""
    return f"""\
# GPULocker web and API (gunicorn), written by `gpulocker install`.
# Runs as {opts.user} with no capabilities; /etc/shadow is read through the shadow group.
[Unit]
Description=GPULocker web and API
After=network-online.target postgresql.service redis-server.service gpulocker-agent.service
Wants=network-online.target

[Service]
Type=simple
User={opts.user}
Group={opts.user}
{groups}Environment=GPULOCKER_ENV_FILE={opts.env_file}
ExecStart={opts.executable} web
ExecReload=/bin/kill -HUP $MAINPID
KillMode=mixed
TimeoutStopSec=20
Restart=on-failure
RestartSec=2
ReadWritePaths={opts.state_dir}
CapabilityBoundingSet=
AmbientCapabilities=
PrivateDevices=yes
PrivateUsers=no
ProtectSystem=strict
ProtectHome={opts.protect_home}
ProtectProc=invisible
ProcSubset=pid
RemoveIPC=yes
DevicePolicy=closed
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
IPAddressAllow=any
{_COMMON_SANDBOX}
[Install]
WantedBy=multi-user.target
"""


def agent_unit(opts: UnitOptions) -> str:
    """gpulocker-agent.service: root with only AGENT_CAPABILITIES."""
    caps = " ".join(AGENT_CAPABILITIES)
    return f"""\
# GPULocker agent (GPU access enforcement), written by `gpulocker install`.
# Root, but only with: {caps}.
[Unit]
Description=GPULocker agent (GPU access enforcement)
After=network-online.target nvidia-persistenced.service postgresql.service redis-server.service
Wants=network-online.target

[Service]
Type=simple
Environment=GPULOCKER_ENV_FILE={opts.env_file}
ExecStart={opts.executable} agent
# SIGTERM: the agent finishes its tick and stops; access stays as it is on disk.
KillMode=process
TimeoutStopSec=30
Restart=always
RestartSec=2
SupplementaryGroups={opts.user}
ReadWritePaths={opts.state_dir}
RuntimeDirectory=gpulocker
RuntimeDirectoryMode=0755
CapabilityBoundingSet={caps}
ProtectSystem=strict
ProtectHome=read-only
PrivateMounts=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
{_COMMON_SANDBOX}
[Install]
WantedBy=multi-user.target
"""


PAM_SERVICE = """\
# /etc/pam.d/gpulocker, written by `gpulocker install`: sign-in checks the Unix password.
auth     required pam_unix.so
account  required pam_unix.so
"""

NVIDIA_OPTIONS = """\
# Written by `gpulocker install`: nvidia-modprobe makes /dev/nvidia* 0660 root:root, so only
# the ACLs the GPULocker agent sets open a GPU (the driver's default is 0666, open to all).
options nvidia NVreg_DeviceFileMode=0660 NVreg_DeviceFileUID=0 NVreg_DeviceFileGID=0
"""
