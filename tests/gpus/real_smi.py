"""Real nvidia-smi outputs from ../shared/real-smi, turned into what our invocations print.

The files are other projects' committed test data (see that folder's README); they are read
in place, never copied into this repository. The transformations are the README's T1-T4:
T1 header'd CSV -> `noheader,nounits` with our field list; T2 `-q -x` XML -> query-gpu rows;
T3 XML -> the two kinds of `-q` line we read; T4 XML -> query-compute-apps rows.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from gpulocker.gpus.smi import APPS_FIELDS, INVENTORY_FIELDS, SAMPLE_FIELDS


def _root() -> Path:
    """`../shared/real-smi` from the repository root (a worktree's parents are tried too)."""
    if os.environ.get("GPULOCKER_REAL_SMI"):
        return Path(os.environ["GPULOCKER_REAL_SMI"])
    repo = Path(__file__).resolve().parents[2]
    for parent in repo.parents:
        if (parent / "shared" / "real-smi").is_dir():
            return parent / "shared" / "real-smi"
    return repo.parent / "shared" / "real-smi"


ROOT = _root()
ALIASES = {"used_memory": "used_gpu_memory", "gpu_bus_id": "pci.bus_id", "gpu_name": "name"}
_UNIT = re.compile(r"^(.*?) \[(.+)\]$")


def available() -> bool:
    return (ROOT / "README.md").is_file()


def captures() -> list[Path]:
    return sorted(p for p in (ROOT / "captures").iterdir() if p.is_dir())


def xmls() -> list[Path]:
    return sorted((ROOT / "xml").glob("*.xml"))


def t1(path: Path, fields: str) -> str:
    """A header'd CSV as `--format=csv,noheader,nounits` would print `fields`."""
    lines = path.read_text().splitlines()
    header = []
    for cell in lines[0].split(", "):
        match = _UNIT.match(cell)
        name, unit = (match.group(1), match.group(2)) if match else (cell, None)
        header.append((ALIASES.get(name, name), unit))
    names = [n for n, _ in header]
    out = []
    for line in lines[1:]:
        cells = line.split(", ")
        row = []
        for field in fields.split(","):
            at = names.index(ALIASES.get(field, field))
            cell, unit = cells[at], header[at][1]
            if unit and cell.endswith(f" {unit}"):
                cell = cell[: -len(unit) - 1]
            row.append(cell)
        out.append(", ".join(row))
    return "".join(f"{r}\n" for r in out)


def _parse(path: Path) -> ET.Element:
    # Checked-in files of known checksum (SHA256SUMS), not input from anyone at run time.
    return ET.parse(path).getroot()  # noqa: S314


def _text(node: ET.Element, path: str) -> str:
    found = node.find(path)
    text = (found.text or "").strip() if found is not None else "N/A"
    return "[N/A]" if text == "N/A" else text


def _strip(text: str, unit: str) -> str:
    return text[: -len(unit) - 1] if text.endswith(f" {unit}") else text


def _power(gpu: ET.Element) -> str:
    for path in (
        "power_readings/power_draw",
        "gpu_power_readings/power_draw",
        "gpu_power_readings/average_power_draw",
        "gpu_power_readings/instant_power_draw",
    ):
        if gpu.find(path) is not None and _text(gpu, path) != "[N/A]":
            return _strip(_text(gpu, path), "W")
    return "[N/A]"


def t2(path: Path, fields: str) -> str:
    """query-gpu rows from `-q -x` XML."""
    tree = _parse(path)
    out = []
    for index, gpu in enumerate(tree.findall("gpu")):
        cells = {
            "index": str(index),
            "name": _text(gpu, "product_name"),
            "uuid": _text(gpu, "uuid"),
            "pci.bus_id": gpu.get("id", ""),
            "memory.total": _strip(_text(gpu, "fb_memory_usage/total"), "MiB"),
            "memory.used": _strip(_text(gpu, "fb_memory_usage/used"), "MiB"),
            "mig.mode.current": _text(gpu, "mig_mode/current_mig"),
            "driver_version": _text(tree, "driver_version"),
            "utilization.gpu": _strip(_text(gpu, "utilization/gpu_util"), "%"),
            "temperature.gpu": _strip(_text(gpu, "temperature/gpu_temp"), "C"),
            "power.draw": _power(gpu),
        }
        out.append(", ".join(cells[f] for f in fields.split(",")))
    return "".join(f"{r}\n" for r in out)


def t3(path: Path) -> str:
    """The minimal `-q` our inventory reads: the GPU header and its minor number."""
    tree = _parse(path)
    lines = []
    for gpu in tree.findall("gpu"):
        minor = (gpu.findtext("minor_number") or "N/A").strip()
        lines += [f"GPU {gpu.get('id')}", f"    Minor Number                          : {minor}"]
    return "\n".join(lines) + "\n"


def t4(path: Path) -> str:
    """query-compute-apps rows (compute processes only) from `-q -x` XML."""
    tree = _parse(path)
    out = []
    for gpu in tree.findall("gpu"):
        for proc in gpu.findall("processes/process_info"):
            if "C" not in (proc.findtext("type") or ""):
                continue
            memory = _strip(_text(proc, "used_memory"), "MiB")
            name = (proc.findtext("process_name") or "").strip()
            out.append(f"{gpu.get('id')}, {_text(proc, 'pid')}, {memory}, {name}")
    return "".join(f"{r}\n" for r in out)


def stage(source: Path, dest: Path) -> Path:
    """The fake nvidia-smi's folder for one real capture folder or XML file."""
    dest.mkdir(parents=True)
    if source.is_dir():
        gpu_csv, apps_csv = source / "query-gpu.csv", source / "query-compute-apps.csv"
        inventory, sample = t1(gpu_csv, INVENTORY_FIELDS), t1(gpu_csv, SAMPLE_FIELDS)
        apps, q = t1(apps_csv, APPS_FIELDS), (source / "q.txt").read_text()
    else:
        inventory, sample = t2(source, INVENTORY_FIELDS), t2(source, SAMPLE_FIELDS)
        apps, q = t4(source), t3(source)
    (dest / f"query-gpu={INVENTORY_FIELDS}.out").write_text(inventory)
    (dest / f"query-gpu={SAMPLE_FIELDS}.out").write_text(sample)
    (dest / f"query-compute-apps={APPS_FIELDS}.out").write_text(apps)
    (dest / "q.out").write_text(q)
    return dest
