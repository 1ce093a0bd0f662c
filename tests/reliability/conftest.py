"""Reliability tests: the fault bookkeeping hooks and the pipeline fixtures (tiny model, workspace)."""

from tests.pipeline.conftest import built, params, tiny_model_dir, workspace  # noqa: F401  (fixtures)
from tests.reliability.plugin import (  # noqa: F401  (pytest hooks)
    pytest_addoption,
    pytest_configure,
    pytest_runtest_call,
    pytest_runtest_makereport,
)
from tests.reliability.plugin import pytest_sessionfinish  # noqa: F401
