"""Configuration (SPEC section 3): every key family parses strictly, errors name the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpulocker.config import (
    KEYS,
    ConfigError,
    Settings,
    load_settings,
    resolve_secret_key,
    simulated_gpu_config,
)

BASE = {"STATE_DIR": "/tmp/gpulocker-config-test", "GPULOCKER_ENV_FILE": "/dev/null"}


def load(**env: str) -> Settings:
    return load_settings({**BASE, **env})


def test_it_has_the_defaults_of_the_spec() -> None:
    s = load()
    assert (s.host, s.port, s.gpu_config, s.max_allocation_hours) == ("0.0.0.0", 5151, {}, 168.0)
    assert s.exempt_users == ("root", "nvidia-persistenced")
    assert s.kill_violators and s.public_gpu_status and not s.privileged_gpu_access
    assert s.reconcile_seconds == 10 and s.pam_service == "login" and s.gpu_backend == "nvml"
    assert s.database_url == "sqlite:////tmp/gpulocker-config-test/gpulocker.db"
    assert s.effective_redis_url is None and s.device_path == Path("/dev")


def test_it_reads_every_original_key() -> None:
    s = load(
        HOST="127.0.0.1",
        PORT="8080",
        GPU_CONFIG='{"4090": [1,2,3,4]}',
        LOG_LEVEL="debug",
        PRIVILEGED_USERS="admin1, admin2",
        USER_LOCKOUT_HOURS="2",
        FORCE_REVOKE="False",
        MIN_GPU_MEMORY_GB="0.1",
        CHECK_FOR_IDLE_GPU_HOURS="0.01",
        REDIS_HOST="localhost",
        REDIS_PORT="6380",
        REDIS_DB="3",
        GPUs_STATUS_REFRESH_RATE_SECONDS="2",
        PROXY_URL="http://user:pw@proxy.example.com:3128",
        TELEGRAM_CHAT_ID="-100123",
    )
    assert s.gpu_config == {"4090": [1, 2, 3, 4]} and s.port == 8080 and s.log_level == "DEBUG"
    assert s.privileged_users == ("admin1", "admin2") and s.is_admin("admin2")
    assert s.force_revoke is False and s.check_for_idle_gpu_hours == 0.01
    assert s.effective_redis_url == "redis://localhost:6380/3"
    assert s.gpus_status_refresh_rate_seconds == 2.0


def test_durations_accept_floats() -> None:
    s = load(
        REVOKE_IDLE_GPU_AFTER_HOURS="0.01", EXPIRY_GRACE_HOURS="0.005", RECONCILE_SECONDS="0.5"
    )
    assert (s.revoke_idle_gpu_after_hours, s.expiry_grace_hours, s.reconcile_seconds) == (
        0.01,
        0.005,
        0.5,
    )


def test_agent_stale_seconds_is_one_setting_default_60() -> None:
    assert load().agent_stale_seconds == 60.0
    assert load(AGENT_STALE_SECONDS="15").agent_stale_seconds == 15.0
    with pytest.raises(ConfigError, match="AGENT_STALE_SECONDS"):
        load(AGENT_STALE_SECONDS="0")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("PORT", "abc", "PORT: expected an integer 1-65535, got 'abc'"),
        ("PORT", "70000", "PORT: expected an integer 1-65535"),
        ("GPU_CONFIG", '{"4090": "x"}', "GPU_CONFIG: expected JSON mapping a GPU type"),
        ("GPU_CONFIG", "[1,2]", "GPU_CONFIG: expected JSON mapping"),
        ("GPU_CONFIG", '{"a": [0], "b": [0]}', "GPU_CONFIG: expected each GPU id once"),
        ("FORCE_REVOKE", "maybe", "FORCE_REVOKE: expected true or false, got 'maybe'"),
        ("USER_LOCKOUT_HOURS", "-1", "USER_LOCKOUT_HOURS: expected a number >= 0"),
        ("REVOKE_IDLE_GPU_AFTER_HOURS", "0", "REVOKE_IDLE_GPU_AFTER_HOURS: expected a number > 0"),
        ("MAX_ALLOCATION_HOURS", "inf", "MAX_ALLOCATION_HOURS: expected a number > 0"),
        (
            "MIN_GPU_UTILIZATION_PERCENT",
            "150",
            "MIN_GPU_UTILIZATION_PERCENT: expected a number 0-100",
        ),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL: expected one of DEBUG, INFO"),
        ("GPU_BACKEND", "cuda", "GPU_BACKEND: expected one of nvml, smi, simulated"),
        ("DATABASE_URL", "mysql://x", "DATABASE_URL: expected a URL starting with sqlite://"),
        ("REDIS_URL", "localhost:6379", "REDIS_URL: expected a URL starting with redis://"),
        ("MAX_GPUS_PER_USER", "0", "MAX_GPUS_PER_USER: expected an integer >= 1"),
        ("REDIS_DB", "-1", "REDIS_DB: expected an integer >= 0"),
        ("PROXY_URL", "proxy:3128", "PROXY_URL: expected a URL starting with http://"),
    ],
)
def test_a_bad_value_names_the_key(key: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{key: value})
    assert str(info.value).startswith(expected)
    assert "\n" not in str(info.value)


def test_secrets_are_not_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, "TELEGRAM_API_URL": "nope", "TELEGRAM_BOT_TOKEN": "123:secret"})
    assert "secret" not in str(info.value)


def test_every_key_has_a_parser_and_a_field() -> None:
    assert len(KEYS) >= 40
    names = {name for name, _ in KEYS.values()}
    assert {"gpus_status_refresh_rate_seconds", "notify_urls", "public_gpu_status"} <= names


def test_the_env_file_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=6000\nGPU_CONFIG='{\"a100\": [0, 1]}'\nHOST=10.0.0.1\n")
    s = load_settings({"STATE_DIR": str(tmp_path), "HOST": "127.0.0.1"}, env_file=env_file)
    assert (s.port, s.host, s.gpu_config) == (6000, "127.0.0.1", {"a100": [0, 1]})


def test_a_missing_env_file_named_explicitly_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GPULOCKER_ENV_FILE: no such file"):
        load_settings({"GPULOCKER_ENV_FILE": str(tmp_path / "missing.env")})


def test_the_secret_key_is_generated_once_and_kept(tmp_path: Path) -> None:
    s = load(STATE_DIR=str(tmp_path / "state"))
    first = resolve_secret_key(s)
    assert len(first) == 64 and resolve_secret_key(s) == first
    assert (tmp_path / "state" / "secret_key").stat().st_mode & 0o777 == 0o600
    assert resolve_secret_key(s.with_overrides(secret_key="given")) == "given"


def test_simulated_gpus_default_to_the_state_dir(tmp_path: Path) -> None:
    s = load(STATE_DIR=str(tmp_path), GPU_BACKEND="simulated")
    assert s.device_path == tmp_path / "dev"
    assert load(DEVICE_DIR="/srv/dev", GPU_BACKEND="simulated").device_path == Path("/srv/dev")


def test_the_simulate_spec_numbers_gpus_in_order() -> None:
    assert simulated_gpu_config('{"4090": 4, "a100": 2}') == {"4090": [0, 1, 2, 3], "a100": [4, 5]}
    assert simulated_gpu_config('{"h100": [2, 5]}') == {"h100": [2, 5]}
    for bad in ("nope", '{"4090": 0}', "{}", '{"4090": "x"}'):
        with pytest.raises(ConfigError, match="--simulate: expected"):
            simulated_gpu_config(bad)


@pytest.mark.parametrize(
    ("line", "key"), [('GPU_CONFIG=\'{"4090": "x"}\'', "GPU_CONFIG"), ("PORT=abc", "PORT")]
)
def test_the_command_stops_with_one_line_naming_the_key(
    tmp_path: Path, line: str, key: str
) -> None:
    (tmp_path / ".env").write_text(line + "\n")
    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    if os.geteuid() == 0:  # root reads no ./.env (SPEC §12): name the file
        env["GPULOCKER_ENV_FILE"] = str(tmp_path / ".env")
    proc = subprocess.run(
        [sys.executable, "-m", "gpulocker", "db", "upgrade"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"gpulocker: configuration error: {key}: expected"
    )


@pytest.mark.parametrize(
    ("env", "command", "expected"),
    [
        ({"LOG_FILE": "/nonexistent/dir/gpulocker.log"}, ["db", "upgrade"], "LOG_FILE: expected"),
        ({"STATE_DIR": "/proc/no-such-dir"}, ["db", "upgrade"], "STATE_DIR: expected"),
        (
            {"DATABASE_URL": "postgresql://nobody:hunter2@127.0.0.1:1/none"},
            ["db", "upgrade"],
            "DATABASE_URL: cannot use the database at",
        ),
        (
            {"GPU_BACKEND": "smi", "PATH": "/usr/bin:/bin"},
            ["serve", "--port", "1"],
            "no NVIDIA driver found; run with --simulate",
        ),
    ],
)
def test_what_cannot_be_used_stops_with_one_line(
    tmp_path: Path, env: dict[str, str], command: list[str], expected: str
) -> None:
    base = {k: v for k, v in os.environ.items() if k not in KEYS}
    base.update({"STATE_DIR": str(tmp_path / "state"), "LOG_FILE": "", **env})
    if "LOG_FILE" in env:  # configure_logging runs in the long-running commands
        command = ["agent", "--simulate", '{"4090": 1}']
    proc = subprocess.run(
        [sys.executable, "-m", "gpulocker", *command],
        cwd=tmp_path,
        env=base,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode in (1, 2)
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("gpulocker: ")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "hunter2" not in proc.stderr
