"""Shared fixtures: tiny random models per architecture, built once per test session."""

from __future__ import annotations

import pytest

from tests.tiny_models import ARCHS, make_model


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {arch: str(make_model(arch, root / arch)) for arch in ARCHS}
