"""Loading a causal LM for the loops: device, dtype, attention kernel, LM head, and what loops need to know.

Two CPU-specific choices, both measured on the default model (SmolLM2-135M, 2 cores):
- attention is torch's SDPA with grouped-query attention inside the kernel (`gqa_sdpa_attention`);
- the LM head takes a transposed product for a handful of rows (`small_batch_head`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from qsteer.lm.fused import fuse_projections as fuse
from qsteer.lm.stop import StopRule, eos_ids, token_budget
from qsteer.models import resolve_model_path

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # bf16 halves memory traffic on GPUs; CPUs here have no fast bf16 matmul.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of: auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def gqa_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       **_kwargs):
    """SDPA with grouped-query attention done inside the kernel.

    transformers' `sdpa` copies every key/value head group (`repeat_kv`) whenever a mask is
    given, which with left padding is always: on CPU that copy of the whole KV cache in every
    layer at every step costs as much as the attention itself. torch's CPU kernel takes the
    mask and `enable_gqa` together, so nothing needs copying.
    """
    causal = query.shape[2] > 1 and attention_mask is None and (is_causal if is_causal is not None else True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("qsteer_gqa_sdpa", gqa_sdpa_attention)
AttentionMaskInterface.register("qsteer_gqa_sdpa", sdpa_mask)


def small_batch_head(head: torch.nn.Linear):
    """The LM head's forward for few rows: weight @ hidden.T instead of hidden @ weight.T.

    On CPU, MKL runs `linear` with a handful of rows (one decode step of a few sequences, a
    speculative verify chunk) far below its speed for the transposed product: measured here for
    the 49152 x 576 head, 17 ms against 3 ms at 2 rows and 25 ms against 9 ms at 11. A single
    row goes to a slower matrix-vector kernel, so it is doubled. The product's values depend on
    the row count, while `linear`'s do not from 4 rows up (measured): plain decoding therefore
    uses it only below 4 rows (where `linear` is not batch-invariant either), and the speculative
    loop, which trades that for latency, up to `head.small_rows = 24` (`many_small_rows`).
    """
    weight = head.weight
    head.small_rows = 3

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        rows = flat.shape[0]
        if rows > head.small_rows:
            return torch.nn.functional.linear(hidden, weight)
        if rows == 1:
            flat = flat.expand(2, -1)
        return (weight @ flat.T).T[:rows].reshape(*hidden.shape[:-1], weight.shape[0])

    return forward


@contextlib.contextmanager
def many_small_rows(model, rows: int = 24):
    """Let the small-batch head take up to `rows` rows (speculative verify chunks) for a while."""
    head = model.get_output_embeddings()
    previous = getattr(head, "small_rows", None)
    if previous is not None:
        head.small_rows = rows
    try:
        yield
    finally:
        if previous is not None:
            head.small_rows = previous


@dataclass
class LanguageModel:
    """A loaded causal LM and what every token loop needs to know about it."""

    model: torch.nn.Module
    tokenizer: object
    path: str
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: list[int]
    pad_id: int
    context_length: int

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def stop_rule(self, stop: list[str]) -> StopRule:
        return StopRule(self.tokenizer, self.eos_token_ids, stop)

    def budget(self, prompt_length: int, max_new_tokens: int) -> int:
        return token_budget(prompt_length, max_new_tokens, self.context_length)


def load_language_model(path: str | None = None, dtype: str = "auto", device: str = "auto",
                        trust_remote_code: bool = False, fuse_projections: bool = False) -> LanguageModel:
    """`path` (a folder, a hub id, or None/`default` for the shipped model) on `device` in `dtype`;
    `fuse_projections` fuses q/k/v and gate/up into one matmul each (`lm.fused`)."""
    resolved = resolve_model_path(path)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    # On CUDA, torch's fused kernels want no mask with GQA, so keep transformers' own choice there.
    attention = "qsteer_gqa_sdpa" if torch_device.type == "cpu" else None
    model = AutoModelForCausalLM.from_pretrained(
        resolved, dtype=torch_dtype, trust_remote_code=trust_remote_code, attn_implementation=attention
    ).to(torch_device)
    model.eval()
    head = model.get_output_embeddings()
    if torch_device.type == "cpu" and type(head) is torch.nn.Linear and head.bias is None:
        head.forward = small_batch_head(head)
    if fuse_projections:
        fuse(model)
    eos = eos_ids(tokenizer.eos_token_id, model.generation_config.eos_token_id)
    pad = tokenizer.pad_token_id
    return LanguageModel(
        model=model, tokenizer=tokenizer, path=resolved, device=torch_device, dtype=torch_dtype, eos_token_ids=eos,
        pad_id=pad if pad is not None else eos[0],
        context_length=int(getattr(model.config, "max_position_embeddings", 2048)),
    )


def load_draft_model(path: str | None, lm: LanguageModel) -> torch.nn.Module:
    """The draft LM for `path` beside `lm`: its own weights when path is null or the same folder."""
    if path is None or resolve_model_path(path) == lm.path:
        return lm.model
    resolved = resolve_model_path(path)
    tokenizer = AutoTokenizer.from_pretrained(resolved)
    if tokenizer.get_vocab() != lm.tokenizer.get_vocab():
        raise ValueError(f"draft.path={path!r}: its tokenizer differs from the policy's; a draft must share it")
    model = AutoModelForCausalLM.from_pretrained(
        resolved, dtype=lm.dtype, attn_implementation=lm.model.config._attn_implementation
    ).to(lm.device)
    return model.eval()
