"""`reward=calibrated` as a reward role: the base reward's actors judge, the reference policy's actors sample.

`CalibratedRewardGroup` meets `RewardRole`, so every workflow (and ctrl_align's TRL reward
function) uses it unchanged. A completion's reward is Phi(C(x, y)), its calibrated reward C
(`qsteer.rewards.calibrated.calibrate`: the rank of its base reward among M reference samples'
base rewards, ties as half) through the transform. The reference samples come from the policy
group (`model=`: the reference policy), with the job's sampling settings and seed but their own
random streams (key `reference/<id>`), so they are never the very samples being judged; they are
scored by the base reward group in one call per batch of prompts, and cached in memory and on
disk (`ReferenceCache`). A base reward's info (a failing test's reason) is kept, with the raw
reward and C beside it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from qsteer.actors.roles import PolicyRole, RewardRole, Scored
from qsteer.engines import SamplingParams
from qsteer.rewards.calibrated import CalibratedReward, ReferenceCache, calibrate, transform

REFERENCE_KEY = "reference/"  # prefix of the reference samples' random-stream keys


class CalibratedRewardGroup:
    """The calibrated, transformed reward over a base reward group and a reference policy group."""

    def __init__(
        self,
        base: RewardRole,
        reference: PolicyRole,
        params: SamplingParams,
        num_reference: int = 32,
        transform: str = "identity",
        t: float | None = None,
        chat: bool = True,
        cache: ReferenceCache | None = None,
    ) -> None:
        self.base = base
        self.reference_policy = reference
        self.params = replace(params, n=num_reference, speculative=None)
        self.chat = chat
        self.reference_calls = 0
        self.calibrated = CalibratedReward(
            self._base_values, self._reference_scores, num_reference=num_reference, transform=transform, t=t,
            cache=cache,
        )

    def __len__(self) -> int:
        return len(self.base)

    def info(self) -> list[dict[str, Any]]:
        return self.base.info()

    def shutdown(self) -> None:
        self.base.shutdown()

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]] | None,
        columns: dict[str, list[Any]],
    ) -> list[Scored]:
        """(Phi(C), info with `raw_reward` and `calibrated`) per completion; (None, info) where the base failed."""
        raw = self.base.score(prompts, completions, completion_ids, columns)
        references = self.prepare(prompts, columns)
        out: list[Scored] = []
        for (value, info), reference in zip(raw, references, strict=True):
            if value is None:
                out.append((None, info))
                continue
            u = float(calibrate([value], reference)[0])
            phi = float(transform([u], self.calibrated.transform, self.calibrated.t)[0])
            out.append((phi, {**info, "raw_reward": value, "calibrated": u}))
        return out

    def prepare(self, prompts: list[str], columns: dict[str, list[Any]] | None = None) -> list[Any]:
        """Each prompt's sorted reference scores, sampling and scoring (one call each) the prompts not cached."""
        columns = columns or {}
        rows = [{name: values[i] for name, values in columns.items()} for i in range(len(prompts))]
        return self.calibrated.reference(prompts, rows)

    def _reference_scores(self, prompts: list[str], rows: list[dict[str, Any]], m: int) -> list[list[float | None]]:
        keys = [REFERENCE_KEY + str(row.get("id", prompt)) for prompt, row in zip(prompts, rows, strict=True)]
        prompt_ids = self.reference_policy.encode(prompts, self.chat)
        samples = self.reference_policy.generate(prompt_ids, replace(self.params, n=m), keys)
        self.reference_calls += 1
        flat_prompts = [p for p, group in zip(prompts, samples, strict=True) for _ in group]
        flat_rows = [row for row, group in zip(rows, samples, strict=True) for _ in group]
        names = sorted({name for row in rows for name in row})
        flat_columns = {name: [row.get(name) for row in flat_rows] for name in names}
        scored = self.base.score(
            flat_prompts, [c.text for g in samples for c in g], [c.token_ids for g in samples for c in g],
            flat_columns,
        )
        out, start = [], 0
        for group in samples:
            out.append([value for value, _ in scored[start : start + len(group)]])
            start += len(group)
        return out

    def _base_values(self, prompts: list[str], completions: list[str], completion_ids=None, **columns: Any):
        # CalibratedReward's own base call; `score` above calls the base group directly to keep its info.
        return [value for value, _ in self.base.score(prompts, completions, completion_ids, columns)]
