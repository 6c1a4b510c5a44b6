"""Starting Ray: the cluster named by RAY_ADDRESS, else a local one (no cluster needed on one machine)."""

import os

import ray


def start_ray() -> None:
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(include_dashboard=False)  # starts faster; `serve deploy` on a cluster uses the cluster's own
