"""Which machine this process runs on: its hostname and, inside Ray, its Ray node id."""

from __future__ import annotations

import socket
import sys


def this_node() -> dict[str, str]:
    """``{"hostname": ..., "ray_node_id": ...}`` (the id only in a process Ray started or
    connected; Ray is never imported here)."""
    node = {"hostname": socket.gethostname()}
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        node["ray_node_id"] = ray.get_runtime_context().get_node_id()
    return node


def describe(node: dict[str, str]) -> str:
    """A node in words, for messages: ``host (Ray node abc123…)``."""
    ray_id = node.get("ray_node_id")
    return f"{node['hostname']} (Ray node {ray_id})" if ray_id else node["hostname"]
