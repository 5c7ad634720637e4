"""Fixtures for the data tests: quiet `datasets` and a private cache per test."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()


@pytest.fixture
def cache_dir(tmp_path) -> str:
    """A fresh `datasets` cache per test: nothing leaks into ~/.cache or between tests."""
    return str(tmp_path / "hf_cache")
