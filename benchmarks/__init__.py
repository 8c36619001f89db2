"""Benchmarks: dtfx against DBOS Transact, side by side, on SQLite and PostgreSQL.

Run them with ``make bench`` (or ``python -m benchmarks``); they write BENCHMARKS.md.
They are not tests: the test suite has no timing assertions.
"""
