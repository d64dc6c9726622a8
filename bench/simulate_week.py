"""A synthetic week on 8 GPUs and 40 users: first come first served against GPULocker.

Seeded (`--seed`, default 1) and deterministic. Demand: 36 light users send a few 1-2
GPU jobs of 1-8 hours spread over the week; 4 heavy users send 2-4 GPU jobs of 12-48 hours,
most of them in the first day. In all about 120 % of the week's GPU-hours is asked for,
so there is a line. Every job asks to wait at most QUEUE_MAX_WAIT_HOURS (24) and then
gives up; a granted job holds its GPUs for the hours it asked for.

Two policies on the same jobs, event by event (an arrival, an end, a wait running out):

- FCFS: the line in arrival order; the first job that does not fit blocks the others.
- GPULocker: the order and the backfill rule of scheduler.serve_queue, with its own code:
  queue.order_key (aging after QUEUE_AGING_HOURS, then fair-share usage, then age),
  fairshare.weighted_hours (decayed GPU-hours, FAIRSHARE_HALF_LIFE_HOURS) and
  capacity.HostPlan (fits, and the sure start a backfill must end before). The database
  and the transactions around them are left out; this is a model of the pass, not a run
  of the agent.

Arrivals stop at the week's end; the simulation goes on until the line is empty. Printed
per policy: GPU utilization within the week and until the line is empty (a policy that
serves long jobs later pushes some of their hours past the week, which the first figure
counts as lost), mean and p95 wait of granted jobs, jobs that gave up, and Jain's fairness
index of the GPU-hours each user received.

    .venv/bin/python bench/simulate_week.py [--seed N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from gpulocker import queue
from gpulocker.capacity import HostPlan
from gpulocker.fairshare import weighted_hours

GPUS = 8
WEEK_H = 168.0
MAX_WAIT_H = 24.0
AGING_H = 12.0
HALF_LIFE_H = 168.0
T0 = datetime(2026, 1, 5, tzinfo=UTC)


@dataclass
class Job:
    id: int
    user: str
    count: int
    hours: float
    submit: float  # hours since T0
    start: float | None = None
    gave_up: bool = False

    @property
    def created_at(self) -> datetime:
        return T0 + timedelta(hours=self.submit)


def demand(seed: int) -> list[Job]:
    rng = random.Random(seed)
    jobs: list[Job] = []
    for u in range(40):
        heavy = u < 4
        user = f"{'heavy' if heavy else 'user'}{u:02d}"
        for _ in range(rng.randint(3, 5) if heavy else rng.randint(2, 4)):
            if heavy:
                job = (rng.choice((2, 3, 4)), rng.choice((12, 24, 36, 48)), rng.uniform(0, 30))
            else:
                job = (rng.choice((1, 1, 2)), rng.choice((1, 2, 4, 6, 8)), rng.uniform(0, 160))
            jobs.append(Job(0, user, job[0], float(job[1]), job[2]))
    jobs.sort(key=lambda j: j.submit)
    for i, job in enumerate(jobs):
        job.id = i
    return jobs


@dataclass
class Cluster:
    running: list[tuple[float, int, Job]] = field(default_factory=list)  # (end, count, job)

    def free(self) -> int:
        return GPUS - sum(c for _e, c, _j in self.running)

    def plan(self, now: float) -> HostPlan:
        ends = [T0 + timedelta(hours=e) for e, c, _j in self.running for _ in range(c)]
        return HostPlan("sim", GPUS, cast(Any, [None] * self.free()), ends)


def usage_of(history: list[Job], now: float) -> dict[str, float]:
    at = T0 + timedelta(hours=now)
    totals: dict[str, float] = {}
    for job in history:
        assert job.start is not None
        start = T0 + timedelta(hours=job.start)
        end = start + timedelta(hours=job.hours)
        totals[job.user] = totals.get(job.user, 0.0) + job.count * weighted_hours(
            start, end, at, HALF_LIFE_H
        )
    return totals


def simulate(jobs: list[Job], policy: str) -> list[Job]:
    jobs = [Job(j.id, j.user, j.count, j.hours, j.submit) for j in jobs]
    cluster = Cluster()
    waiting: list[Job] = []
    started: list[Job] = []
    moments = sorted({j.submit for j in jobs} | {j.submit + MAX_WAIT_H for j in jobs})
    arrivals = iter(jobs)
    pending = next(arrivals, None)
    now = 0.0
    while now < WEEK_H or waiting or cluster.running or pending is not None:
        cluster.running = [r for r in cluster.running if r[0] > now]
        while pending is not None and pending.submit <= now:
            waiting.append(pending)
            pending = next(arrivals, None)
        for job in [j for j in waiting if now - j.submit >= MAX_WAIT_H]:
            job.gave_up = True
            waiting.remove(job)
        if policy == "fcfs":
            line = sorted(waiting, key=lambda j: (j.submit, j.id))
        else:
            usage = usage_of(started, now)
            at = T0 + timedelta(hours=now)
            line = sorted(waiting, key=lambda j: queue.order_key(j, usage, at, AGING_H))
        blocked: list[Job] = []
        for job in line:
            if policy == "fcfs":
                if blocked or job.count > cluster.free():
                    blocked.append(job)
                    continue
            else:
                plan = cluster.plan(now)
                at = T0 + timedelta(hours=now)
                if job.count > cluster.free():
                    blocked.append(job)
                    continue
                end = at + timedelta(hours=job.hours)
                sure = [plan.earliest(at, b.hours, b.count) for b in blocked]
                known = [s for s in sure if s is not None]
                if known and end > min(known):
                    continue
            job.start = now
            cluster.running.append((now + job.hours, job.count, job))
            started.append(job)
            waiting.remove(job)
        ends = [e for e, _c, _j in cluster.running if e > now]
        future = [m for m in moments if m > now] + ends + ([WEEK_H] if now < WEEK_H else [])
        if not future:
            break
        now = min(future)
    return jobs


def report(policy: str, jobs: list[Job]) -> dict[str, float]:
    users = sorted({j.user for j in jobs})
    got = dict.fromkeys(users, 0.0)
    used = 0.0
    served = 0.0
    last_end = WEEK_H
    waits = []
    for job in jobs:
        if job.start is None:
            continue
        hours = max(0.0, min(job.start + job.hours, WEEK_H) - job.start)
        got[job.user] += job.count * job.hours
        used += job.count * hours
        served += job.count * job.hours
        last_end = max(last_end, job.start + job.hours)
        waits.append(job.start - job.submit)
    values = list(got.values())
    jain = sum(values) ** 2 / (len(values) * sum(v * v for v in values))
    waits.sort()
    p95 = waits[min(len(waits) - 1, round(0.95 * (len(waits) - 1)))]
    result = {
        "utilization": 100 * used / (GPUS * WEEK_H),
        "drained": 100 * served / (GPUS * last_end),
        "mean_wait": statistics.fmean(waits),
        "p95_wait": p95,
        "gave_up": sum(j.gave_up for j in jobs),
        "jain": jain,
    }
    print(
        f"  {policy:<10} utilization {result['utilization']:5.1f} % in the week, "
        f"{result['drained']:5.1f} % until the line is empty   wait mean "
        f"{result['mean_wait']:5.2f} h  p95 {result['p95_wait']:5.2f} h   gave up "
        f"{result['gave_up']:3.0f}   Jain's index {result['jain']:.3f}"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    jobs = demand(args.seed)
    asked = sum(j.count * j.hours for j in jobs)
    print(
        f"seed {args.seed}: {len(jobs)} jobs of 40 users on {GPUS} GPUs, "
        f"{asked:.0f} GPU-hours asked in a week of {GPUS * WEEK_H:.0f} ({100 * asked / (GPUS * WEEK_H):.0f} %)"
    )
    fcfs = report("FCFS", simulate(jobs, "fcfs"))
    fair = report("GPULocker", simulate(jobs, "gpulocker"))
    raised = fair["jain"] > fcfs["jain"]
    cost = fcfs["utilization"] - fair["utilization"]
    drained = fcfs["drained"] - fair["drained"]
    print(
        f"  fairness raised: {'yes' if raised else 'NO'}; utilization cost {cost:+.1f} points "
        f"in the week, {drained:+.1f} until the line is empty (at most 2 allowed): "
        f"{'met' if raised and max(cost, drained) <= 2 else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
