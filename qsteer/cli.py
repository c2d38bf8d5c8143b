"""The `qsteer [overrides]` command: compose the Hydra config, run the job, print the summary.

The job itself (checks, resume, Ray, batches, files) is `run.run_job`.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from qsteer.cluster.placement import PlacementError
from qsteer.config import ConfigError
from qsteer.data import DatasetError
from qsteer.models import ModelNotFoundError
from qsteer.results import ResultsError
from qsteer.run import RunFolderBusy, run_job


def print_summary(summary: dict[str, Any], out_dir: Path | str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    table = Table(title=f"qsteer {summary['workflow']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("num_prompts", "num_errors", "mean_reward", "generated_tokens", "wall_s", "startup_s",
                "generation_s", "tokens_per_s"):
        value = summary.get(key)
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    for key, value in summary["metrics"].items():
        if isinstance(value, (int, float)):
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
    # The folder on its own line, never wrapped or styled by rich, so it can be copied whole.
    print(f"run folder: {out_dir}", file=sys.stderr)


def failed(summary: dict[str, Any]) -> list[str]:
    """Why a finished run counts as failed (batches that failed, or every record erring), first errors
    quoted; [] when it did not fail."""
    metrics, reasons = summary["metrics"], []
    unfinished = metrics.get("unfinished", [])
    if unfinished:
        reasons += [f"{len(unfinished)} batch(es) failed and their prompts were not written:", *unfinished[:5]]
    if summary["num_prompts"] and summary["num_errors"] == summary["num_prompts"]:
        reasons += ["every record has an error; the first:", *metrics["first_errors"]]
    return reasons


_exit_codes: list[int] = []  # one per job that failed; a sweep goes on past a failed point


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    where = cfg.get("output_dir") or out_dir  # where the results go: output_dir (a folder or URL) or Hydra's
    try:
        summary = run_job(cfg, out_dir)
    except (ConfigError, DatasetError, ModelNotFoundError, PlacementError, ResultsError, RunFolderBusy) as err:
        print(f"qsteer: error: {err}", file=sys.stderr)
        _exit_codes.append(2)
        return
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (run.Stopped): the sweep stops too
        signum = getattr(stop, "signum", signal.SIGINT)
        print(f"qsteer: stopped by {signal.Signals(signum).name}; every finished record is in "
              f"{where}; rerun the same command to resume", file=sys.stderr)
        sys.exit(128 + signum)
    if summary.get("dry_run"):
        return  # the plan is printed; nothing ran
    print_summary(summary, where)
    reasons = failed(summary)
    if reasons:
        print("qsteer: the run failed: " + "\n  ".join(reasons), file=sys.stderr)
        print(f"qsteer: fix the cause and rerun into {where} to redo what failed", file=sys.stderr)
        _exit_codes.append(1)


def main() -> None:
    if {"--help", "-h"} & set(sys.argv[1:]):  # before Hydra: the help comes from the config dataclasses
        from qsteer.config.help import print_help

        sys.exit(print_help([a for a in sys.argv[1:] if not a.startswith("-")]))
    # `python -m` puts the working directory on sys.path, the `qsteer` script does not: a reward
    # module next to the user (reward.target=my_reward:fn) imports either way (local Ray workers
    # get the driver's sys.path). Last, so it shadows nothing.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    _hydra_main()
    if _exit_codes:
        sys.exit(max(_exit_codes))


if __name__ == "__main__":
    main()
