"""expertmesh: node."""
