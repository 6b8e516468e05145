"""Shared fixtures (kept small: area helpers live in tests/helpers_<area>.py)."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_default_db(tmp_path, monkeypatch):
    """No test may touch ./ckptreg.duckdb of the working directory: point the default elsewhere."""
    monkeypatch.setenv("CKPTREG_DB", str(tmp_path / "default-registry.duckdb"))
    monkeypatch.delenv("CKPTREG_LOCK_TIMEOUT", raising=False)


@pytest.fixture
def db_path(tmp_path):
    """A registry database path inside tmp_path (the file does not exist yet)."""
    return tmp_path / "registry.duckdb"


@pytest.fixture
def registry(db_path):
    """A Registry on a fresh database in tmp_path."""
    from ckptreg.registry import Registry

    return Registry(db_path, lock_timeout=20.0)
