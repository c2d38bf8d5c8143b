"""Value functions V(x, y<t) for value-guided decoding (controlled decoding, beam search, DVTS).

- `base`: the `ValueFunction` protocol a guided loop takes as a collaborator, and weighted sums.
- `model`: scalar and Q heads on their own backbone or on the frozen policy's hidden states,
  with their transformers-format files, and `ValueScorer`, the protocol over token-id lists.
- `guided`: the tokenwise law p exp(alpha V) / Z over the top-k, its sampler and KL accounting.
- `tabular`: an exactly enumerable LM and value, the test bed for all of the above.

This package sits at the decoding level: it imports torch and transformers only (no Ray, no
engines, no workflows). Fitting lives in `qsteer.training.value`; see docs/values.md.
"""

from qsteer.values.base import ValueFunction, WeightedValues
from qsteer.values.guided import best_of_k_kl_bound, guided_logprobs, sample_guided, step_kl
from qsteer.values.model import ValueModel, ValueScorer, checkpoint_kind, load_value_model

__all__ = [
    "ValueFunction",
    "ValueModel",
    "ValueScorer",
    "WeightedValues",
    "best_of_k_kl_bound",
    "checkpoint_kind",
    "guided_logprobs",
    "load_value_model",
    "sample_guided",
    "step_kl",
]
