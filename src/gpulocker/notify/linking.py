"""Linking a user's own Telegram chat, without typing chat ids.

The settings page calls `start_link(user)` and shows a one-time code; the user sends
`/start <code>` to the bot (or opens `https://t.me/<bot>?start=<code>`). The agent reads the
bot's updates (`getUpdates`, so no public webhook is needed) and `poll_updates` ties the
chat that sent the code to the user. A code proves the chat belongs to whoever could see
the settings page, so nobody can point notifications at someone else's chat. The bot must
not have a webhook set: Telegram refuses getUpdates while one is. The HTTP calls are
`notify/telegram.py`'s.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from sqlalchemy import select

from gpulocker import lease
from gpulocker.background import Worker
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.hostview import HostView
from gpulocker.models import Setting, UserProfile, utcnow
from gpulocker.notify import TELEGRAM, notify
from gpulocker.notify.outbox import queue
from gpulocker.notify.telegram import DeliveryError, call

log = logging.getLogger(__name__)

OFFSET_KEY = "telegram_updates_offset"
BOT_KEY = "telegram_bot"


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


class TelegramLinkStep:
    """Agent step: read the bot's messages (chat linking) in the background (its own
    worker). One process at a time (lease), as Telegram allows a single getUpdates reader
    per bot. Chats are looked for every few seconds (a short poll: one cheap request)."""

    name = "telegram"

    def __init__(self) -> None:
        self.worker = Worker("telegram-updates")

    def every(self, settings: Settings) -> float:
        return 3.0

    def run(self, view: HostView) -> bool:
        if not view.settings.telegram_bot_token:
            return False
        if self.worker.busy or not lease.acquire(view.ctx.db, UPDATES_LEASE, 60.0):
            return False
        return self.worker.start(_poll_quietly, view.ctx)
