"""The local socket: password-less GPULocker for users logged in on the GPU server.

The agent serves a Unix stream socket that every local user may connect to (mode 0666);
who the caller is comes from the kernel, through the socket's peer credentials
(SO_PEERCRED), never from anything the caller says. Authorization is therefore the
same as on the web: the caller's Linux user name, admins being PRIVILEGED_USERS.

Protocol: JSON lines. Each request is one line `{"op": "allocations.request", "args":
{...}}`; each answer is one line, `{"result": {...}}` or `{"error": {"code", "message"}}`
(the codes of gpulocker.errors). A connection may carry any number of requests, one
at a time. Every operation maps onto one call of the core.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from gpulocker import allocations, gpustatus, heartbeat, lockouts, maintenance
from gpulocker.agent.admission import Admission
from gpulocker.context import Context
from gpulocker.errors import Forbidden, GPULockerError, Invalid
from gpulocker.models import Allocation
from gpulocker.notify import admin_message
from gpulocker.untrusted import parse_json

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024  # bytes in one request; a longer line is refused and the connection closed
FIRST_REQUEST_TIMEOUT = 10.0  # seconds a new connection may take to send its first request
IDLE_TIMEOUT = 300.0  # seconds a connection may wait between requests
ACCESS_WAIT_SECONDS = 2.0  # how long a request waits for the agent to grant access on the files

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One argument of an operation: its JSON kind, its default (REQUIRED if none) and,
    for strings, the longest accepted (names fit their 255-character columns)."""

    kind: str
    default: Any = REQUIRED
    max_length: int = 255


INT_LIMIT = 2**31  # ids and counts fit the database's integer columns


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -INT_LIMIT < value < INT_LIMIT


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    # No NUL characters: PostgreSQL text cannot hold them.
    "str": (lambda v: isinstance(v, str) and "\x00" not in v, "a string without NUL characters"),
    "int": (_is_int, "a whole number"),
    "number": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int_list": (
        lambda v: isinstance(v, list) and all(_is_int(i) for i in v),
        "a list of whole numbers",
    ),
}

Operation = Callable[..., dict[str, Any]]


@dataclass(frozen=True)
class Spec:
    """An operation and the arguments it takes."""

    func: Operation
    params: dict[str, Param]


OPERATIONS: dict[str, Spec] = {}


def operation(name: str, **params: Param) -> Callable[[Operation], Operation]:
    """Register `func(ctx, actor, **args)` as operation `name`, taking `params`."""

    def register(func: Operation) -> Operation:
        OPERATIONS[name] = Spec(func, params)
        return func

    return register


def parse_args(params: dict[str, Param], args: Any) -> dict[str, Any]:
    """Check every argument before anything is done, so a bad request changes nothing."""
    if not isinstance(args, dict):
        raise Invalid("args must be a JSON object")
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise Invalid(f"unknown argument(s): {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, param in params.items():
        if name not in args or (args[name] is None and param.default is None):
            if param.default is REQUIRED:
                raise Invalid(f"{name} is required")
            values[name] = param.default
            continue
        check, expected = _KINDS[param.kind]
        if not check(args[name]):
            raise Invalid(f"{name} must be {expected}")
        if param.kind == "str" and len(args[name]) > param.max_length:
            raise Invalid(f"{name} must be at most {param.max_length} characters")
        values[name] = args[name]
    return values


def handle(ctx: Context, actor: str | None, request: Any) -> dict[str, Any]:
    """Answer one decoded request as `actor` (None: a uid with no user name)."""
    try:
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            raise Invalid('a request is a JSON object: {"op": "...", "args": {...}}')
        spec = OPERATIONS.get(request["op"])
        if spec is None:
            raise Invalid(f"unknown operation {request['op']!r} (known: {', '.join(OPERATIONS)})")
        values = parse_args(spec.params, request.get("args", {}))
        if actor is None:
            raise Forbidden("your uid has no user name on this host")
        return {"result": spec.func(ctx, actor, **values)}
    except GPULockerError as exc:
        return error(exc.code, exc.message)
    except OperationalError:
        log.exception("database error serving %s", actor)
        return error("unavailable", "the database is unreachable; try again shortly")
    except Exception:
        log.exception("internal error serving %s", actor)
        return error("internal", "internal error; the agent's log has the details")


def error(code: str, message: str) -> dict[str, Any]:
    """The error shape shared with the HTTP API."""
    return {"error": {"code": code, "message": message}}


# --- operations: each one call of the core ------------------------------------------------


def _allocation_list(rows: list[Allocation]) -> list[dict[str, Any]]:
    return [r.to_dict() for r in rows]


@operation("me")
def _me(ctx: Context, actor: str) -> dict[str, Any]:
    with ctx.db.session() as session:
        lockout = lockouts.active(session, actor)
    return {
        "username": actor,
        "is_admin": ctx.settings.is_admin(actor),
        "locked_until": lockout.until.isoformat() if lockout else None,
    }


@operation("status")
def _status(ctx: Context, actor: str) -> dict[str, Any]:
    return gpustatus.snapshot(ctx, with_users=True)


@operation(
    "allocations.request",
    gpu_type=Param("str"),
    count=Param("int", None),
    hours=Param("number"),
    gpu_ids=Param("int_list", None),
    user=Param("str", None),
)
def _request(
    ctx: Context,
    actor: str,
    gpu_type: str,
    count: int | None,
    hours: float,
    gpu_ids: list[int] | None,
    user: str | None,
) -> dict[str, Any]:
    rows = allocations.request(
        ctx.db, ctx.settings, actor, gpu_type, count, hours, gpu_ids=gpu_ids, user=user
    )
    applied = wait_for_access(ctx, [r.id for r in rows])
    return {
        "allocations": applied,
        "cuda_visible_devices": allocations.cuda_visible_devices(ctx.db, rows),
        "access_applied": all(a["access_applied_at"] for a in applied),
    }


@operation(
    "allocations.list_for",
    all=Param("bool", False),
    state=Param("str", "active"),
)
def _list_for(ctx: Context, actor: str, all: bool, state: str) -> dict[str, Any]:
    wanted = None if state == "any" else state
    with ctx.db.session() as session:
        rows = allocations.list_for(session, ctx.settings, actor, all_users=all, state=wanted)
        return {"allocations": _allocation_list(rows)}


@operation("allocations.get", id=Param("int"))
def _get(ctx: Context, actor: str, id: int) -> dict[str, Any]:
    with ctx.db.session() as session:
        return {"allocation": allocations.get(session, ctx.settings, actor, id).to_dict()}


@operation("allocations.extend", id=Param("int"), hours=Param("number"))
def _extend(ctx: Context, actor: str, id: int, hours: float) -> dict[str, Any]:
    row = allocations.extend(ctx.db, ctx.settings, actor, id, hours)
    return {"allocation": row.to_dict()}


@operation("allocations.release", id=Param("int"))
def _release(ctx: Context, actor: str, id: int) -> dict[str, Any]:
    return {"allocation": allocations.release(ctx.db, ctx.settings, actor, id).to_dict()}


@operation("allocations.release_all", user=Param("str", None))
def _release_all(ctx: Context, actor: str, user: str | None) -> dict[str, Any]:
    return {"released": allocations.release_all(ctx.db, ctx.settings, actor, user)}


@operation("allocations.reset")
def _reset(ctx: Context, actor: str) -> dict[str, Any]:
    return {"ended": allocations.reset(ctx.db, ctx.settings, actor)}


@operation("lockouts.all_active")
def _lockouts(ctx: Context, actor: str) -> dict[str, Any]:
    if not ctx.settings.is_admin(actor):
        raise Forbidden("only admins can list every lockout")
    with ctx.db.session() as session:
        return {"lockouts": [row.to_dict() for row in lockouts.all_active(session)]}


@operation("lockouts.lift", user=Param("str"))
def _lift(ctx: Context, actor: str, user: str) -> dict[str, Any]:
    return {"lifted": lockouts.lift(ctx.db, ctx.settings, actor, user)}


@operation(
    "maintenance.set_enabled", enabled=Param("bool"), message=Param("str", "", max_length=1000)
)
def _maintenance(ctx: Context, actor: str, enabled: bool, message: str) -> dict[str, Any]:
    maintenance.set_enabled(ctx.db, ctx.settings, actor, enabled, message)
    return {"enabled": enabled}


@operation("notify.admin_message", user=Param("str"), message=Param("str", max_length=4000))
def _notify(ctx: Context, actor: str, user: str, message: str) -> dict[str, Any]:
    admin_message(ctx.db, ctx.settings, actor, user, message)
    return {"sent": True}


def wait_for_access(
    ctx: Context, ids: list[int], timeout: float = ACCESS_WAIT_SECONDS
) -> list[dict[str, Any]]:
    """The allocations once the agent has granted access on their files (at most `timeout`).

    Waits only while an agent of their host is alive (recent heartbeat): without one,
    nothing would change and the answer says access is not applied yet.
    """
    deadline = time.monotonic() + timeout
    while True:
        with ctx.db.session() as session:
            rows = [session.get(Allocation, i) for i in ids]
            found = [r for r in rows if r is not None]
            pending = [r for r in found if r.access_applied_at is None]
            if not pending or time.monotonic() >= deadline or not _agents_alive(ctx, pending):
                return _allocation_list(found)
        time.sleep(0.05)


def _agents_alive(ctx: Context, rows: list[Allocation]) -> bool:
    limit = max(5.0, 3 * ctx.settings.reconcile_seconds)
    with ctx.db.session() as session:
        for host in {r.host for r in rows}:
            age = heartbeat.age_seconds(session, heartbeat.agent_name(host))
            if age is None or age > limit:
                return False
    return True


# --- the server --------------------------------------------------------------------------


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end, as the kernel recorded it at connect."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def user_name(uid: int) -> str | None:
    """The user name of `uid` (None when the password database has no entry)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def bind(path: Path) -> socket.socket:
    """A listening socket at `path`, mode 0666, in a directory others can reach.

    A stale socket file (no one listening) is replaced; a live one means another agent
    serves it, which is refused.
    """
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o755)
        path.parent.chmod(0o755)
    elif not path.parent.stat().st_mode & stat.S_IXOTH:
        log.warning("%s is not reachable by other users; they cannot use the socket", path.parent)
    if path.exists() or path.is_symlink():
        _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        sock.bind(str(tmp))
        tmp.chmod(0o666)  # who may do what is decided by the peer credentials, not the mode
        os.replace(tmp, path)  # appears with its final mode at once
        sock.listen(64)
    except OSError:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return sock


def _remove_stale(path: Path) -> None:
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise OSError(f"{path} exists and is not a socket; remove it or set SOCKET_PATH")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left over from a crash
        return
    finally:
        probe.close()
    raise OSError(f"another GPULocker agent already serves {path}")


class Server:
    """Accepts connections on the socket; one thread per connection."""

    def __init__(self, ctx: Context, sock: socket.socket, path: Path) -> None:
        self.ctx = ctx
        self.path = path
        self._sock = sock
        self._inode = path.stat().st_ino
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, str] = {}  # open connection -> its person
        self.admission = Admission()  # connections and request rates per person
        self.first_request_timeout = FIRST_REQUEST_TIMEOUT
        self._threads: set[threading.Thread] = set()
        self._acceptor = threading.Thread(target=self._accept_loop, name="localapi", daemon=True)

    def start(self) -> Server:
        """Begin accepting connections in a background thread."""
        self._acceptor.start()
        log.info("local socket listening at %s", self.path)
        return self

    def close(self) -> None:
        """Stop accepting, end the open connections and remove the socket file."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake_w.send(b"x")
        self._acceptor.join(timeout=5)
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)
        self._sock.close()
        self._wake_r.close()
        self._wake_w.close()
        with contextlib.suppress(FileNotFoundError):
            if self.path.stat().st_ino == self._inode:  # never remove a successor's socket
                self.path.unlink()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in selector.select():
                    if key.fileobj is self._sock and not self._stop.is_set():
                        self._accept()

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
            uid = peer_uid(conn)
        except OSError:
            return
        person, refusal = self.admission.admit(uid)
        with self._lock:
            if refusal is None:
                self._connections[conn] = person
                thread = threading.Thread(target=self._serve, args=(conn, uid, person), daemon=True)
                self._threads.add(thread)
        if refusal is not None:
            conn.settimeout(1)
            with contextlib.suppress(OSError):
                _send(conn, error("busy", refusal))
            conn.close()
            return
        thread.start()

    def _serve(self, conn: socket.socket, uid: int, person: str) -> None:
        try:
            with conn:
                conn.settimeout(self.first_request_timeout)  # silence frees the slot soon
                self._converse(conn, user_name(uid), person)
        except OSError as exc:
            log.debug("local connection ended: %s", exc)
        finally:
            self.admission.leave(person)
            with self._lock:
                self._connections.pop(conn, None)
                self._threads.discard(threading.current_thread())

    def _converse(self, conn: socket.socket, user: str | None, person: str) -> None:
        with conn.makefile("rb") as reader:
            while not self._stop.is_set():
                line = reader.readline(MAX_LINE + 1)
                if not line:
                    return
                conn.settimeout(IDLE_TIMEOUT)
                if not self.admission.may_ask(person):
                    _send(conn, error("throttled", "too many requests at once; slow down"))
                    continue
                if len(line) > MAX_LINE:
                    _send(conn, error("invalid", f"a request must be under {MAX_LINE} bytes"))
                    return
                try:
                    request = parse_json(line)
                except Invalid as exc:
                    _send(conn, error("invalid", f"a request must be one line of JSON: {exc}"))
                    continue
                _send(conn, handle(self.ctx, user, request))


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def start(ctx: Context, path: Path | None = None) -> Server:
    """Serve the local socket at `path` (default SOCKET_PATH) until `.close()`."""
    path = path or ctx.settings.local_socket_path
    return Server(ctx, bind(path), path).start()


def start_quietly(ctx: Context) -> Server | None:
    """`start`, but a socket that cannot be served is logged, not fatal: the agent's
    enforcement matters more than the terminal commands."""
    try:
        return start(ctx)
    except OSError as exc:
        log.error("the local socket is not served (%s); terminal commands need `login`", exc)
        return None


def serve_while(ctx: Context, run: Callable[[], None]) -> None:
    """Serve the local socket while `run()` runs (the agent's loop), then close it."""
    server = start_quietly(ctx)
    try:
        run()
    finally:
        if server is not None:
            server.close()
