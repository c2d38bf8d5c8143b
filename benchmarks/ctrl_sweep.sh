#!/usr/bin/env bash
# The CTRL report in one command: RL on the raw reward, on the calibrated reward (identity) and on its
# Best-of-N transform (exp(t C), t the analytic tool's default for Best-of-4 at KL 1), each over beta;
# then benchmarks/ctrl_report.py writes OUT/ctrl_report.{md,png,json}: win rate under sample, BoN(4)
# and BoN(16) against the reference, with intervals, against the KL (k1, per sequence).
#
#   benchmarks/ctrl_sweep.sh [OUT]          (env: BETAS, PROMPTS, STEPS, TOKENS, PYTHON)
#
# Defaults are CPU-sized (8 sentiment prompts, 16 tokens, 12 steps of 2 prompts x 4 generations,
# 16 evaluation samples per side per prompt): minutes per run on 2 cores, and far too small for
# the paper's effect to be more than a trend; raise PROMPTS/STEPS on a GPU.
set -euo pipefail
OUT=${1:-multirun/ctrl}
BETAS=${BETAS:-0.02,0.1}
PYTHON=${PYTHON:-python}
COMMON=(workflow=ctrl_align "dataset.limit=${PROMPTS:-8}" "workflow.steps=${STEPS:-12}"
        "generation.max_new_tokens=${TOKENS:-16}" "workflow.beta=${BETAS}" progress=false)
"$PYTHON" -m qsteer.cli -m reward=sentiment "${COMMON[@]}" "hydra.sweep.dir=${OUT}/raw"
"$PYTHON" -m qsteer.cli -m reward=calibrated reward.transform=identity,bon "${COMMON[@]}" \
    "hydra.sweep.dir=${OUT}/calibrated"
"$PYTHON" benchmarks/ctrl_report.py "${OUT}/raw" "${OUT}/calibrated" --output "${OUT}/ctrl_report"
