"""The web half of `serve` started as root runs as WEB_USER (SPEC section 14): who that is,
and the state it must share with the root agent (STATE_DIR, the SQLite files, the secret key)."""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass

from gpulocker.config import Settings, resolve_secret_key


@dataclass(frozen=True)
class Account:
    uid: int
    gid: int
    groups: tuple[int, ...]  # its supplementary groups (shadow among them: pam_unix)


def web_account(user: str) -> Account | None:
    """WEB_USER's ids, or None when there is no such user (or it is root)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return None
    if entry.pw_uid == 0:
        return None
    groups = tuple(g for g in os.getgrouplist(user, entry.pw_gid) if g != entry.pw_gid)
    return Account(entry.pw_uid, entry.pw_gid, groups)


def share_state(settings: Settings, account: Account) -> None:
    """Let the web user use STATE_DIR: the directory group-owned by its group (setgid, so new
    files stay in the group), the SQLite database and its journals group read-write, the secret
    key made now and owned by it. Links are not followed; files root did not make are left."""
    state = settings.state_dir
    fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchown(fd, 0, account.gid)
        os.fchmod(fd, 0o2770)
    finally:
        os.close(fd)
    resolve_secret_key(settings)
    _own(state / "secret_key", account.uid, account.gid, 0o600)
    database = settings.database_url
    if database.startswith("sqlite:///"):
        path = database.removeprefix("sqlite:///")
        for suffix in ("", "-wal", "-shm", "-journal"):
            _own(path + suffix, 0, account.gid, 0o660)


def _own(path: os.PathLike[str] | str, uid: int, gid: int, mode: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except (FileNotFoundError, OSError):
        return
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid in (0, uid):
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
