"""Model primitives under every token loop: nothing here knows about decoding methods, engines or Ray.

- `loading`: a causal LM on its device and dtype, the attention it runs with, the small-row LM
  head, fused projections, and `LanguageModel` (the model with what every loop needs to know).
- `cache`: the preallocated KV cache, cropped, compacted and written row by row.
- `forward`: left padding, prefill (shared by the n samples of a prompt), and the masked forward
  of a chunk of tokens over a cache with holes.
- `params`: `SamplingParams` and the seed of each row's random stream (no torch).
- `sampling`: the per-row random streams, filtering and inverse-CDF draws.
- `stop`: the one rule that ends a row (EOS, stop string, budget) and cuts its text.
"""
