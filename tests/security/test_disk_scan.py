"""The disk scan runs with the user's own rights, follows no link and stops at its bounds
(SPEC §12): what root can read in a home but the user cannot is never counted."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpulocker import disk, diskscan
from gpulocker.context import Context
from tests.helpers import ALICE, BOB, TestUser

MIB = 1024 * 1024


@pytest.fixture
def alice(users: dict[str, TestUser]) -> Iterator[TestUser]:
    user = users[ALICE]
    yield user
    for name in ("root-only", "many", "bob-link"):
        path = Path(user.home) / name
        if path.is_symlink():
            path.unlink()
        shutil.rmtree(path, ignore_errors=True)


def test_what_only_root_can_read_is_not_counted(alice: TestUser) -> None:
    before = disk.measure(alice.home, user=ALICE)
    private = Path(alice.home) / "root-only"
    private.mkdir(mode=0o700)  # root's, inside alice's home: alice cannot look in
    (private / "big.bin").write_bytes(os.urandom(8 * MIB))
    grown = disk.measure(alice.home, user=ALICE) - before
    assert grown < MIB  # the folder itself, not the 8 MiB only root can see


def test_a_link_to_another_users_home_is_not_followed(
    alice: TestUser, users: dict[str, TestUser]
) -> None:
    bob_file = Path(users[BOB].home) / "bob-data.bin"
    bob_file.write_bytes(os.urandom(4 * MIB))
    before = disk.measure(alice.home, user=ALICE)
    (Path(alice.home) / "bob-link").symlink_to(users[BOB].home)
    try:
        assert disk.measure(alice.home, user=ALICE) - before < MIB
    finally:
        bob_file.unlink()


def test_a_huge_tree_is_reported_as_partial_not_hanging(
    ctx: Context, alice: TestUser, monkeypatch: pytest.MonkeyPatch
) -> None:
    many = Path(alice.home) / "many"
    many.mkdir()
    for n in range(300):
        (many / f"f{n}").touch()
    monkeypatch.setattr(diskscan, "MAX_ENTRIES", 100)
    disk.usage_for(ctx, ALICE)  # asks for a scan
    assert disk.scan_pending(ctx) >= 1
    row = disk.usage_for(ctx, ALICE)
    assert row["status"] == "done"
    assert "more than 100 entries (partial)" in str(row.get("error"))


def test_it_refuses_to_measure_a_home_owned_by_root(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="as root"):
        disk.measure(str(tmp_path))
