"""Judging: suites, scorers, signed capability cards, trust, and the node's judge service."""
