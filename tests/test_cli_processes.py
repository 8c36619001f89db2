"""The ``dtfx`` command in real processes: a worker process and a client process on one
SQLite file, graceful shutdown on a signal, the bundled demo and the progress display."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dtfx

DTFX = [sys.executable, "-m", "dtfx.cli"]

SLOW_APP = """
import time
from pathlib import Path

import dtfx

app = dtfx.App()
HERE = Path(__file__).parent


@app.activity
def slow(ctx, _):
    (HERE / "started").write_text("")
    while not (HERE / "go").exists():  # the test says when to finish
        time.sleep(0.01)
    with open(HERE / "runs", "a") as runs:
        runs.write("ran\\n")
    return "done"


@app.orchestrator
def slow_job(ctx, _):
    return (yield ctx.call_activity(slow))
"""


COUNTER_APP = """
import dtfx

app = dtfx.App()


@app.entity
def counter(ctx, amount):
    ctx.set_state(ctx.get_state(int, 0) + amount)
"""

WAITING_APP = """
import dtfx

app = dtfx.App()


@app.orchestrator
def waiting(ctx, _):
    ctx.set_custom_status("[/x] waiting for [bold]go[/bold]")
    return (yield ctx.wait_for_external_event("go"))
"""


VERSIONED_APP = """
import dtfx

app = dtfx.App()


@app.orchestrator
def child(ctx, _):
    return ctx.version


@app.orchestrator
def report(ctx, _):
    return [ctx.version, (yield ctx.call_sub_orchestrator(child))]
"""


def environment(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "DTFX_BACKEND"}
    return env | extra


def dtfx_command(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DTFX, *args], cwd=cwd, env=environment(**env), capture_output=True, text=True, timeout=60, check=False
    )


class WorkerProcess:
    """A ``dtfx run`` process; its stderr is read line by line."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.stderr: list[str] = []

    def read_until(self, text: str) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)
            if text in line:
                return
        raise AssertionError(f"the worker exited before printing {text!r}: {''.join(self.stderr)}")

    def stop(self, signal_number: signal.Signals) -> int:
        self.process.send_signal(signal_number)
        return self.wait()

    def wait(self) -> int:
        _, rest = self.process.communicate(timeout=60)
        self.stderr.append(rest)
        return self.process.returncode


@contextmanager
def worker_process(target: str, *options: str, cwd: Path, **env: str) -> Iterator[WorkerProcess]:
    process = subprocess.Popen(
        [*DTFX, "run", target, *options],
        cwd=cwd,
        env=environment(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker = WorkerProcess(process)
    try:
        worker.read_until("Press Ctrl-C to stop.")
        yield worker
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_a_worker_process_and_a_client_process(tmp_path: Path) -> None:
    hub = f"sqlite:///{tmp_path}/hub.db"
    with worker_process("dtfx.examples.hello_cities", "--backend", hub, cwd=tmp_path) as worker:
        started = dtfx_command(
            "start", "hello_cities", "--input", '["Tokyo", "Lima"]', "--wait", "--json", cwd=tmp_path, DTFX_BACKEND=hub
        )
        assert started.returncode == 0, started.stderr
        state = json.loads(started.stdout)
        assert state["runtime_status"] == "COMPLETED"
        assert state["output"] == ["Hello, Tokyo!", "Hello, Lima!"]
        assert worker.stop(signal.SIGINT) == 0
    assert "orchestrators: hello_cities" in worker.stderr[1] and "activities: say_hello" in worker.stderr[2]
    assert "SIGINT: stopping" in "".join(worker.stderr)
    assert worker.stderr[-1].rstrip().endswith("Worker stopped.")


def test_a_worker_on_a_memory_hub_says_nothing_else_can_reach_it(tmp_path: Path) -> None:
    with worker_process("dtfx.examples.hello_cities", "-b", "memory://", cwd=tmp_path) as worker:
        assert worker.stop(signal.SIGTERM) == 0
    assert "no client or other worker can reach it" in "".join(worker.stderr)


def test_a_worker_for_an_app_of_entities_only(tmp_path: Path) -> None:
    (tmp_path / "counter_app.py").write_text(COUNTER_APP)
    hub = f"sqlite:///{tmp_path}/hub.db"
    entity = dtfx.EntityInstanceId("counter", "a")
    with worker_process("counter_app", "-b", hub, cwd=tmp_path) as worker, dtfx.Client(hub) as client:
        client.signal_entity(entity, "add", 2)
        deadline = time.monotonic() + 30
        while (metadata := client.get_entity(entity)) is None:
            assert time.monotonic() < deadline, "the worker never ran the entity"
            time.sleep(0.02)
        assert worker.stop(signal.SIGTERM) == 0
    assert metadata.get_state(int) == 2
    assert "orchestrators: -" in worker.stderr[1] and "activities: -" in worker.stderr[2]
    assert "entities: counter" in worker.stderr[3]


BUSY_APP = """
import threading
import time

import dtfx

app = dtfx.App()
lock = threading.Lock()
running = peak = 0


@app.activity
def busy(ctx, _):
    global running, peak
    with lock:
        running += 1
        peak = max(peak, running)
    time.sleep(0.2)
    with lock:
        running -= 1
    return peak


@app.orchestrator
def fan_out(ctx, count):
    peaks = yield dtfx.when_all([ctx.call_activity(busy) for _ in range(count)])
    return max(peaks)
"""


def test_a_worker_runs_at_most_as_many_activities_at_once_as_it_is_told(tmp_path: Path) -> None:
    (tmp_path / "busy_app.py").write_text(BUSY_APP)
    hub = f"sqlite:///{tmp_path}/hub.db"
    limits = ("--max-activities", "2", "--threads", "2", "--max-orchestrations", "1")
    with worker_process("busy_app", "-b", hub, *limits, cwd=tmp_path) as worker, dtfx.Client(hub) as client:
        instance_id = client.schedule_new_orchestration("fan_out", input=8)
        state = client.wait_for_orchestration_completion(instance_id, timeout=30)
        assert worker.stop(signal.SIGTERM) == 0
    assert state is not None and state.get_output() in (1, 2), state.failure_details  # by default, 6+ at once
    refused = dtfx_command("run", "busy_app", "-b", hub, "--threads", "0", cwd=tmp_path)
    assert refused.returncode == 2 and "--threads" in refused.stderr


def test_a_worker_of_one_version_and_its_own_orchestrators(tmp_path: Path) -> None:
    (tmp_path / "versioned_app.py").write_text(VERSIONED_APP)
    hub = f"sqlite:///{tmp_path}/hub.db"
    versioning = ("--version", "2.0", "--match", "current-or-older", "--on-mismatch", "fail", "--registered-only")
    with worker_process("versioned_app", "-b", hub, *versioning, cwd=tmp_path) as worker, dtfx.Client(hub) as client:
        older = client.schedule_new_orchestration("report", version="1.5")
        newer = client.schedule_new_orchestration("report", version="3.0")
        unknown = client.schedule_new_orchestration("from_the_next_deploy", version="2.0")
        ran = client.wait_for_orchestration_completion(older, timeout=30)
        refused = client.wait_for_orchestration_completion(newer, timeout=30)
        left = client.get_orchestration_state(unknown)
        assert worker.stop(signal.SIGTERM) == 0
    assert left is not None and left.runtime_status == dtfx.OrchestrationStatus.PENDING  # for another worker
    assert ran is not None and ran.get_output() == ["1.5", "2.0"]  # its child got the worker's version
    assert refused is not None and refused.runtime_status == dtfx.OrchestrationStatus.FAILED
    assert refused.failure_details is not None and refused.failure_details.error_type == "VersionMismatch"


def test_sigterm_lets_the_activity_in_flight_finish(tmp_path: Path) -> None:
    (tmp_path / "slow_app.py").write_text(SLOW_APP)
    hub = f"sqlite:///{tmp_path}/hub.db"
    with worker_process("slow_app.py", cwd=tmp_path, DTFX_BACKEND=hub) as worker:
        assert dtfx_command("start", "slow_job", "--id", "job", "-b", hub, cwd=tmp_path).returncode == 0
        wait_for_file(tmp_path / "started")
        worker.process.send_signal(signal.SIGTERM)
        worker.read_until("SIGTERM: stopping")
        (tmp_path / "go").write_text("")  # the activity finishes only now, while the worker stops
        assert worker.wait() == 0
    assert "Worker stopped." in worker.stderr[-1]
    assert (tmp_path / "runs").read_text() == "ran\n"

    # The activity's result was kept: a new worker finishes the orchestration without running it again.
    with worker_process("slow_app.py", "-b", hub, cwd=tmp_path) as worker, dtfx.Client(hub) as client:
        state = client.wait_for_orchestration_completion("job", timeout=30)
        assert worker.stop(signal.SIGTERM) == 0
    assert state is not None and state.get_output() == "done"
    assert (tmp_path / "runs").read_text() == "ran\n"


TRACED_SLOW_APP = (
    SLOW_APP
    + """
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult


class ToFile(SpanExporter):
    def export(self, spans):
        with open(HERE / "exported", "a") as exported:
            exported.writelines(f"{span.name}\\n" for span in spans)
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(ToFile(), schedule_delay_millis=60_000))
trace.set_tracer_provider(provider)
with trace.get_tracer(__name__).start_as_current_span("loaded"):  # held by the batch until a flush
    pass
"""
)


def quit_past_the_grace_period(app_source: str, tmp_path: Path) -> str:
    """Run ``slow_job`` of ``app_source`` on a worker stopped while its activity runs (it never
    gets its "go"), with a grace period shorter than that; the hub's URL."""
    (tmp_path / "slow_app.py").write_text(app_source)
    hub = f"sqlite:///{tmp_path}/hub.db"
    with worker_process("slow_app.py", "-b", hub, "--grace-period", "0.5", cwd=tmp_path) as worker:
        assert dtfx_command("start", "slow_job", "--id", "job", "-b", hub, cwd=tmp_path).returncode == 0
        wait_for_file(tmp_path / "started")
        assert not (tmp_path / "exported").exists()
        assert worker.stop(signal.SIGTERM) == 0
    assert "1 sync activity(ies) outlasted the grace period; quitting without them" in "".join(worker.stderr)
    return hub


def test_a_worker_that_quits_past_its_grace_period_exports_the_spans_it_holds(tmp_path: Path) -> None:
    quit_past_the_grace_period(TRACED_SLOW_APP, tmp_path)
    assert (tmp_path / "exported").read_text().splitlines() == ["loaded"]


def test_a_worker_quits_when_its_grace_period_ends_even_with_a_sync_activity_running(tmp_path: Path) -> None:
    hub = quit_past_the_grace_period(SLOW_APP, tmp_path)
    assert not (tmp_path / "runs").exists()

    # Its work item went back to the store: the next worker runs it at once.
    (tmp_path / "go").write_text("")
    with worker_process("slow_app.py", "-b", hub, cwd=tmp_path) as worker, dtfx.Client(hub) as client:
        state = client.wait_for_orchestration_completion("job", timeout=10)
        assert worker.stop(signal.SIGTERM) == 0
    assert state is not None and state.get_output() == "done"


def test_a_second_signal_quits_without_waiting_for_the_work_in_flight(tmp_path: Path) -> None:
    (tmp_path / "slow_app.py").write_text(SLOW_APP)
    hub = f"sqlite:///{tmp_path}/hub.db"
    with worker_process("slow_app.py", "-b", hub, cwd=tmp_path) as worker:
        assert dtfx_command("start", "slow_job", "-b", hub, cwd=tmp_path).returncode == 0
        wait_for_file(tmp_path / "started")
        worker.process.send_signal(signal.SIGINT)
        worker.read_until("SIGINT: stopping")
        assert worker.stop(signal.SIGINT) == 130  # the activity never got its "go"
    assert "SIGINT again: quitting now." in worker.stderr[-1]
    assert not (tmp_path / "runs").exists()


def test_the_demo_runs_on_the_default_sqlite_file(tmp_path: Path) -> None:
    demo = subprocess.run(
        [sys.executable, "-m", "dtfx.examples.hello_cities"],
        cwd=tmp_path,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    assert demo.stdout.splitlines() == ["Hello, Tokyo!", "Hello, Seattle!", "Hello, London!"]
    assert (tmp_path / ".dtfx" / "taskhub.db").is_file()

    listed = dtfx_command("list", "--status", "completed", "--json", cwd=tmp_path)
    assert [state["name"] for state in json.loads(listed.stdout)] == ["hello_cities"]


def test_the_console_script() -> None:
    script = Path(sys.executable).parent / "dtfx"
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert result.stdout.strip() == f"dtfx {dtfx.__version__}"


class TerminalCommand:
    """A ``dtfx`` command whose stderr is a terminal, as a person running it sees it."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.primary, secondary = pty.openpty()
        self.process = subprocess.Popen(
            [*DTFX, *args],
            cwd=cwd,
            env=environment(TERM="xterm", COLUMNS="120"),
            stdout=subprocess.DEVNULL,
            stderr=secondary,
        )
        os.close(secondary)
        self.shown = b""

    def __enter__(self) -> TerminalCommand:
        return self

    def __exit__(self, *_: object) -> None:
        """Kill the command if a failed assertion left it running."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        if self.primary >= 0:
            os.close(self.primary)

    @property
    def text(self) -> str:
        """What it showed so far, without colours and cursor moves."""
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", self.shown.decode(errors="replace"))

    def read_until(self, text: str) -> None:
        while text not in self.text:
            assert self._read(), f"the command exited without showing {text!r}: {self.text}"

    def wait(self) -> int:
        while self._read():
            pass
        os.close(self.primary)
        self.primary = -1
        return self.process.wait(timeout=30)

    def _read(self) -> bool:
        ready, _, _ = select.select([self.primary], [], [], 30)
        assert ready, "the command printed nothing for 30s"
        try:
            chunk = os.read(self.primary, 4096)
        except OSError:  # the command exited and closed the terminal
            return False
        self.shown += chunk
        return bool(chunk)


def test_a_long_wait_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    hub = f"sqlite:///{tmp_path}/hub.db"
    with TerminalCommand(
        "start", "hello_cities", "--id", "lonely", "--wait", "--timeout", "1", "-b", hub, cwd=tmp_path
    ) as command:
        assert command.wait() == 1
    assert "hello_cities lonely: PENDING (waiting for a worker)" in command.text
    assert "error: Instance lonely is still PENDING after 1s" in command.text


def test_the_progress_shows_a_custom_status_with_brackets_as_written(tmp_path: Path) -> None:
    (tmp_path / "waiting_app.py").write_text(WAITING_APP)
    hub = f"sqlite:///{tmp_path}/hub.db"
    with worker_process("waiting_app", "-b", hub, cwd=tmp_path) as worker:
        with TerminalCommand("start", "waiting", "--id", "w1", "--wait", "-b", hub, cwd=tmp_path) as command:
            command.read_until('waiting w1: RUNNING ("[/x] waiting for [bold]go[/bold]")')
            assert dtfx_command("raise", "w1", "go", "--data", '"went"', "-b", hub, cwd=tmp_path).returncode == 0
            assert command.wait() == 0
        assert worker.stop(signal.SIGTERM) == 0


def test_ctrl_c_ends_a_waiting_command_with_130(tmp_path: Path) -> None:
    hub = f"sqlite:///{tmp_path}/hub.db"
    process = subprocess.Popen(
        [*DTFX, "start", "hello_cities", "--id", "stuck", "--wait", "-b", hub],
        cwd=tmp_path,
        env=environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with dtfx.Client(hub) as client:  # once the instance exists, the command is waiting for it to end
            deadline = time.monotonic() + 30
            while client.get_orchestration_state("stuck") is None:
                assert time.monotonic() < deadline, "the command never started the instance"
                time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130
    assert stderr.strip().splitlines() == [
        "Started hello_cities as instance stuck; it goes on, only the wait was interrupted.",
        "error: interrupted",
    ]
