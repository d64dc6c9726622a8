"""The wheel builds and carries what the package needs at run time (`pipx install …` then
`sudo gpulocker install` is the whole production set-up)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_templates_static_and_migrations(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("gpulocker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for part in (
        "gpulocker/web/templates/",
        "gpulocker/web/static/",
        "gpulocker/migrations/versions/0001",
        "gpulocker/install/units.py",
    ):
        assert any(name.startswith(part) for name in names), part
