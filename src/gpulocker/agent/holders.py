"""Who holds a managed GPU, found by what they hold (SPEC §13).

A sample's processes are what the backend reports (NVML's compute, graphics and MPS
lists; nvidia-smi's table) united with one sweep of every open descriptor on the host
whose device number (or, for the simulated GPUs' regular files, filesystem and inode) is
a managed GPU's. So a process that only holds `/dev/nvidiaN` open -- no CUDA context,
opened through a bind mount, a hard link or a descriptor handed down -- is a holder too.
Revoke and the violation check both read holders from here.

The agent samples with a `procfs.DescriptorSweep` (`sweep_for`): each sample looks at the
processes that are new since the last one, those that held a managed GPU at their last
look, and a slice of the rest, so a descriptor-only holder is found within one round of
`slices` samples (at least SWEEP_ROUND_SECONDS of them) and a new one at the next sample;
NVML's own lists are read whole every sample. Revoke (`holding`) sweeps every process.

IGNORED_PROCESSES matches are marked `ignored`: still shown, never punished, never
counted as anyone's activity.
"""

from __future__ import annotations

from dataclasses import replace

from gpulocker import ignored, procfs
from gpulocker.config import Settings
from gpulocker.gpus import GpuProcess, GpuSample


def sweep_for(settings: Settings) -> procfs.DescriptorSweep:
    """The agent's sweep: a round spans at least SWEEP_ROUND_SECONDS of samples."""
    period = max(settings.gpus_status_refresh_rate_seconds, 1e-3)
    return procfs.DescriptorSweep(min_slices=max(1, int(procfs.SWEEP_ROUND_SECONDS // period)))


def unite(
    samples: list[GpuSample],
    devices: dict[int, str],
    settings: Settings,
    sweep: bool = True,
    sweeper: procfs.DescriptorSweep | None = None,
) -> list[GpuSample]:
    """Add descriptor holders missing from each sample and mark the ignored processes.
    `sweep` False when the backend's list already is the descriptor sweep (simulated);
    `sweeper` the agent's incremental sweep (None: one full sweep)."""
    held: dict[str, list[procfs.OpenFileHolder]] = {}
    if sweep:
        paths = devices.values()
        held = sweeper.sweep(paths) if sweeper else procfs.holders_by_device(paths)
    rules = ignored.parse(settings.ignored_processes)
    for sample in samples:
        path = devices.get(sample.index)
        listed = {p.pid for p in sample.processes}
        for holder in held.get(path, []) if path else []:
            if holder.pid not in listed:
                sample.processes.append(
                    GpuProcess(holder.pid, holder.uid, holder.user, 0.0, holder.name)
                )
                listed.add(holder.pid)
        sample.processes = [
            replace(p, ignored=True) if ignored.matches(rules, p.pid, p.uid, p.user, p.name) else p
            for p in sample.processes
        ]
    return samples


def holding(path: str, uid: int) -> list[int]:
    """Pids of `uid` holding the GPU file at `path` open, by whatever path (for revoke)."""
    return [h.pid for h in procfs.holders_by_device([path]).get(path, []) if h.uid == uid]
