"""A local HTTP server standing in for Telegram's Bot API (TELEGRAM_API_URL) in tests.

It records every request, answers sendMessage/getUpdates/getMe like Telegram does, can
refuse chats (400 "chat not found"), ask for a pause (429), go down (stop listening) and
come back on the same port. Requests sent through it as an HTTP proxy are recorded too.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Call:
    """One request the server received."""

    path: str
    method: str
    payload: dict[str, Any]
    proxied: bool


@dataclass
class FakeTelegram:
    """The fake Bot API. `sent` lists (chat_id, text) of accepted messages, in order."""

    token: str = "123456:TEST-token"
    port: int = 0
    calls: list[Call] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    refused_chats: set[str] = field(default_factory=set)
    down_chats: set[str] = field(default_factory=set)  # answered 502 (try again later)
    too_many: int = 0  # answer this many sendMessage calls with 429 first
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def sent(self) -> list[tuple[str, str]]:
        with self._lock:
            return [
                (str(c.payload["chat_id"]), c.payload["text"])
                for c in self.calls
                if c.method == "sendMessage" and c.payload.get("_accepted")
            ]

    def start(self) -> FakeTelegram:
        """Listen (on the same port as before, after a stop)."""
        handler = _handler(self)
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused, as when Telegram is unreachable."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def answer(self, method: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if method == "getMe":
            return 200, {
                "ok": True,
                "result": {"id": 1, "is_bot": True, "username": "gpulocker_test_bot"},
            }
        if method == "getUpdates":
            offset = int(payload.get("offset") or 0)
            return 200, {
                "ok": True,
                "result": [u for u in self.updates if u["update_id"] >= offset],
            }
        if method != "sendMessage":
            return 404, {"ok": False, "error_code": 404, "description": "Not Found"}
        if self.too_many > 0:
            self.too_many -= 1
            return 429, {
                "ok": False,
                "error_code": 429,
                "description": "Too Many Requests: retry after 7",
                "parameters": {"retry_after": 7},
            }
        if str(payload.get("chat_id")) in self.down_chats:
            return 502, {"ok": False, "error_code": 502, "description": "Bad Gateway"}
        if str(payload.get("chat_id")) in self.refused_chats:
            return 400, {
                "ok": False,
                "error_code": 400,
                "description": "Bad Request: chat not found",
            }
        payload["_accepted"] = True
        return 200, {
            "ok": True,
            "result": {"message_id": len(self.calls), "text": payload.get("text")},
        }


def _handler(fake: FakeTelegram) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b"{}"
            try:
                payload = json.loads(body or b"{}")
            except ValueError:
                payload = {"raw": body.decode(errors="replace")}
            proxied = self.path.startswith("http://")
            path = (
                self.path.split("://", 1)[1].partition("/")[2] if proxied else self.path.lstrip("/")
            )
            bot, _, method = path.partition("/")
            with fake._lock:
                if bot == f"bot{fake.token}":
                    status, answer = fake.answer(method, payload)
                else:  # anything else (an Apprise json:// target) is recorded and accepted
                    method, status, answer = path, 200, {"ok": True}
                fake.calls.append(Call(path, method, payload, proxied))
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
