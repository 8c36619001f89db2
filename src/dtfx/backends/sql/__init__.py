"""What the SQL backends (SQLite, PostgreSQL) share.

The transactional logic of the storage contract is written once, as *programs*:
generators that yield SQL steps and receive their results (:mod:`.program`). Each
backend only drives them on its own connection, sync (SQLite) or async (PostgreSQL),
and supplies a :class:`~dtfx.backends.sql.program.Dialect` for the few places where
the SQL differs.

* :mod:`.rows`: columns, timestamps and the row <-> :class:`~dtfx.OrchestrationState` mapping;
* :mod:`.schema`: the versioned schema and its migrations;
* :mod:`.transaction`: a write transaction planned in memory, written set-based;
* :mod:`.operations`: one program per contract method;
* :mod:`.backend`: :class:`~dtfx.backends.sql.backend.SqlBackend`, the contract over those programs.
"""
