"""Chaos fixtures: private Redis and PostgreSQL (these tests stop and restart them), started once a session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .stack import Proc, Stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A migrated database on a private PostgreSQL, a private Redis; never the machine's shared servers."""
    s = Stack.start("marketdata_chaos", tmp_path_factory.mktemp("chaos-logs"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="session")
def _gateways(stack: Stack) -> dict[str, Proc]:
    return {"one": stack.gateway("one"), "two": stack.gateway("two")}


@pytest.fixture
def gateways(stack: Stack, _gateways: dict[str, Proc]) -> dict[str, Proc]:
    """Two gateway processes on the private servers; one a test killed is started again."""
    for name, proc in list(_gateways.items()):
        if not proc.alive():
            _gateways[name] = stack.gateway(name)
    return _gateways
