"""`/healthz` (can this process do its job?) and `/metrics` (Prometheus text format).

Request and refusal counters are kept in memory shared by every worker of one server:
the array is created before gunicorn forks its workers (`preload_app`), so one scrape
sees the whole server whichever worker answers it.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from typing import Any, Literal

from flask import Blueprint, Flask, Response, current_app
from sqlalchemy import func, select, text

from gpulocker import heartbeat, retention
from gpulocker import schemas as s
from gpulocker.db import Database
from gpulocker.models import STATES, Allocation, Gpu, utcnow
from gpulocker.notify import outbox
from gpulocker.web.errors import STATUS
from gpulocker.web.openapi import endpoint
from gpulocker.web.session import get_ctx

bp = Blueprint("health", __name__)


class HealthCheck(s.Out):
    ok: bool
    detail: str | None = None
    age_seconds: float | None = None


class OutboxHealth(s.Out):
    pending: int
    failed: int
    oldest_pending_seconds: float


class Health(s.Out):
    status: Literal["ok", "degraded", "failing"]
    database: HealthCheck
    redis: HealthCheck | None
    agents: dict[str, HealthCheck]
    notifications: OutboxHealth | None = None


STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
REFUSALS = tuple(sorted(set(STATUS) | {"other"}))
log = logging.getLogger(__name__)
_COUNTERS = "gpulocker.counters"
TABLE_ROWS_SECONDS = 30.0
_TABLE_ROWS: dict[str, tuple[float, tuple[dict[str, int], bool]]] = {}


class Counters:
    """Per-server counters in shared memory (safe across forked workers and threads)."""

    def __init__(self) -> None:
        self.names = [f"requests:{c}" for c in STATUS_CLASSES] + [f"refusals:{r}" for r in REFUSALS]
        self.index = {name: i for i, name in enumerate(self.names)}
        self.values = multiprocessing.Array("Q", len(self.names))

    def add(self, name: str) -> None:
        """Count one of `name`."""
        with self.values.get_lock():
            self.values[self.index[name]] += 1

    def snapshot(self) -> dict[str, int]:
        """Every counter's value now."""
        with self.values.get_lock():
            return {name: int(self.values[i]) for i, name in enumerate(self.names)}


def install_request_counter(app: Flask) -> None:
    """Count every answer by status class, and every API refusal by its code."""
    counters = Counters()
    app.extensions[_COUNTERS] = counters

    @app.after_request
    def count(response: Response) -> Response:
        counters.add(f"requests:{response.status_code // 100}xx")
        if 400 <= response.status_code < 500 and response.is_json:
            error = (response.get_json(silent=True) or {}).get("error") or {}
            code = error.get("code") if isinstance(error, dict) else None
            counters.add(f"refusals:{code if code in REFUSALS else 'other'}")
        return response


@endpoint(
    bp,
    "GET",
    "/healthz",
    auth="public",
    response=Health,
    errors=(503,),
    summary="Health: database, Redis (if configured), agent heartbeat age",
)
def healthz() -> Any:
    body = health_report()
    status = 200 if body["status"] != "failing" else 503
    response = current_app.json.response(body)
    response.status_code = status
    return response


def health_report() -> dict[str, Any]:
    """Database and Redis must answer (else failing); a stale agent is only degraded."""
    ctx = get_ctx()
    database = _check(_ping_database)
    client = ctx.redis
    redis = _check(client.ping) if client is not None else None
    agents: dict[str, dict[str, Any]] = {}
    if database["ok"]:
        with ctx.db.session() as session:
            for row in heartbeat.agents(session):
                age = (utcnow() - row.at).total_seconds()
                stale = heartbeat.is_stale(age, ctx.settings)
                agents[row.name.split(":", 1)[1]] = {
                    "ok": not stale,
                    "age_seconds": round(age, 3),
                    "detail": "no heartbeat lately" if stale else None,
                }
    notifications = outbox.stats(ctx.db) if database["ok"] else None
    failing = not database["ok"] or (redis is not None and not redis["ok"])
    degraded = not agents or not all(a["ok"] for a in agents.values())
    status = "failing" if failing else "degraded" if degraded else "ok"
    return {
        "status": status,
        "database": database,
        "redis": redis,
        "agents": agents,
        "notifications": notifications,
    }


def _ping_database() -> None:
    with get_ctx().db.session() as session:
        session.execute(text("SELECT 1"))


def _check(probe: Any) -> dict[str, Any]:
    try:
        probe()
    except Exception as exc:  # health reports any failure instead of failing itself
        # The text of a driver's error can carry host names, users or a URL's password, and
        # /healthz is anonymous: the log gets the text, the answer only the kind of failure.
        log.warning("health check %s failed: %s", getattr(probe, "__name__", probe), exc)
        return {"ok": False, "detail": f"{type(exc).__name__} (see the server log)"}
    return {"ok": True, "detail": None}


@endpoint(
    bp,
    "GET",
    "/metrics",
    auth="public",
    response=None,
    media_type="text/plain",
    summary="Prometheus metrics: GPUs by state, allocations, requests, refusals, agent tick, "
    "rows per table",
)
def metrics() -> Response:
    lines = _gauge_lines() + _counter_lines()
    body = "\n".join(lines) + "\n"
    return Response(body, mimetype="text/plain", headers={"Cache-Control": "no-store"})


def _gauge_lines() -> list[str]:
    ctx = get_ctx()
    lines = ["# HELP gpulocker_gpus Managed GPUs by state.", "# TYPE gpulocker_gpus gauge"]
    with ctx.db.session() as session:
        gpus = session.execute(select(Gpu.host, Gpu.gpu_id, Gpu.healthy, Gpu.error)).all()
        busy = set(
            session.execute(
                select(Allocation.host, Allocation.gpu_id).where(Allocation.state == "active")
            ).all()
        )
        by_state = session.execute(
            select(Allocation.state, func.count()).group_by(Allocation.state)
        ).all()
        beats = heartbeat.agents(session)
    states = {"free": 0, "allocated": 0, "unhealthy": 0}
    for host, gpu_id, healthy, error in gpus:
        if error == "not managed":
            continue
        key = "unhealthy" if not healthy else "allocated" if (host, gpu_id) in busy else "free"
        states[key] += 1
    lines += [f'gpulocker_gpus{{state="{k}"}} {v}' for k, v in states.items()]
    lines += [
        "# HELP gpulocker_allocations Allocations by state.",
        "# TYPE gpulocker_allocations gauge",
    ]
    counts = dict.fromkeys(STATES, 0)
    counts.update({state: int(n) for state, n in by_state})
    lines += [f'gpulocker_allocations{{state="{k}"}} {v}' for k, v in counts.items()]
    lines += _agent_lines(beats)
    lines += _outbox_lines(outbox.stats(ctx.db))
    lines += _table_lines(*_table_rows(ctx.db))
    return lines


def _table_rows(db: Database) -> tuple[dict[str, int], bool]:
    """retention.table_rows, kept TABLE_ROWS_SECONDS per process: on SQLite it counts, and
    counting 1.4 million rows took 52 ms here (/tmp/retention-measure.py in the note)."""
    now = time.monotonic()
    cached = _TABLE_ROWS.get(db.url)
    if cached is None or now - cached[0] > TABLE_ROWS_SECONDS:
        cached = _TABLE_ROWS[db.url] = (now, retention.table_rows(db))
    return cached[1]


def _table_lines(counts: dict[str, int], exact: bool) -> list[str]:
    """Rows per table, saying how they were counted (the retention settings bound them)."""
    how = (
        "exact, count(*)"
        if exact
        else "PostgreSQL's estimate, pg_stat_user_tables.n_live_tup: not a count, "
        "it follows commits within seconds"
    )
    return [
        f"# HELP gpulocker_table_rows Rows per database table ({how}).",
        "# TYPE gpulocker_table_rows gauge",
        *(f'gpulocker_table_rows{{table="{_label(t)}"}} {n}' for t, n in counts.items()),
    ]


def _outbox_lines(stats: dict[str, float | int]) -> list[str]:
    """Notifications waiting to go out, given up, and how long the oldest has waited."""
    return [
        "# HELP gpulocker_outbox_messages Outgoing notifications by state.",
        "# TYPE gpulocker_outbox_messages gauge",
        f'gpulocker_outbox_messages{{state="pending"}} {stats["pending"]}',
        f'gpulocker_outbox_messages{{state="failed"}} {stats["failed"]}',
        "# HELP gpulocker_outbox_oldest_pending_seconds Age of the oldest unsent notification.",
        "# TYPE gpulocker_outbox_oldest_pending_seconds gauge",
        f"gpulocker_outbox_oldest_pending_seconds {stats['oldest_pending_seconds']:.3f}",
    ]


def _agent_lines(beats: list[Any]) -> list[str]:
    lines = [
        "# HELP gpulocker_agent_tick_seconds Duration of the agent's last tick.",
        "# TYPE gpulocker_agent_tick_seconds gauge",
    ]
    ages = [
        "# HELP gpulocker_agent_heartbeat_age_seconds Seconds since the agent last beat.",
        "# TYPE gpulocker_agent_heartbeat_age_seconds gauge",
    ]
    now = utcnow()
    for row in beats:
        host = _label(row.name.split(":", 1)[1])
        tick_ms = (row.data or {}).get("tick_ms")
        if isinstance(tick_ms, int | float):
            lines.append(f'gpulocker_agent_tick_seconds{{host="{host}"}} {tick_ms / 1000:.6f}')
        ages.append(
            f'gpulocker_agent_heartbeat_age_seconds{{host="{host}"}} '
            f"{(now - row.at).total_seconds():.3f}"
        )
    return lines + ages


def _counter_lines() -> list[str]:
    counters: Counters = current_app.extensions[_COUNTERS]
    values = counters.snapshot()
    lines = [
        "# HELP gpulocker_http_requests_total HTTP answers by status class.",
        "# TYPE gpulocker_http_requests_total counter",
    ]
    lines += [
        f'gpulocker_http_requests_total{{status="{c}"}} {values[f"requests:{c}"]}'
        for c in STATUS_CLASSES
    ]
    lines += [
        "# HELP gpulocker_refusals_total API refusals by reason.",
        "# TYPE gpulocker_refusals_total counter",
    ]
    lines += [
        f'gpulocker_refusals_total{{reason="{r}"}} {values[f"refusals:{r}"]}' for r in REFUSALS
    ]
    return lines


def _label(value: str) -> str:
    """A Prometheus label value, escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
