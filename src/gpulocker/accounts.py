"""Whether a Linux account may still use GPULocker: it exists, is not locked, not expired.

PAM answers this at sign-in; sessions and API tokens outlive that moment, so each use of
one asks again (SPEC §12: a locked, expired or deleted account loses its sessions and
tokens). Locking (`usermod -L`, `passwd -l`) and account expiry (`usermod -e`, `chage -E`)
are read from /etc/shadow when this process can read it (root, or the `shadow` group);
accounts that live elsewhere (LDAP, SSSD) are judged by whether they can be found.
"""

from __future__ import annotations

import logging
import pwd
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHADOW = Path("/etc/shadow")
OK = "ok"
GONE = "gone"  # no such account now (deleted, or the directory cannot be reached)
LOCKED = "locked"
EXPIRED = "expired"


def standing(user: str, shadow: Path = SHADOW, today: int | None = None) -> str:
    """OK, GONE, LOCKED or EXPIRED for `user` now; `today` in days since 1970 (for tests)."""
    try:
        pwd.getpwnam(user)
    except (KeyError, ValueError, OSError):
        return GONE
    entry = _shadow_entry(user, shadow)
    if entry is None:
        return OK
    if entry[1].startswith("!"):
        return LOCKED
    expire = entry[7] if len(entry) > 7 else ""
    days = int(time.time() // 86400) if today is None else today
    if expire.isdigit() and int(expire) <= days:
        return EXPIRED
    return OK


def _shadow_entry(user: str, shadow: Path) -> list[str] | None:
    """The fields of `user`'s line in the shadow file, or None (not readable, not there)."""
    try:
        text = shadow.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    prefix = user + ":"
    for line in text.splitlines():
        if line.startswith(prefix):
            return line.split(":")
    return None
