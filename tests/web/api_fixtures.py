"""Fixtures for the API tests: the real app on the test's database, clients, tokens."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gpulocker import tokens
from gpulocker.context import Context
from gpulocker.web import create_app

Headers = dict[str, str]


@pytest.fixture
def app(ctx: Context) -> Flask:
    """The web app on the test's Context (failed sign-ins are not padded, to keep tests fast)."""
    application = create_app(ctx=ctx)
    application.config.update(TESTING=True)
    return application


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of the app."""
    return app.test_client()


@pytest.fixture
def bearer(ctx: Context, users: dict[str, object]) -> Callable[[str], Headers]:
    """`bearer(user)` -> headers carrying a fresh API token of `user`. The accounts must
    exist: a token of an account not in good standing is refused (`users` makes them)."""
    made: dict[str, Headers] = {}

    def headers_for(user: str) -> Headers:
        if user not in made:
            _row, raw = tokens.create(ctx.db, user, "test")
            made[user] = {"Authorization": f"Bearer {raw}"}
        return made[user]

    return headers_for
