"""Shared fixtures: the real default model, one local Ray for the session, composed configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).parent


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

    # Ray workers must import the test-only reward functions in tests/.
    pythonpath = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])
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
