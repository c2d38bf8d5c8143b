"""PlanSearch's reason to exist, on the default model: its candidates are more diverse than repeated sampling's.

The issue's check: on `basic_code` with the default model, at the same number of programs per
problem and a fixed seed, the mean per-problem Vendi score of PlanSearch's candidates
(`metrics.vendi` in the run's summary) is above repeated sampling's. Both runs go through
`run_job` with the real policy (SmolLM2-135M-Instruct, hf engine, in process) and the real
sandbox; the search is cut to what the claim needs (3 problems, 4 programs each, first-order
observations only, 96-token replies): about ten generate calls in turn for PlanSearch, one for
repeated sampling.

Not yet seen to pass: in the session that wrote it the shared machine's load (8-20) gave the
run a tenth of a core and it ran past pytest's 15-minute limit inside PlanSearch's observation
tree. The benchmark's run on the same problems (n = 10, 80 tokens, seed 0) measured PlanSearch
1.96 against repeated sampling 1.91 of 10: a gap of 0.05, so the check asks only for the claim
(strictly more diverse) until seeds on a quiet machine show how stable it is.
"""

from __future__ import annotations

import json

import pytest

from qsteer.actors.local import local_policy, local_sandbox
from qsteer.metrics.vendi import vendi_score
from qsteer.rewards.code_tests import extract_code
from qsteer.run import run_job

PROBLEMS = 3
N = 4
MARGIN = 0.0  # Vendi points out of N; one measured gap so far, 0.05 at n = 10 (see the module docstring)
COMMON = ("dataset=basic_code", f"dataset.limit={PROBLEMS}", f"workflow.n={N}", "generation.max_new_tokens=96",
          "generation.temperature=0.7", "generation.top_p=0.95", "seed=0")
PLANSEARCH = ("workflow=plansearch", "workflow.num_observations=3", "workflow.layers=1")


@pytest.mark.model
@pytest.mark.heavy  # minutes: PlanSearch's stages are ten generate calls in turn
@pytest.mark.timeout(3600)
def test_plansearch_candidates_are_more_diverse_than_repeated_samplings(engine, compose, tmp_path):
    roles = {"policy": local_policy(engine), "sandbox": local_sandbox(1, workers=2, timeout_s=5.0)}
    plan = run_job(compose(*PLANSEARCH, *COMMON), tmp_path / "plansearch", roles=roles)
    repeated = run_job(compose("workflow=repeated_sampling", *COMMON), tmp_path / "repeated", roles=roles)
    for summary in (plan, repeated):
        assert summary["num_errors"] == 0 and summary["num_prompts"] == PROBLEMS
    # the summary's score is the mean over problems of the Vendi score of each problem's N programs
    rows = [json.loads(line) for line in (tmp_path / "plansearch" / "results.jsonl").read_text().splitlines()]
    assert all(len(row["candidates"]) == N for row in rows)
    per_problem = [vendi_score([extract_code(c["text"]) for c in row["candidates"]]) for row in rows]
    assert plan["metrics"]["vendi"] == pytest.approx(sum(per_problem) / PROBLEMS, abs=1e-3)
    assert 1.0 <= repeated["metrics"]["vendi"] <= N and plan["metrics"]["vendi"] <= N
    assert plan["metrics"]["vendi"] > repeated["metrics"]["vendi"] + MARGIN, (plan["metrics"], repeated["metrics"])
