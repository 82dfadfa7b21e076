"""Routing: the router over the bandit, decomposition, community learning, reports."""
