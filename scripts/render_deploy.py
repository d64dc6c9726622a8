"""Write deploy/ from `gpulocker install` (one source of truth): the units, PAM service, NVIDIA
options and env file install writes for a gpulocker command at /usr/local/bin/gpulocker.
A test (tests/cli/test_install.py) fails when deploy/ and install disagree."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from gpulocker.install import files, plan

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
EXECUTABLE = "/usr/local/bin/gpulocker"
#: deploy/ name -> the path install writes
FILES = {
    "gpulocker-web.service": plan.WEB_UNIT,
    "gpulocker-agent.service": plan.AGENT_UNIT,
    "pam.d-gpulocker": plan.PAM_FILE,
    "modprobe.d-gpulocker-nvidia.conf": plan.NVIDIA_FILE,
    "gpulocker.env": plan.ENV_FILE,
}


def render() -> dict[str, str]:
    """deploy/ name -> text, as install writes it (the shadow group as on Debian)."""
    opts = plan.InstallOptions(executable=EXECUTABLE)
    texts: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        actions = [
            a
            for a in plan.install_actions(opts, shadow="shadow", certificate=False)
            if isinstance(a, files.WriteFile)
        ]
        for action in actions:
            files.write_file(Path(tmp), action)
        for name, path in FILES.items():
            texts[name] = (Path(tmp) / path.lstrip("/")).read_text()
    return texts


def main() -> int:
    for old in DEPLOY.iterdir():
        if old.name not in FILES:
            old.unlink()
    for name, text in render().items():
        (DEPLOY / name).write_text(text)
    print(f"wrote {', '.join(FILES)} in {DEPLOY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
