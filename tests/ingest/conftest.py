"""The ingest tests' fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["thread", "process"])
def publish_host(request, settings):
    """Publish from a thread of the ingester, then from a process of its own (ingest/publisher_hosts.py).

    Production runs the process host (the command's default), tests the thread host (test
    settings): the pipeline suites run their publishing runs against both (test_commit_order,
    test_live and test_historical whole, test_replay's publishing tests; a test that cannot
    says why).
    """
    settings.INGEST_PUBLISH_PROCESS = request.param == "process"
    return request.param
