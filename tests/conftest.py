"""Shared fixtures (socket pairs live in bus.io.testing)."""

from __future__ import annotations

import pytest

from bus.wire.identity import Identity


@pytest.fixture(scope="session")
def server_identity() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="session")
def client_identity() -> Identity:
    return Identity.generate()

