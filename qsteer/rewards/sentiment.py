"""Lexicon sentiment reward: VADER's compound score of the completion, in [-1, 1]."""

from __future__ import annotations

from typing import Any


class SentimentReward:
    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        return [self._analyzer.polarity_scores(text)["compound"] for text in completions]
