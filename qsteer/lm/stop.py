"""The one rule every token loop ends a row by, and the completion it hands back.

A row is done at an EOS token ("stop"), when a stop string appears in the decoded tail of its
output ("stop"), or when it has used its token budget ("length"), checked in that order after
each emitted token. Its text is the decoded output cut before the first stop string.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    # log-probability of each generated token under the model at temperature 1 (as `score` gives)
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    spec: dict | None = None  # speculative decoding counts (rounds, drafted, accepted, ...) when used
    guided: dict | None = None  # guided decoding's KL from the base and its costs (decoding/guided.py)


def eos_ids(tokenizer_eos: int | None, generation_eos: int | list[int] | None) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS and the generation config's."""
    if not isinstance(generation_eos, (list, tuple)):
        generation_eos = [generation_eos]
    return sorted({t for t in (tokenizer_eos, *generation_eos) if t is not None})


class StopRule:
    def __init__(self, tokenizer, eos_token_ids: list[int], stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        self.stop = list(stop)
        # a stop string spans at most len(s) tokens; two more cover a token that straddles it
        self.window = max((len(s) for s in self.stop), default=0) + 2

    def reason(self, output: list[int], budget: int) -> str | None:
        """Why a row with `output` (its newest token last) is done, or None while it goes on."""
        if output[-1] in self.eos:
            return "stop"
        if self.stop:
            tail = self.tokenizer.decode(output[-self.window :])
            if any(s in tail for s in self.stop):
                return "stop"
        if len(output) >= budget:
            return "length"
        return None

    def text(self, output: list[int], reason: str) -> str:
        text = self.tokenizer.decode(output, skip_special_tokens=True)
        if reason == "stop" and self.stop:
            cut = min((text.find(s) for s in self.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
        return text

    def completion(self, output: list[int], logprobs: list[float], reason: str, spec: dict | None = None) -> Completion:
        return Completion(list(output), self.text(output, reason), list(logprobs), reason, spec=spec)


def token_budget(prompt_length: int, max_new_tokens: int, context_length: int) -> int:
    """New tokens a row may emit: max_new_tokens, or what is left of the context."""
    return min(max_new_tokens, context_length - prompt_length)
