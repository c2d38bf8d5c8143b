"""LLM-as-judge reward: a model is asked a yes/no question about the completion.

reward = P(yes) / (P(yes) + P(no)) over the judge's next token, summing the probability of the
usual spellings ("Yes", " yes", ...). Normalizing over the two answers removes the mass a small
model puts on other openings ("The", "I"), which would otherwise dominate the score.
"""

from __future__ import annotations

import math
from typing import Any

from qsteer.engines import build_engine

TEMPLATE = (
    "{question}\n\n"
    "Request:\n{prompt}\n\n"
    "Response:\n{completion}\n\n"
    "Answer with a single word, yes or no."
)
_YES = ("Yes", "yes", " Yes", " yes", "YES")
_NO = ("No", "no", " No", " no", "NO")


class JudgeReward:
    def __init__(
        self,
        model_path: str | None = "default",
        question: str = "Is this response positive, helpful and well written?",
        chat_template: bool = True,
        top_k: int = 200,
        engine: str = "hf",
        **engine_kwargs: Any,
    ) -> None:
        self.engine = build_engine(engine, path=model_path, chat_template=chat_template, **engine_kwargs)
        self.question = question
        self.top_k = top_k
        self.yes_ids = self._single_tokens(_YES)
        self.no_ids = self._single_tokens(_NO)
        if not self.yes_ids or not self.no_ids:
            raise ValueError("the judge's tokenizer has no single-token spelling of yes/no")

    def _single_tokens(self, words: tuple[str, ...]) -> set[int]:
        ids = (self.engine.tokenizer(w, add_special_tokens=False)["input_ids"] for w in words)
        return {t[0] for t in ids if len(t) == 1}

    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[dict]:
        questions = [
            TEMPLATE.format(question=self.question, prompt=p, completion=c)
            for p, c in zip(prompts, completions, strict=True)
        ]
        top = self.engine.topk_next(self.engine.encode(questions), self.top_k)
        out = []
        for candidates in top:
            p_yes = sum(math.exp(lp) for t, lp in candidates if t in self.yes_ids)
            p_no = sum(math.exp(lp) for t, lp in candidates if t in self.no_ids)
            total = p_yes + p_no
            reward = p_yes / total if total > 0 else 0.5
            out.append({"reward": reward, "info": {"p_yes": p_yes, "p_no": p_no}})
        return out
