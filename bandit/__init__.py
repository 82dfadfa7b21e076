"""expertmesh: bandit."""
