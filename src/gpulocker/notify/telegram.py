"""Telegram: sending through the Bot API, and linking a user's own chat.

Linking works without typing chat ids: the settings page calls `start_link(user)` and
shows a one-time code; the user sends `/start <code>` to the bot (or opens
`https://t.me/<bot>?start=<code>`). The agent reads the bot's updates (`getUpdates`,
so no public webhook is needed) and `poll_updates` ties the chat that sent the code to
the user. A code proves the chat belongs to whoever could see the settings page, so
nobody can point notifications at someone else's chat. The bot must not have a webhook
set: Telegram refuses getUpdates while one is.

Every request honours PROXY_URL and TELEGRAM_API_URL (tests point it at a local server).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

import requests
from sqlalchemy import select

from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.models import Setting, UserProfile, utcnow

log = logging.getLogger(__name__)

OFFSET_KEY = "telegram_updates_offset"
BOT_KEY = "telegram_bot"
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


# --- linking a user's chat


def start_link(db: Database, user: str) -> str:
    """A new one-time code for `user` to send to the bot (replaces any earlier code)."""
    code = secrets.token_urlsafe(12)
    with db.transaction() as session:
        profile = session.get(UserProfile, user)
        if profile is None:
            session.add(UserProfile(user=user, telegram_link_code=code))
        else:
            profile.telegram_link_code = code
    return code


def link_instructions(code: str, bot_username: str | None = None) -> str:
    """What the settings page tells the user to do with their code."""
    if bot_username:
        return f"Open https://t.me/{bot_username}?start={code} or send /start {code} to @{bot_username}."
    return f"Send /start {code} to the GPULocker bot on Telegram."


def link_status(db: Database, user: str) -> dict[str, Any]:
    """For the settings page: whether a chat is linked, since when, and a pending code."""
    with db.session() as session:
        profile = session.get(UserProfile, user)
    if profile is None:
        return {"linked": False, "chat_id": None, "linked_at": None, "code": None}
    return {
        "linked": profile.telegram_chat_id is not None,
        "chat_id": profile.telegram_chat_id,
        "linked_at": profile.telegram_linked_at.isoformat() if profile.telegram_linked_at else None,
        "code": profile.telegram_link_code,
    }


def unlink(db: Database, user: str) -> bool:
    """Stop sending `user`'s notifications to Telegram. True if a chat was linked."""
    with db.transaction() as session:
        profile = session.get(UserProfile, user)
        if profile is None or (
            profile.telegram_chat_id is None and profile.telegram_link_code is None
        ):
            return False
        was_linked = profile.telegram_chat_id is not None
        profile.telegram_chat_id = profile.telegram_link_code = profile.telegram_linked_at = None
        return was_linked


def poll_updates(ctx: Context) -> int:
    """Read the bot's new messages and link every chat that sent a valid `/start <code>`.

    The offset is stored, so each update is handled once, across restarts. Returns how
    many chats were linked. Raises DeliveryError when Telegram cannot be reached.
    """
    from gpulocker.notify import TELEGRAM, notify
    from gpulocker.notify.outbox import queue

    settings = ctx.settings
    with ctx.db.session() as session:
        row = session.get(Setting, OFFSET_KEY)
        offset = int(row.value.get("offset", 0)) if row else 0
        known_bot = session.get(Setting, BOT_KEY)
    if known_bot is None:
        _store_bot(ctx.db, call(settings, "getMe", {}))
    updates = call(
        settings, "getUpdates", {"offset": offset, "timeout": 0, "allowed_updates": ["message"]}
    )
    linked = 0
    with ctx.db.transaction() as session:
        for update in updates or []:
            offset = max(offset, int(update.get("update_id", 0)) + 1)
            message = update.get("message") or {}
            text = str(message.get("text") or "").strip()
            chat_id = (message.get("chat") or {}).get("id")
            if chat_id is None or not text.startswith("/start"):
                continue
            code = text.partition(" ")[2].strip()
            profile = (
                session.scalar(select(UserProfile).where(UserProfile.telegram_link_code == code))
                if code
                else None
            )
            if profile is None:
                queue(
                    session,
                    TELEGRAM,
                    str(chat_id),
                    "telegram_link",
                    "This code is unknown or already used. Get a new one on your GPULocker settings page.",
                )
                continue
            profile.telegram_chat_id = str(chat_id)
            profile.telegram_link_code = None
            profile.telegram_linked_at = utcnow()
            session.flush()
            notify(
                session,
                settings,
                "telegram_linked",
                f"Telegram linked: GPULocker notifications for {profile.user} now arrive in this chat.",
                users=[profile.user],
            )
            linked += 1
        _store_offset(session, offset)
    return linked


def bot_username(db: Database) -> str | None:
    """The bot's @name as the agent last learnt it (getMe), for t.me links; None if unknown."""
    with db.session() as session:
        row = session.get(Setting, BOT_KEY)
    return str(row.value.get("username")) if row and row.value.get("username") else None


def _store_bot(db: Database, me: Any) -> None:
    username = me.get("username") if isinstance(me, dict) else None
    with db.transaction() as session:
        if session.get(Setting, BOT_KEY) is None:
            session.add(
                Setting(
                    key=BOT_KEY,
                    value={"username": username},
                    updated_at=utcnow(),
                    updated_by="agent",
                )
            )


def _store_offset(session: Any, offset: int) -> None:
    row = session.get(Setting, OFFSET_KEY)
    if row is None:
        session.add(
            Setting(
                key=OFFSET_KEY, value={"offset": offset}, updated_at=utcnow(), updated_by="agent"
            )
        )
    elif row.value.get("offset") != offset:
        row.value, row.updated_at = {"offset": offset}, utcnow()


UPDATES_LEASE = "telegram-updates"


def _poll_quietly(ctx: Context) -> None:
    try:
        linked = poll_updates(ctx)
        if linked:
            log.info("linked %d Telegram chat(s)", linked)
    except DeliveryError as exc:
        log.info("Telegram updates not read: %s", exc)
    except Exception:  # the next pass tries again; the loop that started us must go on
        log.exception("reading Telegram updates failed")


def updates_step(agent: Any) -> bool:
    """Agent step: read the bot's messages (chat linking) in the background. One process
    at a time (lease), as Telegram allows a single getUpdates reader per bot."""
    from gpulocker import lease
    from gpulocker.background import worker_for

    if not agent.settings.telegram_bot_token:
        return False
    worker = worker_for(agent, "telegram-updates")
    if worker.busy or not lease.acquire(agent.ctx.db, UPDATES_LEASE, 60.0):
        return False
    return worker.start(_poll_quietly, agent.ctx)


def updates_every(settings: Settings) -> float:
    """Chats are looked for every few seconds (a short poll: one cheap request)."""
    return 3.0
