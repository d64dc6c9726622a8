"""The agent's descriptor sweep, a slice of the processes per sample (SPEC §13): a holder is
found within one round whatever it does, a new one at the next sample; real processes
holding real files."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpulocker import procfs
from gpulocker.agent import holders
from gpulocker.agent.loop import Agent
from gpulocker.config import Settings
from gpulocker.context import Context


@pytest.fixture
def device(tmp_path: Path) -> str:
    path = tmp_path / "nvidia0"
    path.touch()
    os.link(path, tmp_path / "card0")  # a second name for the same file
    return str(path)


class LateOpener:
    """A process that opens a file only when told, long after it started, and closes it
    when told again: the sweep cannot know it as a new process."""

    def __init__(self, path: str) -> None:
        code = (
            "import os, sys\n"
            "sys.stdin.readline(); fd = os.open(sys.argv[1], os.O_RDONLY); print(1, flush=True)\n"
            "sys.stdin.readline(); os.close(fd); print(2, flush=True)\n"
            "sys.stdin.readline()\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid

    def step(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip()

    def end(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def late(device: str) -> Iterator[LateOpener]:
    opener = LateOpener(str(Path(device).parent / "card0"))
    yield opener
    opener.end()


def found(sweep: procfs.DescriptorSweep, device: str) -> set[int]:
    return {h.pid for h in sweep.sweep([device])[device]}


def test_a_process_that_opens_the_gpu_later_is_found_within_one_round(
    device: str, late: LateOpener
) -> None:
    sweep = procfs.DescriptorSweep(min_slices=4, per_sample=10**6)
    assert found(sweep, device) == set()  # the first sample looks at every process
    late.step()  # opens it now, through the other name
    calls = 0
    while late.pid not in found(sweep, device):
        calls += 1
        assert calls < sweep.slices, "not found within one round"
    # It was found in its own slice (pid modulo 4), not by luck of a full look.
    assert sweep.slices == 4
    assert sweep.looked < len(procfs._pids())
    # A known holder is looked at every sample, in or out of its slice...
    assert all(late.pid in found(sweep, device) for _ in range(sweep.slices))
    late.step()  # ...so it drops out at the next sample once it closed the file
    assert late.pid not in found(sweep, device)


def test_every_round_sees_what_one_full_sweep_sees(device: str, late: LateOpener) -> None:
    late.step()
    sweep = procfs.DescriptorSweep(min_slices=3, per_sample=10**6)
    sweep.sweep([device])
    seen: set[int] = set()
    for _ in range(sweep.slices):
        seen |= found(sweep, device)
    full = {h.pid for h in procfs.holders_by_device([device])[device]}
    assert seen == full == {late.pid}


def test_a_new_process_is_found_at_the_next_sample(device: str) -> None:
    sweep = procfs.DescriptorSweep(min_slices=50, per_sample=10**6)
    found(sweep, device)
    found(sweep, device)  # past the first, full, look
    with open(device, "rb") as handle:
        child = subprocess.Popen(["sleep", "60"], stdin=handle)
    try:
        assert child.pid in found(sweep, device)
    finally:
        child.kill()
        child.wait()


def test_a_busy_host_gets_more_slices_at_the_next_round(device: str) -> None:
    sweep = procfs.DescriptorSweep(min_slices=2, per_sample=5)
    sweep.sweep([device])
    sweep.sweep([device])  # a round starts: its length is chosen now
    processes = len(procfs._pids())
    assert sweep.slices == max(2, -(-processes // 5))
    assert sweep.looked <= -(-processes // sweep.slices) * 2 + 2


def test_the_agent_sweeps_in_rounds_of_ten_seconds(ctx: Context, settings: Settings) -> None:
    assert holders.sweep_for(settings).min_slices == 5  # 2 s samples
    slow = settings.with_overrides(gpus_status_refresh_rate_seconds=30.0)
    assert holders.sweep_for(slow).min_slices == 1  # every sample looks at everything
    agent = Agent(ctx)
    assert agent.backend.sweep is agent.sweep  # type: ignore[attr-defined]
    agent.tick(force=True)
    assert agent.status()["sweep_slices"] == agent.sweep.slices
    agent.close()
