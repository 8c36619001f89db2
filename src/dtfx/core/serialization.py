"""JSON payloads: how user values become the strings stored in history, and back.

The default converter writes plain JSON. Dataclasses, pydantic models, datetimes,
enums, UUIDs and namedtuples are encoded; on the way back a *target type* (an
explicit ``return_type=`` / ``data_type=``, or the annotation of the function that
receives the value) rebuilds them. Without a target type the raw JSON value is
returned, never a type read from the payload.
"""

from __future__ import annotations

import functools
import inspect
import json
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

import msgspec

from dtfx.core.errors import SerializationError

# Older Durable Task SDKs marked auto-serialized objects with this key; drop it on read.
_SDK_OBJECT_MARKER = "__durabletask_autoobject__"


class DataConverter(ABC):
    """Turns payload values into JSON strings and back; must be deterministic."""

    @abstractmethod
    def serialize(self, value: Any) -> str | None:
        """The JSON text of ``value``, or ``None`` when ``value`` is ``None``."""

    @abstractmethod
    def deserialize(self, data: str | None, target_type: Any = None) -> Any:
        """The value encoded in ``data``, rebuilt as ``target_type`` when one is given."""


def _encode_hook(value: Any) -> Any:
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):  # a pydantic model
        return model_dump(mode="json", by_alias=True)  # as model_validate reads it
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        return to_json()
    if isinstance(value, types.SimpleNamespace):
        return vars(value)
    raise NotImplementedError(f"Objects of type {type(value).__qualname__} are not JSON-serializable")


def _drop_sdk_markers(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _drop_sdk_markers(item) for key, item in value.items() if key != _SDK_OBJECT_MARKER}
    if isinstance(value, list):
        return [_drop_sdk_markers(item) for item in value]
    return value


_UNENCODABLE = (TypeError, NotImplementedError, msgspec.EncodeError, OverflowError, ValueError, RecursionError)
"""What encoding a value as JSON raises for a value it cannot encode: a type it does not know, a
number too large, a lone surrogate (a ``UnicodeEncodeError``), nesting too deep."""


class JsonDataConverter(DataConverter):
    """The default converter: compact JSON via msgspec, typed decoding via msgspec or pydantic."""

    def __init__(self) -> None:
        self._encoder = msgspec.json.Encoder(enc_hook=_encode_hook)

    def serialize(self, value: Any) -> str | None:
        if value is None:
            return None
        try:
            encoded = self._encoder.encode(value)
            if b"null" in encoded:  # msgspec writes NaN and the infinities as null
                return _with_non_finite_kept(value, encoded)
            return encoded.decode()
        except _UNENCODABLE as error:
            raise SerializationError(f"Cannot serialize {type(value).__qualname__} to JSON: {error}") from error

    def deserialize(self, data: str | None, target_type: Any = None) -> Any:
        if data is None or data == "":
            return None
        try:
            value = msgspec.json.decode(data)
        except msgspec.DecodeError as error:
            value = _with_non_finite(data, error)
        except RecursionError as error:
            raise SerializationError(f"Invalid JSON payload: {error}") from error
        if isinstance(value, dict) and _SDK_OBJECT_MARKER in value:
            value = _drop_sdk_markers(value)
        if target_type is None or not needs_conversion(target_type):
            return value
        return convert(value, target_type)


def _with_non_finite_kept(value: Any, encoded: bytes) -> str:
    """``value``, which msgspec encoded as ``encoded``, as Python's ``json`` and the official SDK
    write it if it holds NaN or an infinity: ``NaN``, ``Infinity`` and ``-Infinity`` (which
    JSON itself lacks), not ``null``: the value read back differs from the value only then."""
    as_builtins = msgspec.to_builtins(value, enc_hook=_encode_hook)
    try:
        if msgspec.json.decode(encoded) != as_builtins:  # a NaN is no null (nor any other value)
            json.dumps(as_builtins, allow_nan=False)  # or only written differently (an int key)
    except ValueError:  # NaN or an infinity
        return json.dumps(as_builtins, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:  # nested deeper than Python compares or encodes, but not msgspec: as msgspec wrote it
        pass
    return encoded.decode()


def _with_non_finite(data: str, error: msgspec.DecodeError) -> Any:
    """A payload msgspec cannot read, read as Python's ``json`` does: with NaN or an infinity,
    as Python code (an SDK worker, say) writes them."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        raise SerializationError(f"Invalid JSON payload: {error}") from error


def convert(value: Any, target_type: Any) -> Any:
    """Rebuild a decoded JSON value as ``target_type`` (dataclass, pydantic model, ...)."""
    model_validate = getattr(target_type, "model_validate", None)
    try:
        if callable(model_validate):
            return model_validate(value)
        return msgspec.convert(value, target_type, strict=False)
    except msgspec.ValidationError as error:
        try:  # a pydantic model inside a list, a dict, an Optional: msgspec cannot build one
            return _convert_with_pydantic(value, target_type)
        except SerializationError:
            raise SerializationError(f"Cannot read payload as {_type_name(target_type)}: {error}") from error
    except TypeError:
        return _convert_with_pydantic(value, target_type)
    except Exception as error:
        raise SerializationError(f"Cannot read payload as {_type_name(target_type)}: {error}") from error


def _convert_with_pydantic(value: Any, target_type: Any) -> Any:
    """For types msgspec cannot build (a pydantic model inside a dataclass, say)."""
    try:
        return _type_adapter(target_type).validate_python(value)
    except ImportError as error:  # pragma: no cover - pydantic is an install away
        raise SerializationError(f"Cannot read payload as {_type_name(target_type)} without pydantic") from error
    except Exception as error:
        raise SerializationError(f"Cannot read payload as {_type_name(target_type)}: {error}") from error


@functools.lru_cache(maxsize=256)
def _type_adapter(target_type: Any) -> Any:
    import pydantic

    return pydantic.TypeAdapter(target_type)


def _type_name(target_type: Any) -> str:
    return getattr(target_type, "__qualname__", None) or repr(target_type)


_PLAIN_JSON_TYPES: frozenset[Any] = frozenset({Any, object, str, int, float, bool, dict, list, type(None)})
_PLAIN_JSON_KEYS: frozenset[Any] = frozenset({Any, object, str})


def _one_of(target_type: Any, types: frozenset[Any]) -> bool:
    try:
        return target_type in types
    except TypeError:  # no hash (Annotated[int, {...}]): none of them, which all have one
        return False


def needs_conversion(target_type: Any) -> bool:
    """False for annotations that plain JSON values already satisfy."""
    if _one_of(target_type, _PLAIN_JSON_TYPES):
        return False
    origin = typing.get_origin(target_type)
    if origin in (dict, list):
        arguments = typing.get_args(target_type)
        if origin is dict and arguments and not _one_of(arguments[0], _PLAIN_JSON_KEYS):
            return True  # JSON's keys are strings: dict[int, str] needs its keys made ints
        return any(needs_conversion(argument) for argument in arguments)
    return not isinstance(target_type, typing.TypeVar)


@functools.lru_cache(maxsize=1024)
def _signature_types(fn: Callable[..., Any]) -> tuple[tuple[Any, ...], Any]:
    """The annotated types of ``fn``'s parameters (``None`` where missing) and its return type."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins and other callables without a signature
        return (), None
    try:
        hints = typing.get_type_hints(_annotated(fn))
    except Exception:  # unresolvable forward references
        hints = {}
    return tuple(hints.get(parameter.name) for parameter in parameters), hints.get("return")


def _annotated(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What holds ``fn``'s annotations: the function a ``functools.partial`` wraps, or a
    callable object's ``__call__`` (its signature leaves out what they bind, by name)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if not inspect.isroutine(fn) and not isinstance(fn, type):
        return type(fn).__call__
    return fn


def parameter_types(fn: Callable[..., Any]) -> tuple[Any, ...]:
    """The annotated type of each parameter of ``fn`` (``None`` where there is none)."""
    target = getattr(fn, "__func__", fn)  # a bound method: leave out ``self``
    types = _signature_types(target)[0]
    return types[1:] if target is not fn else types


def input_type_of(fn: Callable[..., Any]) -> Any:
    """The annotated type of ``fn(ctx, input)``'s input, or ``None``."""
    types = parameter_types(fn)
    return types[1] if len(types) >= 2 else None


def output_type_of(fn: Callable[..., Any]) -> Any:
    """The annotated result type of an activity or orchestrator (a generator's return type)."""
    output = _signature_types(getattr(fn, "__func__", fn))[1]
    origin = typing.get_origin(output) or output  # typing's aliases have collections.abc's classes as origins
    if origin is Generator:
        arguments = typing.get_args(output)
        return arguments[2] if len(arguments) == 3 else None
    if origin in (Iterator, Iterable):  # a generator whose return type is unsaid
        return None
    return output


DEFAULT_CONVERTER: DataConverter = JsonDataConverter()
