"""Payload JSON and the history codec."""

from __future__ import annotations

import builtins
import enum
import functools
import json
import math
import uuid
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pydantic
import pytest

from dtfx.core.errors import SerializationError
from dtfx.core.history import (
    EventRaised,
    ExecutionStarted,
    FailureDetails,
    OrchestrationInstance,
    TaskFailed,
    decode_event,
    decode_events,
    encode_event,
    encode_events,
    qualified_name,
)
from dtfx.core.serialization import JsonDataConverter, input_type_of, output_type_of


class Color(enum.Enum):
    RED = "red"


@dataclass
class Point:
    x: int
    y: int


@dataclass
class Shape:
    name: str
    points: list[Point]
    color: Color


class Model(pydantic.BaseModel):
    title: str
    at: datetime


converter = JsonDataConverter()


def test_plain_values_and_none() -> None:
    assert converter.serialize(None) is None
    assert converter.deserialize(None) is None
    assert converter.deserialize("") is None
    value = {"a": [1, 2.5, True, None, "x"]}
    assert converter.deserialize(converter.serialize(value)) == value


def test_dataclasses_round_trip_with_a_target_type() -> None:
    shape = Shape("tri", [Point(0, 0), Point(1, 2)], Color.RED)
    text = converter.serialize(shape)
    assert converter.deserialize(text) == {
        "name": "tri",
        "points": [{"x": 0, "y": 0}, {"x": 1, "y": 2}],
        "color": "red",
    }
    assert converter.deserialize(text, Shape) == shape
    assert converter.deserialize(converter.serialize([shape]), list[Shape]) == [shape]


def test_pydantic_models_round_trip() -> None:
    model = Model(title="t", at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    assert converter.deserialize(converter.serialize(model), Model) == model


class Aliased(pydantic.BaseModel):
    user_name: str = pydantic.Field(alias="userName")


@dataclass
class Boxed:
    model: Model


def test_pydantic_models_inside_containers_dataclasses_and_optionals_round_trip() -> None:
    model = Model(title="t", at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    for value, target in (
        ([model, model], list[Model]),
        ({"a": model}, dict[str, Model]),
        (model, Model | None),
        (Boxed(model), Boxed),
    ):
        assert converter.deserialize(converter.serialize(value), target) == value
    with pytest.raises(SerializationError, match="Cannot read payload as list"):
        converter.deserialize('[{"title": "no time"}]', list[Model])


def test_pydantic_models_with_aliases_round_trip() -> None:
    aliased = Aliased(userName="bob")
    assert converter.serialize(aliased) == '{"userName":"bob"}'
    assert converter.deserialize(converter.serialize(aliased), Aliased) == aliased


def test_dict_keys_take_their_annotated_type() -> None:
    assert converter.deserialize(converter.serialize({1: "a", 2: "b"}), dict[int, str]) == {1: "a", 2: "b"}


def test_other_encodable_values() -> None:
    identifier = uuid.uuid4()
    assert converter.deserialize(converter.serialize(identifier), uuid.UUID) == identifier
    assert converter.deserialize(converter.serialize(SimpleNamespace(a=1))) == {"a": 1}
    moment = datetime(2026, 5, 6, tzinfo=UTC)
    assert converter.deserialize(converter.serialize(moment), datetime) == moment


@dataclass
class Reading:
    value: float
    at: datetime


def test_nan_and_the_infinities_round_trip_as_python_and_the_sdk_write_them() -> None:
    moment = datetime(2026, 5, 6, tzinfo=UTC)
    value = {"ratio": math.nan, "bounds": [-math.inf, None, 1.5], "reading": Reading(math.inf, moment)}
    text = converter.serialize(value)
    assert text == (
        '{"ratio":NaN,"bounds":[-Infinity,null,1.5],"reading":{"value":Infinity,"at":"2026-05-06T00:00:00Z"}}'
    )
    back = converter.deserialize(text)
    assert math.isnan(back["ratio"]) and back["bounds"] == [-math.inf, None, 1.5]
    assert converter.deserialize(converter.serialize(Reading(-math.inf, moment)), Reading) == Reading(-math.inf, moment)
    assert converter.serialize({"none": None, "finite": 2.0}) == '{"none":null,"finite":2.0}'
    assert converter.deserialize(json.dumps([math.nan, math.inf])) == [pytest.approx(math.nan, nan_ok=True), math.inf]


def test_errors_are_clear() -> None:
    with pytest.raises(SerializationError, match="Cannot serialize object"):
        converter.serialize(object())
    for invalid in ("{not json", "[NaN,", "nan"):
        with pytest.raises(SerializationError, match="Invalid JSON"):
            converter.deserialize(invalid)
    with pytest.raises(SerializationError, match="Point"):
        converter.deserialize('{"x": "not a number"}', Point)


def test_the_old_sdk_object_marker_is_ignored() -> None:
    text = '{"__durabletask_autoobject__": true, "x": 1, "y": 2}'
    assert converter.deserialize(text, Point) == Point(1, 2)
    assert converter.deserialize(text) == {"x": 1, "y": 2}


def test_types_come_from_annotations() -> None:
    def activity(ctx: Any, point: Point) -> Shape:
        raise NotImplementedError

    def orchestrator(ctx: Any, value: int) -> Generator[Any, Any, Shape]:
        raise NotImplementedError
        yield

    def untyped(ctx, value):  # type: ignore[no-untyped-def]
        return value

    assert input_type_of(activity) is Point and output_type_of(activity) is Shape
    assert output_type_of(orchestrator) is Shape
    assert input_type_of(untyped) is None and output_type_of(untyped) is None


def test_types_come_from_a_callable_objects_call_and_a_partials_function() -> None:
    class Activity:
        def __call__(self, ctx: Any, point: Point) -> Shape:
            raise NotImplementedError

    def with_prefix(prefix: str, ctx: Any, point: Point) -> Shape:
        raise NotImplementedError

    for activity in (Activity(), functools.partial(with_prefix, "p")):
        assert input_type_of(activity) is Point and output_type_of(activity) is Shape


def test_a_generator_annotated_as_an_iterator_has_no_output_type() -> None:
    def orchestrator(ctx: Any, value: int) -> Iterator[Any]:
        yield value

    assert output_type_of(orchestrator) is None


def test_history_events_round_trip() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    started = ExecutionStarted(
        timestamp=now, name="n", instance=OrchestrationInstance(instance_id="i", execution_id="e"), tags={"a": "b"}
    )
    failure = FailureDetails(error_type="E", message="m", inner_failure=FailureDetails(error_type="I", message="n"))
    events = [
        started,
        EventRaised(timestamp=now, name="x", input="1"),
        TaskFailed(timestamp=now, task_scheduled_id=3, failure_details=failure),
    ]
    assert decode_events(encode_events(events)) == events
    assert [decode_event(encode_event(e)) for e in events] == events
    assert b'"type":"EventRaised"' in encode_event(events[1])


def test_a_failure_is_caused_by_a_builtin_named_with_or_without_its_module() -> None:
    class RefusalError(ValueError):
        pass

    for recorded in ("ValueError", "builtins.ValueError"):  # dtfx's name, and the official SDK's
        details = FailureDetails(error_type=recorded, message="x")
        assert details.is_caused_by(ValueError) and details.is_caused_by(Exception)
        assert details.is_caused_by("ValueError") and details.is_caused_by("builtins.ValueError")
        assert not details.is_caused_by(RefusalError) and not details.is_caused_by(KeyError)
    assert FailureDetails(error_type=qualified_name(RefusalError), message="x").is_caused_by(ValueError)


class LedgerError(Exception):
    pass


def test_a_failure_named_without_its_module_is_caused_by_the_class_of_that_name() -> None:
    """As the official SDK decides: older SDKs and other languages record bare names."""
    bare = FailureDetails(error_type="LedgerError", message="x")
    assert bare.is_caused_by(LedgerError) and bare.is_caused_by(Exception)
    assert bare.is_caused_by("LedgerError") and bare.is_caused_by("accounts.LedgerError")
    qualified = FailureDetails(error_type=qualified_name(LedgerError), message="x")
    assert qualified.is_caused_by("LedgerError") and qualified.is_caused_by(qualified_name(LedgerError))
    assert not qualified.is_caused_by("accounts.LedgerError")  # both qualified: the modules differ
    assert not FailureDetails(error_type="", message="x").is_caused_by("")


def test_a_builtin_failure_is_not_caused_by_a_class_of_the_same_name_elsewhere() -> None:
    class ConnectionError(Exception):
        pass

    for recorded in ("ConnectionError", "builtins.ConnectionError"):
        details = FailureDetails(error_type=recorded, message="x")
        assert details.is_caused_by(builtins.ConnectionError) and details.is_caused_by("ConnectionError")
        assert not details.is_caused_by(ConnectionError) and not details.is_caused_by(qualified_name(ConnectionError))


@pytest.mark.parametrize(
    "value",
    [b"caf\xe9".decode("utf-8", "surrogateescape"), functools.reduce(lambda inner, _: [inner], range(2000), [])],
    ids=["lone surrogate", "nested too deep"],
)
def test_what_json_cannot_hold_is_a_serialization_error(value: Any) -> None:
    with pytest.raises(SerializationError, match="Cannot serialize"):
        JsonDataConverter().serialize(value)


def test_json_nested_too_deep_to_read_is_a_serialization_error() -> None:
    with pytest.raises(SerializationError, match="Invalid JSON"):
        JsonDataConverter().deserialize("[" * 100_000 + "]" * 100_000)
