"""`gpulocker doctor`: is this host ready to enforce GPU access? Each check says ok, warn or
fail, and what to do about anything that is not ok.

The checks read the host as it is (the driver's options, the filesystem under DEVICE_DIR,
PAM, the database, Redis, the agent's heartbeat, the docker group, the clock) and change
nothing, except a temporary file in DEVICE_DIR to prove that ACLs can be set there. The
files they read are in `HostPaths`, so tests point them at files of their own.

The package: `base` (Check, HostPaths), `driver` (GPUs, the driver's options, `--fix`),
`host` (everything else); this module runs them in order and renders the report.
"""

from __future__ import annotations

from collections.abc import Callable

from gpulocker.agent import doctor_trust
from gpulocker.agent.doctor.base import (
    FAIL,
    OK,
    WARN,
    BackendFactory,
    Check,
    HostPaths,
)
from gpulocker.agent.doctor.driver import (
    check_driver_options,
    check_gpus,
    modprobe_text,
    needs_modprobe_fix,
    read_params,
    write_modprobe,
)
from gpulocker.agent.doctor.host import (
    check_acl,
    check_clock,
    check_database,
    check_docker,
    check_exempt,
    check_heartbeat,
    check_pam,
    check_redis,
    docker_members,
    ntp_synchronized,
)
from gpulocker.config import Settings
from gpulocker.gpus import make_backend

__all__ = [
    "FAIL",
    "OK",
    "WARN",
    "BackendFactory",
    "Check",
    "HostPaths",
    "check_acl",
    "check_clock",
    "check_database",
    "check_docker",
    "check_driver_options",
    "check_exempt",
    "check_gpus",
    "check_heartbeat",
    "check_pam",
    "check_redis",
    "docker_members",
    "exit_status",
    "modprobe_text",
    "needs_modprobe_fix",
    "ntp_synchronized",
    "read_params",
    "render",
    "run_checks",
    "write_modprobe",
]


def run_checks(
    settings: Settings,
    paths: HostPaths | None = None,
    backend_factory: BackendFactory = make_backend,
) -> list[Check]:
    """Every check, in the order an admin would fix things. A check that crashes is a fail."""
    paths = paths or HostPaths()
    checks: list[Check] = []
    steps: list[tuple[str, Callable[[], list[Check]]]] = [
        # first, before opening the database fixes its mode: what the host is like now
        ("trust", lambda: [Check(*found) for found in doctor_trust.check_trust(settings)]),
        ("driver", lambda: check_gpus(settings, backend_factory)),
        ("device files", lambda: check_driver_options(settings, paths)),
        ("acl", lambda: check_acl(settings)),
        ("pam", lambda: check_pam(settings, paths)),
        ("database", lambda: check_database(settings)),
        ("redis", lambda: check_redis(settings)),
        ("agent", lambda: check_heartbeat(settings)),
        ("docker", lambda: check_docker(paths)),
        ("exempt", lambda: check_exempt(settings, paths)),
        ("clock", lambda: check_clock(settings)),
    ]
    for name, step in steps:
        try:
            checks += step()
        except Exception as exc:  # one broken check must not hide the others
            checks.append(Check(name, FAIL, f"the check itself failed: {exc!r}"))
    return checks


def render(checks: list[Check]) -> str:
    """The report: one line per check, its fix indented below, and a summary line."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for check in checks:
        lines.append(f"{check.status:<5} {check.name:<{width}}  {check.message}")
        if check.fix:
            lines.append(f"{'':<5} {'':<{width}}  fix: {check.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    lines.append(f"doctor: {counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail")
    return "\n".join(lines)


def exit_status(checks: list[Check]) -> int:
    """1 when anything failed (warnings alone are 0)."""
    return 1 if any(c.status == FAIL for c in checks) else 0
