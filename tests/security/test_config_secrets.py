"""A configuration error names the key and the bad value, never a URL's password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpulocker.config import redact_urls

PASSWORD = "hunter2-not-for-logs"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DATABASE_URL", f"mysql://lab:{PASSWORD}@db.example/gpulocker"),
        ("PROXY_URL", f"ftp://lab:{PASSWORD}@proxy.example:21"),
        ("REDIS_URL", f"memcache://:{PASSWORD}@127.0.0.1:6379/0"),
    ],
)
def test_the_gpulocker_command_does_not_print_a_urls_password(
    tmp_path: Path, key: str, value: str
) -> None:
    env = {"PATH": os.environ["PATH"], "STATE_DIR": str(tmp_path), key: value}
    done = subprocess.run(
        [sys.executable, "-m", "gpulocker", "agent"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = done.stdout + done.stderr
    assert done.returncode != 0
    assert f"configuration error: {key}" in said
    assert PASSWORD not in said and ":***@" in said


def test_it_redacts_every_url_in_a_list() -> None:
    text = f"tgram://bot:{PASSWORD}@x, mailto://me:{PASSWORD}@mail.example?x=1 plain"
    assert PASSWORD not in redact_urls(text)
    assert redact_urls("https://example.org/path") == "https://example.org/path"
