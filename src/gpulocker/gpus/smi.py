"""The fallback backend: the same readings as `nvml`, parsed from `nvidia-smi` output.

Used when NVML cannot load but `nvidia-smi` exists. Inventory: `--query-gpu` plus the minor
numbers from `nvidia-smi -q` (there is no query field for them), read once. A sample: two
processes, `--query-gpu` for the readings and `--query-compute-apps` for the processes,
both `--format=csv,noheader,nounits`.

nvidia-smi writes what NVML could not give in brackets. `[N/A]`, `[Not Supported]` and
`[Insufficient Permissions]` make that field None (as NotSupported does in the nvml
backend); any other bracketed value (`[GPU is lost]`, `[Unknown Error]`, `[GPU requires
reset]`) fails that GPU's sample. A GPU nvidia-smi skips ("Unable to determine the device
handle for GPU ...: GPU is lost") is left out at start and fails its samples later.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from gpulocker.gpus import BackendUnavailable, GpuInfo, GpuSample
from gpulocker.gpus.nvml import bus_id_text, owned_processes
from gpulocker.models import utcnow

log = logging.getLogger(__name__)

INVENTORY_FIELDS = "index,name,uuid,pci.bus_id,memory.total,mig.mode.current,driver_version"
SAMPLE_FIELDS = (
    "index,pci.bus_id,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw"
)
APPS_FIELDS = "gpu_bus_id,pid,used_memory,process_name"
FORMAT = "--format=csv,noheader,nounits"
FIELD_GAPS = {"[n/a]", "n/a", "[not supported]", "[insufficient permissions]", ""}
TIMEOUT_SECONDS = 30.0
_BUS_ID = r"([0-9A-Fa-f]+:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f])"
_GPU_HEADER = re.compile(rf"^GPU {_BUS_ID}\s*$")
_MINOR = re.compile(r"^\s+Minor Number\s*:\s*(\S+)")
_SKIPPED = re.compile(rf"device handle for GPU\s*{_BUS_ID}:\s*(.+)$")


class GpuFailed(Exception):
    """A bracketed value that means the GPU itself failed, e.g. `[GPU is lost]`."""


@dataclass(frozen=True)
class SmiResult:
    """What one nvidia-smi call printed: its lines, and what went wrong if anything."""

    lines: list[str]
    returncode: int
    stderr: str

    def skipped(self) -> dict[str, str]:
        """GPUs nvidia-smi could not open, by bus id, with its reason."""
        found = {}
        for line in self.stderr.splitlines():
            match = _SKIPPED.search(line)
            if match:
                found[bus_id_text(match.group(1))] = " ".join(match.group(2).split())
        return found

    def failure(self) -> str:
        """One line saying why the call gave nothing."""
        text = (self.stderr.strip() or "\n".join(self.lines)).splitlines()
        return text[0] if text else f"nvidia-smi exited with status {self.returncode}"


def value(raw: str) -> str | None:
    """A field's text; None for a field the GPU cannot report; GpuFailed for a failed GPU."""
    text = raw.strip()
    if text.lower() in FIELD_GAPS:
        return None
    if text.startswith("[") and text.endswith("]"):
        raise GpuFailed(text[1:-1])
    return text


def number(raw: str) -> float | None:
    """A numeric field (units already stripped by `nounits`)."""
    text = value(raw)
    return float(text) if text is not None else None


def parse_minors(text: str) -> dict[str, int]:
    """Bus id -> minor number, from `nvidia-smi -q` (the first "Minor Number" of each GPU)."""
    minors: dict[str, int] = {}
    current: str | None = None
    for line in text.splitlines():
        header = _GPU_HEADER.match(line)
        if header:
            current = bus_id_text(header.group(1))
            continue
        match = _MINOR.match(line)
        if match and current and current not in minors and match.group(1).isdigit():
            minors[current] = int(match.group(1))
    return minors


class SmiBackend:
    """Every NVIDIA GPU of this host, read by running nvidia-smi."""

    name = "smi"

    def __init__(self, device_dir: Path, fallback_reason: str | None = None) -> None:
        self.device_dir = Path(device_dir)
        self.fallback_reason = fallback_reason
        found = shutil.which("nvidia-smi")
        if found is None:
            raise BackendUnavailable("nvidia-smi is not on PATH")
        self.executable = found
        self.problems: list[str] = []
        self.driver_version: str | None = None
        self._inventory = self._read_inventory()
        self._bus_to_index = {g.pci_bus_id: g.index for g in self._inventory}

    def _run(self, *args: str) -> SmiResult:
        try:
            proc = subprocess.run(
                [self.executable, *args],
                capture_output=True,
                text=True,
                timeout=TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return SmiResult([], -1, f"nvidia-smi did not answer within {TIMEOUT_SECONDS:g} s")
        except OSError as exc:
            return SmiResult([], -1, f"nvidia-smi cannot run: {exc}")
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        return SmiResult(lines, proc.returncode, proc.stderr)

    def _query(self, option: str, fields: str) -> SmiResult:
        return self._run(f"--{option}={fields}", FORMAT)

    def _read_inventory(self) -> list[GpuInfo]:
        result = self._query("query-gpu", INVENTORY_FIELDS)
        rows = [line.split(", ") for line in result.lines]
        rows = [row for row in rows if len(row) == 7 and row[0].strip().isdigit()]
        if not rows:
            raise BackendUnavailable(f"nvidia-smi found no GPU: {result.failure()}")
        for bus_id, reason in result.skipped().items():
            self._problem(f"GPU {bus_id}: {reason}; it is not managed")
        minors = parse_minors("\n".join(self._run("-q").lines))
        gpus = []
        for row in rows:
            info = self._describe(row, minors)
            if info is not None:
                gpus.append(info)
        return sorted(gpus, key=lambda g: g.index)

    def _problem(self, message: str) -> None:
        log.error("%s", message)
        self.problems.append(message)

    def _describe(self, row: list[str], minors: dict[str, int]) -> GpuInfo | None:
        index = int(row[0])
        try:
            bus_id = bus_id_text(value(row[3]) or "")
            name, uuid = value(row[1]), value(row[2])
            memory, mig = number(row[4]), value(row[5])
            self.driver_version = self.driver_version or value(row[6])
        except GpuFailed as exc:
            self._problem(f"GPU {index}: {exc}; it is not managed")
            return None
        minor = minors.get(bus_id)
        if minor is None:
            self._problem(f"GPU {index}: nvidia-smi -q gives no minor number; it is not managed")
            return None
        return GpuInfo(
            index=index,
            name=name or "unknown",
            minor=minor,
            device=str(self.device_dir / f"nvidia{minor}"),
            memory_total_mib=int(memory or 0),
            uuid=uuid,
            pci_bus_id=bus_id,
            mig=(mig or "").lower() == "enabled",
        )

    def inventory(self) -> list[GpuInfo]:
        """The GPUs found at start (read once: `nvidia-smi -q` is slow)."""
        return list(self._inventory)

    def sample(self) -> list[GpuSample]:
        """Two nvidia-smi calls for all GPUs; each GPU's failure stays in its own sample."""
        now = utcnow()
        readings = self._query("query-gpu", SAMPLE_FIELDS)
        apps = self._query("query-compute-apps", APPS_FIELDS)
        rows = {
            int(r[0]): r
            for r in (line.split(", ") for line in readings.lines)
            if len(r) == 7 and r[0].strip().isdigit()
        }
        skipped = readings.skipped()
        processes = self._processes(apps)
        samples = []
        for gpu in self._inventory:
            row = rows.get(gpu.index)
            if row is None:
                why = skipped.get(gpu.pci_bus_id or "") or (
                    readings.failure() if not readings.lines else "not reported by nvidia-smi"
                )
                samples.append(GpuSample(index=gpu.index, at=now, ok=False, error=why))
                continue
            samples.append(self._sample_one(gpu.index, row, processes.get(gpu.index, {}), now))
        return samples

    def _sample_one(
        self, index: int, row: list[str], procs: dict[int, tuple[float, str]], now: datetime
    ) -> GpuSample:
        try:
            util, used, total, temperature, power = (number(f) for f in row[2:7])
        except GpuFailed as exc:
            return GpuSample(index=index, at=now, ok=False, error=str(exc))
        memory = {pid: mib for pid, (mib, _) in procs.items()}
        names = {pid: Path(name).name for pid, (_, name) in procs.items()}
        return GpuSample(
            index=index,
            at=now,
            utilization=util,
            memory_used_mib=used,
            memory_total_mib=total,
            temperature_c=temperature,
            power_w=power,
            processes=owned_processes(memory, names),
        )

    def _processes(self, apps: SmiResult) -> dict[int, dict[int, tuple[float, str]]]:
        """GPU index -> pid -> (MiB, name). The name is last: it may hold ", "."""
        found: dict[int, dict[int, tuple[float, str]]] = {}
        for line in apps.lines:
            fields = line.split(", ", 3)
            if len(fields) != 4 or not fields[1].strip().isdigit():
                continue
            index = self._bus_to_index.get(bus_id_text(fields[0]))
            if index is None:
                continue
            try:
                mib = number(fields[2]) or 0.0
            except GpuFailed:
                mib = 0.0
            pid = int(fields[1])
            previous = found.setdefault(index, {}).get(pid, (0.0, ""))
            found[index][pid] = (max(previous[0], mib), fields[3].strip())
        return found

    def close(self) -> None:
        """Nothing is held between calls."""
