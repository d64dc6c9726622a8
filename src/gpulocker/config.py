"""Configuration: every key read from the environment and a `.env` file, strictly.

One flat list of keys (SPEC section 3). The original app's keys keep their names and
meaning; each bad value raises `ConfigError` with one line naming the key and what is
expected, so `gpulocker` can stop with that line instead of a traceback.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from gpulocker import ignored
from gpulocker.config_parsers import (
    _bool,
    _choice,
    _float,
    _int_range,
    _list,
    _optional_int,
    _optional_str,
    _optional_url,
    _path,
    _percent,
    _retention_days,
    _str,
    _url,
)
from gpulocker.config_parsers import parse_gpu_config as _gpu_config
from gpulocker.config_parsers import parse_quotas as _quotas
from gpulocker.safefs import trusted_file_problem

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
BACKENDS = ("nvml", "smi", "simulated")


SECRET_KEYS = ("SECRET_KEY", "TELEGRAM_BOT_TOKEN")
# `scheme://user:password@` anywhere in a value: the password part is never echoed.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)[^@\s]*@")


def redact_urls(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***` (for messages)."""
    return _URL_PASSWORD.sub(lambda m: m.group("head") + "***@", text)


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the key."""


@dataclass(frozen=True)
class Settings:
    """The whole configuration, parsed and validated. Durations keep their unit in the name."""

    host: str = "0.0.0.0"
    port: int = 5151
    gpu_config: dict[str, list[int]] = field(default_factory=dict)
    log_file: str | None = None
    log_level: str = "INFO"
    secret_key: str | None = None
    privileged_users: tuple[str, ...] = ()
    user_lockout_hours: float = 2.0
    disk_cache_timeout_seconds: float = 1800.0
    check_for_idle_gpu_hours: float = 1 / 60
    gpus_status_refresh_rate_seconds: float = 2.0
    min_gpu_utilization_percent: float = 1.0
    min_gpu_memory_gb: float = 0.1
    force_revoke: bool = False
    gpu_utilization_history_days: float = 7.0
    gpu_activity_check_minutes: float = 5.0
    revoke_idle_gpu_after_hours: float = 8.0
    redis_host: str | None = None
    redis_port: int = 6379
    redis_db: int = 0
    proxy_url: str | None = None
    telegram_bot_token: str | None = None
    telegram_chat_id: str | None = None
    # Keys new in GPULocker.
    database_url: str = ""
    redis_url: str | None = None
    state_dir: Path = Path("/var/lib/gpulocker")
    gpu_backend: str = "nvml"
    gpu_host: str = ""
    device_dir: Path | None = None
    max_allocation_hours: float = 168.0
    max_gpus_per_user: int | None = None
    expiry_grace_hours: float = 0.0
    expiry_reminder_minutes: float = 30.0
    kill_violators: bool = True
    kill_grace_seconds: float = 5.0
    exempt_users: tuple[str, ...] = ("root", "nvidia-persistenced")
    ignored_processes: tuple[str, ...] = ignored.DEFAULT  # SPEC 13, gpulocker/ignored.py
    privileged_gpu_access: bool = False
    reconcile_seconds: float = 10.0
    agent_stale_seconds: float = 60.0
    pam_service: str = "login"
    login_failure_floor_seconds: float = 3.0
    ssl_cert: str | None = None
    ssl_key: str | None = None
    web_user: str = "gpulocker"
    trusted_proxy: bool = False
    telegram_api_url: str = "https://api.telegram.org"
    notify_urls: tuple[str, ...] = ()
    public_gpu_status: bool = True
    token_days: float = 90.0
    socket_path: Path | None = None
    queue_max_wait_hours: float = 24.0  # scheduling (SPEC section 11) from here
    queue_aging_hours: float = 12.0
    fairshare_half_life_hours: float = 168.0
    reservation_max_days_ahead: float = 30.0
    quotas: dict[str, dict[str, float]] = field(default_factory=dict)
    # Retention (gpulocker/retention.py; 0 = keep for ever). Samples: GPU_UTILIZATION_HISTORY_DAYS.
    event_retention_days: float = 365.0
    notification_retention_days: float = 90.0
    outbox_retention_days: float = 30.0

    @property
    def effective_redis_url(self) -> str | None:
        """REDIS_URL, or one built from the original REDIS_HOST/PORT/DB keys; None = no Redis."""
        if self.redis_url:
            return self.redis_url
        if self.redis_host:
            return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db}"
        return None

    @property
    def device_path(self) -> Path:
        """DEVICE_DIR; by default /dev, or STATE_DIR/dev for simulated GPUs."""
        if self.device_dir is not None:
            return self.device_dir
        if self.gpu_backend == "simulated":
            return self.state_dir / "dev"
        return Path("/dev")

    @property
    def local_socket_path(self) -> Path:
        """SOCKET_PATH; by default /run/gpulocker/gpulocker.sock for root, else in STATE_DIR."""
        if self.socket_path is not None:
            return self.socket_path
        if os.geteuid() == 0:
            return Path("/run/gpulocker/gpulocker.sock")
        return self.state_dir / "gpulocker.sock"

    def is_admin(self, user: str) -> bool:
        """Admins are the PRIVILEGED_USERS."""
        return user in self.privileged_users

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some values replaced (used by `serve --simulate` and tests)."""
        return replace(self, **changes)


# --- parsers: each takes the raw string and returns the value or raises ValueError(expected)


KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "HOST": ("host", _str),
    "PORT": ("port", _int_range(1, 65535)),
    "GPU_CONFIG": ("gpu_config", _gpu_config),
    "LOG_FILE": ("log_file", _optional_str),
    "LOG_LEVEL": ("log_level", _choice(LOG_LEVELS, upper=True)),
    "SECRET_KEY": ("secret_key", _optional_str),
    "PRIVILEGED_USERS": ("privileged_users", _list),
    "USER_LOCKOUT_HOURS": ("user_lockout_hours", _float()),
    "DISK_CACHE_TIMEOUT_SECONDS": ("disk_cache_timeout_seconds", _float()),
    "CHECK_FOR_IDLE_GPU_HOURS": ("check_for_idle_gpu_hours", _float(strictly_positive=True)),
    "GPUs_STATUS_REFRESH_RATE_SECONDS": (
        "gpus_status_refresh_rate_seconds",
        _float(strictly_positive=True),
    ),
    "MIN_GPU_UTILIZATION_PERCENT": ("min_gpu_utilization_percent", _percent),
    "MIN_GPU_MEMORY_GB": ("min_gpu_memory_gb", _float()),
    "FORCE_REVOKE": ("force_revoke", _bool),
    "GPU_UTILIZATION_HISTORY_DAYS": ("gpu_utilization_history_days", _retention_days),
    "GPU_ACTIVITY_CHECK_MINUTES": ("gpu_activity_check_minutes", _float(strictly_positive=True)),
    "REVOKE_IDLE_GPU_AFTER_HOURS": ("revoke_idle_gpu_after_hours", _float(strictly_positive=True)),
    "REDIS_HOST": ("redis_host", _optional_str),
    "REDIS_PORT": ("redis_port", _int_range(1, 65535)),
    "REDIS_DB": ("redis_db", _int_range(0)),
    "PROXY_URL": ("proxy_url", _optional_url(("http", "https", "socks5", "socks5h"))),
    "TELEGRAM_BOT_TOKEN": ("telegram_bot_token", _optional_str),
    "TELEGRAM_CHAT_ID": ("telegram_chat_id", _optional_str),
    "DATABASE_URL": ("database_url", _url(("sqlite", "postgresql", "postgresql+psycopg"))),
    "REDIS_URL": ("redis_url", _optional_url(("redis", "rediss", "unix"))),
    "STATE_DIR": ("state_dir", _path),
    "GPU_BACKEND": ("gpu_backend", _choice(BACKENDS)),
    "GPU_HOST": ("gpu_host", _str),
    "DEVICE_DIR": ("device_dir", _path),
    "MAX_ALLOCATION_HOURS": ("max_allocation_hours", _float(strictly_positive=True)),
    "MAX_GPUS_PER_USER": ("max_gpus_per_user", _optional_int),
    "EXPIRY_GRACE_HOURS": ("expiry_grace_hours", _float()),
    "EXPIRY_REMINDER_MINUTES": ("expiry_reminder_minutes", _float()),
    "KILL_VIOLATORS": ("kill_violators", _bool),
    "KILL_GRACE_SECONDS": ("kill_grace_seconds", _float()),
    "EXEMPT_USERS": ("exempt_users", _list),
    "IGNORED_PROCESSES": ("ignored_processes", ignored.setting),
    "PRIVILEGED_GPU_ACCESS": ("privileged_gpu_access", _bool),
    "RECONCILE_SECONDS": ("reconcile_seconds", _float(strictly_positive=True)),
    "AGENT_STALE_SECONDS": ("agent_stale_seconds", _float(strictly_positive=True)),
    "PAM_SERVICE": ("pam_service", _str),
    "LOGIN_FAILURE_FLOOR_SECONDS": ("login_failure_floor_seconds", _float()),
    "SSL_CERT": ("ssl_cert", _optional_str),
    "SSL_KEY": ("ssl_key", _optional_str),
    "TOKEN_DAYS": ("token_days", _float(strictly_positive=True)),
    "WEB_USER": ("web_user", _str),
    "TRUSTED_PROXY": ("trusted_proxy", _bool),
    "TELEGRAM_API_URL": ("telegram_api_url", _url(("http", "https"))),
    "NOTIFY_URLS": ("notify_urls", _list),
    "PUBLIC_GPU_STATUS": ("public_gpu_status", _bool),
    "SOCKET_PATH": ("socket_path", _path),
    "QUEUE_MAX_WAIT_HOURS": ("queue_max_wait_hours", _float(strictly_positive=True)),
    "QUEUE_AGING_HOURS": ("queue_aging_hours", _float(strictly_positive=True)),
    "FAIRSHARE_HALF_LIFE_HOURS": ("fairshare_half_life_hours", _float(strictly_positive=True)),
    "RESERVATION_MAX_DAYS_AHEAD": ("reservation_max_days_ahead", _float(strictly_positive=True)),
    "QUOTAS": ("quotas", _quotas),
    "EVENT_RETENTION_DAYS": ("event_retention_days", _retention_days),
    "NOTIFICATION_RETENTION_DAYS": ("notification_retention_days", _retention_days),
    "OUTBOX_RETENTION_DAYS": ("outbox_retention_days", _retention_days),
}

_FIELD_NAMES = {f.name for f in fields(Settings)}
assert all(name in _FIELD_NAMES for name, _ in KEYS.values())


def default_state_dir() -> Path:
    """/var/lib/gpulocker for root, the XDG state dir for anyone else."""
    if os.geteuid() == 0:
        return Path("/var/lib/gpulocker")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpulocker"


SYSTEM_ENV_FILE = Path("/etc/gpulocker/gpulocker.env")


def _read_trusted(path: Path) -> dict[str, str]:
    """Key/values of a config file its reader may trust: owned by root or by the reader,
    writable by neither group nor others (SPEC §12). Anything else is refused in one line."""
    uid = os.geteuid()
    if str(path) == os.devnull:  # "no configuration file" (tests, containers)
        return {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it: {exc.strerror}") from None
    with os.fdopen(fd, encoding="utf-8", errors="replace") as handle:
        problem = trusted_file_problem(os.fstat(fd), uid)
        if problem:
            raise ConfigError(f"{path}: refusing this configuration file: {problem}")
        text = handle.read(1 << 20)
    return {k: v for k, v in dotenv_values(stream=io.StringIO(text)).items() if v is not None}


def env_file_path(environ: Mapping[str, str], env_file: str | Path | None = None) -> Path:
    """The configuration file: the one named, else /etc/gpulocker/gpulocker.env for root
    (never a `.env` of the folder root was started in), else `./.env`."""
    named = env_file or environ.get("GPULOCKER_ENV_FILE")
    if named:
        return Path(named)
    return SYSTEM_ENV_FILE if os.geteuid() == 0 else Path(".env")


def read_environment(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = None
) -> dict[str, str]:
    """The raw key/values: the trusted `.env` file first, the process environment on top."""
    environ = os.environ if environ is None else environ
    path = env_file_path(environ, env_file)
    values: dict[str, str] = {}
    if os.path.lexists(path):
        values.update(_read_trusted(path))
    elif env_file is not None or environ.get("GPULOCKER_ENV_FILE"):
        raise ConfigError(f"GPULOCKER_ENV_FILE: no such file: {path}")
    values.update({k: v for k, v in environ.items() if k in KEYS})
    return values


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | Path | None = None
) -> Settings:
    """Parse every known key; the first bad one raises ConfigError naming it."""
    raw = read_environment(environ, env_file)
    values: dict[str, Any] = {}
    for key, (name, parse) in KEYS.items():
        if key not in raw:
            continue
        text = raw[key]
        try:
            values[name] = parse(text)
        except ValueError as exc:
            shown = "<hidden>" if key in SECRET_KEYS else repr(redact_urls(text))
            raise ConfigError(f"{key}: expected {exc}, got {shown}") from None
    values.setdefault("state_dir", default_state_dir())
    values.setdefault("gpu_host", "")
    if not values["gpu_host"]:
        values["gpu_host"] = socket.gethostname()
    if not values.get("database_url"):
        values["database_url"] = f"sqlite:///{values['state_dir'] / 'gpulocker.db'}"
    if bool(values.get("ssl_cert")) != bool(values.get("ssl_key")):
        raise ConfigError("SSL_CERT: expected SSL_CERT and SSL_KEY to be set together")
    return Settings(**values)


def resolve_secret_key(settings: Settings) -> str:
    """SECRET_KEY, or one generated on first use and kept (mode 0600) in STATE_DIR."""
    if settings.secret_key:
        return settings.secret_key
    path = settings.state_dir / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use theirs
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


def simulated_gpu_config(spec: str) -> dict[str, list[int]]:
    """`--simulate '{"4090": 4, "a100": 2}'` -> {"4090": [0,1,2,3], "a100": [4,5]}.

    Lists of ids are accepted too, as in GPU_CONFIG.
    """
    expected = 'a JSON object mapping a GPU type to a count, e.g. {"4090": 4, "a100": 2}'
    try:
        data = json.loads(spec)
    except json.JSONDecodeError:
        raise ConfigError(f"--simulate: expected {expected}, got {spec!r}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"--simulate: expected {expected}, got {spec!r}")
    if all(isinstance(v, list) for v in data.values()):
        try:
            return _gpu_config(spec)
        except ValueError as exc:
            raise ConfigError(f"--simulate: expected {exc}, got {spec!r}") from None
    result: dict[str, list[int]] = {}
    next_id = 0
    for gpu_type, count in data.items():
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 256:
            raise ConfigError(f"--simulate: expected {expected}, got {spec!r}")
        result[str(gpu_type)] = list(range(next_id, next_id + count))
        next_id += count
    return result
