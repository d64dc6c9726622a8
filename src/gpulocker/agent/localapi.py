"""The local socket: password-less GPULocker for users logged in on the GPU server.

The agent serves a Unix stream socket that every local user may connect to (mode 0666);
who the caller is comes from the kernel, through the socket's peer credentials
(SO_PEERCRED), never from anything the caller says. Authorization is therefore the
same as on the web: the caller's Linux user name, admins being PRIVILEGED_USERS.

Protocol: JSON lines. Each request is one line `{"op": "allocations.request", "args":
{...}}`; each answer is one line, `{"result": {...}}` or `{"error": {"code", "message"}}`
(the codes of gpulocker.errors). A connection may carry any number of requests, one
at a time. The operations are those of gpulocker.operations, by name: the same
validation and the same answers as the HTTP API.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError

from gpulocker import operations, safefs
from gpulocker.agent.admission import Admission
from gpulocker.context import Context
from gpulocker.errors import Forbidden, GPULockerError, Invalid
from gpulocker.operations import OPERATIONS
from gpulocker.untrusted import parse_json

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024  # bytes in one request; a longer line is refused and the connection closed
FIRST_REQUEST_TIMEOUT = 10.0  # seconds a new connection may take to send its first request
IDLE_TIMEOUT = 300.0  # seconds a connection may wait between requests


def handle(ctx: Context, actor: str | None, request: Any) -> dict[str, Any]:
    """Answer one decoded request as `actor` (None: a uid with no user name)."""
    try:
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            raise Invalid('a request is a JSON object: {"op": "...", "args": {...}}')
        if request["op"] not in OPERATIONS:
            raise Invalid(f"unknown operation {request['op']!r} (known: {', '.join(OPERATIONS)})")
        args = request.get("args", {})
        if not isinstance(args, dict):
            raise Invalid("args must be a JSON object")
        if actor is None:
            raise Forbidden("your uid has no user name on this host")
        return {"result": operations.run(ctx, actor, request["op"], args)}
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
    # Only root may write in the folder, so nobody can swap the socket or its temp name
    # for a link between bind and chmod below (SPEC §12).
    safefs.make_root_dir(path.parent, 0o755, "socket folder")
    if not path.parent.stat().st_mode & stat.S_IXOTH:
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


def serve_while(ctx: Context, run: Callable[[Callable[[], None]], None]) -> None:
    """Serve the local socket while `run(ready)` runs (the agent's loop), from the moment
    it calls `ready()` (the agent enforces: a grant asked for over the socket finds it
    reconciling and alive), then close it."""
    server: Server | None = None

    def ready() -> None:
        nonlocal server
        if server is None:
            server = start_quietly(ctx)

    try:
        run(ready)
    finally:
        if server is not None:
            server.close()
