"""Telling people: the in-app inbox (always) and the outbox of messages to send.

`notify()` is called inside the transaction that made the change, so a notification is
stored if and only if the change is. Delivery of the outbox happens elsewhere, later,
with retries; it never blocks the caller.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from gpulocker.config import Settings
from gpulocker.db import Database
from gpulocker.models import Notification, OutboxMessage, UserProfile, utcnow

TELEGRAM = "telegram"
APPRISE = "apprise"


def notify(
    session: Session,
    settings: Settings,
    kind: str,
    message: str,
    *,
    users: Iterable[str] = (),
    admins: bool = False,
) -> list[Notification]:
    """Put `message` in the inbox of `users` (and of every admin if `admins`) and queue it
    for their external channels: each user's linked Telegram chat, the admin chat
    (TELEGRAM_CHAT_ID) and NOTIFY_URLS for admin messages."""
    now = utcnow()
    recipients = list(dict.fromkeys(users))
    if admins:
        recipients += [a for a in settings.privileged_users if a not in recipients]
    inbox = [Notification(user=u, kind=kind, message=message, created_at=now) for u in recipients]
    session.add_all(inbox)

    def queue(channel: str, target: str, text: str) -> None:
        session.add(
            OutboxMessage(
                channel=channel,
                target=target,
                kind=kind,
                message=text,
                created_at=now,
                next_attempt_at=now,
            )
        )

    direct = list(dict.fromkeys(users))
    if settings.telegram_bot_token and direct:
        chats = session.execute(
            select(UserProfile.user, UserProfile.telegram_chat_id).where(
                UserProfile.user.in_(direct), UserProfile.telegram_chat_id.is_not(None)
            )
        )
        for _user, chat_id in chats:
            queue(TELEGRAM, str(chat_id), message)
    if admins:
        admin_text = f"[GPULocker admin] {message}"
        if settings.telegram_bot_token and settings.telegram_chat_id:
            queue(TELEGRAM, settings.telegram_chat_id, admin_text)
        for url in settings.notify_urls:
            queue(APPRISE, url, admin_text)
    return inbox


def admin_message(db: Database, settings: Settings, actor: str, user: str, message: str) -> None:
    """Admin: send `message` to `user` (inbox and their channels), recorded in the audit log."""
    from gpulocker import events
    from gpulocker.errors import Forbidden, Invalid

    if not settings.is_admin(actor):
        raise Forbidden("only admins can message users")
    text = message.strip()
    if not text or len(text) > 4000:
        raise Invalid("the message must be 1-4000 characters")
    if not user.strip():
        raise Invalid("say which user to message")
    with db.transaction() as session:
        notify(session, settings, "admin_message", f"Message from {actor}: {text}", users=[user])
        events.record(session, "admin_message", actor, f"message to {user}", user=user)
