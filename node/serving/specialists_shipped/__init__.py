"""Specialist definitions shipped with expertmesh (TOML data, read by node.serving.specialists)."""
