"""/api/gpu_status throughput: the real app beside a minimal Flask app, same server settings.

Both run under gunicorn with 2 workers and GPULocker's worker settings (gthread, preload),
on loopback, loaded by wrk in the same run, five times each, alternating (the machine
may be shared, so the best of each is kept). The real app serves 8 simulated GPUs from
SQLite (live samples, inventory, holders; cached while nothing changed, see
gpulocker.web.status_cache); the baseline answers the very same JSON from memory. Prints
requests/s of both and their ratio (target >= 0.8), for an anonymous caller and for a
caller with a bearer token.

Usage: python bench/bench_gpu_status.py [--seconds 5] [--connections 16]
Needs `wrk` (Debian: apt-get install -y wrk).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gpulocker import allocations, live, tokens
from gpulocker.config import Settings
from gpulocker.context import open_context
from gpulocker.gpus.simulated import SimulatedBackend, write_load
from gpulocker.inventory import register, types_from_config
from gpulocker.web.server import run_web

WORKERS = 2
ROUNDS = 5  # alternating ours/baseline; the machine is shared, so keep the best of each
GPUS = {"4090": [0, 1, 2, 3], "a100": [4, 5, 6, 7]}


def bench_settings(state: Path, port: int) -> Settings:
    """The settings both servers run under (only the app differs)."""
    return Settings(
        host="127.0.0.1",
        port=port,
        state_dir=state,
        database_url=f"sqlite:///{state / 'gpulocker.db'}",
        gpu_backend="simulated",
        gpu_config=GPUS,
        gpu_host="benchhost",
        secret_key="bench",
        log_level="WARNING",
    )


def prepare(state: Path) -> str:
    """8 GPUs with live samples, 3 held; returns a bearer token."""
    ctx = open_context(bench_settings(state, 1))
    backend = SimulatedBackend(GPUS, ctx.settings.device_path)
    for gpu_id in range(8):
        write_load(ctx.settings.device_path, gpu_id, 10.0 * gpu_id, 512.0 * gpu_id, None)
    with ctx.db.transaction() as session:
        register(session, "benchhost", types_from_config(GPUS, backend.inventory()))
    live.publish(ctx, "benchhost", backend.sample())
    allocations.request(ctx.db, ctx.settings, "benchuser", "4090", 2, 4)
    allocations.request(ctx.db, ctx.settings, "otheruser", "a100", 1, 4)
    _row, raw = tokens.create(ctx.db, "benchuser", "bench")
    ctx.close()
    return raw


def serve_ours(state: Path, port: int) -> None:
    """Child process: the real app."""
    from gpulocker.web import create_app

    settings = bench_settings(state, port)
    run_web(settings, WORKERS, lambda: create_app(settings))


def serve_baseline(state: Path, port: int, body_file: Path) -> None:
    """Child process: a minimal Flask app answering the same JSON, same server settings."""
    from flask import Flask, jsonify

    data = json.loads(body_file.read_text())
    app = Flask("baseline")

    @app.get("/api/gpu_status")
    def gpu_status() -> Any:
        return jsonify(data)

    run_web(bench_settings(state, port), WORKERS, lambda: app)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start(mode: str, state: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    """Start a server child and wait until it answers."""
    proc = subprocess.Popen([sys.executable, __file__, mode, str(state), str(port), *extra])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/api/gpu_status", timeout=2).raise_for_status()
            return proc
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"{mode} server did not start")


def wrk(url: str, seconds: int, connections: int, token: str | None) -> float:
    """Requests per second wrk measured (fails loudly on errors or non-2xx answers)."""
    command = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    if token:
        command[1:1] = ["-H", f"Authorization: Bearer {token}"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw errors:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise SystemExit(f"cannot read wrk's output:\n{out}")
    return float(match.group(1))


def fetch(url: str, token: str | None) -> bytes:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = requests.get(url, headers=headers, timeout=5)
    answer.raise_for_status()
    return answer.content


def measure(args: argparse.Namespace) -> None:
    """Parent: prepare, run both servers, load each, print the figures."""
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")
    workdir = Path(tempfile.mkdtemp(prefix="gpulocker-bench-"))
    state = workdir / "state"
    token = prepare(state)
    ours_port, base_port = free_port(), free_port()
    ours = start("--serve-ours", state, ours_port)
    procs = [ours]
    try:
        for label, caller_token in (("anonymous", None), ("bearer token", token)):
            url = f"http://127.0.0.1:{ours_port}/api/gpu_status"
            body_file = workdir / "body.json"
            body_file.write_bytes(fetch(url, caller_token))
            assert len(json.loads(body_file.read_text())["gpus"]) == 8
            base = start("--serve-baseline", state, base_port, str(body_file))
            procs.append(base)
            base_url = f"http://127.0.0.1:{base_port}/api/gpu_status"
            ours_rps, base_rps = [], []
            for _round in range(ROUNDS):
                ours_rps.append(wrk(url, args.seconds, args.connections, caller_token))
                base_rps.append(wrk(base_url, args.seconds, args.connections, caller_token))
            base.terminate()
            base.wait(15)
            best_ours, best_base = max(ours_rps), max(base_rps)
            median_ratio = statistics.median(ours_rps) / statistics.median(base_rps)
            print(
                f"/api/gpu_status, 8 GPUs, {label}: GPULocker {best_ours:,.0f} req/s, "
                f"minimal Flask {best_base:,.0f} req/s, ratio {best_ours / best_base:.2f} "
                f"(ratio of medians {median_ratio:.2f}; runs: ours "
                f"{[round(r) for r in ours_rps]}, baseline {[round(r) for r in base_rps]})"
            )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(15)
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"server: gunicorn, {WORKERS} workers x gthread; wrk -t2 -c{args.connections} "
        f"-d{args.seconds}s on loopback; best of {ROUNDS} alternating runs each"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-ours":
        serve_ours(Path(sys.argv[2]), int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-baseline":
        serve_baseline(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    measure(parser.parse_args())


if __name__ == "__main__":
    main()
