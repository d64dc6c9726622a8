"""The CUDA line names GPUs by UUID and is safe to eval (SPEC §5, §12)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from gpulocker import allocations, cudaline
from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.gpus.simulated import SimulatedBackend, simulated_uuid
from gpulocker.models import Gpu
from tests.helpers import ALICE, cuda

H100 = "GPU-5a1c0e2e-6f3b-4c1d-9a3e-8b7f2d4c1e90"
MIG = "MIG-0a1b2c3d-4e5f-6a7b-8c9d-0e1f2a3b4c5d"


def test_it_lists_uuids_in_nvml_index_order_and_indices_where_none_is_known() -> None:
    assert cudaline.value([(3, MIG), (0, H100), (1, None)]) == f"{H100},1,{MIG}"
    assert cudaline.value([(2, "GPU-not-a-uuid")]) == "2"  # an odd uuid never reaches a shell


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0;rm -rf ~",
        "$(id)",
        "GPU-x",
        "0,,1",
        "0 1",
        "GPU-5a1c0e2e-6f3b-4c1d-9a3e-8b7f2d4c1e90`",
    ],
)
def test_it_refuses_to_print_anything_else_for_a_shell(text: str) -> None:
    with pytest.raises(cudaline.BadCudaLine):
        cudaline.export_line(text)


def test_the_export_line_sets_both_variables_in_a_real_shell() -> None:
    line = cudaline.export_line(f"{H100},MIG-GPU-5a1c0e2e-6f3b-4c1d-9a3e-8b7f2d4c1e90/1/0")
    shell = subprocess.run(
        ["bash", "-c", 'eval "$1"; echo "$CUDA_DEVICE_ORDER|$CUDA_VISIBLE_DEVICES"', "-", line],
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout == f"PCI_BUS_ID|{H100},MIG-GPU-5a1c0e2e-6f3b-4c1d-9a3e-8b7f2d4c1e90/1/0\n"


def test_simulated_gpus_have_stable_uuids_of_the_real_shape(tmp_path: Path) -> None:
    first = SimulatedBackend({"4090": [0, 1]}, tmp_path, host="h1").inventory()
    again = SimulatedBackend({"4090": [0, 1]}, tmp_path, host="h1").inventory()
    other = SimulatedBackend({"4090": [0]}, tmp_path, host="h2").inventory()
    assert [g.uuid for g in first] == [g.uuid for g in again]
    assert first[0].uuid == simulated_uuid("h1", 0) != other[0].uuid
    assert all(cudaline.is_entry(g.uuid or "") for g in first)


def test_a_grant_is_named_by_the_uuids_the_inventory_stored(
    db: Database, settings: Settings
) -> None:
    rows = allocations.request(db, settings, ALICE, "4090", 2, 1, gpu_ids=[3, 1])
    assert allocations.cuda_visible_devices(db, rows) == cuda(1, 3)
    with db.transaction() as session:
        for gpu in session.query(Gpu).filter(Gpu.gpu_id == 3):
            gpu.uuid = None  # a backend that knows no UUID for it
    assert allocations.cuda_visible_devices(db, rows) == f"{simulated_uuid('testhost', 1)},3"


def test_a_hostile_server_answer_never_reaches_the_users_shell(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import click

    from gpulocker.cli import commands

    marker = tmp_path / "owned"
    row = {
        "id": 1,
        "gpu_id": 0,
        "gpu_type": "4090",
        "host": "h",
        "user": ALICE,
        "device": "/dev/nvidia0",
        "expires_at": "2030-01-01T00:00:00+00:00",
    }
    answer = {"allocations": [row], "cuda_visible_devices": f"0$(touch {marker})"}
    with pytest.raises(click.ClickException, match="cannot be used"):
        commands.print_grant({**answer, "access_applied": True})
    out = capsys.readouterr().out
    subprocess.run(["bash", "-c", f'eval "{out}"'], check=True)
    assert out == "" and not marker.exists()
