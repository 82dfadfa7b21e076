"""Serving: models on disk, local experts, batching, worker processes, specialists."""
