"""Fixtures shared by several test files."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sharded_runs(tmp_path_factory):
    """HDPTrainer runs under ZeRO stages 0-2 and FSDP2 on 4, 2 and 1 gloo ranks (tests/test_zero.py's
    ``train_all``), launched once for tests/test_zero.py and tests/test_fsdp.py together."""
    from tests.test_zero import train_all

    return train_all(tmp_path_factory.mktemp("sharded"))
