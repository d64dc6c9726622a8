"""Regenerate docs/screenshots/: the dashboard, schedule, calendar and admin pages at
desktop and phone width (`make screenshots`). `--all DIR` also saves the other pages and dark mode
to DIR, for checking the look of every page.

It runs the real product (`python -m gpulocker serve --simulate`) on a free port with a
fresh state directory seeded with demo data: a few allocations, a week of utilization
history, a lockout, notifications, live load on the simulated GPUs, two requests waiting in
line and bookings in the coming days. The demo users
need no Linux accounts: the script signs them in by creating their web session the way
a PAM sign-in does (a server-side session token in the signed session cookie).
"""

from __future__ import annotations

import contextlib
import math
import os
import pwd
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

from playwright.sync_api import Browser, BrowserContext, sync_playwright

from gpulocker import allocations, lockouts, queue, reservations, tokens
from gpulocker.config import Settings, load_settings, simulated_gpu_config
from gpulocker.context import Context, open_context
from gpulocker.gpus.simulated import SimulatedBackend, write_load
from gpulocker.inventory import register, types_from_config
from gpulocker.models import GpuSample, utcnow
from gpulocker.notify import admin_message
from gpulocker.web import create_app

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "screenshots"
SIMULATE = '{"4090": 4, "a100": 2}'
HOST = "gpu-server-1"
USER, ADMIN = "alice", "admin"
SECRET = secrets.token_hex(16)  # one per run: the cookies made here die with the server
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
VIEWPORTS = {"desktop": (1280, 860), "phone": (390, 844)}
# (GPU, utilization %, memory used MiB) now, for the GPUs that are busy.
LIVE_LOAD = {0: (87, 19800), 1: (64, 15200), 3: (12, 2100), 4: (96, 71000)}


def free_port() -> int:
    """A port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def environment(base: Path) -> dict[str, str]:
    """The server's configuration: everything in a fresh directory, simulated GPUs."""
    (base / "dev").mkdir(mode=0o755, parents=True)
    (base / "demo.env").write_text("# screenshots: everything is set in the environment\n")
    env = {
        **os.environ,
        "GPULOCKER_ENV_FILE": str(base / "demo.env"),
        "STATE_DIR": str(base / "state"),
        "DEVICE_DIR": str(base / "dev"),
        "GPU_HOST": HOST,
        "PRIVILEGED_USERS": ADMIN,
        "SECRET_KEY": SECRET,
        "GPUs_STATUS_REFRESH_RATE_SECONDS": "1",
        "LOG_LEVEL": "WARNING",
    }
    for key in ("DATABASE_URL", "REDIS_URL", "REDIS_HOST", "GPU_CONFIG"):
        env.pop(key, None)
    return env


def settings_for(env: dict[str, str]) -> Settings:
    """The same settings the server will read."""
    settings = load_settings(env, env["GPULOCKER_ENV_FILE"])
    return settings.with_overrides(
        gpu_backend="simulated", gpu_config=simulated_gpu_config(SIMULATE)
    )


def seed(ctx: Context) -> None:
    """Demo data: allocations, a week of history, a lockout, messages, live load."""
    settings = ctx.settings
    backend = SimulatedBackend(settings.gpu_config, settings.device_path, HOST)
    with ctx.db.transaction() as session:
        register(session, HOST, types_from_config(settings.gpu_config, backend.inventory()))
    held = allocations.request(ctx.db, settings, USER, "4090", 2, 6)
    held += allocations.request(ctx.db, settings, "bob", "a100", 1, 40)
    held += allocations.request(ctx.db, settings, "carol", "4090", gpu_ids=[3], hours=0.75)
    with ctx.db.transaction() as session:  # the demo users have no accounts for real ACLs
        for row in held:
            allocations.mark_access_applied(session, row.id)
    held += allocations.request(ctx.db, settings, "frank", "a100", gpu_ids=[5], hours=10)
    (done,) = allocations.request(ctx.db, settings, "dave", "4090", gpu_ids=[2], hours=1)
    allocations.release(ctx.db, settings, "dave", done.id)
    seed_schedule(ctx)
    with ctx.db.transaction() as session:
        lockouts.lock_out(session, settings, "erin", "used GPU 5 without holding it", "agent")
    admin_message(
        ctx.db, settings, ADMIN, USER, "The server reboots Sunday 08:00 UTC for a driver update."
    )
    seed_history(ctx)
    for gpu_id, (util, mem) in LIVE_LOAD.items():
        write_load(settings.device_path, gpu_id, util, mem)


def seed_schedule(ctx: Context) -> None:
    """Both a100 are taken: carol, then alice wait in line; bookings in the coming days."""
    settings = ctx.settings
    queue.submit(ctx.db, settings, "carol", "a100", 1, 12)
    queue.submit(ctx.db, settings, USER, "a100", 1, 8)
    day = (utcnow() + timedelta(days=1)).replace(hour=9, minute=0, second=0, microsecond=0)
    reservations.book(ctx.db, settings, USER, "4090", 2, day, 8)
    reservations.book(ctx.db, settings, "bob", "a100", 2, day + timedelta(days=2), 30)
    reservations.book(ctx.db, settings, "dave", "4090", 1, day + timedelta(days=3, hours=4), 48)


def seed_history(ctx: Context) -> None:
    """Seven days of samples every 10 minutes: busy days, quiet nights, some idle GPUs."""
    rng = random.Random(6)
    now = utcnow()
    totals = {0: 24564, 1: 24564, 2: 24564, 3: 24564, 4: 81920, 5: 81920}
    rows = []
    steps = 7 * 24 * 6
    for gpu_id, total in totals.items():
        busy = {0: 0.8, 1: 0.6, 2: 0.3, 3: 0.25, 4: 0.9, 5: 0.1}[gpu_id]
        level = 0.0
        for step in range(steps):
            at = now - timedelta(minutes=10 * (steps - step))
            daytime = 0.5 + 0.5 * math.sin((at.hour - 8) / 24 * 2 * math.pi)
            target = 100 * busy * (0.4 + 0.6 * daytime) if rng.random() < busy + 0.1 else 0
            level = 0.7 * level + 0.3 * target
            util = max(0.0, min(100.0, level + rng.uniform(-6, 6)))
            mem = total * min(0.95, 0.15 + util / 110) if util > 2 else 0.0
            rows.append(
                GpuSample(host=HOST, gpu_id=gpu_id, at=at, utilization=util, memory_used_mib=mem)
            )
    with ctx.db.transaction() as session:
        session.add_all(rows)


@contextlib.contextmanager
def demo_accounts(names: tuple[str, ...]) -> Iterator[None]:
    """The signed-in demo users as real (password-less, no-login) accounts while it runs:
    a session only counts while its Linux account stands (SPEC section 12). Accounts made
    here are removed afterwards; existing ones are left alone."""
    made = []
    try:
        for name in names:
            try:
                pwd.getpwnam(name)
                continue
            except KeyError:
                pass
            if os.geteuid() != 0:
                raise SystemExit(f"the demo user {name!r} has no account: run as root")
            shell = ["--shell", "/usr/sbin/nologin", "--no-create-home", "--system"]
            subprocess.run(["useradd", *shell, name], check=True, capture_output=True)
            made.append(name)
            subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)
        yield
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=False, capture_output=True)


def session_cookie(ctx: Context, user: str) -> dict[str, str]:
    """A signed session cookie for `user`, as `login_user` would set it after PAM."""
    _row, raw = tokens.create(
        ctx.db, user, "screenshots", kind=tokens.WEB, hours=tokens.WEB_SESSION_HOURS
    )
    app = create_app(ctx=ctx)
    serializer = app.session_interface.get_signing_serializer(app)  # type: ignore[attr-defined]
    value = serializer.dumps({"token": raw, "user": user, "csrf_token": "screenshots"})
    return {"name": app.config["SESSION_COOKIE_NAME"], "value": value}


def start_server(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """`gpulocker serve --simulate` and wait until it answers."""
    command = [sys.executable, "-m", "gpulocker", "serve", "--simulate", SIMULATE]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=2):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"the server did not come up:\n{log.read_text()[-3000:]}")


def shoot(
    browser: Browser,
    url: str,
    cookie: dict[str, str] | None,
    name: str,
    path: str,
    out: Path = OUT,
    scheme: str = "light",
) -> None:
    """Save `name`-desktop.png and `name`-phone.png of one page (`name`-dark-… in dark)."""
    suffix = "-dark" if scheme == "dark" else ""
    for size, (width, height) in VIEWPORTS.items():
        context: BrowserContext = browser.new_context(
            viewport={"width": width, "height": height},
            color_scheme="dark" if scheme == "dark" else "light",
            device_scale_factor=1 if size == "desktop" else 2,
        )
        if cookie is not None:
            context.add_cookies([{**cookie, "url": url}])
        page = context.new_page()
        page.goto(url + path)
        if name == "schedule":
            page.wait_for_selector("[data-chart] canvas")
            for button in page.locator('button[data-hours="24"]').all():
                button.click()
            page.wait_for_timeout(1500)
        target = out / f"{name}{suffix}-{size}.png"
        page.screenshot(path=str(target), full_page=True)
        print(f"wrote {target}")
        context.close()


def extra_pages(browser: Browser, url: str, ctx: Context, out: Path) -> None:
    """With --all DIR: the other pages too, and dark mode (for checking, not committed)."""
    out.mkdir(parents=True, exist_ok=True)
    user, admin = session_cookie(ctx, USER), session_cookie(ctx, ADMIN)
    shoot(browser, url, None, "login", "/login", out)
    for name, path in (("notifications", "/notifications"), ("settings", "/settings")):
        shoot(browser, url, user, name, path, out)
    shoot(browser, url, user, "schedule", "/schedule", out, "dark")
    shoot(browser, url, user, "dashboard", "/", out, "dark")
    shoot(browser, url, user, "calendar", "/calendar", out, "dark")
    shoot(browser, url, admin, "calendar-admin", "/calendar?days=3", out)
    for name, path in (("events", "/admin/events"), ("reset", "/admin/reset")):
        shoot(browser, url, admin, name, path, out)
    shoot(browser, url, admin, "admin", "/admin/", out, "dark")


def main() -> None:
    """Seed, serve, sign in, photograph, clean up."""
    extra = Path(sys.argv[sys.argv.index("--all") + 1]) if "--all" in sys.argv else None
    base = Path(tempfile.mkdtemp(prefix="gpulocker-screenshots-", dir="/tmp"))
    base.chmod(0o755)
    env = environment(base)
    ctx = open_context(settings_for(env))
    try:
        with demo_accounts((USER, ADMIN)):
            photograph(ctx, env, base, extra)
    finally:
        ctx.close()
        shutil.rmtree(base, ignore_errors=True)


def photograph(ctx: Context, env: dict[str, str], base: Path, extra: Path | None) -> None:
    """Seed, serve, sign in and save the pictures."""
    proc = None
    try:
        seed(ctx)
        port = free_port()
        proc = start_server(env, port, base / "server.log")
        time.sleep(3)  # the agent publishes its first live samples
        url = f"http://127.0.0.1:{port}"
        OUT.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
            )
            user_cookie = session_cookie(ctx, USER)
            shoot(browser, url, user_cookie, "dashboard", "/")
            shoot(browser, url, user_cookie, "schedule", "/schedule")
            shoot(browser, url, user_cookie, "calendar", "/calendar")
            shoot(browser, url, session_cookie(ctx, ADMIN), "admin", "/admin/")
            if extra is not None:
                extra_pages(browser, url, ctx, extra)
            browser.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
