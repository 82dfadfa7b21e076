"""The mesh: peers, hellos and exchange, relays, invites, the directory."""
