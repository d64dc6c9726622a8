"""Property-based run over the OpenAPI description: no 5xx, every answer fits the schema.

Schemathesis reads /api/v1/openapi.json from the app and throws generated requests
(valid and invalid) at every operation, signed in as an admin so the admin endpoints are
exercised too, and as a plain user. SQLite only, to stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gpulocker import tokens
from gpulocker.context import Context
from gpulocker.db import Database, upgrade
from tests.helpers import ADMIN, ALICE
from tests.web.api_fixtures import app

__all__ = ["app"]

EXAMPLES = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only for this module."""
    url = f"sqlite:///{tmp_path}/gpulocker.db"
    database = Database(url)
    upgrade(database.engine)
    database.dispose()
    return url


def headers_of(ctx: Context, user: str) -> dict[str, str]:
    _row, raw = tokens.create(ctx.db, user, "schemathesis")
    return {"Authorization": f"Bearer {raw}"}


def run_operation(operation: Any, mode: GenerationMode, headers: dict[str, str]) -> None:
    """Generated requests of one mode against one operation, every check on each answer."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    run()


# schemathesis.pytest.from_fixture cannot run under pytest 9 (it needs Function._nodeid), so
# the operations are walked here, each with positive and negative data.
@pytest.mark.timeout(300)
@pytest.mark.parametrize("user", [ADMIN, ALICE], ids=["admin", "alice"])
def test_the_api_keeps_its_description(
    app: Flask, ctx: Context, pam_service: str, user: str
) -> None:
    headers = headers_of(ctx, user)
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    for operation in operations:
        has_input = any((operation.path_parameters, operation.query, operation.body))
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if has_input else [])
        for mode in modes:
            run_operation(operation, mode, headers)
