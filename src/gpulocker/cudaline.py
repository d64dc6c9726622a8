"""The CUDA line: which GPUs a job should use, named so CUDA finds them (SPEC §5).

CUDA numbers only the GPUs a process can open, from 0, so once the ACLs close the other
GPUs an NVML index such as `3` names nothing (or another GPU). A UUID (`GPU-…`, or `MIG-…`
for a MIG instance) names the same GPU whatever CUDA can see, so the value lists UUIDs
whenever the backend knows them, in NVML index order. `CUDA_DEVICE_ORDER=PCI_BUS_ID` makes
CUDA's own order (fastest first by default) match NVML's for anything that still counts.

No database here: the CLI and its terminal rendering import this module too.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable

# One entry of CUDA_VISIBLE_DEVICES: an index, a GPU UUID, or a MIG UUID (both the current
# `MIG-<uuid>` and the older `MIG-GPU-<uuid>/<gi>/<ci>` forms).
_ENTRY = re.compile(
    r"\d{1,4}|GPU-[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}"
    r"|MIG-(?:GPU-)?[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}(?:/\d{1,3}/\d{1,3})?"
)
ORDER_LINE = "CUDA_DEVICE_ORDER=PCI_BUS_ID"


class BadCudaLine(ValueError):
    """A value that is not a list of GPU indices or UUIDs (never printed for a shell)."""


def is_entry(text: str) -> bool:
    """Whether `text` is one valid CUDA_VISIBLE_DEVICES entry."""
    return _ENTRY.fullmatch(text) is not None


def entry(index: int, uuid: str | None) -> str:
    """How one GPU is named: its UUID when known and well formed, else its index."""
    if uuid and is_entry(uuid.strip()) and not uuid.strip().isdigit():
        return uuid.strip()
    return str(index)


def value(gpus: Iterable[tuple[int, str | None]]) -> str:
    """CUDA_VISIBLE_DEVICES for (NVML index, UUID or None) pairs, in index order."""
    return ",".join(entry(index, uuid) for index, uuid in sorted(gpus, key=lambda g: g[0]))


def check(text: str) -> str:
    """`text` if it is a comma-separated list of valid entries; BadCudaLine otherwise."""
    if not text or not all(is_entry(part) for part in text.split(",")):
        raise BadCudaLine(f"not a list of GPU indices or UUIDs: {text[:80]!r}")
    return text


def export_line(text: str) -> str:
    """The line for `eval "$(gpulocker request ...)"`: checked, then shell-quoted anyway."""
    return f"export {ORDER_LINE} CUDA_VISIBLE_DEVICES={shlex.quote(check(text))}"
