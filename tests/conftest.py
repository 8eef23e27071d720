"""Shared fixtures: tiny random models per architecture, built once per test session."""

from __future__ import annotations

import os

import pytest

from tests.tiny_models import ARCHS, make_model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {arch: str(make_model(arch, root / arch)) for arch in ARCHS}


def pytest_configure(config: pytest.Config) -> None:
    """`pytest -m fuzz` runs the fuzzing tests larger than the default run does."""
    if "fuzz" in (config.option.markexpr or ""):
        os.environ.setdefault("PAGEDLLM_FUZZ_EXAMPLES", "200")
