"""How the terminal commands reach GPULocker: the local socket, or HTTP with a token.

On the GPU server the agent's socket needs no password (the kernel tells it who is
calling). From elsewhere, `gpulocker login --server URL` stores a token and the commands
go over HTTP. Both transports answer the same operations with the same shapes, so the
commands do not care which one they use.

This module imports neither SQLAlchemy nor Flask: a terminal command should start fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gpulocker.config import default_state_dir

if TYPE_CHECKING:
    import urllib.error

ROOT_SOCKET = Path("/run/gpulocker/gpulocker.sock")
TIMEOUT = 30.0  # seconds; a request waits at most ~2 s for the agent, the rest is slack


class ClientError(Exception):
    """A refusal or a failure to reach GPULocker, as one line for the user."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Client(Protocol):
    """Something that answers the operations of gpulocker.operations, by name."""

    where: str

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Run one operation; raise ClientError on a refusal."""
        ...


def _raise_for(answer: Any) -> dict[str, Any]:
    """The result of an answer, or the ClientError its error describes."""
    if not isinstance(answer, dict):
        raise ClientError("protocol", "the server sent an answer this client does not understand")
    if "error" in answer:
        err = answer["error"] if isinstance(answer["error"], dict) else {}
        raise ClientError(str(err.get("code", "error")), str(err.get("message", answer["error"])))
    return answer


class SocketClient:
    """The agent's local socket (JSON lines), identified by the kernel: no password."""

    def __init__(self, path: Path, timeout: float = TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.where = f"socket {path}"

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request, read one answer line."""
        request = json.dumps({"op": op, "args": args}).encode() + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
                _check_server(sock, self.path)
                sock.sendall(request)
                with sock.makefile("rb") as reader:
                    line = reader.readline()
            except OSError as exc:
                raise ClientError(
                    "unreachable",
                    f"cannot talk to the GPULocker agent at {self.path}: {exc.strerror or exc}; "
                    "is `gpulocker agent` running?",
                ) from None
        if not line:
            raise ClientError("unreachable", f"the agent at {self.path} closed the connection")
        try:
            answer = _raise_for(json.loads(line))
        except ValueError:
            raise ClientError("protocol", f"the agent at {self.path} sent no JSON") from None
        return dict(answer.get("result") or {})


def _check_server(sock: socket.socket, path: Path) -> None:
    """Talk only to an agent run by root, or by the caller (a personal `gpulocker serve`).

    Whoever can create a socket can answer on it: a classmate's fake agent could send a
    line meant for `eval`. The kernel says who listens (SO_PEERCRED), so we ask it.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    if uid not in (0, os.getuid()):
        raise ClientError(
            "untrusted",
            f"the socket {path} is served by uid {uid}, which is neither root nor you: "
            "not talking to it (only root's agent, or your own `gpulocker serve`)",
        )


@dataclass(frozen=True)
class Credentials:
    """What `gpulocker login` stores: the server and the API token for it."""

    server: str
    token: str
    username: str = ""


def credentials_path() -> Path:
    """~/.config/gpulocker/credentials.json (XDG_CONFIG_HOME respected)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "gpulocker" / "credentials.json"


def normalize_server(url: str) -> str:
    """`host:5151` -> `https://host:5151` (SPEC section 14); no trailing slash."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        url = "https://" + url
    return url


def plain_http_refusal(url: str) -> str | None:
    """Why `gpulocker login` will not send a password to `url` (plain HTTP off loopback)."""
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme != "http":
        return None
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (
        f"refusing to send a password over plain HTTP to {host}: use https:// "
        "(or --insecure-http if you really mean it)"
    )


def load_credentials(path: Path | None = None) -> Credentials | None:
    """The stored credentials, if `gpulocker login` was run."""
    path = path or credentials_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ClientError("credentials", f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not data.get("server") or not data.get("token"):
        raise ClientError("credentials", f"{path} is damaged; run `gpulocker login` again")
    return Credentials(str(data["server"]), str(data["token"]), str(data.get("username", "")))


def save_credentials(creds: Credentials, path: Path | None = None) -> Path:
    """Write the credentials readable by the owner only (0600, directory 0700), atomically."""
    path = path or credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(
            {"server": creds.server, "token": creds.token, "username": creds.username}, handle
        )
        handle.write("\n")
    os.replace(tmp, path)
    return path


def forget_credentials(path: Path | None = None) -> bool:
    """Remove the stored credentials; True if there were any."""
    path = path or credentials_path()
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def http_json(
    method: str,
    url: str,
    body: dict[str, Any] | None = None,
    token: str | None = None,
    timeout: float = TIMEOUT,
) -> Any:
    """One HTTP request with a JSON body; the decoded answer, or ClientError."""
    import urllib.error  # here, not at the top: the socket path starts faster without it
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 (URL is the user's server)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise _http_error(exc, url, signed_in=bool(token)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ClientError("unreachable", f"cannot reach {url}: {reason}") from None
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise ClientError("protocol", f"{url} did not answer with JSON") from None


def _http_error(exc: urllib.error.HTTPError, url: str, signed_in: bool) -> ClientError:
    try:
        answer = json.loads(exc.read() or b"{}")
    except ValueError:
        answer = {}
    err = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(err, dict) and err.get("message"):
        code, message = str(err.get("code", exc.code)), str(err["message"])
    else:
        code, message = str(exc.code), f"{url} answered {exc.code} {exc.reason}"
    if exc.code == 401 and signed_in:  # the stored token no longer works
        message += " (run `gpulocker login --server URL` to sign in again)"
    return ClientError(code, message)


class HttpClient:
    """The HTTP API with a bearer token (SPEC section 7), answering like the socket."""

    def __init__(self, server: str, token: str, timeout: float = TIMEOUT) -> None:
        self.server = normalize_server(server)
        self.token = token
        self.timeout = timeout
        self.where = self.server

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send operation `op` to its endpoint (ROUTES): one request per operation."""
        method, path, body = http_request_for(op, args)
        answer = http_json(method, self.server + path, body, self.token, self.timeout)
        if not isinstance(answer, dict):
            raise ClientError("protocol", f"{self.server} sent an answer that is not an object")
        return answer


# operation -> (method, path, arguments that go in the path); the others go in the body
# (POST) or the query string (GET). The answers are the operations' own shapes
# (gpulocker.operations), so nothing is translated.
ROUTES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "me": ("GET", "/api/v1/me", ()),
    "status": ("GET", "/api/v1/gpus", ()),
    "allocations.request": ("POST", "/api/v1/allocations", ()),
    "allocations.list_for": ("GET", "/api/v1/allocations", ()),
    "allocations.get": ("GET", "/api/v1/allocations/{id}", ("id",)),
    "allocations.extend": ("POST", "/api/v1/allocations/{id}/extend", ("id",)),
    "allocations.release": ("DELETE", "/api/v1/allocations/{id}", ("id",)),
    "allocations.release_all": ("POST", "/api/v1/allocations/release", ()),
    "allocations.reset": ("POST", "/api/v1/admin/reset", ()),
    "lockouts.all_active": ("GET", "/api/v1/admin/lockouts", ()),
    "lockouts.lift": ("DELETE", "/api/v1/admin/lockouts/{user}", ("user",)),
    "maintenance.set_enabled": ("POST", "/api/v1/admin/maintenance", ()),
    "notify.admin_message": ("POST", "/api/v1/admin/notify", ()),
    # SPEC section 11
    "requests.submit": ("POST", "/api/v1/requests", ()),
    "requests.list_for": ("GET", "/api/v1/requests", ()),
    "requests.get": ("GET", "/api/v1/requests/{id}", ("id",)),
    "requests.cancel": ("DELETE", "/api/v1/requests/{id}", ("id",)),
    "queue.view": ("GET", "/api/v1/queue", ()),
    "reservations.book": ("POST", "/api/v1/reservations", ()),
    "reservations.list_for": ("GET", "/api/v1/reservations", ()),
    "reservations.get": ("GET", "/api/v1/reservations/{id}", ("id",)),
    "reservations.cancel": ("DELETE", "/api/v1/reservations/{id}", ("id",)),
    "calendar": ("GET", "/api/v1/calendar", ()),
    "me.usage": ("GET", "/api/v1/me/usage", ()),
}


def http_request_for(op: str, args: dict[str, Any]) -> tuple[str, str, dict[str, Any] | None]:
    """(method, path with query string, JSON body) of operation `op` with `args` over HTTP."""
    route = ROUTES.get(op)
    if route is None:
        raise ClientError("invalid", f"{op} is not available over HTTP")
    method, template, in_path = route
    path = template.format(**{k: urllib.parse.quote(str(args.get(k)), safe="") for k in in_path})
    rest = {k: v for k, v in args.items() if k not in in_path and v is not None}
    if method == "GET":
        if rest:
            path += "?" + urllib.parse.urlencode({k: _query_value(v) for k, v in rest.items()})
        return method, path, None
    return method, path, rest if method == "POST" else None


def _query_value(value: Any) -> Any:
    return ("1" if value else "0") if isinstance(value, bool) else value


def socket_candidates() -> list[Path]:
    """Where the agent's socket may be when neither `--socket` nor GPULOCKER_SOCKET says:
    the root agent's path, then the caller's own state dir (a personal `gpulocker serve`).

    Never from a `.env` of the current folder: in a shared project folder a classmate
    would choose whom we talk to (SPEC §12)."""
    return [ROOT_SOCKET, default_state_dir() / "gpulocker.sock"]


def connect(server: str | None = None, socket_path: Path | None = None) -> Client:
    """The client to use: `--socket`, else `--server` (or stored login), else the local socket."""
    if socket_path is not None:
        return SocketClient(socket_path)
    creds = load_credentials()
    if server:
        wanted = normalize_server(server)
        if creds is None or normalize_server(creds.server) != wanted:
            raise ClientError(
                "not_signed_in",
                f"not signed in to {wanted}: run `gpulocker login --server {wanted}`",
            )
        return HttpClient(creds.server, creds.token)
    if creds is not None:
        return HttpClient(creds.server, creds.token)
    candidates = socket_candidates()
    for path in candidates:
        with contextlib.suppress(OSError):
            if path.is_socket():
                return SocketClient(path)
    shown = " or ".join(str(p) for p in candidates)
    raise ClientError(
        "unreachable",
        f"no GPULocker agent socket at {shown}; is `gpulocker agent` running here? "
        "From another machine: `gpulocker login --server URL`",
    )


def login(server: str, username: str, password: str) -> Credentials:
    """POST /api/v1/tokens with the Linux user name and password; the token to store."""
    server = normalize_server(server)
    body = {
        "username": username,
        "password": password,
        "name": f"gpulocker login on {socket.gethostname()}",
    }
    answer = http_json("POST", server + "/api/v1/tokens", body)
    token = answer.get("token") if isinstance(answer, dict) else None
    if not isinstance(token, str) or not token:
        raise ClientError("protocol", f"{server} gave no token")
    return Credentials(server, token, username)
