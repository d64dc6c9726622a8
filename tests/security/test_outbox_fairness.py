"""One dead destination never holds up everybody else's notifications (SPEC §12)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import time_machine

from gpulocker.config import Settings
from gpulocker.context import Context
from gpulocker.db import Database
from gpulocker.models import OutboxMessage, utcnow
from gpulocker.notify import outbox
from tests.fake_telegram import FakeTelegram
from tests.helpers import ALICE, BOB
from tests.notify.test_notify import link, say

DEAD_CHAT, ALICE_CHAT = "666", "4242"
OWED = outbox.BATCH + 100


@pytest.fixture
def fake() -> Iterator[FakeTelegram]:
    server = FakeTelegram(down_chats={DEAD_CHAT}).start()
    yield server
    server.stop()


@pytest.fixture
def tg_ctx(settings: Settings, db: Database, fake: FakeTelegram) -> Iterator[Context]:
    context = Context(
        settings.with_overrides(telegram_bot_token=fake.token, telegram_api_url=fake.url)
    )
    yield context
    context.close()


def test_rows_owed_to_a_dead_chat_do_not_stop_the_others(
    tg_ctx: Context, fake: FakeTelegram
) -> None:
    link(tg_ctx.db, BOB, DEAD_CHAT)  # bob's chat is gone: every send fails, to be retried
    link(tg_ctx.db, ALICE, ALICE_CHAT)
    with tg_ctx.db.transaction() as session:
        now = utcnow()
        session.add_all(
            OutboxMessage(
                channel=outbox.TELEGRAM,
                target=DEAD_CHAT,
                kind="test",
                message=f"owed {n}",
                created_at=now,
                next_attempt_at=now,
            )
            for n in range(OWED)
        )
    say(tg_ctx, "your GPU is ready", users=[ALICE])
    assert outbox.deliver(tg_ctx) == 1
    assert fake.sent == [(ALICE_CHAT, "your GPU is ready")]
    dead_tries = [c for c in fake.calls if c.payload.get("chat_id") == DEAD_CHAT]
    assert len(dead_tries) == 1  # only the dead chat's oldest message was tried
    assert not outbox.has_due(tg_ctx.db)  # ... and it waits for its backoff, costing nothing
    fake.down_chats.clear()  # bob's chat comes back: his messages go, in order
    with time_machine.travel(utcnow() + timedelta(seconds=outbox.FIRST_RETRY_SECONDS + 1)):
        assert outbox.deliver(tg_ctx) == outbox.BATCH
    assert [text for chat, text in fake.sent if chat == DEAD_CHAT][:3] == [
        "owed 0",
        "owed 1",
        "owed 2",
    ]
