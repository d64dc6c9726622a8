"""Delivering notifications: the outbox to Telegram (a local fake Bot API) and Apprise
targets, in order, retried with backoff while the channel is down, nothing lost across a
restart; and linking a user's Telegram chat with `/start <code>`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import time_machine
from sqlalchemy import select

from gpulocker import allocations
from gpulocker.background import Worker
from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.models import OutboxMessage, UserProfile, utcnow
from gpulocker.notify import admin_message, linking, notify, outbox
from tests.fake_telegram import FakeTelegram
from tests.helpers import ADMIN, ALICE, BOB, export

ADMIN_CHAT = "-1001"
ALICE_CHAT = "4242"


@pytest.fixture
def fake() -> Iterator[FakeTelegram]:
    server = FakeTelegram().start()
    yield server
    server.stop()


@pytest.fixture
def tg_settings(settings: Settings, fake: FakeTelegram) -> Settings:
    return settings.with_overrides(
        telegram_bot_token=fake.token, telegram_api_url=fake.url, telegram_chat_id=ADMIN_CHAT
    )


@pytest.fixture
def tg_ctx(tg_settings: Settings, db: Database) -> Iterator[Context]:
    context = Context(tg_settings)
    yield context
    context.close()


def link(db: Database, user: str, chat_id: str) -> None:
    with db.transaction() as session:
        session.add(UserProfile(user=user, telegram_chat_id=chat_id, telegram_linked_at=utcnow()))


def say(ctx: Context, text: str, users: list[str] | None = None, admins: bool = False) -> None:
    with ctx.db.transaction() as session:
        notify(session, ctx.settings, "test", text, users=users or [], admins=admins)


def pending_rows(db: Database) -> list[OutboxMessage]:
    return outbox.pending(db)


def test_it_sends_the_exact_messages_in_order(tg_ctx: Context, fake: FakeTelegram) -> None:
    link(tg_ctx.db, ALICE, ALICE_CHAT)
    rows = allocations.request(tg_ctx.db, tg_ctx.settings, ALICE, "4090", 1, 2)
    admin_message(tg_ctx.db, tg_ctx.settings, ADMIN, ALICE, "please save your checkpoints")
    allocations.release(tg_ctx.db, tg_ctx.settings, ALICE, rows[0].id)
    say(tg_ctx, "GPU 5 is lost", admins=True)
    assert outbox.deliver(tg_ctx) == 4
    end = rows[0].expires_at
    # in order per chat (destinations take turns, so the chats may interleave)
    assert sorted(fake.sent, key=lambda sent: sent[0] == ADMIN_CHAT) == [
        (
            ALICE_CHAT,
            f"You have GPU(s) 0 (4090) on testhost until {end:%Y-%m-%d %H:%M} UTC. {export(0)}",
        ),
        (ALICE_CHAT, f"Message from {ADMIN}: please save your checkpoints"),
        (ALICE_CHAT, "Your GPU 0 (4090) on testhost was released: released."),
        (ADMIN_CHAT, "[GPULocker admin] GPU 5 is lost"),
    ]
    assert pending_rows(tg_ctx.db) == []
    assert outbox.deliver(tg_ctx) == 0  # each message once


def test_it_keeps_messages_while_telegram_is_down_and_sends_them_later(
    tg_settings: Settings, db: Database, fake: FakeTelegram
) -> None:
    link(db, ALICE, ALICE_CHAT)
    fake.stop()
    ctx = Context(tg_settings)
    for text in ("one", "two", "three"):
        say(ctx, text, users=[ALICE])
    assert outbox.deliver(ctx) == 0
    rows = pending_rows(db)
    assert [r.message for r in rows] == ["one", "two", "three"]
    assert rows[0].attempts == 1 and "unreachable" in (rows[0].last_error or "")
    assert fake.token not in (rows[0].last_error or "")  # the token never leaks into errors
    assert rows[1].attempts == 0  # waiting behind the first: order is kept
    assert outbox.stats(db)["pending"] == 3
    ctx.close()  # the agent stops...

    fake.start()  # ...Telegram comes back on the same address...
    ctx = Context(tg_settings)  # ...and a new agent starts
    assert outbox.deliver(ctx) == 0, "the retry waits for its backoff"
    with time_machine.travel(utcnow() + timedelta(seconds=outbox.FIRST_RETRY_SECONDS + 1)):
        assert outbox.deliver(ctx) == 3
    ctx.close()
    assert fake.sent == [(ALICE_CHAT, "one"), (ALICE_CHAT, "two"), (ALICE_CHAT, "three")]


def test_it_backs_off_longer_after_each_failure(tg_ctx: Context, fake: FakeTelegram) -> None:
    link(tg_ctx.db, ALICE, ALICE_CHAT)
    fake.stop()
    say(tg_ctx, "hello", users=[ALICE])
    waits = []
    now = utcnow()
    for _ in range(4):
        with time_machine.travel(now):
            outbox.deliver(tg_ctx)
        row = pending_rows(tg_ctx.db)[0]
        waits.append((row.next_attempt_at - now).total_seconds())
        now = row.next_attempt_at
    assert [round(w) for w in waits] == [15, 30, 60, 120]
    assert outbox.backoff_seconds(30) == outbox.MAX_RETRY_SECONDS


def test_it_waits_as_long_as_telegram_asks(tg_ctx: Context, fake: FakeTelegram) -> None:
    link(tg_ctx.db, ALICE, ALICE_CHAT)
    fake.too_many = 1
    say(tg_ctx, "slow down", users=[ALICE])
    start = utcnow()
    with time_machine.travel(start):
        assert outbox.deliver(tg_ctx) == 0
    row = pending_rows(tg_ctx.db)[0]
    assert round((row.next_attempt_at - start).total_seconds()) == 7
    with time_machine.travel(start + timedelta(seconds=8)):
        assert outbox.deliver(tg_ctx) == 1
    assert fake.sent == [(ALICE_CHAT, "slow down")]


def test_it_gives_up_on_a_chat_telegram_refuses_and_goes_on(
    tg_ctx: Context, fake: FakeTelegram
) -> None:
    link(tg_ctx.db, ALICE, "999")
    link(tg_ctx.db, BOB, "777")
    fake.refused_chats.add("999")
    say(tg_ctx, "to alice", users=[ALICE])
    say(tg_ctx, "to bob", users=[BOB])
    say(tg_ctx, "alice again", users=[ALICE])
    assert outbox.deliver(tg_ctx) == 1
    with tg_ctx.db.session() as s:
        rows = s.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
    assert [(r.message, r.sent_at is not None, r.failed_at is not None) for r in rows] == [
        ("to alice", False, True),
        ("to bob", True, False),
        ("alice again", False, True),
    ]
    assert "chat not found" in (rows[0].last_error or "")
    assert fake.sent == [("777", "to bob")]
    assert outbox.stats(tg_ctx.db) == {"pending": 0, "failed": 2, "oldest_pending_seconds": 0.0}


def test_it_sends_each_message_once_with_two_senders(tg_ctx: Context, fake: FakeTelegram) -> None:
    for n in range(6):
        link(tg_ctx.db, f"user{n}", f"10{n}")
        say(tg_ctx, f"message {n}", users=[f"user{n}"])
    other = Context(tg_ctx.settings)
    counts: list[int] = []
    threads = [
        threading.Thread(target=lambda c=c: counts.append(outbox.deliver(c)))
        for c in (tg_ctx, other)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    other.close()
    assert sum(counts) == 6
    assert sorted(fake.sent) == sorted((f"10{n}", f"message {n}") for n in range(6))


def test_it_honours_proxy_url(settings: Settings, db: Database, fake: FakeTelegram) -> None:
    proxied = settings.with_overrides(
        telegram_bot_token=fake.token,
        telegram_api_url="http://api.telegram.invalid",
        telegram_chat_id=ADMIN_CHAT,
        proxy_url=fake.url,
    )
    ctx = Context(proxied)
    say(ctx, "through the proxy", admins=True)
    assert outbox.deliver(ctx) == 1
    ctx.close()
    assert fake.sent == [(ADMIN_CHAT, "[GPULocker admin] through the proxy")]
    assert [c.proxied for c in fake.calls] == [True]


def test_it_sends_admin_messages_to_notify_urls(
    settings: Settings, db: Database, fake: FakeTelegram
) -> None:
    ctx = Context(settings.with_overrides(notify_urls=(f"json://127.0.0.1:{fake.port}/hook",)))
    say(ctx, "GPU 3 is unhealthy", admins=True)
    say(ctx, "only for alice", users=[ALICE])
    assert outbox.deliver(ctx) == 1
    ctx.close()
    hooks = [c for c in fake.calls if c.path == "hook"]
    assert len(hooks) == 1
    assert hooks[0].payload["message"] == "[GPULocker admin] GPU 3 is unhealthy"
    assert hooks[0].payload["title"] == "GPULocker"


def test_it_links_a_chat_with_a_start_code(tg_ctx: Context, fake: FakeTelegram) -> None:
    code = linking.start_link(tg_ctx.db, ALICE)
    assert linking.link_status(tg_ctx.db, ALICE) == {
        "linked": False,
        "chat_id": None,
        "linked_at": None,
        "code": code,
    }
    fake.updates += [
        {"update_id": 500, "message": {"chat": {"id": 31337}, "text": "/start wrong-code"}},
        {"update_id": 501, "message": {"chat": {"id": 4242}, "text": f"/start {code}"}},
    ]
    assert linking.poll_updates(tg_ctx) == 1
    status = linking.link_status(tg_ctx.db, ALICE)
    assert status["linked"] and status["chat_id"] == "4242" and status["code"] is None
    assert linking.bot_username(tg_ctx.db) == "gpulocker_test_bot"
    # The same updates are not handled twice (the offset is kept): no new link, no new reply.
    assert linking.poll_updates(tg_ctx) == 0
    offsets = [c.payload["offset"] for c in fake.calls if c.method == "getUpdates"]
    assert offsets == [0, 502]
    # The used code cannot link another chat.
    fake.updates.append(
        {"update_id": 502, "message": {"chat": {"id": 666}, "text": f"/start {code}"}}
    )
    assert linking.poll_updates(tg_ctx) == 0
    say(tg_ctx, "after linking", users=[ALICE])
    outbox.deliver(tg_ctx)
    assert fake.sent == [
        (
            "31337",
            "This code is unknown or already used. Get a new one on your GPULocker settings page.",
        ),
        ("4242", f"Telegram linked: GPULocker notifications for {ALICE} now arrive in this chat."),
        (
            "666",
            "This code is unknown or already used. Get a new one on your GPULocker settings page.",
        ),
        ("4242", "after linking"),
    ]
    assert linking.unlink(tg_ctx.db, ALICE)
    assert not linking.link_status(tg_ctx.db, ALICE)["linked"]
    assert "t.me/gpulocker_test_bot?start=abc" in linking.link_instructions(
        "abc", "gpulocker_test_bot"
    )


def test_the_agent_delivers_in_the_background_and_after_a_restart(
    tg_settings: Settings, db: Database, fake: FakeTelegram
) -> None:
    from gpulocker.agent.loop import Agent

    link(db, ALICE, ALICE_CHAT)
    fake.stop()
    first = Agent(Context(tg_settings))
    allocations.request(db, tg_settings, ALICE, "4090", 1, 1)
    say(first.ctx, "second", users=[ALICE])
    assert first.tick(force=True)["outbox"] is True  # a delivery thread started
    assert step_worker(first, "outbox").join(timeout=30)
    assert [r.attempts for r in pending_rows(db)] == [1, 0]
    first.close()
    first.ctx.close()  # the agent is gone; the messages are in the database

    fake.start()
    second = Agent(Context(tg_settings))
    with time_machine.travel(utcnow() + timedelta(seconds=outbox.FIRST_RETRY_SECONDS + 1)):
        assert second.tick(force=True)["outbox"] is True
        assert step_worker(second, "outbox").join(timeout=30)
    second.close()
    second.ctx.close()
    assert [text.split(" (")[0] for _, text in fake.sent] == ["You have GPU(s) 0", "second"]
    assert pending_rows(db) == []


def test_the_agent_links_chats_in_the_background_one_reader_at_a_time(
    tg_ctx: Context, fake: FakeTelegram
) -> None:
    from gpulocker import lease
    from gpulocker.agent.loop import Agent

    code = linking.start_link(tg_ctx.db, BOB)
    fake.updates.append(
        {"update_id": 7, "message": {"chat": {"id": 555}, "text": f"/start {code}"}}
    )
    agent = Agent(tg_ctx)
    assert agent.tick(force=True)["telegram"] is True
    assert step_worker(agent, "telegram").join(timeout=30)
    assert linking.link_status(tg_ctx.db, BOB)["chat_id"] == "555"
    # Telegram allows one getUpdates reader per bot: another process holding the lease wins.
    assert lease.release(tg_ctx.db, linking.UPDATES_LEASE)
    assert lease.acquire(tg_ctx.db, linking.UPDATES_LEASE, 60, holder="another-agent")
    assert agent.tick(force=True)["telegram"] is False
    agent.close()


def step_worker(agent: Any, name: str) -> Worker:
    """The background worker owned by the agent's step `name` (outbox, telegram)."""
    step = agent.step(name)
    assert isinstance(step, outbox.OutboxStep | linking.TelegramLinkStep)
    return step.worker
