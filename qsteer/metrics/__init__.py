"""Metrics over results: pass@k, win rate, lexical diversity, speculative acceptance."""

from qsteer.metrics.comparison import win_rate
from qsteer.metrics.correctness import mean_pass_at_k, pass_at_k
from qsteer.metrics.diversity import distinct_n
from qsteer.metrics.speculative import rates, sum_spec

__all__ = ["distinct_n", "mean_pass_at_k", "pass_at_k", "rates", "sum_spec", "win_rate"]
