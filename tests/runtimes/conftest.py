"""Fixtures of the runtime tests; the helpers they share live in runtime_exports.py."""
