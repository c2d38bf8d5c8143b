"""Drafters for the speculative loop, one module each with its own config dataclass and mechanism.

- `lookup`: prompt lookup / input-guided copy from the row's own tokens.
- `recycle`: Token Recycling's table of past top-k predictions, read into a static tree.
- `layerskip`: the policy with sub-blocks skipped (unified layer skipping, SWIFT's search).
- `model`: another causal LM with the policy's tokenizer, on its own KV cache.

`base` holds the `Drafter` protocol and what a round passes around; `chains` the chain sampler
and acceptance predictor the model and layer-skip drafters share.
"""
