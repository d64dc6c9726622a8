"""A real browser over HTTPS with the certificate `gpulocker install` generates (SPEC 14):
`gpulocker install --root` makes the certificate and key, `serve` as root runs its web half as
an unprivileged user with them, and headless Chromium trusts exactly that certificate (its
public key pinned with --ignore-certificate-errors-spki-list, not "ignore every HTTPS
error"), signs in as a real PAM test user, takes a GPU and gets a Secure, __Host- cookie."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, expect, sync_playwright

from tests.helpers import ALICE, BOB, TestUser, try_open_as, wait_for
from tests.web.test_browser import CHROMIUM, CHROMIUM_ARGS, free_port, request_gpus
from tests.web.test_unprivileged import _uid, _uids_of_gunicorn, web_user

pytestmark = [pytest.mark.browser, pytest.mark.root, pytest.mark.timeout(300)]
__all__ = ["web_user"]  # fixture used here
COOKIE = "__Host-gpulocker_session"


@dataclass
class Served:
    url: str
    cert: Path  # what install wrote
    devices: Path
    log: Path


def spki_pin(cert_pem: bytes) -> str:
    """Base64 SHA-256 of the certificate's public key, as Chromium's pin list wants it."""
    key = x509.load_pem_x509_certificate(cert_pem).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def install_certificate(root: Path, user: str) -> tuple[Path, Path]:
    """Run `gpulocker install --root` (the real command) and return its cert and key paths."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "gpulocker", "install", "--root", str(root), "--yes"),
            *("--no-nvidia-options", "--user", user, "--hostname", "localhost"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "write /etc/gpulocker/tls/cert.pem" in done.stdout
    tls = root / "etc/gpulocker/tls"
    return tls / "cert.pem", tls / "key.pem"


def _up(url: str, cert: Path) -> bool:
    context = ssl.create_default_context(cafile=str(cert))
    try:
        with urllib.request.urlopen(url + "/login", timeout=2, context=context) as answer:  # noqa: S310
            return bool(answer.status == 200)
    except OSError:
        return False


@pytest.fixture
def served(pam_service: str, users: dict[str, TestUser], web_user: str) -> Iterator[Served]:
    """`gpulocker serve` as root over HTTPS with install's certificate, web half as web_user."""
    base = Path(tempfile.mkdtemp(prefix="gpulocker-https-", dir="/var/tmp"))
    base.chmod(0o755)  # the web user must traverse it
    cert, key = install_certificate(base / "root", web_user)
    (base / "root").chmod(0o755)
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(base),
        "GPULOCKER_ENV_FILE": os.devnull,
        "STATE_DIR": str(base / "state"),
        "DEVICE_DIR": str(base / "dev"),
        "SOCKET_PATH": str(base / "gl.sock"),
        "GPU_HOST": "httpshost",
        "PAM_SERVICE": pam_service,
        "WEB_USER": web_user,
        "SSL_CERT": str(cert),
        "SSL_KEY": str(key),
        "HOST": "127.0.0.1",
        "RECONCILE_SECONDS": "1",
        "LOG_LEVEL": "WARNING",
    }
    (base / "dev").mkdir(mode=0o755)
    log = base / "serve.log"
    command = [sys.executable, "-m", "gpulocker", "serve", "--simulate", '{"4090": 2}']
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--port", str(port)], cwd=base, env=env, stdout=out, stderr=out
        )
    url = f"https://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(url, cert) or proc.poll() is not None, timeout=60, interval=0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
        uids = _uids_of_gunicorn(base)
        assert uids and set(uids) == {_uid(web_user)}, uids  # the web half is unprivileged
        yield Served(url, cert, base / "dev", log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        output = log.read_text()
        print(output[-3000:])
        shutil.rmtree(base, ignore_errors=True)
    assert "the agent exited" not in output, output[-3000:]


def test_a_browser_trusting_the_installed_certificate_signs_in_and_takes_a_gpu(
    served: Served, users: dict[str, TestUser]
) -> None:
    pem = served.cert.read_bytes()
    port = int(served.url.rsplit(":", 1)[1])
    on_the_wire = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port)))
    assert on_the_wire == ssl.PEM_cert_to_DER_cert(pem.decode())  # the one install generated
    pinned = [*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_pin(pem)}"]
    with sync_playwright() as playwright:
        # Without the pin the browser refuses the self-signed certificate: trust is the pin.
        stranger = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        with pytest.raises(PlaywrightError, match="ERR_CERT_AUTHORITY_INVALID"):
            stranger.new_page().goto(served.url + "/login")
        stranger.close()

        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=pinned)
        context = browser.new_context(ignore_https_errors=False)
        context.set_default_timeout(15000)
        page = context.new_page()
        set_cookies: list[str] = []
        page.on(
            "response",
            lambda r: (
                set_cookies.extend(r.header_values("set-cookie"))
                if r.request.method == "POST"
                else None
            ),
        )
        sign_in(page, served.url, users[ALICE])
        assert page.evaluate("window.isSecureContext") is True
        request_gpus(page, "4090", 1, 1)
        expect(page.get_by_role("status").filter(has_text="You have GPU 0 (4090)")).to_be_visible()
        device = str(served.devices / "nvidia0")
        wait_for(lambda: try_open_as(users[ALICE], device) == 0, timeout=15)
        assert try_open_as(users[BOB], device) != 0

        (cookie,) = [c for c in context.cookies() if c["name"] == COOKIE]
        assert cookie["secure"] and cookie["httpOnly"] and cookie["path"] == "/"
        assert cookie["domain"] == "127.0.0.1"  # host-only: no Domain attribute was sent
        issued = [h for h in set_cookies if h.startswith(COOKIE + "=")]
        assert issued, set_cookies
        attributes = issued[0].lower()
        assert "; secure" in attributes and "; path=/" in attributes
        assert "domain=" not in attributes
        assert not [c for c in context.cookies() if c["name"] == "gpulocker_session"]
        browser.close()


def sign_in(page: Page, url: str, user: TestUser) -> None:
    page.goto(url + "/login")
    page.get_by_label("User name").fill(user.name)
    page.get_by_label("Password").fill(user.password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name=f"Hello, {user.name}")).to_be_visible()
