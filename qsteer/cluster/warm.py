"""List and stop the warm role actors that `cluster.warm=true` runs leave on a cluster.

    python -m qsteer.cluster.warm list [--address auto] [--namespace qsteer]
    python -m qsteer.cluster.warm stop [--address auto] [--namespace qsteer] [NAME ...]

Warm actors are detached Ray actors named `qsteer-warm-<role>-<digest of their config>`
(`actors.group.warm_name`); they hold their model's weights until stopped. On a local Ray
(`cluster.address=null`) they end with the process that started it, so this is for clusters.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

from qsteer.actors.group import WARM_PREFIX
from qsteer.cluster.connect import connect


def warm_actors(namespace: str) -> list[str]:
    """The names of the warm actors alive in `namespace`, sorted."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == namespace and a["name"].startswith(WARM_PREFIX))


def stop(namespace: str, names: list[str] | None = None) -> list[str]:
    """Kill the named warm actors (all of them when `names` is None); the names stopped."""
    import ray

    chosen = warm_actors(namespace) if not names else names
    for name in chosen:
        ray.kill(ray.get_actor(name, namespace=namespace))
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="List or stop qsteer's warm role actors on a Ray cluster")
    parser.add_argument("command", choices=["list", "stop"])
    parser.add_argument("names", nargs="*", help="stop: only these actors (default: all warm actors)")
    parser.add_argument("--address", default="auto", help="the cluster (as cluster.address); default: auto")
    parser.add_argument("--namespace", default="qsteer", help="as cluster.namespace; default: qsteer")
    args = parser.parse_args(argv)
    connect(SimpleNamespace(address=args.address, namespace=args.namespace))
    if args.command == "list":
        for name in warm_actors(args.namespace):
            print(name)
    else:
        for name in stop(args.namespace, args.names):
            print(f"stopped {name}")


if __name__ == "__main__":
    main()
