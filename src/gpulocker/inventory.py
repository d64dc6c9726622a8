"""The GPU inventory in the database: what each host's agent found, and what is free.

The agent owns the rows of its host (`register`); the web side and the allocation core
only read them, so a web worker never needs a GPU library.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from gpulocker import events
from gpulocker.gpus import GpuInfo
from gpulocker.models import ACTIVE, Allocation, Gpu, utcnow


@dataclass(frozen=True)
class TypedGpu:
    """A detected GPU with the allocation type it belongs to."""

    info: GpuInfo
    gpu_type: str


def types_from_config(
    gpu_config: dict[str, list[int]], detected: Sequence[GpuInfo]
) -> list[TypedGpu]:
    """Match detected GPUs to GPU_CONFIG. A configured id that is not there is an error."""
    by_index = {g.index: g for g in detected}
    typed = []
    for gpu_type, ids in gpu_config.items():
        missing = [i for i in ids if i not in by_index]
        if missing:
            found = ", ".join(str(i) for i in sorted(by_index)) or "none"
            raise ValueError(
                f"GPU_CONFIG: GPU id(s) {missing} of type {gpu_type!r} do not exist "
                f"on this host (found: {found})"
            )
        typed += [TypedGpu(by_index[i], gpu_type) for i in ids]
    return sorted(typed, key=lambda t: t.info.index)


# Words that name the vendor or the product family, not the model.
FAMILY_WORDS = frozenset({"nvidia", "geforce", "rtx", "gtx", "tesla", "quadro", "pro"})
# Words after the model number that make it a different model.
VARIANT_WORDS = frozenset({"ti", "super", "ada"})


def auto_type(name: str) -> str:
    """A short type name from a model name (docs/gpus.md has the table):
    "NVIDIA GeForce RTX 4090" -> "4090", "NVIDIA A100-SXM4-80GB" -> "a100",
    "NVIDIA H200" -> "h200", "Tesla V100-PCIE-16GB" -> "v100", "NVIDIA RTX A6000" -> "a6000",
    "NVIDIA GeForce RTX 3090 Ti" -> "3090ti", "NVIDIA RTX 6000 Ada Generation" -> "6000ada".

    The rule: drop the vendor and family words; the model is the first remaining word
    holding a digit (else the first remaining word), cut at its first dash, lower-cased,
    followed by a variant word right after it (Ti, SUPER, Ada).
    """
    words = [w for w in re.split(r"\s+", name.strip()) if w and w.lower() not in FAMILY_WORDS]
    if not words:
        return "gpu"
    at = next((i for i, w in enumerate(words) if any(c.isdigit() for c in w)), 0)
    model = re.sub(r"[^a-z0-9]", "", words[at].split("-")[0].lower())
    following = words[at + 1].lower() if at + 1 < len(words) else ""
    if following in VARIANT_WORDS and "-" not in words[at]:
        model += following
    return model or "gpu"


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def assign_types(gpu_config: dict[str, list[int]], detected: Sequence[GpuInfo]) -> list[TypedGpu]:
    """Types from GPU_CONFIG when set, else every detected GPU grouped by model (auto_type).

    Different models that get the same short name on one host (an A100 40GB beside an A100
    80GB) are told apart by their memory ("a100-40gb", "a100-80gb"), and by the whole model
    name if that is not enough, so one type never mixes two models.
    """
    if gpu_config:
        return types_from_config(gpu_config, detected)
    gpus = sorted(detected, key=lambda g: g.index)
    models: dict[str, set[str]] = {}
    for gpu in gpus:
        models.setdefault(auto_type(gpu.name), set()).add(gpu.name)
    by_memory: dict[str, set[str]] = {}

    def memory_type(gpu: GpuInfo) -> str:
        return f"{auto_type(gpu.name)}-{round(gpu.memory_total_mib / 1024)}gb"

    for gpu in gpus:
        by_memory.setdefault(memory_type(gpu), set()).add(gpu.name)

    def type_of(gpu: GpuInfo) -> str:
        short = auto_type(gpu.name)
        if len(models[short]) == 1:
            return short
        if len(by_memory[memory_type(gpu)]) == 1:
            return memory_type(gpu)
        return _slug(gpu.name)

    return [TypedGpu(g, type_of(g)) for g in gpus]


def register(session: Session, host: str, gpus: Sequence[TypedGpu]) -> list[Gpu]:
    """Upsert this host's GPUs; GPUs no longer managed are marked unhealthy, not deleted."""
    now = utcnow()
    existing = {g.gpu_id: g for g in session.scalars(select(Gpu).where(Gpu.host == host))}
    rows = []
    for typed in gpus:
        info = typed.info
        row = existing.pop(info.index, None)
        if row is None:
            row = Gpu(host=host, gpu_id=info.index, healthy=True)
            session.add(row)
            events.record(
                session,
                "gpu_added",
                "agent",
                f"GPU {info.index} ({typed.gpu_type}) on {host}",
                host=host,
                gpu_id=info.index,
            )
        row.gpu_type = typed.gpu_type
        row.name = info.name
        row.uuid = info.uuid
        row.pci_bus_id = info.pci_bus_id
        row.minor = info.minor
        row.device = info.device
        row.memory_total_mib = info.memory_total_mib
        row.mig = info.mig
        row.seen_at = now
        if row.error == "not managed":
            row.healthy, row.error = True, None
        rows.append(row)
    for gone in existing.values():
        if gone.error != "not managed":
            gone.healthy, gone.error = False, "not managed"
    return rows


def all_gpus(session: Session) -> list[Gpu]:
    """Every managed GPU, by host and id."""
    stmt = (
        select(Gpu).where(Gpu.error.is_distinct_from("not managed")).order_by(Gpu.host, Gpu.gpu_id)
    )
    return list(session.scalars(stmt))


def free_gpus(session: Session, gpu_type: str) -> list[Gpu]:
    """Healthy GPUs of `gpu_type` with no active allocation, by host and id."""
    taken = and_(
        Allocation.host == Gpu.host, Allocation.gpu_id == Gpu.gpu_id, Allocation.state == ACTIVE
    )
    stmt = (
        select(Gpu)
        .outerjoin(Allocation, taken)
        .where(Gpu.gpu_type == gpu_type, Gpu.healthy.is_(True), Allocation.id.is_(None))
        .order_by(Gpu.host, Gpu.gpu_id)
    )
    return list(session.scalars(stmt))


def type_counts(session: Session) -> dict[str, dict[str, int]]:
    """Per type: total managed GPUs, healthy ones, and free ones (for forms and refusals)."""
    counts: dict[str, dict[str, int]] = {}
    gpus = all_gpus(session)
    for gpu in gpus:
        entry = counts.setdefault(gpu.gpu_type, {"total": 0, "healthy": 0, "free": 0})
        entry["total"] += 1
        entry["healthy"] += int(gpu.healthy)
    taken = select(Allocation.host, Allocation.gpu_id).where(Allocation.state == ACTIVE)
    busy = {(h, g) for h, g in session.execute(taken)}
    for gpu in gpus:
        if gpu.healthy and (gpu.host, gpu.gpu_id) not in busy:
            counts[gpu.gpu_type]["free"] += 1
    return counts


_KNOWN_TYPES = select(Gpu.gpu_type).where(Gpu.error.is_distinct_from("not managed")).distinct()


def known_types(session: Session) -> list[str]:
    """The GPU types that exist (managed), sorted. Read by every request: the statement
    is built once."""
    return sorted(session.scalars(_KNOWN_TYPES))


def set_health(session: Session, host: str, gpu_id: int, healthy: bool, error: str | None) -> bool:
    """Record a GPU's health; True when it changed (so the caller can notify once)."""
    row = session.scalar(select(Gpu).where(Gpu.host == host, Gpu.gpu_id == gpu_id))
    if row is None or (row.healthy == healthy and row.error == error):
        return False
    changed = row.healthy != healthy
    row.healthy, row.error = healthy, error
    return changed


def count_gpus(session: Session) -> int:
    """How many GPUs are managed."""
    return session.scalar(select(func.count()).select_from(Gpu)) or 0
