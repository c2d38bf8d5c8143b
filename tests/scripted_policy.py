"""A policy that replies from a script: a real PolicyRole object standing in for the model.

It serves the code workflows' conversations (plansearch, ideasearch, repeated sampling, and the
idea-diversity judge) with fixed replies chosen by the stage a conversation belongs to, and logs
every call (the conversations, temperature, samples, keys and reply budget), so tests can check
each stage's conversation structure and the number of batched calls. Token ids are indices into its table of
conversations: nothing here is a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from qsteer.engines import Completion, SamplingParams
from qsteer.workflows import plansearch_prompts as P

Reply = Callable[[list[dict], float, str, int], str]


@dataclass
class Call:
    conversations: list[list[dict]]
    temperature: float
    n: int
    keys: list[str]
    max_new_tokens: int = 0


def stage_of(conversation: list[dict]) -> str:
    """Which stage asked: from the system prompt and the last user turn."""
    system, last = conversation[0]["content"], conversation[-1]["content"]
    if last == P.LIST_ALL:
        return "list"
    if last == P.KEEP_USEFUL:
        return "filter"
    if last == P.AS_PYTHON_LIST:
        return "format"
    if last == P.FIX_FOLLOW_UP:
        return "fix"
    return {P.OBSERVER_SYSTEM: "observe", P.COMBINER_SYSTEM: "combine", P.SKETCH_SYSTEM: "sketch",
            P.COACH_SYSTEM: "critique", P.PSEUDOCODE_SYSTEM: "pseudocode", P.CODER_SYSTEM: "code",
            P.DIRECT_SYSTEM: "direct", P.IDEA_SYSTEM: "idea", P.IDEA_SUMMARY_SYSTEM: "summarize",
            P.SAME_IDEA_SYSTEM: "same_idea"}[system]


@dataclass
class ScriptedPolicy:
    reply: Reply
    calls: list[Call] = field(default_factory=list)
    table: list[list[dict]] = field(default_factory=list)

    def info(self) -> list[dict]:
        return [{"calls": len(self.calls), "context_length": 100_000, "eos_token_ids": [0]}]

    def __len__(self) -> int:
        return 1

    def encode(self, prompts: list, chat: bool = True) -> list[list[int]]:
        out = []
        for prompt in prompts:
            self.table.append(prompt)
            out.append([len(self.table) - 1])
        return out

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, keys: list[str]) -> list[list[Completion]]:
        conversations = [self.table[ids[0]] for ids in prompt_ids]
        self.calls.append(Call(conversations, params.temperature, params.n, list(keys), params.max_new_tokens))
        out = []
        for conversation, key in zip(conversations, keys, strict=True):
            texts = [self.reply(conversation, params.temperature, key, j) for j in range(params.n)]
            out.append([Completion(list(range(1, len(t.split()) + 1)), t, [0.0] * len(t.split()), "stop")
                        for t in texts])
        return out

    def score(self, prompt_ids, continuation_ids):
        raise NotImplementedError("the code workflows never score")

    def topk_next(self, prefixes, k):
        raise NotImplementedError("only PG-TD asks for the top k; its tests use the tiny model")

    def decode(self, token_ids: list[list[int]]) -> list[str]:
        raise NotImplementedError("only PG-TD decodes; its tests use the tiny model")

    def stages(self) -> list[set[str]]:
        """The stages each call served, in call order."""
        return [{stage_of(c) for c in call.conversations} for call in self.calls]
