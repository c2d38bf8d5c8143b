"""What the code-search workflows share: batched chat stages, stage state for resuming, judging.

repeated_sampling, ideasearch and plansearch are chains of stages. A stage is one batched call
to the policy group over every conversation of every problem in the batch (`CodeRun.stage`);
its replies are stored in the problem's stage state, which is saved after each stage through
`Context.stages` (the run folder's `stages/`), so a rerun after a crash resumes at the first
stage a problem has not finished and never redoes one. The state also goes into the result
record (`stages`), so a run can be inspected stage by stage.

Every conversation has its own random stream, keyed by the problem, the stage and the slot
(or, for the observation tree's calls, by the conversation's own text), so a problem's search
does not depend on which problems share its batch.

Candidates are judged in the sandbox group in one call per batch: each public test alone
(the statement's examples: the share passed is PG-TD's reward, passing all of them is the
selection rule) and the hidden tests (the score). The output is the first candidate that
passes every public test, else the first with the largest share; its hidden verdict is the
record's reward. The sandbox's own faults (timeouts, kills, memory) are counted apart.

With `workflow.idea_diversity`, the policy then judges the candidates' ideas
(`metrics.idea_diversity`): two more stages, each one batched call at temperature 0 over every
problem of the batch, a back-translation per considered program, then a "same idea?" verdict
per pair. They are measurement, not search: their tokens, calls and time are kept apart
(`stats.judge_tokens`, `judge_calls`, `judge_s`), never in the method's `generated_tokens`,
`policy_calls` or `wall_s`.
"""

from __future__ import annotations

import ast
import doctest
import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from qsteer.actors.sandbox import Job
from qsteer.metrics.idea_diversity import considered, judged_pairs, problem_similarity
from qsteer.rewards.code_tests import build_solution, code_prompt, extract_code
from qsteer.workflows.common import Context, Stats, result
from qsteer.workflows.plansearch_prompts import Conversation, idea_summary, problem_of, same_idea

Built = list[tuple[Conversation, str]]  # one problem's conversations of a stage, each with its stream key

JUDGE_STAGES = ("idea_summary", "same_idea")  # the idea judge's stages: measurement, not the method's cost
SAME_IDEA_TOKENS = 16
"""Reply budget of a "same idea?" verdict: the answer is "Yes." or "No.", and the parse reads the first
yes or no, so the rest of a longer reply would cost tokens and change nothing."""


class StageStore:
    """Per-problem stage state as JSON files in a folder, replaced atomically after each stage."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _path(self, record_id: str) -> Path:
        return self.folder / (hashlib.sha256(str(record_id).encode()).hexdigest()[:24] + ".json")

    def load(self, record_id: str) -> dict[str, Any]:
        path = self._path(record_id)
        return json.loads(path.read_text()) if path.exists() else {}

    def save(self, record_id: str, state: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(record_id)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)


def stream_key(conversation: Conversation, temperature: float | None) -> str:
    """A stream key from the conversation's text (for calls that do not name their slots)."""
    text = json.dumps([conversation, temperature])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


class CodeRun:
    """One batch of problems going through a workflow's stages."""

    def __init__(self, records: list[dict], ctx: Context) -> None:
        if ctx.policy is None or ctx.sandbox is None:
            raise ValueError("the code workflows need the policy and the sandbox groups")
        self.records, self.ctx = records, ctx
        self.stats = Stats()
        self.states = [ctx.stages.load(r["id"]) if ctx.stages is not None else {} for r in records]
        for state in self.states:
            state.setdefault("tokens", {})  # per stage: generated tokens of each reply
        self.too_long = 0
        self.judge_calls = 0
        self.judge_s = 0.0

    def save(self, indices: Sequence[int] | None = None) -> None:
        if self.ctx.stages is None:
            return
        for i in range(len(self.records)) if indices is None else indices:
            self.ctx.stages.save(self.records[i]["id"], self.states[i])

    def chat(self, conversations: list[Conversation], keys: list[str], temperature: float | None = None,
             n: int = 1, max_new_tokens: int | None = None) -> list[list[tuple[str, int]]]:
        """One batched call: `n` replies (text, generated tokens) per conversation.

        A conversation at or over the context length gets empty replies rather than failing
        its batch: a problem whose plan grew too long loses that candidate only.
        """
        if not conversations:
            return []
        ctx = self.ctx
        ids = ctx.policy.encode(conversations, True)
        params = replace(ctx.params, n=n) if temperature is None else replace(ctx.params, n=n, temperature=temperature)
        if max_new_tokens is not None:
            params = replace(params, max_new_tokens=min(params.max_new_tokens, max_new_tokens))
        room = [i for i, p in enumerate(ids) if 0 < len(p) < ctx.context_length - 1]
        self.too_long += len(ids) - len(room)
        out: list[list[tuple[str, int]]] = [[("", 0)] * n for _ in conversations]
        if room:
            params = replace(params, max_new_tokens=min(params.max_new_tokens, ctx.context_length - 1 -
                                                        max(len(ids[i]) for i in room)))
            completions = ctx.policy.generate([ids[i] for i in room], params, [keys[i] for i in room])
            self.stats.policy_calls += 1
            for i, comps in zip(room, completions, strict=True):
                out[i] = [(c.text, len(c.token_ids)) for c in comps]
        return out

    def stage(self, name: str, build: Callable[[int, dict], Built], temperature: float | None = None,
              n: int = 1, max_new_tokens: int | None = None) -> list[list[str]]:
        """Run stage `name` for the problems that have not finished it, in one batched call.

        `build(i, state)` gives problem i's conversations and keys; the replies (n per
        conversation, flattened) are stored under `name`. Returns every problem's replies.
        """
        todo = [i for i, state in enumerate(self.states) if name not in state]
        owners, conversations, keys = [], [], []
        for i in todo:
            for conversation, key in build(i, self.states[i]):
                owners.append(i)
                conversations.append(conversation)
                keys.append(f"{self.records[i]['id']}/{name}/{key}")
        replies = self.chat(conversations, keys, temperature, n, max_new_tokens)
        for i in todo:
            self.states[i][name] = []
            self.states[i]["tokens"][name] = []
        for i, conversation_replies in zip(owners, replies, strict=True):
            for text, tokens in conversation_replies:
                self.states[i][name].append(text)
                self.states[i]["tokens"][name].append(tokens)
        self.save(todo)
        return [state[name] for state in self.states]

    def ask_owned(self, owner_of: Callable[[Conversation], int], tokens_key: str):
        """An `Ask` for plansearch_parse (conversations, temperature -> replies) that books tokens per problem."""

        def ask(conversations: list[Conversation], temperature: float | None) -> list[str]:
            keys, seen = [], {}
            for conversation in conversations:
                key = stream_key(conversation, temperature)
                seen[key] = seen.get(key, 0) + 1
                keys.append(f"{key}#{seen[key]}")
            replies = self.chat(conversations, keys, temperature)
            for conversation, ((_, tokens),) in zip(conversations, replies, strict=True):
                self.states[owner_of(conversation)]["tokens"].setdefault(tokens_key, []).append(tokens)
            return [text for ((text, _),) in replies]

        return ask

    # -- judging and records ------------------------------------------------------------------

    def judge_ideas(self, codes: list[list[str]]) -> list[dict]:
        """Each problem's idea similarity (`metrics.idea_diversity`): the policy as judge, two batched calls.

        Per problem, the first `workflow.idea_diversity_codes` candidates of a seeded shuffle are
        back-translated into ideas; every pair of them with a non-empty program and idea is then
        judged "same idea?". Both stages are kept in the stage state, so a resumed run does not
        redo them. Returns per problem the `ProblemSimilarity` as a dict.
        """
        cfg, seed = self.ctx.workflow, self.ctx.params.seed
        problems = [problem_of(r) for r in self.records]
        programs = [[extract_code(text).strip() for text in texts] for texts in codes]
        chosen = [considered(len(texts), cfg.idea_diversity_codes, random.Random(f"idea_diversity/{seed}/{r['id']}"))
                  for r, texts in zip(self.records, codes, strict=True)]
        calls, started = self.stats.policy_calls, time.perf_counter()
        ideas = self.stage("idea_summary", lambda i, state: [
            (idea_summary(problems[i], programs[i][j]), str(j)) for j in chosen[i] if programs[i][j]
        ], temperature=0.0)
        # the back-translations, by position in `chosen` ("" for a program that was empty and not asked)
        aligned = []
        for i, row in enumerate(chosen):
            replies = iter(ideas[i])
            aligned.append([next(replies) if programs[i][j] else "" for j in row])
        pairs = [judged_pairs(row, programs[i], aligned[i]) for i, row in enumerate(chosen)]
        idea_of = [dict(zip(row, aligned[i], strict=True)) for i, row in enumerate(chosen)]
        verdicts = self.stage("same_idea", lambda i, state: [
            (same_idea(problems[i], programs[i][a], idea_of[i][a], programs[i][b], idea_of[i][b]), f"{a}-{b}")
            for a, b in pairs[i]
        ], temperature=0.0, max_new_tokens=SAME_IDEA_TOKENS)
        # the judge's calls and time are the measurement's, not the method's
        self.judge_calls += self.stats.policy_calls - calls
        self.stats.policy_calls = calls
        elapsed = time.perf_counter() - started
        self.judge_s += elapsed
        self.stats.started += elapsed
        for state, row, pair_list in zip(self.states, chosen, pairs, strict=True):
            state["idea_pairs"] = [list(pair) for pair in pair_list]
            state["idea_codes"] = row
        return [problem_similarity(len(row), replies).as_dict() for row, replies in zip(chosen, verdicts, strict=True)]

    def judge(self, codes: list[list[str]]) -> list[list[dict]]:
        """Each candidate's verdicts: hidden tests, each public test, and faults; one sandbox call."""
        jobs: list[Job] = []
        plan: list[list[tuple[int, list[int]]]] = []  # per record, per candidate: (hidden job, public jobs)
        for record, texts in zip(self.records, codes, strict=True):
            entry_point, prompt_code = record["entry_point"], _prompt_code(record)
            publics = public_tests(record)
            rows = []
            for text in texts:
                solution = build_solution(text, entry_point, prompt_code)
                jobs.append(Job(solution, str(record["test"]), entry_point))
                hidden = len(jobs) - 1
                first = len(jobs)
                jobs.extend(Job(solution, test, entry_point) for test in publics)
                rows.append((hidden, list(range(first, len(jobs)))))
            plan.append(rows)
        verdicts = self.ctx.sandbox.run(jobs) if jobs else []
        self.stats.reward_calls += 1 if jobs else 0
        out = []
        for rows in plan:
            judged = []
            for hidden, publics in rows:
                v = verdicts[hidden]
                public = [verdicts[j] for j in publics]
                faults = [x.fault for x in [v, *public] if x.fault is not None]
                judged.append({
                    "passed": v.passed,
                    "passed_public": all(p.passed for p in public),
                    "public_share": sum(p.passed for p in public) / len(public) if public else 1.0,
                    "reason": v.reason,
                    "faults": faults,
                })
            out.append(judged)
        return out

    def judge_public(self, items: list[tuple[dict, str, list[str]]]) -> list[float]:
        """Share of its public tests each (record, program text, tests) passes; one sandbox call."""
        jobs, spans = [], []
        for record, text, tests in items:
            solution = build_solution(text, record["entry_point"], _prompt_code(record))
            spans.append((len(jobs), len(tests)))
            jobs.extend(Job(solution, test, record["entry_point"]) for test in tests)
        verdicts = self.ctx.sandbox.run(jobs) if jobs else []
        self.stats.reward_calls += 1 if jobs else 0
        return [sum(v.passed for v in verdicts[start : start + count]) / count if count else 1.0
                for start, count in spans]

    def records_out(self, code_stage: str = "code", extra: list[dict] | None = None,
                    num_tokens: list[list[int]] | None = None) -> list[dict]:
        """The result records: the replies of `code_stage` judged, the output selected by the public tests.

        A candidate's `num_tokens` is its reply's generated tokens (or `num_tokens`, given per candidate).
        """
        codes = [state[code_stage] for state in self.states]
        code_tokens = num_tokens or [state["tokens"][code_stage] for state in self.states]
        judged = self.judge(codes)
        ideas = self.judge_ideas(codes) if self.ctx.workflow.idea_diversity else None
        out = []
        for i, (record, texts, verdicts) in enumerate(zip(self.records, codes, judged, strict=True)):
            candidates = [
                {"text": text, "reward": 1.0 if v["passed"] else 0.0, "num_tokens": tokens, **v}
                for text, tokens, v in zip(texts, code_tokens[i], verdicts, strict=True)
            ]
            chosen = select(candidates)
            state = self.states[i]
            method_tokens = {name: sum(tokens) for name, tokens in state["tokens"].items() if name not in JUDGE_STAGES}
            stats = self.stats.as_dict(len(self.records)) | {
                "generated_tokens": sum(method_tokens.values()),
                "tokens_by_stage": method_tokens,
                "sandbox_faults": sum(len(c["faults"]) for c in candidates),
                **({"too_long_prompts": self.too_long} if self.too_long else {}),
            }
            if ideas is not None:
                stats["judge_tokens"] = sum(sum(state["tokens"].get(name, [])) for name in JUDGE_STAGES)
                stats["judge_calls"] = round(self.judge_calls / len(self.records), 4)
                stats["judge_s"] = round(self.judge_s / len(self.records), 4)
            stages = {k: v for k, v in state.items() if k != "tokens"}
            out.append(result(
                record, candidates[chosen]["text"] if candidates else None,
                candidates[chosen]["reward"] if candidates else None, candidates, stats,
                None if candidates else "no candidate was generated",
                selected=chosen, stages=stages, **(extra[i] if extra else {}),
                **({"idea_similarity": ideas[i]} if ideas is not None else {}),
            ))
        return out


def select(candidates: list[dict]) -> int:
    """The first candidate passing every public test, else the first with the largest share passed."""
    if not candidates:
        return 0
    return max(range(len(candidates)), key=lambda i: (candidates[i]["passed_public"],
                                                      candidates[i]["public_share"], -i))


def _prompt_code(record: dict) -> str | None:
    return record.get("prompt_code") or code_prompt(record.get("prompt"), record.get("entry_point"))


def _docstring(record: dict) -> str:
    """The entry point's docstring in the record's code (parsed, never run), or ""."""
    try:
        tree = ast.parse(_prompt_code(record) or "")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return ""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == record.get("entry_point"):
            return ast.get_docstring(node) or ""
    return ""


def public_tests(record: dict) -> list[str]:
    """The tests a submitter may run: the record's `public_tests`, else the docstring's examples as asserts."""
    if record.get("public_tests"):
        return list(record["public_tests"])
    tests = []
    for example in doctest.DocTestParser().get_examples(_docstring(record)):
        want = example.want.strip()
        if want and not re.search(r"Traceback|\.\.\.", want):
            tests.append(f"assert ({example.source.strip()}) == ({want})")
    return tests
