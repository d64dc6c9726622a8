"""SPEC section 14 in the web: `serve` as root runs its web half as WEB_USER (and PAM sign-in
still works, through the shadow group); plain HTTP off loopback is refused with one line;
behind TLS the session cookie is Secure and __Host-."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gpulocker.config import Settings
from gpulocker.install import tls
from gpulocker.web import create_app
from gpulocker.web.server import plain_http_refusal
from tests.helpers import ALICE, TestUser, wait_for
from tests.web.test_serve_e2e import free_port


@pytest.fixture
def web_user() -> Iterator[str]:
    """A system user like the one `gpulocker install` makes, in the shadow group."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"glweb{secrets.token_hex(3)}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            "--groups",
            "shadow",
            name,
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def test_serve_as_root_runs_the_web_as_the_user_and_pam_still_works(
    web_user: str, pam_service: str, users: dict[str, TestUser]
) -> None:
    base = Path(tempfile.mkdtemp(dir="/var/tmp"))  # a parent the web user may traverse
    base.chmod(0o755)
    cert, key = tls.self_signed("localhost")
    (base / "cert.pem").write_bytes(cert)
    (base / "key.pem").write_bytes(key)
    (base / "key.pem").chmod(0o644)  # the test's own key; install makes it 0640 root:user
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(base),
        "STATE_DIR": str(base / "state"),
        "SOCKET_PATH": str(base / "gl.sock"),
        "PAM_SERVICE": pam_service,
        "WEB_USER": web_user,
        "SSL_CERT": str(base / "cert.pem"),
        "SSL_KEY": str(base / "key.pem"),
        "HOST": "127.0.0.1",
    }
    log = (base / "serve.log").open("w+")
    command = [
        sys.executable,
        "-m",
        "gpulocker",
        "serve",
        "--simulate",
        '{"4090": 2}',
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(command, cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"https://127.0.0.1:{port}"
    try:
        wait_for(lambda: _healthy_tls(url, base / "cert.pem"), timeout=30, interval=0.2)
        uids = _uids_of_gunicorn(base)
        assert uids and all(uid == _uid(web_user) for uid in uids), uids
        signed_in = requests.post(
            f"{url}/api/v1/tokens",
            json={"username": ALICE, "password": users[ALICE].password},
            timeout=10,
            verify=str(base / "cert.pem"),
        )
        assert signed_in.status_code == 201, signed_in.text
        wrong = requests.post(
            f"{url}/api/v1/tokens",
            json={"username": ALICE, "password": "not-it"},
            timeout=10,
            verify=str(base / "cert.pem"),
        )
        assert wrong.status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.seek(0)
        output = log.read()
        log.close()
        print(output)
        subprocess.run(["rm", "-rf", "--", str(base)], check=False)
    assert f"the web half runs as {web_user}" in output


def _healthy_tls(url: str, cert: Path) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2, verify=str(cert)).ok
    except requests.RequestException:
        return False


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def _uids_of_gunicorn(base: Path) -> list[int]:
    """Real uids of the `gpulocker web` processes whose environment names this state dir."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if (
                b"gpulocker\0web" in cmdline
                and str(base).encode() in (proc / "environ").read_bytes()
            ):
                found.append(proc.stat().st_uid)
        except OSError:
            continue
    return found


@pytest.mark.parametrize(
    ("host", "tls_on", "proxy", "refused"),
    [
        ("0.0.0.0", False, False, True),
        ("192.0.2.2", False, False, True),
        ("gpu1.example", False, False, True),
        ("127.0.0.1", False, False, False),
        ("::1", False, False, False),
        ("localhost", False, False, False),
        ("0.0.0.0", True, False, False),
        ("0.0.0.0", False, True, False),
    ],
)
def test_plain_http_off_loopback_is_refused(
    host: str, tls_on: bool, proxy: bool, refused: bool
) -> None:
    settings = Settings(
        host=host,
        ssl_cert="/c" if tls_on else None,
        ssl_key="/k" if tls_on else None,
        trusted_proxy=proxy,
    )
    assert (plain_http_refusal(settings) is not None) is refused


def test_the_web_command_stops_with_one_line(tmp_path: Path) -> None:
    env = {"STATE_DIR": str(tmp_path), "GPULOCKER_ENV_FILE": "/dev/null"}
    for args in (["web", "--host", "0.0.0.0"], ["serve", "--simulate", '{"4090": 1}']):
        done = subprocess.run(
            [sys.executable, "-m", "gpulocker", *args],
            env={**os.environ, **env, "HOST": "0.0.0.0"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("refusing plain HTTP on 0.0.0.0"), lines


def test_cookies_are_secure_and_host_only_behind_tls(settings: Settings) -> None:
    for changes, name in (
        ({}, "gpulocker_session"),
        ({"trusted_proxy": True}, "__Host-gpulocker_session"),
    ):
        app = create_app(settings.with_overrides(**changes))
        assert app.config["SESSION_COOKIE_NAME"] == name
        assert app.config["SESSION_COOKIE_SECURE"] is bool(changes)
