"""Judging: probe suites (data files), scoring of answers, and score statistics."""
