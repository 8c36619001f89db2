"""Run every benchmark, dtfx and DBOS side by side, and write the results into BENCHMARKS.md.

Each measurement runs in a process of its own on a store of its own: a fresh SQLite
file, or a fresh PostgreSQL database (dropped afterwards). Everything runs on this
machine, in this one run, with the same durability settings for both engines: SQLite
with ``synchronous=FULL`` (dtfx in WAL mode, DBOS with its default rollback journal),
PostgreSQL with the server's ``synchronous_commit=on``.

The workloads the targets are about (sequence, the longest sequence, latency) run ``--repeat``
times, in rounds, so that each engine's runs are spread over the same stretch of time
(the disk's speed drifts); the report gives each one's median run and the range.

Usage: ``python -m benchmarks [--quick] [--repeat 5] [--stores sqlite,postgres] [--output BENCHMARKS.md]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

POSTGRES = os.environ.get("DTFX_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
START, END = "<!-- results:start -->", "<!-- results:end -->"
COMMITS = 500
"""Commits timed for the floor: the cost of one durable commit on each store."""
HEADLINES = {"sequence": ("per_second", "/s"), "long_sequence": ("seconds", " s"), "latency": ("p50_ms", " ms")}
"""The repeated workloads, with the value whose median run counts, and its unit."""


@dataclass(frozen=True)
class Run:
    """One measurement: an engine's workload of a size, on a store."""

    engine: str
    workload: str
    size: int
    store: str

    @property
    def module(self) -> str:
        return {
            "dtfx": "benchmarks.dtfx_bench",
            "dbos": "benchmarks.dbos_bench",
            "sdk": "benchmarks.grpc_bench",
            "store": "benchmarks.floor_bench",
        }[self.engine]


@dataclass
class Results:
    """What the runs measured, by run."""

    values: dict[Run, dict[str, Any]] = field(default_factory=dict)
    """The result of each run (of a repeated one, its median run)."""
    errors: dict[Run, str] = field(default_factory=dict)
    headlines: dict[Run, list[float]] = field(default_factory=dict)
    """Every headline value measured by a repeated run."""

    def get(self, engine: str, workload: str, size: int, store: str) -> dict[str, Any] | None:
        return self.values.get(Run(engine, workload, size, store))


def plan(stores: list[str], quick: bool) -> list[Run]:
    """The runs, in order: every workload on SQLite, then on PostgreSQL."""
    sequence = 300 if quick else 1000
    lengths = [100, 300] if quick else [100, 300, 1000]
    runs: list[Run] = []
    for store in stores:
        runs.append(Run("store", "commit", COMMITS, store))
        for engine in ("dtfx", "dbos"):
            runs.append(Run(engine, "sequence", sequence, store))
            runs.append(Run(engine, "fan_out", 1000, store))
            runs.extend(Run(engine, "long_sequence", length, store) for length in lengths)
            runs.append(Run(engine, "latency", 50, store))
        runs.append(Run("dtfx", "fan_out", 10_000, store))
        runs.append(Run("sdk", "sequence", sequence, store))
        runs.append(Run("dtfx", "entity_signals", 2_000 if quick else 10_000, store))
        runs.append(Run("dtfx", "entity_many", 200 if quick else 1_000, store))
    return runs


@contextmanager
def store_url(store: str) -> Iterator[str]:
    """A fresh, empty store, removed afterwards; the disk has written back what came before."""
    if store == "sqlite":
        with tempfile.TemporaryDirectory(prefix="dtfx-bench-") as directory:
            os.sync()
            yield f"sqlite:///{directory}/store.db"
        return
    database = f"bench_{uuid.uuid4().hex[:12]}"
    _psql(f"CREATE DATABASE {database}")
    try:
        # The new database's pages (copied from the template through the server's log) and
        # the runs before would otherwise be written back during this run's first seconds.
        _psql("CHECKPOINT")
        os.sync()
        yield f"{POSTGRES}/{database}"
    finally:
        _psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def _psql(statement: str) -> str:
    import psycopg

    with psycopg.connect(f"{POSTGRES}/postgres", autocommit=True) as connection:
        cursor = connection.execute(statement)
        row = cursor.fetchone() if cursor.description else None
        return str(row[0]) if row else ""


def measure(run: Run) -> dict[str, Any]:
    """Run one measurement in a process of its own; its last line of output is the result."""
    with store_url(run.store) as url:
        completed = subprocess.run(
            [sys.executable, "-m", run.module, run.workload, url, str(run.size)],
            capture_output=True,
            text=True,
            timeout=1800,
            cwd=Path(__file__).resolve().parent.parent,
        )
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        raise RuntimeError((completed.stderr or completed.stdout).strip().splitlines()[-1:])
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def machine() -> list[tuple[str, str]]:
    """What the results were measured on."""
    cpu = "unknown"
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as info:
        memory = int(info.readline().split()[1]) / 1024 / 1024
    try:
        postgres = _psql("SHOW server_version")
    except Exception:
        postgres = "not reachable"
    return [
        ("Date", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU", f"{cpu}, {os.cpu_count()} cores"),
        ("Memory", f"{memory:.0f} GiB"),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        ("SQLite", sqlite3.sqlite_version),
        ("PostgreSQL", postgres),
        ("dtfx", metadata.version("dtfx")),
        ("DBOS Transact", metadata.version("dbos")),
        ("durabletask (gRPC peer)", metadata.version("durabletask")),
    ]


def _ratio(theirs: dict[str, Any] | None, mine: dict[str, Any] | None, key: str) -> str:
    """``theirs[key]`` over ``mine[key]``, as ``"3.2x"``: for times, more is better for dtfx."""
    if not theirs or not mine or not theirs[key] or not mine[key]:
        return "n/a"
    return f"{theirs[key] / mine[key]:.1f}x"


def report(results: Results, stores: list[str], quick: bool) -> str:
    """The results section of BENCHMARKS.md."""
    out: list[str] = []
    out.append("### Machine\n")
    out.append("| | |\n|---|---|")
    out.extend(f"| {name} | {value} |" for name, value in machine())
    sequence = 300 if quick else 1000
    lengths = [100, 300] if quick else [100, 300, 1000]
    for store in stores:
        title = {"sqlite": "SQLite", "postgres": "PostgreSQL"}[store]
        out.append(f"\n### {title}\n")
        out.append("| Workload | dtfx | DBOS | dtfx vs DBOS | Target | Met |")
        out.append("|---|---|---|---|---|---|")

        def row(name: str, dtfx: str, dbos: str, ratio: str, target: str, met: str) -> None:
            out.append(f"| {name} | {dtfx} | {dbos} | {ratio} | {target} | {met} |")

        mine = results.get("dtfx", "sequence", sequence, store)
        theirs = results.get("dbos", "sequence", sequence, store)
        ours_rate = mine and mine["per_second"]
        their_rate = theirs and theirs["per_second"]
        ratio = (ours_rate / their_rate) if ours_rate and their_rate else None
        row(
            f"sequence: {sequence} x 3 activities (orchestrations/s)",
            f"{ours_rate:,.0f}" if ours_rate else "failed",
            f"{their_rate:,.0f}" if their_rate else "failed",
            f"{ratio:.1f}x" if ratio else "n/a",
            "≥ 10x",
            _met(ratio is not None and ratio >= 10),
        )
        mine = results.get("dtfx", "fan_out", 1000, store)
        theirs = results.get("dbos", "fan_out", 1000, store)
        row(
            "fan-out/fan-in: 1,000 parallel activities (s)",
            _seconds(mine),
            _seconds(theirs),
            _ratio(theirs, mine, "seconds"),
            "",
            "",
        )
        big = results.get("dtfx", "fan_out", 10_000, store)
        row(
            "fan-out/fan-in: 10,000 parallel activities (s)",
            _seconds(big),
            "not run",
            "",
            "< 10 s on SQLite" if store == "sqlite" else "",
            _met(big is not None and big["seconds"] < 10) if store == "sqlite" else "",
        )
        for length in lengths:
            mine = results.get("dtfx", "long_sequence", length, store)
            theirs = results.get("dbos", "long_sequence", length, store)
            speedup = (theirs["seconds"] / mine["seconds"]) if mine and theirs else None
            last = length == lengths[-1] and not quick
            row(
                f"long sequence: L = {length} (s)",
                _seconds(mine),
                _seconds(theirs),
                f"{speedup:.1f}x" if speedup else "n/a",
                "≥ 5x" if last else "",
                _met(speedup is not None and speedup >= 5) if last else "",
            )
        mine = results.get("dtfx", "latency", 50, store)
        theirs = results.get("dbos", "latency", 50, store)
        row(
            "latency, p50 (ms)",
            f"{mine['p50_ms']:.1f}" if mine else "failed",
            f"{theirs['p50_ms']:.1f}" if theirs else "failed",
            _ratio(theirs, mine, "p50_ms"),
            "≤ 1/5 of DBOS",
            _met(bool(mine and theirs and mine["p50_ms"] * 5 <= theirs["p50_ms"])),
        )
        row(
            "latency, p99 (ms)",
            f"{mine['p99_ms']:.1f}" if mine else "failed",
            f"{theirs['p99_ms']:.1f}" if theirs else "failed",
            _ratio(theirs, mine, "p99_ms"),
            "",
            "",
        )
        mine = results.get("dtfx", "sequence", sequence, store)
        theirs = results.get("dbos", "sequence", sequence, store)
        row(
            "peak RSS, sequence workload (MB)",
            f"{mine['peak_rss_mb']:.0f}" if mine else "failed",
            f"{theirs['peak_rss_mb']:.0f}" if theirs else "failed",
            "",
            "",
            "",
        )
        sdk = results.get("sdk", "sequence", sequence, store)
        row(
            "gRPC path: sequence with the official SDK worker on `dtfx serve` (orchestrations/s)",
            f"{sdk['per_second']:,.0f}" if sdk else "failed",
            "",
            "",
            "",
            "",
        )
        growth = _growth(results, "dtfx", store, lengths)
        dbos_growth = _growth(results, "dbos", store, lengths)
        out.append(
            f"\nLong sequence, time for L = {lengths[-1]} over time for L = {lengths[0]}"
            f" ({lengths[-1] // lengths[0]}x the steps): dtfx {growth}, DBOS {dbos_growth}"
            " (linear growth gives about the ratio of the lengths; quadratic, its square)."
        )
        out.append("\n" + _floor(results, store, lengths[-1]))
        spread = _spread(results, store)
        if spread:
            out.append("\n" + spread)
        signals = results.get("dtfx", "entity_signals", 2_000 if quick else 10_000, store)
        many = results.get("dtfx", "entity_many", 200 if quick else 1_000, store)
        out.append("\n| Entities | dtfx |\n|---|---|")
        out.append(
            f"| {signals['count'] if signals else '-'} signals to one counter entity | "
            + (f"{signals['seconds']:.2f} s ({signals['per_second']:,.0f} operations/s)" if signals else "failed")
            + " |"
        )
        out.append(
            f"| {many['operations'] if many else '-'} operations: 10 on each of "
            f"{(many['operations'] // 10) if many else '-'} entities | "
            + (f"{many['seconds']:.2f} s ({many['per_second']:,.0f} operations/s)" if many else "failed")
            + " |"
        )
    if results.errors:
        out.append("\n### Runs that failed\n")
        out.extend(
            f"- {run.engine} {run.workload} {run.size} on {run.store}: {error}" for run, error in results.errors.items()
        )
    return "\n".join(out)


def _repeated(run: Run, runs: list[Run]) -> bool:
    """Whether ``run`` is one of those with a target: the sequence, the longest chain, the latency."""
    if run.engine not in ("dtfx", "dbos") or run.workload not in HEADLINES:
        return False
    return run.workload != "long_sequence" or run.size == max(r.size for r in runs if r.workload == run.workload)


def _spread(results: Results, store: str) -> str:
    """The range of every repeated run's headline value, on ``store``."""
    parts: list[str] = []
    order = list(HEADLINES)

    def position(run: Run) -> tuple[int, int, str]:
        return order.index(run.workload), run.size, run.engine

    for run, values in sorted(results.headlines.items(), key=lambda item: position(item[0])):
        if run.store != store or len(values) < 2:
            continue
        unit = HEADLINES[run.workload][1]
        number = "{:,.0f}" if run.workload == "sequence" else "{:.2f}"
        what = f"long sequence L = {run.size}" if run.workload == "long_sequence" else run.workload
        engine = "DBOS" if run.engine == "dbos" else run.engine
        parts.append(f"{what} {engine} {number.format(min(values))}-{number.format(max(values))}{unit}")
    if not parts:
        return ""
    count = max(len(values) for values in results.headlines.values())
    return (
        f"Sequence, the longest sequence and latency: the median of {count} runs each; the runs ranged:"
        f" {'; '.join(parts)}."
    )


def _floor(results: Results, store: str, length: int) -> str:
    """One durable commit on the store against one step of the long sequence."""
    floor = results.get("store", "commit", COMMITS, store)
    if floor is None:
        return "The cost of one durable commit was not measured."
    if store == "sqlite":
        wal, rollback = floor["wal_us"], floor["rollback_journal_us"]
        commits = f"{wal:,.0f} µs in WAL mode (dtfx), {rollback:,.0f} µs with the rollback journal (DBOS)"
    else:
        commits = f"{floor['commit_us']:,.0f} µs"
    steps = []
    for engine, name in (("dtfx", "dtfx"), ("dbos", "DBOS")):
        result = results.get(engine, "long_sequence", length, store)
        if result:
            steps.append(f"{name} {result['seconds'] / length * 1e6:,.0f} µs")
    return (
        f"One durable commit (a one-row insert, median of {COMMITS}): {commits}."
        f" One step of the long sequence (L = {length}): {', '.join(steps) or 'not measured'}."
    )


def _seconds(result: dict[str, Any] | None) -> str:
    return f"{result['seconds']:.2f}" if result else "failed"


def _met(condition: bool) -> str:
    return "yes" if condition else "**no**"


def _growth(results: Results, engine: str, store: str, lengths: list[int]) -> str:
    first = results.get(engine, "long_sequence", lengths[0], store)
    last = results.get(engine, "long_sequence", lengths[-1], store)
    if not first or not last:
        return "n/a"
    return f"{last['seconds'] / first['seconds']:.1f}x"


def write(section: str, output: Path) -> None:
    """Replace the results section of ``output`` (keeping the rest of the file)."""
    text = output.read_text() if output.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text:
        text = f"{text.rstrip()}\n\n{START}\n{END}\n"
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    output.write_text(pattern.sub(lambda _: f"{START}\n{section}\n{END}", text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller workloads, for a check in a minute")
    parser.add_argument("--repeat", type=int, default=5, help="runs of the workloads with targets (median counts)")
    parser.add_argument("--stores", default="sqlite,postgres")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parent.parent / "BENCHMARKS.md")
    arguments = parser.parse_args()
    stores = arguments.stores.split(",")
    runs = plan(stores, arguments.quick)
    samples: dict[Run, list[dict[str, Any]]] = {}
    results = Results()
    for round_ in range(max(1, arguments.repeat)):
        for run in runs if round_ == 0 else [run for run in runs if _repeated(run, runs)]:
            print(f"{run.engine:5s} {run.workload:15s} {run.size:6d} {run.store:9s} ", end="", flush=True)
            try:
                samples.setdefault(run, []).append(measure(run))
                print(json.dumps(samples[run][-1]))
            except Exception as error:
                results.errors[run] = str(error)
                print(f"failed: {error}")
    for run, measured in samples.items():
        if run in results.errors:
            continue
        if not _repeated(run, runs):
            results.values[run] = measured[0]
            continue
        key = HEADLINES[run.workload][0]
        ordered = sorted(measured, key=lambda result: result[key])
        results.values[run] = ordered[len(ordered) // 2]
        results.headlines[run] = [result[key] for result in measured]
    write(report(results, stores, arguments.quick), arguments.output)
    print(f"Wrote {arguments.output}")


if __name__ == "__main__":
    main()
