"""An idle agent asks the database little (SPEC §10): steps that only find work after a
change skip their reads while the agent's change count stands still, steps of related
periods run in the same tick, and nobody on a GPU means no violation query. Real
databases; the change count is the agent's, set by hand where a test needs it still."""

from __future__ import annotations

import time

from gpulocker import allocations, queue, scheduler_step
from gpulocker.agent.loop import Agent
from gpulocker.agent.steps import FunctionStep
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.models import GRANTED, WAITING
from gpulocker.notify import outbox
from tests.helpers import ALICE, CAROL


def still(agent: Agent, count: int) -> None:
    """Make the agent say it heard `count` changes (as its wake thread would)."""
    agent.change_count = lambda: count  # type: ignore[method-assign]


def test_the_outbox_looks_only_when_the_change_count_moves(ctx: Context, db: Database) -> None:
    agent = Agent(ctx)
    step = outbox.OutboxStep()
    still(agent, 1)
    assert step.run(agent) is False  # nothing queued
    with db.transaction() as session:
        outbox.queue(session, "url", "http://127.0.0.1:9/", "test", "hello")
    assert step.run(agent) is False  # the count stands still: not even a read
    still(agent, 2)  # the new message moved it
    assert step.run(agent) is True
    assert step.worker.join(timeout=30)
    with db.transaction() as session:
        outbox.queue(session, "url", "http://127.0.0.1:7/", "test", "elsewhere")
    assert step.run(agent) is False  # the count stands still...
    step._recheck_at = time.monotonic()  # ...but RECHECK_SECONDS passed (retries come due)
    assert step.run(agent) is True
    assert step.worker.join(timeout=30)
    agent.close()


def test_the_scheduler_reads_nothing_while_the_change_count_stands_still(
    settings: Settings, db: Database
) -> None:
    agent = Agent(Context(settings))
    held = allocations.request(db, settings, CAROL, "a100", 2, 5)
    waiting = queue.submit(db, settings, ALICE, "a100", 1, 1)
    still(agent, 1)
    scheduler_step.scheduler_step(agent)
    allocations.release(db, settings, CAROL, held[0].id)
    assert scheduler_step.scheduler_step(agent) is False  # not heard yet
    assert queue.get(db, settings, ALICE, waiting.id).state == WAITING
    still(agent, 2)  # the release's event, heard
    assert scheduler_step.scheduler_step(agent) is True
    assert queue.get(db, settings, ALICE, waiting.id).state == GRANTED
    agent.close()


def test_no_process_on_any_gpu_means_no_violation_query(ctx: Context) -> None:
    agent = Agent(ctx)
    agent.tick(force=True)
    assert all(not s.processes for s in agent.samples.values())
    step = agent.step("violations")
    broken = ctx.db.session

    def no_reads() -> object:
        raise AssertionError("the violations step read the database")

    ctx.db.session = no_reads  # type: ignore[method-assign]
    try:
        assert step.run(agent) is False
    finally:
        ctx.db.session = broken  # type: ignore[method-assign]
    agent.close()


def test_steps_of_related_periods_run_in_the_same_ticks(ctx: Context) -> None:
    runs: dict[str, int] = {"one": 0, "two": 0, "half": 0}

    def step(name: str, period: float) -> FunctionStep:
        def run(_view: object) -> bool:
            runs[name] += 1
            time.sleep(0.01)  # a step takes time; the next one must not drift behind
            return False

        return FunctionStep(name, run, lambda settings: period)

    agent = Agent(ctx, steps=[step("half", 0.25), step("one", 0.5), step("two", 0.5)])
    agent.tick(force=True)
    assert agent._due["one"] == agent._due["two"] == agent._due["half"] + 0.25
    ticks = 0
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        time.sleep(max(agent.seconds_to_next_step(), 0.001))
        agent.tick()
        ticks += 1
    # Every other "half" tick also runs both 0.5 s steps: no tick of their own.
    assert runs["one"] == runs["two"]
    assert ticks <= runs["half"] + 1
    agent.close()
