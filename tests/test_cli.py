"""The ``dtfx`` command, driven in-process with Typer's CliRunner against real SQLite files.

A worker runs on a background thread against the same file, as a separate
process would; every command opens the file on its own.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import dtfx
from dtfx.cli import COMMANDS, cli
from dtfx.cli.printable import printable
from dtfx.cli.root import configure_logging, print_error
from dtfx.cli.worker import load_app
from dtfx.examples import hello_cities

app = dtfx.App()
app.update(hello_cities.app)
broken = {"fragile": True}


@app.orchestrator
def approval(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
    ctx.set_custom_status("waiting for approval")
    return (yield ctx.wait_for_external_event("approval"))


@app.activity
def fragile(ctx: dtfx.ActivityContext, _: Any) -> str:
    if broken["fragile"]:
        raise ValueError("still broken")
    return "mended"


@app.orchestrator
def rewindable(ctx: dtfx.OrchestrationContext, _: Any) -> Any:
    return (yield ctx.call_activity(fragile))


@app.orchestrator
def echo(ctx: dtfx.OrchestrationContext, value: Any) -> Any:
    return value


@app.orchestrator
def fail_with(ctx: dtfx.OrchestrationContext, message: str) -> None:
    raise ValueError(message)


@app.entity
def tally(ctx: dtfx.EntityContext, amount: int) -> None:
    ctx.set_state(ctx.get_state(int, 0) + amount)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def invoke_json(*args: str) -> Any:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_one_line_error(result: Result, *fragments: str, exit_code: int | None = None) -> None:
    """Bad input: a non-zero exit, one clear line on stderr, no traceback."""
    assert result.exit_code != 0, result.output
    if exit_code is not None:
        assert result.exit_code == exit_code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def hub(tmp_path: Path) -> str:
    """The URL of a new, empty SQLite task hub in a fresh directory."""
    url = f"sqlite:///{tmp_path}/hub.db"
    assert invoke("migrate", "-b", url).exit_code == 0
    return url


@pytest.fixture
def worker(hub: str) -> Iterator[dtfx.Worker]:
    with dtfx.Worker(hub, app=app) as running:
        yield running


def wait_for_status(hub: str, instance_id: str, status: dtfx.OrchestrationStatus) -> dtfx.OrchestrationState:
    """Poll until the instance has ``status`` (the worker runs on its own thread)."""
    deadline = time.monotonic() + 20
    with dtfx.Client(hub) as client:
        while True:
            state = client.get_orchestration_state(instance_id)
            if state is not None and state.runtime_status == status:
                return state
            assert time.monotonic() < deadline, f"{instance_id} never became {status.name}: {state}"
            time.sleep(0.02)


# -- the commands ------------------------------------------------------------------------------


def test_every_command_has_help_and_the_version_prints() -> None:
    assert invoke("--help").exit_code == 0
    for name, _ in COMMANDS:
        result = invoke(name, "--help")
        assert result.exit_code == 0, result.output
        assert f"dtfx {name} [OPTIONS]" in result.stdout
        # An option says what it takes (ID, SECONDS), and a flag nothing, not its Python type.
        options = [line for line in result.stdout.splitlines() if line.startswith("│ --") and "--help" not in line]
        assert not [line for line in options if re.search(r"<(bool|str|int|float)( range)?>", line)], name
    assert invoke("--version").stdout.strip() == f"dtfx {dtfx.__version__}"


def test_start_wait_prints_the_result(hub: str, worker: dtfx.Worker) -> None:
    result = invoke("start", "hello_cities", "--input", '["Oslo", "Lima"]', "--id", "greet", "--wait", "-b", hub)
    assert result.exit_code == 0, result.output
    assert "COMPLETED" in result.stdout
    assert '["Hello, Oslo!","Hello, Lima!"]' in result.stdout

    state = invoke_json("start", "hello_cities", "--wait", "-b", hub)
    assert state["runtime_status"] == "COMPLETED"
    assert state["output"] == ["Hello, Tokyo!", "Hello, Seattle!", "Hello, London!"]


def test_start_without_a_worker_then_status_and_list(hub: str) -> None:
    started = invoke_json("start", "hello_cities", "--input", '["Oslo"]', "--id", "later", "--version", "2", "-b", hub)
    assert started == {"instance_id": "later"}
    assert invoke("start", "hello_cities", "--id", "other", "-b", hub).stdout.strip() == (
        "Started hello_cities as instance other."
    )

    state = invoke_json("status", "later", "-b", hub)
    assert state["runtime_status"] == "PENDING"
    assert state["name"] == "hello_cities" and state["version"] == "2" and state["input"] == ["Oslo"]
    table = invoke("status", "later", "-b", hub).stdout
    assert "PENDING" in table and "hello_cities" in table

    listed = invoke_json("list", "-b", hub)
    assert [item["instance_id"] for item in listed] == ["later", "other"]
    assert listed[0]["input"] == ["Oslo"]
    assert invoke_json("list", "--status", "pending", "--status", "RUNNING", "-b", hub) == listed
    assert invoke_json("list", "--status", "completed", "-b", hub) == []
    assert [item["instance_id"] for item in invoke_json("list", "--limit", "1", "-b", hub)] == ["later"]
    assert [item["instance_id"] for item in invoke_json("list", "--prefix", "oth", "-b", hub)] == ["other"]
    between = ("--created-after", "2000-01-01", "--created-before", "2999-01-01T00:00Z")
    assert invoke_json("list", *between, "-b", hub) == listed
    assert invoke_json("list", "--created-before", "2000-01-01T00:00+01:00", "-b", hub) == []
    assert invoke_json("list", "--created-after", state["created_at"], "--prefix", "lat", "-b", hub) == listed[:1]

    table = invoke("list", "--limit", "1", "-b", hub).stdout
    assert "later" in table and "other" not in table and "raise --limit to see more" in table
    header = invoke("list", "-b", hub).stdout.splitlines()[0].replace("┃", " ").split()
    assert header[:3] == ["Instance", "Name", "Version"]
    assert "Version" not in invoke("list", "--prefix", "oth", "-b", hub).stdout  # none of these has one
    assert "No orchestration instances." in invoke("list", "--status", "failed", "-b", hub).stdout


def test_status_with_history(hub: str, worker: dtfx.Worker) -> None:
    invoke_json("start", "hello_cities", "--input", '["Oslo"]', "--id", "h1", "--wait", "-b", hub)
    state = invoke_json("status", "h1", "--history", "-b", hub)
    types = [event["type"] for event in state["history"]]
    assert types[0] == "OrchestratorStarted" and "ExecutionStarted" in types
    assert types[-1] == "ExecutionCompleted"
    assert state["history"][-1]["status"] == "COMPLETED"
    scheduled = [event for event in state["history"] if event["type"] == "TaskScheduled"]
    assert [(event["name"], event["input"]) for event in scheduled] == [("say_hello", '"Oslo"')]

    table = invoke("status", "h1", "--history", "-b", hub).stdout
    assert "TaskScheduled" in table and "name=say_hello" in table and 'result="Hello, Oslo!"' in table


def test_the_backend_comes_from_dtfx_backend(hub: str) -> None:
    result = invoke("start", "hello_cities", "--id", "from-env", "--json", env={"DTFX_BACKEND": hub})
    assert result.exit_code == 0, result.output
    assert invoke_json("status", "from-env", "-b", hub)["instance_id"] == "from-env"
    assert invoke("status", "from-env", "--json", env={"DTFX_BACKEND": hub}).exit_code == 0
    # --backend wins over the environment
    other = hub.replace("hub.db", "other.db")
    assert_one_line_error(invoke("status", "from-env", "-b", other, env={"DTFX_BACKEND": hub}), "other.db")


def test_a_sqlite_file_that_does_not_exist_is_no_task_hub(tmp_path: Path) -> None:
    """A mistyped path would make an empty task hub, whose instances would all seem gone;
    only a command that creates instances makes the file."""
    missing = tmp_path / "typo" / "hub.db"
    url = f"sqlite:///{missing}"
    for args in (["list"], ["status", "any"], ["purge", "any"], ["raise", "any", "approval"]):
        assert_one_line_error(invoke(*args, "-b", url), f"No task hub at {url}", "does not exist")
    assert not missing.parent.exists()
    assert invoke("start", "hello_cities", "--id", "made", "-b", url).exit_code == 0
    assert invoke_json("status", "made", "-b", url)["runtime_status"] == "PENDING"


def test_migrate_refuses_a_memory_task_hub() -> None:
    assert_one_line_error(invoke("migrate", "-b", "memory://"), "memory:// keeps nothing past this command")


def test_raise_delivers_the_event_data(hub: str, worker: dtfx.Worker) -> None:
    invoke_json("start", "approval", "--id", "a1", "-b", hub)
    wait_for_status(hub, "a1", dtfx.OrchestrationStatus.RUNNING)
    result = invoke("raise", "a1", "approval", "--data", '{"by": "ann"}', "-b", hub)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "Raised event 'approval' on instance a1."
    assert wait_for_status(hub, "a1", dtfx.OrchestrationStatus.COMPLETED).get_output() == {"by": "ann"}

    invoke_json("start", "approval", "--id", "a2", "-b", hub)
    assert invoke_json("raise", "a2", "approval", "-b", hub) == {"instance_id": "a2", "event": "approval"}
    assert wait_for_status(hub, "a2", dtfx.OrchestrationStatus.COMPLETED).get_output() is None


def test_suspend_resume_terminate(hub: str, worker: dtfx.Worker) -> None:
    invoke_json("start", "approval", "--id", "s1", "-b", hub)
    wait_for_status(hub, "s1", dtfx.OrchestrationStatus.RUNNING)
    assert '"waiting for approval"' in invoke("status", "s1", "-b", hub).stdout

    result = invoke("suspend", "s1", "--reason", "lunch", "-b", hub)
    assert result.exit_code == 0 and result.stdout.strip() == "Asked instance s1 to suspend."
    wait_for_status(hub, "s1", dtfx.OrchestrationStatus.SUSPENDED)
    assert invoke_json("resume", "s1", "-b", hub) == {"instance_id": "s1", "requested": "resume"}
    wait_for_status(hub, "s1", dtfx.OrchestrationStatus.RUNNING)
    assert invoke_json("terminate", "s1", "--output", '"enough"', "-b", hub) == {
        "instance_id": "s1",
        "requested": "terminate",
    }
    assert wait_for_status(hub, "s1", dtfx.OrchestrationStatus.TERMINATED).get_output() == "enough"

    assert_one_line_error(invoke("terminate", "s1", "-b", hub), "s1", "TERMINATED", "already ended")
    assert_one_line_error(invoke("raise", "s1", "approval", "-b", hub), "already ended")


def test_rewind_and_restart(hub: str, worker: dtfx.Worker) -> None:
    broken["fragile"] = True
    result = invoke("start", "rewindable", "--id", "r1", "--wait", "-b", hub)
    assert_one_line_error(result, "Orchestration r1 failed", "ValueError: still broken")
    assert "FAILED" in result.stdout

    broken["fragile"] = False
    assert invoke("rewind", "r1", "--reason", "fixed", "-b", hub).stdout.strip() == "Asked instance r1 to rewind."
    assert wait_for_status(hub, "r1", dtfx.OrchestrationStatus.COMPLETED).get_output() == "mended"
    assert_one_line_error(invoke("rewind", "r1", "-b", hub), "r1", "only failed instances can be rewound")

    assert invoke("restart", "r1", "-b", hub).stdout.strip() == "Restarted instance r1."
    assert wait_for_status(hub, "r1", dtfx.OrchestrationStatus.COMPLETED).get_output() == "mended"
    restarted = invoke_json("restart", "r1", "--new-id", "-b", hub)["instance_id"]
    assert restarted != "r1"
    assert wait_for_status(hub, restarted, dtfx.OrchestrationStatus.COMPLETED).name == "rewindable"


def test_purge(hub: str, worker: dtfx.Worker) -> None:
    invoke_json("start", "hello_cities", "--id", "p1", "--wait", "-b", hub)
    invoke_json("start", "approval", "--id", "p2", "-b", hub)
    assert invoke("purge", "p1", "-b", hub).stdout.strip() == "Purged 1 instance(s)."
    assert_one_line_error(invoke("status", "p1", "-b", hub), "No orchestration instance with id 'p1'")
    assert_one_line_error(invoke("purge", "p2", "-b", hub), "only ended instances can be purged")
    invoke_json("terminate", "p2", "-b", hub)
    wait_for_status(hub, "p2", dtfx.OrchestrationStatus.TERMINATED)
    assert invoke_json("purge", "p2", "-b", hub) == {"deleted_instance_count": 1}


def test_stored_text_with_brackets_prints_as_written(hub: str, worker: dtfx.Worker) -> None:
    """Payloads, ids, failure messages and event names are data, not Rich markup."""
    done = invoke("start", "echo", "--input", '"step [done] ok"', "--id", "[b]e1", "--wait", "-b", hub)
    assert done.exit_code == 0, done.output
    assert '"step [done] ok"' in done.stdout and "[b]e1" in done.stdout

    failed = invoke("start", "fail_with", "--input", '"missing [/data/in.csv]"', "--id", "f1", "--wait", "-b", hub)
    assert_one_line_error(failed, "Orchestration f1 failed: ValueError: missing [/data/in.csv]", exit_code=1)
    assert "ValueError: missing [/data/in.csv]" in failed.stdout

    status = invoke("status", "f1", "--history", "-b", hub)
    assert status.exit_code == 0, status.output
    failure_row = next(line for line in status.stdout.splitlines() if line.startswith("Failure"))
    assert failure_row.endswith("ValueError: missing [/data/in.csv]")
    assert 'input="missing [/data/in.csv]"' in status.stdout  # the ExecutionStarted event's details
    history = invoke("status", "[b]e1", "--history", "-b", hub)
    assert history.exit_code == 0, history.output
    assert 'result="step [done] ok"' in history.stdout

    listed = invoke("list", "-b", hub)
    assert listed.exit_code == 0, listed.output
    assert [line.split()[0] for line in listed.stdout.splitlines()[2:]] == ["[b]e1", "f1"]

    invoke_json("start", "approval", "--id", "[x]waiting", "-b", hub)
    raised = invoke("raise", "[x]waiting", "[/x]", "-b", hub)
    assert raised.exit_code == 0, raised.output
    assert raised.stdout.strip() == "Raised event '[/x]' on instance [x]waiting."


def test_json_output_stays_json_when_a_payload_holds_nan(hub: str, worker: dtfx.Worker) -> None:
    # Python's json (and the SDK) write NaN and the infinities as bare words, which JSON has not.
    with dtfx.Client(hub) as client:
        client.schedule_new_orchestration(echo, input=[1.5, float("nan")], instance_id="nan")
        client.wait_for_orchestration_completion("nan", timeout=20)
    result = invoke("status", "nan", "--json", "-b", hub)
    assert result.exit_code == 0, result.output

    def strict(name: str) -> None:
        raise AssertionError(f"{name} in the output")

    state = json.loads(result.stdout, parse_constant=strict)
    assert state["output"] == state["input"] == "[1.5,NaN]"  # the payload as stored


def test_status_of_an_entity_shows_its_state_and_purge_says_entities_are_not_purged(
    hub: str, worker: dtfx.Worker
) -> None:
    entity = dtfx.EntityInstanceId("tally", "t1")
    with dtfx.Client(hub) as client:
        client.signal_entity(entity, "add", 5)
        deadline = time.monotonic() + 20
        while client.get_entity(entity) is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    shown = invoke_json("status", "@tally@t1", "-b", hub)
    assert (shown["entity_id"], shown["name"], shown["key"], shown["state"], shown["locked_by"]) == (
        "@tally@t1",
        "tally",
        "t1",
        5,
        None,
    )
    table = invoke("status", "@tally@t1", "-b", hub)
    assert table.exit_code == 0 and "State" in table.stdout and "Status" not in table.stdout, table.output
    assert_one_line_error(invoke("status", "@tally@none", "-b", hub), "No entity with id '@tally@none'", exit_code=1)
    assert_one_line_error(invoke("status", "@tally@t1", "--history", "-b", hub), "keeps no history", exit_code=2)
    assert_one_line_error(invoke("purge", "@tally@t1", "-b", hub), "entities are not purged", exit_code=1)


def test_ctrl_c_exits_130_with_one_line(hub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def interrupted(*_: Any, **__: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dtfx.AsyncClient, "get_orchestration_state", interrupted)
    assert_one_line_error(invoke("status", "any", "-b", hub), "interrupted", exit_code=130)


def test_verbose_logs_the_traceback_of_an_error(hub: str) -> None:
    result = invoke("status", "nobody", "-v", "-b", hub)
    assert result.exit_code == 1
    assert "error: No orchestration instance with id 'nobody'.\n" in result.stderr
    assert "Traceback" in result.stderr and "OrchestrationNotFoundError" in result.stderr


# -- bad input: one line, non-zero, no traceback -------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["start", "hello_cities", "--input", "{oops"], ["--input", "not valid JSON"]),
        (["start", "hello_cities", "--input", "Tokyo"], ["'Tokyo' is not valid JSON", "double quotes"]),
        (["raise", "some-id", "approval", "--data", "[1,"], ["--data", "not valid JSON"]),
        (["terminate", "some-id", "--output", "nope"], ["--output", "not valid JSON"]),
        (["start", "hello_cities", "--input", "NaN"], ["NaN is not a JSON number"]),
        (["start", "hello_cities", "--input", "[1e999]"], ["1e999 is beyond the range of a number"]),
        (["start", "hello_cities", "--input", "[" * 5000 + "]" * 5000], ["--input", "nested too deeply"]),
        (["list", "--status", "sleepy"], ["'sleepy' is not a status", "running"]),
        (["list", "--limit", "0"], ["--limit"]),
        (["list", "--created-after", "yesterday"], ["'yesterday' is not a date or moment", "ISO 8601"]),
        (["list", "--created-after", "9999-12-31T23:59:59-14:00"], ["out of the range of datetime in UTC"]),
        (["list", "--limit", "100000000000000000000"], ["--limit"]),
        (["status"], ["Missing argument 'ID'"]),
        (["stauts", "x"], ["No such command 'stauts'"]),
        (["start", ""], ["'NAME': cannot be empty"]),
        (["start", "hello_cities", "--id", " "], ["'--id': cannot be empty"]),
        (["raise", "some-id", ""], ["'EVENT': cannot be empty"]),
        (["status", ""], ["'ID': cannot be empty"]),
        (["run", ""], ["'MODULE[:APP]': cannot be empty"]),
        (["run", "dtfx.examples.hello_cities", "--match", "strict"], ["'--match'", "give one"]),
        (["run", "dtfx.examples.hello_cities", "--version", "2", "--on-mismatch", "fail"], ["'--on-mismatch'"]),
        (["run", "dtfx.examples.hello_cities", "--match", "newest"], ["'newest' is not one of"]),
        (["run", "dtfx.examples.hello_cities", "--version", ""], ["'--version': cannot be empty"]),
    ],
)
def test_usage_errors(hub: str, args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(invoke(*args, "-b", hub), *fragments, exit_code=2)


@pytest.mark.parametrize(
    "args",
    [
        ["status", "ghost"],
        ["raise", "ghost", "approval"],
        ["terminate", "ghost"],
        ["suspend", "ghost"],
        ["resume", "ghost"],
        ["restart", "ghost"],
        ["rewind", "ghost"],
        ["purge", "ghost"],
    ],
)
def test_unknown_instances(hub: str, args: list[str]) -> None:
    assert_one_line_error(invoke(*args, "-b", hub), "No orchestration instance with id 'ghost'", exit_code=1)


def test_an_unknown_orchestrator_name_fails_the_instance(hub: str, worker: dtfx.Worker) -> None:
    """The CLI cannot know what a worker registered: the instance fails, and --wait says why."""
    result = invoke("start", "no_such_orchestrator", "--id", "u1", "--wait", "-b", hub)
    assert_one_line_error(
        result, "Orchestration u1 failed", "NotRegisteredError", "No orchestrator named 'no_such_orchestrator'"
    )
    state = invoke_json("status", "u1", "-b", hub)
    assert state["runtime_status"] == "FAILED"
    assert "No orchestrator named 'no_such_orchestrator'" in state["failure_details"]["message"]


def test_waiting_without_a_worker_times_out_with_a_hint(hub: str) -> None:
    result = invoke("start", "hello_cities", "--id", "lonely", "--wait", "--timeout", "0.3", "-b", hub)
    assert_one_line_error(
        result, "lonely is still PENDING after 0.3s", "and runs instances without a version", exit_code=1
    )
    versioned = invoke("start", "hello_cities", "--version", "2.0", "--wait", "--timeout", "0.3", "-b", hub)
    assert_one_line_error(
        versioned, f"is a worker running on {hub} that registers 'hello_cities' and runs version 2.0", exit_code=1
    )


def test_a_relative_sqlite_path_is_shown_with_the_file_it_means(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started from another directory, it would be another task hub."""
    monkeypatch.chdir(tmp_path)
    result = invoke("start", "hello_cities", "--wait", "--timeout", "0.3", "-b", "sqlite:///hubs/a.db")
    assert_one_line_error(result, f"is a worker running on sqlite:///hubs/a.db ({tmp_path / 'hubs' / 'a.db'})")


def test_a_list_cut_short_says_so_beside_its_json(hub: str) -> None:
    for index in range(3):
        invoke_json("start", "hello_cities", "--id", f"i{index}", "-b", hub)
    result = invoke("list", "--limit", "2", "--json", "-b", hub)
    assert result.exit_code == 0, result.output
    assert [state["instance_id"] for state in json.loads(result.stdout)] == ["i0", "i1"]
    assert "raise --limit to see more" in result.stderr
    assert invoke("list", "--limit", "3", "--json", "-b", hub).stderr == ""


def test_an_empty_orchestrator_name_is_refused(hub: str) -> None:
    assert_one_line_error(invoke("start", "", "-b", hub), "'NAME': cannot be empty", exit_code=2)
    assert invoke_json("list", "-b", hub) == []


def test_a_taken_id_is_refused(hub: str) -> None:
    invoke_json("start", "hello_cities", "--id", "taken", "-b", hub)
    assert_one_line_error(invoke("start", "hello_cities", "--id", "taken", "-b", hub), "'taken' already exists")


def test_one_shot_commands_refuse_a_memory_hub() -> None:
    for args in (["start", "hello_cities"], ["list"], ["status", "x"], ["terminate", "x"]):
        assert_one_line_error(invoke(*args, "-b", "memory://"), "memory:// keeps nothing past this", exit_code=1)


def test_backends_that_cannot_be_opened(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    assert_one_line_error(
        invoke("list", "-b", f"sqlite:///{not_a_directory}/hub.db"), f"sqlite:///{not_a_directory}/hub.db"
    )
    assert_one_line_error(invoke("status", "x", "-b", "mysql://localhost/db"), "Unknown backend URL")
    misspelt = invoke("list", "-b", "postgressql://app:hunter2@db.internal/app")
    assert_one_line_error(misspelt, "Unknown backend URL 'postgressql://app:***@db.internal/app'")
    assert "hunter2" not in misspelt.stderr


def test_a_postgresql_server_that_does_not_answer() -> None:
    nothing_listening = invoke("list", "-b", "postgresql://dtfx:secret@127.0.0.1:1/nothing")
    assert_one_line_error(nothing_listening, "postgresql://dtfx:***@127.0.0.1:1/nothing")
    assert "secret" not in nothing_listening.stderr
    in_the_query = invoke("list", "-b", "postgresql://dtfx@127.0.0.1:1/nothing?password=secret&application_name=x")
    assert_one_line_error(in_the_query, "postgresql://dtfx@127.0.0.1:1/nothing?password=***&application_name=x")
    assert "secret" not in in_the_query.stderr


SHOP = """
import dtfx

orders = dtfx.App()
billing = dtfx.App()


@orders.activity
def ship(ctx, _):
    return "shipped"


@billing.activity
def bill(ctx, _):
    return "billed"
"""


def test_run_finds_the_app_in_a_module_or_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # dtfx run adds the current directory
    (tmp_path / "cli_shop.py").write_text(SHOP)
    (tmp_path / "cli_lone.py").write_text(SHOP.replace("billing = dtfx.App()", "billing = orders"))
    assert list(load_app("cli_shop:billing").activities) == ["bill"]
    assert list(load_app("cli_lone").activities) == ["ship", "bill"]  # the only app, under two names
    assert list(load_app("dtfx.examples.hello_cities").orchestrators) == ["hello_cities"]  # `app`
    (tmp_path / "cli_counter.py").write_text(
        "import dtfx\napp = dtfx.App()\napp.entity(lambda ctx, _: None, name='Counter')\n"
    )
    assert list(load_app("cli_counter").entities) == ["counter"]  # entities alone make an app
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "cli_script.py").write_text(SHOP)
    assert list(load_app("scripts/cli_script.py:orders").activities) == ["ship"]


def test_run_reports_apps_it_cannot_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "needs_missing.py").write_text("import no_such_dependency\n")
    (tmp_path / "no_app.py").write_text("x = 1\n")
    (tmp_path / "two_apps.py").write_text("import dtfx\nfirst = dtfx.App()\nsecond = dtfx.App()\n")
    (tmp_path / "empty_app.py").write_text("import dtfx\napp = dtfx.App()\n")
    (tmp_path / "broken_app.py").write_text("1 / 0\n")
    (tmp_path / "queue.py").write_text("import dtfx\napp = dtfx.App()\n")
    (tmp_path / "json.py").write_text("import dtfx\napp = dtfx.App()\n")
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "__init__.py").write_text("import dtfx\napp = dtfx.App()\n")
    hub = f"sqlite:///{tmp_path}/hub.db"
    cases = {
        "no_such_module": "No module named 'no_such_module'",
        "missing.py": "No such file: missing.py",
        "no_app": "no_app has no dtfx.App",
        "two_apps": "several apps; name one, as in: dtfx run two_apps:first",
        "two_apps:third": "two_apps.third is not a dtfx.App (it has: first, second)",
        "empty_app": "registers no orchestrator, no activity and no entity",
        "broken_app.py": "Importing broken_app failed: ZeroDivisionError: division by zero",
        "needs_missing": "Importing needs_missing failed: No module named 'no_such_dependency'",
        "queue.py": "queue.py would be imported as 'queue', the name of another module",
        "json": ("json.py would be imported as 'json', the name of another module", "rename the file"),
        "email": ("email/__init__.py would be imported as 'email', the name of another module", "rename the package"),
    }
    for target, message in cases.items():
        fragments = (message,) if isinstance(message, str) else message
        assert_one_line_error(invoke("run", target, "-b", hub), *fragments, exit_code=1)
    assert not (tmp_path / "hub.db").exists()  # nothing was opened for an app that did not load


def test_a_file_named_as_a_standard_module_not_imported_yet_loads_in_both_forms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directory comes first on the path: the file is what an import of its name finds."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    (tmp_path / "colorsys.py").write_text("import dtfx\napp = dtfx.App()\napp.add_activity(lambda ctx, x: x, 'echo')\n")
    for target in ("colorsys.py", "colorsys"):
        assert list(load_app(target).activities) == ["echo"]
        del sys.modules["colorsys"]


def test_the_bundled_example_runs_a_worker_and_a_client(hub: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DTFX_BACKEND", hub)
    assert hello_cities.main(["Oslo", "Lima"]) == ["Hello, Oslo!", "Hello, Lima!"]
    assert [state["name"] for state in invoke_json("list", "-b", hub)] == ["hello_cities"]


class _Raw(dtfx.JsonDataConverter):
    """Leaves a string as it is: a payload as another SDK may have stored it."""

    def serialize(self, value: Any) -> str | None:
        return value if isinstance(value, str) else super().serialize(value)


def test_what_the_hub_holds_reaches_the_terminal_escaped_and_one_instance_never_breaks_a_listing(hub: str) -> None:
    """A name with an ESC that would clear the screen, a payload too deep to read: whoever
    starts an instance writes them, an operator's terminal shows them."""
    with dtfx.Client(hub, data_converter=_Raw()) as client:
        client.schedule_new_orchestration("clear\x1b[2Jscreen [bold]not markup[/bold]", instance_id="escaped")
        client.schedule_new_orchestration("deep", input="[" * 5000 + "]" * 5000, instance_id="deep")
    listed = invoke("list", "-b", hub)
    shown = invoke("status", "escaped", "-b", hub)
    for result in (listed, shown):
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.stdout
        assert "clear\\x1b[2Jscreen" in result.stdout.replace("\n", "").replace(" ", "")
    assert "[bold]not markup[/bold]" in shown.stdout
    states = invoke_json("list", "-b", hub)
    assert [state["input"] for state in states if state["instance_id"] == "deep"] == ["[" * 5000 + "]" * 5000]


def test_an_error_line_shows_control_characters_escaped_and_crlf_as_a_newline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`start --wait` prints the failure's message, which an activity wrote."""
    print_error("Orchestration o failed: ValueError: evil\x1b]0;title\x07 at line\r\nnext")
    shown = capsys.readouterr().err
    assert "\x1b" not in shown and "\r" not in shown
    assert "evil\\x1b]0;title\\x07 at line next" in shown
    assert printable("a\r\nb\rc") == "a\nb\\x0dc"


def test_the_cli_log_shows_control_characters_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    """`dtfx run` logs a failed orchestration with its name, which its starter wrote."""
    configure_logging(0)
    logging.getLogger("dtfx.test").warning("Instance %s (%s) failed", "i", "clear\x1b[2Jscreen")
    logged = capsys.readouterr().err
    assert "\x1b[2J" not in logged and "clear\\x1b[2Jscreen" in logged
