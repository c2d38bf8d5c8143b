"""The generation cache: completions stored by what determines them, so reruns generate only what is new.

A completion is fixed by the model (its identity: weights, dtype, device, engine and its
arguments), the prompt's tokens, the sampling parameters, the seed, the prompt's id (which names
its random streams) and the sample's index: every (prompt id, sample index) has its own stream
(`lm.params.sample_seed`), so sample j of a prompt is the same whichever N asked for it. The
cache keys an entry file by a hash of all of these except the sample index, and keeps the
prompt's samples by index inside it. A rerun with a new reward or aggregate then re-scores from
the cache without generating, and growing N from 4 to 8 generates only samples 4..7
(`SamplingParams.first_sample`).

`CachedPolicy` wraps any policy role (Ray actors or in-process) on the driver's side; it counts
hits and misses per sample, which the run's summary reports. Entries are written atomically
(temp file, then rename), so a crash leaves an entry whole or absent, and two runs sharing a cache
folder at worst generate the same samples twice.

Exactness: on CPU in float32, a sample generated in another batch can differ in its last bits
(docs/architecture.md), so a cached sample equals a fresh one as exactly as a resumed run does.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from qsteer.actors.roles import PolicyRole
from qsteer.engines import Completion, SamplingParams


def model_identity(path: str, **settings: Any) -> dict[str, Any]:
    """What makes a model generate what it does: its folder's weight and config files (name, size,
    modification time: hashing gigabytes of weights per run would cost more than it saves), or the hub
    id when it is not a local folder, and the settings that change its arithmetic."""
    folder = Path(path)
    files = []
    if folder.is_dir():
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.suffix in (".safetensors", ".bin", ".json", ".gguf", ".model", ".jinja"):
                stat = file.stat()
                files.append([file.name, stat.st_size, stat.st_mtime_ns])
    return {"path": str(folder.resolve()) if folder.is_dir() else path, "files": files, **settings}


def _digest(obj: Any) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True).encode(), digest_size=16).hexdigest()


class GenerationCache:
    """A folder of entries, one per (model, prompt tokens, sampling parameters, seed, prompt id)."""

    def __init__(self, folder: str | Path, model: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model = _digest(model)

    def key(self, prompt_ids: list[int], params: SamplingParams, prompt_key: str) -> str:
        sampling = {k: v for k, v in asdict(params).items() if k not in ("n", "first_sample")}
        return _digest({"model": self.model, "prompt": list(prompt_ids), "sampling": sampling, "key": prompt_key})

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def load(self, key: str) -> dict[int, Completion]:
        path = self._path(key)
        if not path.exists():
            return {}
        samples = json.loads(path.read_text())["samples"]
        return {int(j): Completion(**c) for j, c in samples.items()}

    def store(self, key: str, samples: dict[int, Completion]) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        merged = {**self.load(key), **samples}  # another run may have added samples meanwhile
        text = json.dumps({"samples": {str(j): asdict(c) for j, c in sorted(merged.items())}})
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class CachedPolicy:
    """A policy role that serves samples from a GenerationCache and generates only the missing ones."""

    def __init__(self, policy: PolicyRole, cache: GenerationCache) -> None:
        self.policy = policy
        self.cache = cache
        self.hits = self.misses = self.generated_tokens = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:  # encode, score, topk_next, info, __len__ go to the policy
        return getattr(self.policy, name)

    def __len__(self) -> int:
        return len(self.policy)

    def counts(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "generated_tokens": self.generated_tokens}

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str]) -> list[list[Completion]]:
        if params.offset or params.offsets is not None or params.budgets is not None:
            # a continuation of a stream (blockwise decoding, a search step) is not a whole sample
            return self.policy.generate(prompt_ids, params, keys)
        entry_keys = [self.cache.key(ids, params, key) for ids, key in zip(prompt_ids, keys, strict=True)]
        have = [self.cache.load(k) for k in entry_keys]
        # each prompt generates from its first missing sample on; prompts that start at the same
        # sample go in one call (a rerun or a larger N: all of them)
        starts = [next((j for j in range(params.n) if j not in cached), params.n) for cached in have]
        for start in sorted(set(starts) - {params.n}):
            todo = [i for i, s in enumerate(starts) if s == start]
            fresh = self.policy.generate([prompt_ids[i] for i in todo],
                                         replace(params, n=params.n - start, first_sample=start),
                                         [keys[i] for i in todo])
            for i, completions in zip(todo, fresh, strict=True):
                new = {start + j: c for j, c in enumerate(completions)}
                self.cache.store(entry_keys[i], new)
                have[i] = {**have[i], **new}
                with self._lock:
                    self.misses += len(new)
                    self.generated_tokens += sum(len(c.token_ids) for c in new.values())
        with self._lock:
            self.hits += sum(min(s, params.n) for s in starts)
        return [[cached[j] for j in range(params.n)] for cached in have]
