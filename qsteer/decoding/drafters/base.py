"""What a speculative round passes around, and what the loop asks of a drafter.

`Drafter` is the protocol the speculative loop (`qsteer.decoding.speculative`) takes its draft
source through, as gpt-fast's `speculative_decode` takes its draft model: a drafter in this
process (lookup, recycle, layerskip, model) or one behind a Ray actor (`qsteer.actors.draft`),
which the loop cannot tell apart. `DraftConfig` is the base of every drafter's config dataclass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import torch

from qsteer.lm.sampling import SamplingParams


def config_error(key: str, why: str) -> ValueError:
    return ValueError(f"draft.{key}: {why}")


@dataclass(frozen=True)
class DraftConfig:
    """Fields every draft config has; each kind's dataclass adds its own (`qsteer.decoding.DRAFT_CONFIGS`)."""

    kind: str = ""
    """Which drafter: lookup, recycle, layerskip, model (lossless speculation) or ead (lossy model switching)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """vllm engine only: merged key by key into vLLM's speculative_config (e.g. {method: eagle, model: ...})."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "extra", dict(self.extra or {}))

    @property
    def stochastic(self) -> bool:
        """Drafts sampled from a distribution q (verified by rejection), not copied tokens."""
        return False

    def key(self) -> tuple:
        """Hashable identity: an engine keeps one drafter (and what it has learned) per config."""
        return tuple(sorted((k, repr(v)) for k, v in asdict(self).items()))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DraftConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            named = ", ".join(f"draft.{key}" for key in unknown)
            raise ValueError(f"{named}: not a key of draft.kind={cls.kind}; its keys: {', '.join(sorted(known))}")
        return cls(**values)


@dataclass
class Draft:
    tokens: torch.Tensor  # [rows, nodes] draft tokens
    parents: list[int]  # [nodes] the tree's shape, shared by all rows; -1 is the root (the last emitted token)
    valid: torch.Tensor  # [rows, nodes] a row may use fewer nodes (no lookup match, adaptive stop)
    q: torch.Tensor | None = None  # [rows, nodes, vocab] the processed draft distribution each node was drawn from
    without_replacement: bool = False  # siblings drawn without replacement (RSD), else i.i.d. or deterministic
    calls: int = 0  # draft forward passes spent on this round
    root: torch.Tensor | None = None  # [rows] the last emitted token the tree hangs from (set by the loop)

    @property
    def depths(self) -> list[int]:
        depth: list[int] = []
        for parent in self.parents:
            depth.append(0 if parent < 0 else depth[parent] + 1)
        return depth


@dataclass
class Rows:
    """What any drafter may see of a batch: each row's tokens, the key of its random streams, the sampling."""

    history: list[list[int]]  # per row: prompt + emitted tokens; the last one is not yet in the target cache
    keys: list[tuple[str, int]]  # (prompt key, sample index) per row
    params: SamplingParams


@dataclass
class Batch(Rows):
    """The loop's whole batch: also the target's cache, for drafters that draft on it (layer skipping)."""

    cache: object = None  # the target's DynamicCache of PreallocatedLayers
    valid: torch.Tensor | None = None  # [rows, cache length] bool: the columns each row attends to
    pos: torch.Tensor | None = None  # [rows] position id of each row's last token

    @property
    def last(self) -> torch.Tensor:
        return torch.tensor([h[-1] for h in self.history], device=self.pos.device)


class Drafter(Protocol):
    """A draft source for the speculative loop. The loop calls `begin` once per batch of rows, then per
    round `propose` and `observe`, `select` when the batch drops finished rows, and `finish` at the end.
    The bodies here are the defaults of a drafter that keeps no per-batch state."""

    max_nodes: int  # the most draft nodes one round proposes per row (sizes the cache's headroom)
    rule: str  # how sampled rows verify its drafts: match (copied tokens), rrs or kseq (drafts drawn from q)

    def begin(self, batch: Rows) -> None:
        """A batch of rows starts: set up per-row random streams or a draft cache."""

    def propose(self, batch: Batch) -> Draft:
        """One draft tree per row, hanging from each row's last token."""
        ...

    def observe(self, batch: Batch, draft: Draft, logits: torch.Tensor) -> None:
        """The target's logits [rows, 1 + nodes, vocab] over the round's chunk: what a drafter learns from."""

    def select(self, keep: torch.Tensor) -> None:
        """The batch keeps only rows `keep` (in that order)."""

    def finish(self) -> None:
        """The batch is done."""
