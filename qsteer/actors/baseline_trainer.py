"""The baseline trainer role: a DPO job in its own actor (GPU or CPU), and the trained model it serves.

`workflow=align_baseline` samples and scores with the policy and reward actors, then hands the
preference pairs to this actor, which runs TRL's DPO (`training.baseline`) on its own copy of the
policy's weights and writes the model into the run folder (on a cluster, a folder every node
sees). It then samples from the trained model, so the card's reward after is measured on the
same prompts and random streams as the reward before.
"""

from __future__ import annotations

from typing import Any

from qsteer.actors.policy import Policy
from qsteer.engines import Completion, SamplingParams, build_engine
from qsteer.training.baseline import Pair, align_dpo, write_card


class BaselineTrainer:
    def __init__(self, model_path: str = "default", chat_template: bool = True, num_threads: int | None = None,
                 dtype: str = "auto", device: str = "auto") -> None:
        self.model_path, self.chat, self.num_threads = model_path, chat_template, num_threads
        self.dtype, self.device = dtype, device
        self.trained: dict[str, Policy] = {}
        self.calls = 0

    def info(self) -> dict[str, Any]:
        return {"calls": self.calls, "model_path": self.model_path}

    def align_dpo(self, pairs: list[Pair], out_dir: str, settings: dict[str, Any]) -> dict[str, Any]:
        """DPO on the pairs from the policy's weights; the model folder goes to `out_dir`."""
        self.calls += 1
        self.trained.pop(out_dir, None)
        return align_dpo(self.model_path, pairs, out_dir, chat=self.chat, num_threads=self.num_threads, **settings)

    def generate(self, model_dir: str, prompt_ids: list[list[int]], params: SamplingParams,
                 keys: list[str]) -> list[list[Completion]]:
        """Samples from a trained model (loaded once), with the policy's random streams."""
        self.calls += 1
        if model_dir not in self.trained:
            self.trained[model_dir] = Policy(build_engine("hf", path=model_dir, dtype=self.dtype, device=self.device,
                                                          chat_template=self.chat, num_threads=self.num_threads))
        return self.trained[model_dir].generate(prompt_ids, params, keys)

    def write_card(self, out_dir: str, card: dict[str, Any]) -> None:
        write_card(out_dir, card)
