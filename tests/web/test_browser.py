"""A real browser (Debian's headless Chromium, driven by Playwright) against the real
product: `python -m gpulocker serve --simulate` in a subprocess on a free port, with its
agent, real PAM sign-in of real test users, and `gpulocker sim load` changing a GPU."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.helpers import ADMIN, ALICE, BOB, TestUser, export, hold_open_as, try_open_as, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.root, pytest.mark.timeout(300)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
SIMULATE = '{"4090": 4, "a100": 2}'


@dataclass
class Server:
    """The running product: its URL and the environment its commands need."""

    url: str
    env: dict[str, str]
    log: Path

    def cli(self, *args: str) -> str:
        """Run a `gpulocker` command against the same state (e.g. `sim load`)."""
        done = subprocess.run(
            [sys.executable, "-m", "gpulocker", *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/login", timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the server did not come up:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(pam_service: str, users: dict[str, TestUser]) -> Iterator[Server]:
    """`gpulocker serve --simulate` on a free port with a fresh state directory."""
    base = Path(tempfile.mkdtemp(prefix="gpulocker-browser-", dir="/tmp"))
    base.chmod(0o755)
    port = free_port()
    env = {
        **os.environ,
        "GPULOCKER_ENV_FILE": str(base / "none.env"),
        "STATE_DIR": str(base / "state"),
        "DEVICE_DIR": str(base / "dev"),
        "SOCKET_PATH": str(base / "gl.sock"),  # never the host's /run/gpulocker
        "GPU_HOST": "browserhost",
        "PAM_SERVICE": pam_service,
        "PRIVILEGED_USERS": ADMIN,
        "SECRET_KEY": "browser-test-secret",
        "GPUs_STATUS_REFRESH_RATE_SECONDS": "0.5",
        "GPU_ACTIVITY_CHECK_MINUTES": "0.02",
        "RECONCILE_SECONDS": "1",
        "LOG_LEVEL": "WARNING",
    }
    for key in ("DATABASE_URL", "REDIS_URL", "REDIS_HOST", "GPU_CONFIG"):
        env.pop(key, None)
    (base / "dev").mkdir(mode=0o755)
    (base / "none.env").write_text("# the test sets everything in the environment\n")
    log = base / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpulocker",
                "serve",
                "--simulate",
                SIMULATE,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc, log)
        yield Server(url, env, log)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def new_page(browser: Browser) -> Iterator[object]:
    """`new_page()` -> a page in a fresh browser context (its own cookies)."""
    contexts = []

    def make(width: int = 1280, height: int = 900) -> Page:
        context = browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(15000)
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


def sign_in(page: Page, server: Server, user: TestUser) -> None:
    page.goto(server.url + "/login")
    page.get_by_label("User name").fill(user.name)
    page.get_by_label("Password").fill(user.password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name=f"Hello, {user.name}")).to_be_visible()


def request_gpus(page: Page, gpu_type: str, count: int, hours: float) -> None:
    page.get_by_label("GPU type").select_option(gpu_type)
    page.get_by_label("How many").fill(str(count))
    page.get_by_label("For how long").fill(f"{hours:g}")
    page.get_by_role("button", name="Request").click()


def test_it_takes_two_gpus_watches_them_live_and_gives_them_back(
    server: Server, new_page: object, users: dict[str, TestUser]
) -> None:
    page = new_page()  # type: ignore[operator]
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    sign_in(page, server, users[ALICE])
    request_gpus(page, "4090", 2, 1)
    expect(page.get_by_role("status").filter(has_text="You have GPU 0, 1 (4090)")).to_be_visible()
    expect(page.locator("#cuda-line")).to_have_text(export(0, 1, host="browserhost"))
    mine = page.get_by_test_id("my-allocations").locator("tbody tr")
    expect(mine).to_have_count(2)

    page.get_by_role("link", name="Schedule").click()
    for gpu in ("0", "1"):
        card = page.locator(f'[data-gpu-id="{gpu}"]')
        expect(card.locator('[data-field="status"]')).to_have_text("yours")
        expect(card.locator('[data-field="holder"]')).to_have_text(ALICE)
    expect(page.locator('[data-gpu-id="2"] [data-field="status"]')).to_have_text("free")
    page.evaluate("window.__sameDocument = true")
    expect(page.locator("[data-live-text]")).to_contain_text("updated")  # fresh readings

    device = str(Path(server.env["DEVICE_DIR"]) / "nvidia1")
    wait_for(lambda: try_open_as(users[ALICE], device) == 0, timeout=15)  # the agent granted it
    holder = hold_open_as(users[ALICE], device)
    try:
        procs = page.locator('[data-gpu-id="1"] [data-field="procs"]')
        expect(procs.locator("tbody tr")).to_have_count(1, timeout=20000)
        expect(procs.locator("tbody tr")).to_contain_text(f"{ALICE}{holder.pid}")
    finally:
        holder.kill()
        holder.wait()

    server.cli("sim", "load", "5", "--error", "GPU is lost")
    expect(page.locator('[data-gpu-id="5"] [data-field="status"]')).to_have_text(
        "unhealthy", timeout=20000
    )
    server.cli("sim", "load", "0", "--util", "77", "--mem-mib", "6144")
    card0 = page.locator('[data-gpu-id="0"]')
    expect(card0.locator('[data-field="util-text"]')).to_have_text("77 %", timeout=20000)
    expect(card0.locator('[data-field="util-bar"]')).to_have_attribute("aria-valuenow", "77")
    expect(card0.locator('[data-field="mem-text"]')).to_contain_text("6 GiB")
    assert page.evaluate("window.__sameDocument === true"), "the page was reloaded"
    card0.get_by_role("button", name="24 h").click()
    expect(card0.get_by_role("button", name="24 h")).to_have_attribute("aria-pressed", "true")
    expect(card0.locator("[data-chart] canvas")).to_have_count(1, timeout=20000)

    assert problems == [], problems  # no script error, nothing the security policy blocked
    page.get_by_role("link", name="Dashboard").click()
    page.get_by_role("button", name="Release all 2").click()
    expect(page.get_by_text("You hold no GPUs right now.")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_text("You are signed out.")).to_be_visible()
    page.goto(server.url + "/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_it_lets_an_admin_release_another_users_gpu_and_see_it_logged(
    server: Server, new_page: object, users: dict[str, TestUser]
) -> None:
    bob = new_page()  # type: ignore[operator]
    sign_in(bob, server, users[BOB])
    request_gpus(bob, "a100", 1, 2)
    expect(bob.locator("#cuda-line")).to_have_text(export(4, host="browserhost"))

    admin = new_page()  # type: ignore[operator]
    sign_in(admin, server, users[ADMIN])
    admin.get_by_role("link", name="Admin").click()
    row = admin.get_by_test_id("all-allocations").locator("tbody tr").filter(has_text=BOB)
    expect(row).to_have_count(1)
    row.get_by_role("button", name=f"Release GPU 4 of {BOB}").click()
    expect(admin.get_by_text(f"Released GPU 4 of {BOB}.")).to_be_visible()
    expect(admin.get_by_text("No GPU is allocated.")).to_be_visible()

    admin.get_by_role("link", name="Events log").click()
    admin.get_by_label("User").fill(BOB)
    admin.get_by_label("Kind").select_option("released")
    admin.get_by_role("button", name="Filter").click()
    logged = admin.get_by_test_id("events").locator("tbody tr")
    expect(logged).to_have_count(1)
    expect(logged).to_contain_text(f"of {BOB} released")
    expect(logged.locator('td[data-label="By"]')).to_have_text(ADMIN)

    bob.reload()
    expect(bob.get_by_text("You hold no GPUs right now.")).to_be_visible()
    expect(bob.get_by_test_id("unread-count")).to_have_text("2")


def test_it_fits_a_phone_and_follows_the_dark_system_setting(
    server: Server, browser: Browser, users: dict[str, TestUser]
) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark")
    context.set_default_timeout(15000)
    page = context.new_page()
    try:
        sign_in(page, server, users[ADMIN])
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(14, 17, 22)"
        for path in ("/", "/schedule", "/notifications", "/settings", "/admin/", "/admin/events"):
            page.goto(server.url + path)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, f"{path} is {width} px wide on a 390 px phone"
        page.goto(server.url + "/")
        page.keyboard.press("Tab")  # the first stop is the skip link, then the navigation
        assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    finally:
        context.close()
