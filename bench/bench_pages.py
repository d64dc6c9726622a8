"""What the HTML pages cost beside the JSON they are built from, in the same run.

The schedule page renders 8 GPU cards from the same snapshot `/api/gpu_status` returns;
the dashboard reads the user's allocations, type counts, lockout and inbox. Both are
requested through Flask's test client (no network, so only the app's own work is
measured) by a signed-in user, N times each, after a warm-up, on SQLite. Prints the mean
milliseconds per request and the ratio page / `/api/gpu_status` (the baseline).

Usage: python bench/bench_pages.py [--requests 300]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flask.testing import FlaskClient

from gpulocker import allocations, live, tokens
from gpulocker.config import Settings
from gpulocker.context import Context, open_context
from gpulocker.gpus.simulated import SimulatedBackend, write_load
from gpulocker.inventory import register, types_from_config
from gpulocker.web import create_app

GPUS = {"4090": [0, 1, 2, 3], "a100": [4, 5, 6, 7]}
USER = "benchuser"


def prepare(state: Path) -> Context:
    """8 simulated GPUs with live samples, 3 of them held by the user."""
    settings = Settings(
        state_dir=state,
        database_url=f"sqlite:///{state / 'gpulocker.db'}",
        gpu_backend="simulated",
        gpu_config=GPUS,
        gpu_host="benchhost",
        secret_key="bench",
        log_level="WARNING",
    )
    ctx = open_context(settings)
    backend = SimulatedBackend(GPUS, settings.device_path)
    with ctx.db.transaction() as session:
        register(session, "benchhost", types_from_config(GPUS, backend.inventory()))
    for gpu_id in range(8):
        write_load(settings.device_path, gpu_id, 10.0 * gpu_id, 1024.0 * gpu_id)
    live.publish(ctx, "benchhost", backend.sample())
    allocations.request(ctx.db, settings, USER, "4090", 2, 4)
    allocations.request(ctx.db, settings, USER, "a100", 1, 4)
    return ctx


def signed_in_client(ctx: Context) -> FlaskClient:
    """A test client carrying a web session of USER (as after a PAM sign-in)."""
    app = create_app(ctx=ctx)
    _row, raw = tokens.create(ctx.db, USER, "bench", kind=tokens.WEB, hours=1)
    client = app.test_client()
    with client.session_transaction() as session:
        session["token"], session["user"] = raw, USER
    return client


def mean_ms(client: FlaskClient, path: str, requests: int) -> float:
    """Mean time of one GET, after 20 warm-up requests."""
    for _ in range(20):
        assert client.get(path).status_code == 200, path
    start = time.perf_counter()
    for _ in range(requests):
        client.get(path)
    return (time.perf_counter() - start) * 1000 / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="gpulocker-bench-pages-"))
    ctx = prepare(state)
    try:
        client = signed_in_client(ctx)
        baseline = mean_ms(client, "/api/gpu_status", args.requests)
        print(f"/api/gpu_status (baseline): {baseline:6.2f} ms per request")
        for path in ("/schedule", "/", "/notifications"):
            page = mean_ms(client, path, args.requests)
            print(
                f"{path:26s}: {page:6.2f} ms per request, ratio to baseline {page / baseline:.2f}"
            )
    finally:
        ctx.close()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
