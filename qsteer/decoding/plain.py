"""The plain decode loop: one token per row per step, rows streaming through a fixed set of batch slots.

Read top to bottom, `generate_rows`: the first `max_batch_rows` rows are prefilled (each prompt
once, its cache copied to its n samples: `start`), then every step samples one token per slot
from the slot's logits with the row's own uniform for that step (`lm.sampling`), applies the
stop rule (`lm.stop`), and runs one forward over the sampled tokens. A prompt's tokens and its
n samples' random streams fix a row's output; nothing else does.

Continuous batching: when a row finishes and rows are still waiting, the slot is handed to the
next waiting row (`admit`): its prompt's prefilled keys and values are written into the slot's
row of the cache, right-aligned to the cache's current length, and the slot's mask hides every
other column of that row, as the speculative loop hides rejected drafts. A prompt is prefilled
once, when its first sample is admitted, and kept until its last one is. The admitted slot's
token in the step's forward is a discarded placeholder: its mask column is 0 and its logits are
replaced by the prefill's. When the cache buffer fills up, its holes are squeezed out
(`lm.cache.compact`). With nothing waiting, finished rows ride along until a quarter of the
batch has finished and then the batch shrinks (`shrink`): a cache copy costs as much as a few
decode steps, so shrinking on every finish would cost more than it saves.

A row's tokens depend on nothing but its prompt, its seed and key, and the model's numbers; the
numbers themselves move with the batch's shape in the last bits (MKL's `linear` picks its
reduction order by row count: measured here, [r x 576] @ [576 x 1536] differs from the 300-row
result at every r below 16), which can flip a sampled token whose uniform sits on a CDF boundary.
In float64 (`dtype: float64`) outputs are bitwise independent of batching.

Measured (benchmarks/results/best_of_n_cpu.md): see the continuous-batching rows there.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from qsteer.lm.cache import PreallocatedLayer, compact
from qsteer.lm.forward import prefill
from qsteer.lm.loading import LanguageModel
from qsteer.lm.prefix_cache import PrefixCache
from qsteer.lm.sampling import SamplingParams, sample_tokens, step_uniforms
from qsteer.lm.stop import Completion

# Columns of room beyond the longest prompt + max_new_tokens: holes accumulate in a continuously
# refilled batch, and each `compact` (a copy of the whole cache) buys this many steps.
SLACK_COLUMNS = 64


@dataclass
class _Prefilled:
    """A prompt's prefill, kept while some of its samples still wait for a slot."""

    keys: list[torch.Tensor]  # per layer [1, heads, length, dim]
    values: list[torch.Tensor]
    logits: torch.Tensor  # [vocab] the logits of its first generated token
    length: int
    waiting: int  # samples not yet admitted


@torch.inference_mode()
def generate_rows(lm: LanguageModel, prompt_ids: list[list[int]], keys: list[str], rows: list[tuple[int, int]],
                  params: SamplingParams, max_batch_rows: int, continuous: bool = True,
                  prefix_cache: PrefixCache | None = None) -> list[Completion]:
    """Decode `rows` ((prompt index, sample index) pairs), at most `max_batch_rows` at a time.

    continuous=False decodes them in fixed chunks of `max_batch_rows` rows instead (the benchmark's
    baseline); the tokens are the same either way. With a `prefix_cache` every prefill reuses the
    keys and values of the longest prefix it holds and computes only the rest (`lm.prefix_cache`).
    """
    loop = _Loop(lm, prompt_ids, keys, rows, params, max_batch_rows, continuous, prefix_cache)
    return loop.run()


class _Loop:
    def __init__(self, lm, prompt_ids, keys, rows, params, max_batch_rows, continuous, prefix_cache) -> None:
        self.lm, self.model, self.device = lm, lm.model, lm.device
        self.prompt_ids, self.keys, self.rows, self.params = prompt_ids, keys, rows, params
        self.max_batch_rows = max_batch_rows
        self.steps = max(params.budgets) if params.budgets else params.max_new_tokens
        self.stop = lm.stop_rule(params.stop)
        self.budget = [lm.budget(len(prompt_ids[p]), params.budget(p)) for p, _ in rows]
        self.prefill = prefix_cache.prefill if prefix_cache is not None else prefill
        self.outputs: list[list[int]] = [[] for _ in rows]
        self.logprobs: list[list[float]] = [[] for _ in rows]
        self.finish = ["length"] * len(rows)
        self.waiting = deque(range(len(rows)))
        # writing a prefilled row into a running batch needs every layer to be a preallocated one
        plain_layers = all(type(layer) is DynamicLayer for layer in _probe_layers(self.model))
        self.continuous = continuous and plain_layers and len(rows) > max_batch_rows
        longest = max(len(prompt_ids[p]) for p, _ in rows)
        self.capacity = longest + self.steps + SLACK_COLUMNS if self.continuous else None
        self.prefilled: dict[int, _Prefilled] = {}

    def run(self) -> list[Completion]:
        while self.waiting:
            self.start([self.waiting.popleft() for _ in range(min(self.max_batch_rows, len(self.waiting)))])
            self.decode()
        return [self.stop.completion(o, lp, f) for o, lp, f in zip(self.outputs, self.logprobs, self.finish,
                                                                  strict=True)]

    # -- a batch starts: prefill each of its prompts once and copy its cache to its samples ---------
    def start(self, rows: list[int]) -> None:
        prompts = sorted({self.rows[r][0] for r in rows})
        slot = {p: i for i, p in enumerate(prompts)}
        width = max(len(self.prompt_ids[p]) for p in prompts)
        extra = self.capacity - width if self.continuous else self.steps
        cache, logits, mask, positions = self.prefill(self.model, [self.prompt_ids[p] for p in prompts],
                                                      self.lm.pad_id, self.device, extra)
        if self.continuous:  # prompts with samples still waiting keep their prefill for `admit`
            waiting = {}
            for r in self.waiting:
                waiting[self.rows[r][0]] = waiting.get(self.rows[r][0], 0) + 1
            for p, count in waiting.items():
                if p in slot:
                    self.prefilled[p] = self._keep(cache, slot[p], width, logits[slot[p]], len(self.prompt_ids[p]), count)
        expand = torch.tensor([slot[self.rows[r][0]] for r in rows], device=self.device)
        cache.reorder_cache(expand)
        self.cache, self.logits, self.mask = cache, logits[expand], mask[expand]
        self.position = positions[expand][:, -1]
        self.slot_row = list(rows)
        self.running = [True] * len(rows)
        self.count = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        self.uniforms = torch.stack([self._uniforms(r) for r in rows]).to(self.device)

    def _uniforms(self, row: int) -> torch.Tensor:
        p, j = self.rows[row]
        return step_uniforms(self.params.seed, self.keys[p], j, self.steps, self.params.stream_offset(p))

    @staticmethod
    def _keep(cache, index: int, width: int, logits: torch.Tensor, length: int, waiting: int) -> _Prefilled:
        kv = [layer.columns(index, width - length, width) for layer in cache.layers]
        return _Prefilled([k for k, _ in kv], [v for _, v in kv], logits, length, waiting)

    # -- the steps ---------------------------------------------------------------------------------
    def decode(self) -> None:
        while True:
            chosen = self.sample()
            if not any(self.running) and not (self.continuous and self.waiting):
                return
            fresh: dict[int, _Prefilled] = {}
            if self.continuous and self.waiting:
                fresh = self.admit()
            elif self.running.count(False) * 4 >= len(self.running):
                chosen = self.shrink(chosen)
            self.forward(chosen, fresh)

    def sample(self) -> torch.Tensor:
        """One token per slot; each running row records it and checks the stop rule."""
        raw = torch.log_softmax(self.logits, dim=-1)
        step = self.count.clamp(max=self.steps - 1)
        chosen = sample_tokens(raw, self.params, self.uniforms.gather(1, step[:, None])[:, 0])
        chosen_logprob = raw.gather(-1, chosen[:, None])[:, 0]
        tokens, logprobs = chosen.tolist(), chosen_logprob.tolist()
        for slot, row in enumerate(self.slot_row):
            if not self.running[slot]:
                continue
            self.outputs[row].append(tokens[slot])
            self.logprobs[row].append(logprobs[slot])
            reason = self.stop.reason(self.outputs[row], self.budget[row])
            if reason is not None:
                self.finish[row] = reason
                self.running[slot] = False
        self.count += 1
        return chosen

    def admit(self) -> dict[int, _Prefilled]:
        """Hand finished rows' slots to waiting rows; returns the slots taken and their prompts' prefills."""
        free = [slot for slot, running in enumerate(self.running) if not running][: len(self.waiting)]
        taken = [self.waiting.popleft() for _ in free]
        new = sorted({self.rows[r][0] for r in taken} - set(self.prefilled))
        if new:
            waiting = {p: 0 for p in new}
            for r in [*taken, *self.waiting]:
                if self.rows[r][0] in waiting:
                    waiting[self.rows[r][0]] += 1
            cache, logits, _, _ = self.prefill(self.model, [self.prompt_ids[p] for p in new], self.lm.pad_id,
                                               self.device, 0)
            width = max(len(self.prompt_ids[p]) for p in new)
            for i, p in enumerate(new):
                self.prefilled[p] = self._keep(cache, i, width, logits[i], len(self.prompt_ids[p]), waiting[p])
        layers: list[PreallocatedLayer] = self.cache.layers
        fresh = {}
        for slot, row in zip(free, taken, strict=True):
            p = self.rows[row][0]
            prompt = fresh[slot] = self.prefilled[p]
            length = layers[0].length
            if length < prompt.length:  # the cache is shorter than this prompt: make room on the left
                for layer in layers:
                    layer.shift(prompt.length - length)
                self.mask = torch.cat([self.mask.new_zeros((len(self.slot_row), prompt.length - length)), self.mask], -1)
                length = prompt.length
            rows = torch.tensor([slot], device=self.device)
            for layer, k, v in zip(layers, prompt.keys, prompt.values, strict=True):
                layer.place(rows, k, v, length - prompt.length)
            self.mask[slot] = 0
            self.mask[slot, length - prompt.length : length] = 1
            self.slot_row[slot], self.running[slot] = row, True
            self.count[slot] = 0
            self.uniforms[slot] = self._uniforms(row).to(self.device)
            prompt.waiting -= 1
            if prompt.waiting == 0:
                del self.prefilled[p]
        return fresh

    def shrink(self, chosen: torch.Tensor) -> torch.Tensor:
        """Drop finished slots from the batch (nothing is waiting for them)."""
        keep = [slot for slot, running in enumerate(self.running) if running]
        index = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.position, self.count = self.mask[index], self.position[index], self.count[index]
        self.uniforms = self.uniforms[index]
        self.slot_row = [self.slot_row[slot] for slot in keep]
        self.running = [self.running[slot] for slot in keep]
        return chosen[index]

    def forward(self, chosen: torch.Tensor, fresh: dict[int, _Prefilled]) -> None:
        """Feed the sampled tokens; freshly admitted slots keep their prefill's logits and position."""
        if self.continuous and self.mask.shape[1] + 1 > self.capacity:
            self.mask = compact(self.cache, self.mask.bool()).long()
        column = self.mask.new_ones((self.mask.shape[0], 1))
        column[list(fresh)] = 0
        self.mask = torch.cat([self.mask, column], dim=-1)
        self.position = self.position + 1
        out = self.model(input_ids=chosen[:, None], attention_mask=self.mask, position_ids=self.position[:, None],
                         past_key_values=self.cache)
        self.logits = out.logits[:, -1, :].float()
        for slot, prompt in fresh.items():
            self.position[slot] = prompt.length - 1
            self.logits[slot] = prompt.logits


def _probe_layers(model) -> list:
    from transformers import DynamicCache

    return DynamicCache(config=model.config).layers
