"""The draft configuration (`draft=` config group), field by field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from qsteer.speculative.trees import tree_shape

KINDS = ("model", "layerskip", "lookup", "recycle")
MODES = ("lossless", "ead")
VERIFY = ("auto", "rrs", "kseq")


@dataclass(frozen=True)
class SpeculativeConfig:
    kind: str = "lookup"  # model | layerskip | lookup | recycle
    gamma: int = 5  # draft tokens per round (the most, when adaptive)
    # -- several drafts per round (model, layerskip): SpecTr's K-SEQ or RSD's recursive rejection
    num_drafts: int = 1
    verify: str = "auto"  # auto: rrs; kseq: SpecTr (i.i.d. drafts); rrs: RSD (first tokens without replacement)
    # -- adaptive draft length (model, layerskip): SpecDec++'s stop when P(some rejection) > threshold
    adaptive: bool = False
    threshold: float = 0.3
    min_gamma: int = 2
    # -- model: another causal LM with the policy's tokenizer
    path: str | None = None  # null: the policy's own model (a draft that accepts everything)
    colocate: bool = True  # false: the draft lives in its own actor group (`draft` role)
    # -- layerskip: the policy with sub-blocks skipped
    skip_ratio: float = 0.45  # fraction of the attention and MLP sub-blocks of layers 1..L-2 skipped
    skip: tuple[tuple[str, int], ...] | None = None  # explicit (("attn"|"mlp"), layer) pairs; overrides ratio
    search: int = 0  # SWIFT: candidate skip sets tried on the fly (0: keep the even layer set)
    # -- lookup: prompt lookup / input-guided copy
    max_ngram: int = 3
    # -- recycle: Token Recycling
    topk: int = 8
    tree: str | tuple[tuple[int, ...], ...] = "2.2.2"
    # -- Entropy Adaptive Decoding (lossy): the draft is the small model, the policy the large one
    mode: str = "lossless"  # lossless | ead
    entropy_threshold: float = 2.0  # bits, rolling mean over `entropy_window` steps
    entropy_window: int = 5
    min_dwell: int = 4
    extra: dict[str, Any] = field(default_factory=dict)  # backend passthrough (vllm speculative_config)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"draft.{key}: {why}")

        if self.kind not in KINDS:
            raise bad("kind", f"{self.kind!r} is not one of {', '.join(KINDS)}")
        if self.mode not in MODES:
            raise bad("mode", f"{self.mode!r} is not one of {', '.join(MODES)}")
        if self.verify not in VERIFY:
            raise bad("verify", f"{self.verify!r} is not one of {', '.join(VERIFY)}")
        if self.gamma < 1:
            raise bad("gamma", f"must be at least 1, got {self.gamma}")
        if self.num_drafts < 1:
            raise bad("num_drafts", f"must be at least 1, got {self.num_drafts}")
        if self.num_drafts > 1 and not self.stochastic:
            raise bad("num_drafts", f"several drafts need a draft with probabilities (model, layerskip), not {self.kind}")
        if not 0 <= self.skip_ratio < 1:
            raise bad("skip_ratio", f"must be in [0, 1), got {self.skip_ratio}")
        if self.adaptive and not 0 < self.threshold <= 1:
            raise bad("threshold", f"must be in (0, 1], got {self.threshold}")
        if self.adaptive and self.num_drafts > 1:
            raise bad("adaptive", "adaptive draft length is for one draft chain (num_drafts: 1)")
        if self.kind == "recycle":
            tree_shape(self.tree, self.topk)
        if self.mode == "ead" and not self.stochastic:
            raise bad("mode", "ead switches between two models: the draft must be model or layerskip")

    @property
    def stochastic(self) -> bool:
        """Drafts sampled from a distribution q (verified by rejection), not copied tokens."""
        return self.kind in ("model", "layerskip")

    @property
    def rule(self) -> str:
        if not self.stochastic:
            return "match"
        return "kseq" if self.verify == "kseq" else "rrs"

    def key(self) -> tuple:
        """Hashable identity: the engine keeps one drafter (and its learned state) per config."""
        return tuple(sorted((k, repr(v)) for k, v in asdict(self).items()))

    @classmethod
    def from_dict(cls, values: dict[str, Any] | SpeculativeConfig) -> SpeculativeConfig:
        if isinstance(values, SpeculativeConfig):
            return values
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"draft: unknown keys {unknown}; known: {sorted(known)}")
        values = dict(values)
        if values.get("skip") is not None:
            values["skip"] = tuple((str(kind), int(layer)) for kind, layer in values["skip"])
        if not isinstance(values.get("tree", "2.2.2"), str):
            values["tree"] = tuple(tuple(int(i) for i in path) for path in values["tree"])
        values["extra"] = dict(values.get("extra") or {})
        return cls(**values)
