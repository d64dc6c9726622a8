"""Telegram transport: HTTP calls to the Bot API (`call`, `send_message`) and how their
answers map to DeliveryError. Linking a user's chat is `notify/linking.py`.

Every request honours PROXY_URL and TELEGRAM_API_URL (tests point it at a local server).
"""

from __future__ import annotations

import logging
from typing import Any

import requests

from gpulocker.config import Settings

log = logging.getLogger(__name__)

MAX_TEXT = 4096  # Telegram's limit for one message
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 15.0


class DeliveryError(Exception):
    """Sending failed. `permanent` means trying again cannot help (unknown chat, blocked bot);
    `retry_after` is the wait the service asked for, in seconds."""

    def __init__(self, message: str, permanent: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


def proxies(settings: Settings) -> dict[str, str] | None:
    """PROXY_URL for both schemes, as requests wants it."""
    if not settings.proxy_url:
        return None
    return {"http": settings.proxy_url, "https": settings.proxy_url}


def call(settings: Settings, method: str, payload: dict[str, Any]) -> Any:
    """Call one Bot API method; its `result`, or DeliveryError. The token never appears in
    an error message (requests puts the URL, which holds it, in its own)."""
    token = settings.telegram_bot_token
    if not token:
        raise DeliveryError("TELEGRAM_BOT_TOKEN is not set")
    url = f"{settings.telegram_api_url.rstrip('/')}/bot{token}/{method}"
    try:
        response = requests.post(
            url, json=payload, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), proxies=proxies(settings)
        )
    except requests.RequestException as exc:
        raise DeliveryError(
            f"Telegram unreachable: {type(exc).__name__}: {exc}".replace(token, "<token>")
        ) from None
    return _result(response)


def _result(response: requests.Response) -> Any:
    """Map the Bot API's answer: 429 and 5xx are worth retrying, 400/403 are not, and 401/404
    (a wrong token or URL) are kept for retry too, so fixing the configuration loses nothing."""
    try:
        data = response.json()
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    if response.ok and data.get("ok"):
        return data.get("result")
    description = str(data.get("description") or response.reason or "error")
    status = response.status_code
    if status == 429:
        retry = (data.get("parameters") or {}).get("retry_after")
        raise DeliveryError(f"Telegram 429: {description}", retry_after=float(retry or 30))
    raise DeliveryError(f"Telegram {status}: {description}", permanent=status in (400, 403))


def send_message(settings: Settings, chat_id: str, text: str) -> None:
    """Send `text` to one chat (cut to Telegram's length limit)."""
    if len(text) > MAX_TEXT:
        text = text[: MAX_TEXT - 1] + "…"
    call(
        settings,
        "sendMessage",
        {"chat_id": chat_id, "text": text, "disable_web_page_preview": True},
    )
