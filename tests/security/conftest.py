"""Security test fixtures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from asgiref.sync import sync_to_async
from django.db import connections


@pytest.fixture(autouse=True)
async def _close_gateway_db_connections() -> AsyncIterator[None]:
    """The gateway's database calls run in asgiref's sync thread: close that thread's connections
    after each test, so the test database can be flushed and dropped."""
    yield
    await sync_to_async(connections.close_all)()
