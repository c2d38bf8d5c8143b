"""Metrics over results: pass@k, win rate, lexical diversity."""

from qsteer.metrics.comparison import win_rate
from qsteer.metrics.correctness import mean_pass_at_k, pass_at_k
from qsteer.metrics.diversity import distinct_n

__all__ = ["distinct_n", "mean_pass_at_k", "pass_at_k", "win_rate"]
