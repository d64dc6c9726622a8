"""scripts/gpu-check --dry-run: the real-GPU check's own code path, on simulated GPUs.

Real users are made, the agent really runs, A is granted through the socket and opens the
device file with the exported line, B is refused by the ACL, A's running program is stopped
by the revoke, and the device file is put back as it was found.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check"


def test_the_dry_run_grants_refuses_revokes_and_restores(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    for key in ("GPU_BACKEND", "GPU_CONFIG", "DATABASE_URL", "DEVICE_DIR", "STATE_DIR"):
        env.pop(key, None)
    run = subprocess.run(
        [str(SCRIPT), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert any(
        line.startswith("PASS simulated: granted A: export CUDA_DEVICE_ORDER=PCI_BUS_ID ")
        and "CUDA_VISIBLE_DEVICES=GPU-" in line
        for line in lines
    )
    assert any(line.startswith("PASS simulated: A uses the GPU") for line in lines)
    assert any("B refused: PermissionError" in line for line in lines)
    assert any("A's running program" in line and "stopped" in line for line in lines)
    assert any("100 samples, median" in line for line in lines)
    assert "PASS restored 1 device files as found" in lines
    assert not any(line.startswith("FAIL") for line in lines)
    assert (tmp_path / "out" / "summary.txt").read_text().count("PASS") >= 5


def test_it_refuses_an_unknown_option() -> None:
    wrong = subprocess.run([str(SCRIPT), "--bogus"], capture_output=True, text=True, check=False)
    assert wrong.returncode == 2 and "usage" in wrong.stderr
