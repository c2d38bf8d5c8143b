"""List and stop the warm role actors that `cluster.warm=true` runs leave on a cluster.

    python -m qsteer.cluster.warm list [--address auto] [--namespace qsteer]
    python -m qsteer.cluster.warm stop [--address auto] [--namespace qsteer] [NAME ...]

Warm actors are detached Ray actors named `qsteer-warm-<role>-<digest of their config>`
(`actors.group.warm_name`); they hold their model's weights until stopped. With `cluster.placement`
they live in detached placement groups named `qsteer-warm-pg-<digest>` (`placement.warm_group_name`),
which hold their bundles' resources until stopped; both are listed, and `stop` removes the groups
after their actors. On a local Ray (`cluster.address=null`) they end with the process that started
it, so this is for clusters.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

from qsteer.actors.group import WARM_PREFIX
from qsteer.cluster.connect import connect
from qsteer.cluster.placement import WARM_GROUP_PREFIX


def warm_actors(namespace: str) -> list[str]:
    """The names of the warm actors alive in `namespace`, sorted (warm placement groups apart)."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == namespace and a["name"].startswith(WARM_PREFIX))


def warm_groups(namespace: str) -> list[str]:
    """The names of the warm placement groups not removed in `namespace` (the connected one), sorted."""
    from ray.util.placement_group import get_placement_group, placement_group_table

    names = {g["name"] for g in placement_group_table().values()
             if g["name"].startswith(WARM_GROUP_PREFIX) and g["state"] != "REMOVED"}
    # the table spans namespaces; a name looked up resolves in this job's namespace only
    out = []
    for name in sorted(names):
        try:
            get_placement_group(name)
        except ValueError:
            continue
        out.append(name)
    return out


def stop(namespace: str, names: list[str] | None = None) -> list[str]:
    """Kill the named warm actors and remove the named warm placement groups (all of both when `names`
    is None, actors first); the names stopped."""
    import ray
    from ray.util import remove_placement_group
    from ray.util.placement_group import get_placement_group

    chosen = warm_actors(namespace) + warm_groups(namespace) if not names else names
    for name in chosen:
        if name.startswith(WARM_GROUP_PREFIX):
            continue
        ray.kill(ray.get_actor(name, namespace=namespace))
    for name in chosen:
        if name.startswith(WARM_GROUP_PREFIX):
            remove_placement_group(get_placement_group(name))
    return chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="List or stop qsteer's warm role actors (and their placement "
                                                 "groups) on a Ray cluster")
    parser.add_argument("command", choices=["list", "stop"])
    parser.add_argument("names", nargs="*", help="stop: only these actors (default: all warm actors)")
    parser.add_argument("--address", default="auto", help="the cluster (as cluster.address); default: auto")
    parser.add_argument("--namespace", default="qsteer", help="as cluster.namespace; default: qsteer")
    args = parser.parse_args(argv)
    connect(SimpleNamespace(address=args.address, namespace=args.namespace))
    if args.command == "list":
        for name in warm_actors(args.namespace) + warm_groups(args.namespace):
            print(name)
    else:
        for name in stop(args.namespace, args.names):
            print(f"stopped {name}")


if __name__ == "__main__":
    main()
