"""Joining a Ray cluster, or starting a private local one.

Three cases, tried on a 2-node local cluster (`ray start`, Ray 2.60):
- `cluster.address=null` on a laptop starts a private Ray (`address="local"`), never joining
  `RAY_ADDRESS` or the last cluster started on the machine, which may have died;
- the same command submitted with `ray job submit` joins the cluster that runs the job: the
  driver of a Ray job finds its cluster in `RAY_ADDRESS` and its runtime_env (the uploaded
  `--working-dir`) in `RAY_JOB_CONFIG_JSON_ENV_VAR`. Starting a private Ray there failed
  (its actors could not download the job's working_dir package from a GCS that never held it);
- an explicit address. Ray 2.60 clusters started by `ray start` use token authentication
  (the token in `~/.ray/auth_token`); `ray.init("auto")` enables it when a token exists, an
  explicit address does not, and the connection is then refused with a bare ConnectionError.
  We enable it as `auto` does, before connecting (Ray reads the mode once per process).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a job's driver


def in_ray_job() -> bool:
    """True in the driver of a job submitted with `ray job submit` (or the Jobs API)."""
    return JOB_CONFIG_ENV in os.environ


def joins_cluster(address: str | None) -> bool:
    """Whether the run joins a running cluster (so local checks of cores and GPUs do not apply)."""
    return address is not None or in_ray_job()


def connect(cluster: Any) -> bool:
    """Join or start Ray for `cluster` (a ClusterConfig node); True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    if cluster.address is None and not in_ray_job():
        ray.init(
            address="local",
            num_cpus=cluster.num_cpus,
            include_dashboard=bool(cluster.dashboard),
            dashboard_host="127.0.0.1",
            namespace=cluster.namespace,
            log_to_driver=True,
        )
        return True
    address = cluster.address if cluster.address is not None else os.environ.get("RAY_ADDRESS", "auto")
    if address not in ("auto",) and not address.startswith("ray://"):
        _enable_token_auth_if_available()
    try:
        ray.init(address=address, namespace=cluster.namespace)
    except ConnectionError as err:
        raise ConnectionError(f"cluster.address={cluster.address}: cannot join the Ray cluster at {address} "
                              f"({err}). {auth_hint()}") from err
    return True


def token_available() -> bool:
    """A Ray auth token is where Ray looks for one: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).is_file()


def _enable_token_auth_if_available() -> None:
    if "RAY_AUTH_MODE" in os.environ or not token_available():
        return
    try:  # what ray.init("auto") does itself (ray._private.worker.init); private, so guarded
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        os.environ["RAY_AUTH_MODE"] = "token"  # read by a Ray that has no such helper yet
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def auth_hint() -> str:
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode == "token":
        return ("RAY_AUTH_MODE=token is set: check that this machine holds the cluster's token "
                "(~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH).")
    return ("Ray 2.60 clusters use token authentication by default: set RAY_AUTH_MODE=token and give this "
            "machine the cluster's token (~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH); "
            "is the cluster running (`ray status`)?")
