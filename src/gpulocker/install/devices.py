"""Uninstall gives the GPU device files back the way the driver makes them: the mode of
/proc/driver/nvidia/params (DeviceFileMode, 0666 by default), no ACL."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

_DEVICE = re.compile(r"nvidia(\d+|ctl|-uvm|-uvm-tools|-modeset)$")


def driver_mode(params: Path = Path("/proc/driver/nvidia/params")) -> int:
    """DeviceFileMode from the driver's params (decimal there), else the driver default 0666."""
    try:
        text = params.read_text()
    except OSError:
        return 0o666
    match = re.search(r"^DeviceFileMode:\s*(\d+)", text, re.MULTILINE)
    return int(match.group(1)) & 0o777 if match else 0o666


def restore(root: Path, dry_run: bool) -> list[str]:
    """Reset every /dev/nvidia* character device under root; lines saying what was done."""
    dev = root / "dev"
    mode = driver_mode()
    lines: list[str] = []
    try:
        names = sorted(os.listdir(dev))
    except OSError:
        return lines
    for name in names:
        path = dev / name
        if not _DEVICE.match(name):
            continue
        st = os.lstat(path)
        if not stat.S_ISCHR(st.st_mode):  # a link or anything else: not ours to touch
            continue
        lines.append(f"{'would reset' if dry_run else 'reset'} {path} to {mode:04o}, no ACL")
        if dry_run:
            continue
        # The ACL first: removing it after a chmod would leave the group bits of the old one.
        subprocess.run(["setfacl", "--physical", "-b", "--", str(path)], check=False)
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW)
        try:
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)
    return lines
