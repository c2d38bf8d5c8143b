"""Vendi score: exact values on given kernels, and the embedding model's behaviour on code."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qsteer.metrics.vendi import vendi_score_of_embeddings, vendi_score_of_kernel


@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_identical_items_score_one(n):
    assert vendi_score_of_kernel(np.ones((n, n))) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score_of_embeddings(np.tile([0.3, -1.2, 2.0], (n, 1))) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_orthogonal_items_score_n(n):
    assert vendi_score_of_kernel(np.eye(n)) == pytest.approx(n, abs=1e-9)
    rotation, _ = np.linalg.qr(np.random.default_rng(n).normal(size=(n, n)))
    assert vendi_score_of_embeddings(3.0 * rotation) == pytest.approx(n, abs=1e-9)


def test_two_items_with_similarity_s():
    # K/2 has eigenvalues (1 + s)/2 and (1 - s)/2.
    for similarity in (0.0, 0.25, 0.5, 0.9):
        high, low = (1 + similarity) / 2, (1 - similarity) / 2
        expected = math.exp(-(high * math.log(high) + (low * math.log(low) if low else 0.0)))
        kernel = np.array([[1.0, similarity], [similarity, 1.0]])
        assert vendi_score_of_kernel(kernel) == pytest.approx(expected, abs=1e-12)


def test_counts_distinct_groups_not_copies():
    # Three mutually orthogonal groups of 4 copies each: the effective number of items is 3.
    embeddings = np.repeat(np.eye(3), 4, axis=0)
    assert vendi_score_of_embeddings(embeddings) == pytest.approx(3.0, abs=1e-9)


def test_bad_kernels_are_named():
    with pytest.raises(ValueError, match="square"):
        vendi_score_of_kernel(np.ones((2, 3)))
    with pytest.raises(ValueError, match="symmetric"):
        vendi_score_of_kernel(np.array([[1.0, 0.2], [0.5, 1.0]]))
    with pytest.raises(ValueError, match="diagonal"):
        vendi_score_of_kernel(np.array([[2.0, 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="zero vector"):
        vendi_score_of_embeddings(np.array([[0.0, 0.0], [1.0, 0.0]]))


SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "def is_palindrome(s):\n    return s == s[::-1]\n",
    "import json\n\ndef load(path):\n    with open(path) as handle:\n        return json.load(handle)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n",
    "for i in range(10):\n    print(i * i)\n",
]


@pytest.fixture(scope="module")
def embedder():
    from qsteer.metrics.vendi import TextEmbedder

    return TextEmbedder()


@pytest.mark.model
def test_distinct_code_scores_higher_than_repeats(embedder):
    from qsteer.metrics.vendi import vendi_score

    distinct = vendi_score(SNIPPETS, embedder)
    repeated = vendi_score([SNIPPETS[0]] * len(SNIPPETS), embedder)
    assert repeated == pytest.approx(1.0, abs=1e-4)
    assert distinct > 2.0 > repeated
    assert distinct <= len(SNIPPETS) + 1e-9


@pytest.mark.model
def test_embeddings_match_sentence_transformers(embedder):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    reference = sentence_transformers.SentenceTransformer(str(embedder.path), device="cpu")
    expected = reference.encode(SNIPPETS, convert_to_numpy=True, normalize_embeddings=False)
    ours = embedder.embed(SNIPPETS)
    assert ours.shape == expected.shape == (len(SNIPPETS), 384)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
