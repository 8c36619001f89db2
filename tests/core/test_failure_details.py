"""Describing an error for the history, whatever the error's own code does."""

from __future__ import annotations

from dtfx.core.history import FailureDetails


class NotesThatRaiseError(Exception):
    @property
    def __notes__(self) -> list[str]:
        raise RuntimeError("no notes")


def test_a_chain_of_causes_is_described_once_each_up_to_ten() -> None:
    error: BaseException = ValueError("cause 0")
    for number in range(1, 20):
        try:
            raise ValueError(f"cause {number}") from error
        except ValueError as raised:
            error = raised
    described: FailureDetails | None = FailureDetails.from_exception(error, non_retriable=True)
    messages = []
    while described is not None:
        messages.append(described.message)
        described = described.inner_failure
    assert messages == [f"cause {number}" for number in range(19, 8, -1)]  # the error and ten causes


def test_an_error_whose_traceback_cannot_be_written_is_still_described() -> None:
    details = FailureDetails.from_exception(NotesThatRaiseError("noted"))
    assert (details.error_type.rsplit(".", 1)[-1], details.message) == ("NotesThatRaiseError", "noted")
    assert details.stack_trace == "<the traceback of the NotesThatRaiseError could not be written: RuntimeError>"


def test_non_retriable_given_marks_only_the_error_itself() -> None:
    try:
        raise KeyError("inner")
    except KeyError as inner:
        outer = RuntimeError("outer")
        outer.__cause__ = inner
    details = FailureDetails.from_exception(outer, non_retriable=True)
    assert details.is_non_retriable and details.inner_failure is not None
    assert not details.inner_failure.is_non_retriable
