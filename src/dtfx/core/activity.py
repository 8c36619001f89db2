"""The context an activity function receives."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActivityContext:
    """What an activity ``fn(ctx, input)`` knows about its invocation."""

    orchestration_id: str
    """The id of the orchestration instance that scheduled the activity."""
    task_id: int
    """The activity's task id, unique within the orchestration's execution."""
    name: str = ""
    """The activity's registered name."""
    attempt: int = 1
    """How many times this task has been delivered (more than 1 after a worker died)."""
