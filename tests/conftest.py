"""Shared fixtures: a tiny random-weight model, the real default model, one local Ray, composed configs.

Markers say what a test needs: `model` (the real default model), `ray`, `vllm`, `gpu`. Each of
them also makes the test `slow`, the tier `make test-fast` skips; `gpu` tests skip without CUDA.
`heavy` marks the checks of minutes that `make test` leaves to `make test-heavy`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent


NEEDS = ("model", "ray", "vllm", "gpu", "heavy")


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if any(item.get_closest_marker(name) for name in NEEDS):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> str:
    """A folder holding the tiny random-weight model (tests/tiny_model.py)."""
    from tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def tiny_engine(tiny_path):
    """The hf engine on the tiny model: for mechanism tests of loops, caches and workflows."""
    from qsteer.engines import build_engine

    return build_engine("hf", path=tiny_path, max_batch_rows=64)


@pytest.fixture(scope="session")
def tiny_engine64(tiny_path):
    """The tiny model in float64: outputs bitwise independent of batch shapes and of how a context was
    fed (prefilled whole or decoded token by token), so two loops can be compared token for token."""
    from qsteer.engines import build_engine

    return build_engine("hf", path=tiny_path, dtype="float64", max_batch_rows=64)


@pytest.fixture(scope="session")
def engine():
    from qsteer.engines.hf import HFEngine

    return HFEngine(max_batch_rows=64)


@pytest.fixture(scope="session")
def reference_model(engine):
    """The same weights through transformers' own eager attention: an independent reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(engine.path, attn_implementation="eager").eval()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for all end-to-end tests; run_job joins it instead of starting its own."""
    import ray

    # Ray workers must import the test-only reward functions in tests/, and this tree's qsteer.
    pythonpath = os.pathsep.join([str(TESTS_DIR.parent), str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    yield ray
    ray.shutdown()


@pytest.fixture
def compose():
    """Compose the packaged config with overrides, as the `qsteer` command would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    def _compose(*overrides: str):
        with initialize_config_module("qsteer.conf", version_base="1.3"):
            return hydra_compose("config", overrides=["progress=false", *overrides])

    return _compose
