"""Benchmarks: scripts that print a table and can write JSON."""
