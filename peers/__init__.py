"""expertmesh: peers."""
