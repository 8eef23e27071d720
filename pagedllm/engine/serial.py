"""The wire format between `AsyncLLM` and the engine-core process: msgpack of plain lists,
derived from the dataclasses' fields.

Every message is `[kind, payload]`. A dataclass crosses as the list of its fields in declaration
order (`dataclasses.fields`), each converted as its type annotation says: a nested dataclass as
its own list, an enum as its value, a set as a list (a tuple comes back from a list), and lists,
dicts, tuples, sets and `X | None` of those are walked. So a new field of `Request`,
`SamplingParams`, `EngineCoreOutput`, `Logprobs` or `SchedulerStats` crosses the socket with no
change here.

Decoding builds only the classes the annotations name, so nothing arbitrary is built (no pickle):
- a class all of whose fields cross is restored field by field without `__init__`: the sender
  validated it, and there is no second validation (`SamplingParams`, the outputs, the stats);
- a class may keep fields on its side (`field(metadata={"wire": False})`: the core's state of a
  `Request`): it is built through its constructor from the fields that cross, so the others get
  their initial values there (`__post_init__` runs).

Each class's encoder and decoder are generated once as Python source (as `dataclasses` makes
`__init__`), so a message stays one msgpack call and no field is interpreted at run time: as
fast as the hand-written field lists this replaces.

NOTE: both ends run the same code version (the client spawns the core), so field order is the
only schema; there is no versioning. An object crosses as the class its field is annotated with
(a subclass's own fields stay behind).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

from pagedllm.engine.outputs import EngineCoreOutputs
from pagedllm.engine.request import Request

T = TypeVar("T")


class InputKind(enum.IntEnum):
    """Client → core."""

    ADD = 0  # payload: an encoded Request
    ABORT = 1  # payload: request ids
    FINISH = 2  # payload: request ids a stop string ended (finished, not aborted)


class OutputKind(enum.IntEnum):
    """Core → client."""

    OUTPUTS = 0  # payload: an encoded EngineCoreOutputs
    FAILED = 1  # payload: the error text; the core exits after sending it
    DEAD = 2  # payload: why; sent by the client's own process monitor, never by the core


def pack(kind: int, payload: Any) -> bytes:
    return msgpack.packb([int(kind), payload], use_bin_type=True)


def unpack(data: bytes | memoryview) -> tuple[int, Any]:
    kind, payload = msgpack.unpackb(data, raw=False, strict_map_key=False)
    return kind, payload


# ----- the generic codec -----


def encode(obj: Any) -> list[Any]:
    """A dataclass instance as plain lists, ready for msgpack."""
    encoder = _ENCODERS.get(type(obj))
    if encoder is None:
        encoder = _Codec(type(obj)).encoder
    return encoder(obj)


def decode(cls: type[T], values: Any) -> T:
    """The `cls` instance `encode` turned into `values`."""
    decoder = _DECODERS.get(cls)
    if decoder is None:
        decoder = _Codec(cls).decoder
    result: T = decoder(values)
    return result


def crosses(f: dataclasses.Field[Any]) -> bool:
    """Whether a field is sent (a field marked `metadata={"wire": False}` is not)."""
    return bool(f.metadata.get("wire", True))


_ENCODERS: dict[type, Callable[[Any], list[Any]]] = {}
_DECODERS: dict[type, Callable[[Any], Any]] = {}

_PLAIN = (int, float, str, bool, bytes, type(None), typing.Any, object)


class _Codec:
    """Generates the encoder and decoder of one dataclass (and, through them, of the
    dataclasses its fields hold) and registers them in `_ENCODERS` / `_DECODERS`."""

    def __init__(self, cls: type) -> None:
        if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
            raise TypeError(f"{cls!r} is not a dataclass: it cannot cross the socket")
        self.cls = cls
        self.ns: dict[str, Any] = {"_new": object.__new__, "_set": object.__setattr__}
        self.names = itertools.count()
        self.inlining: set[type] = {cls}  # NOTE: a dataclass that holds itself is not inlined
        all_fields = dataclasses.fields(cls)
        self.fields = [f for f in all_fields if crosses(f)]
        construct = len(self.fields) < len(all_fields)
        # NOTE: registered before the source is generated, so a dataclass that holds itself
        # (a tree) calls its own functions.
        _ENCODERS[cls] = self._encode_lazily
        _DECODERS[cls] = self._decode_lazily
        try:
            hints = typing.get_type_hints(cls)
            self.encoder = self._compile("encode", self._encoder_source(hints))
            self.decoder = self._compile("decode", self._decoder_source(hints, construct))
        except BaseException:
            del _ENCODERS[cls], _DECODERS[cls]
            raise
        _ENCODERS[cls] = self.encoder
        _DECODERS[cls] = self.decoder

    def _encode_lazily(self, obj: Any) -> list[Any]:
        return self.encoder(obj)

    def _decode_lazily(self, values: Any) -> Any:
        return self.decoder(values)

    def _compile(self, name: str, source: str) -> Callable[[Any], Any]:
        self.ns["_cls"] = self.cls
        exec(compile(source, f"<serial.{name} {self.cls.__qualname__}>", "exec"), self.ns)
        fn: Callable[[Any], Any] = self.ns.pop(name)
        return fn

    def _ref(self, prefix: str, value: Any) -> str:
        """A name in the generated code's namespace for `value`."""
        name = f"_{prefix}{next(self.names)}"
        self.ns[name] = value
        return name

    def _temp(self) -> str:
        return f"_t{next(self.names)}"

    # ----- source -----

    def _encoder_source(self, hints: dict[str, Any]) -> str:
        return f"def encode(o):\n    return {self._fields_list(self.fields, hints, 'o')}\n"

    def _fields_list(
        self, fields: list[dataclasses.Field[Any]], hints: dict[str, Any], x: str
    ) -> str:
        """The list display of the encoded fields of the object named `x`."""
        items = [self._enc(hints[f.name], f"{x}.{f.name}") or f"{x}.{f.name}" for f in fields]
        return f"[{', '.join(items)}]"

    def _decoder_source(self, hints: dict[str, Any], construct: bool) -> str:
        names = [f"f{i}" for i in range(len(self.fields))]
        # NOTE: the unpacking checks the number of fields (ValueError on a malformed message).
        lines = ["def decode(v):", f"    [{', '.join(names)}] = v"]
        values = [
            self._dec(hints[f.name], name) or name
            for f, name in zip(self.fields, names, strict=True)
        ]
        if construct:
            # Some fields stay on the sender's side: the constructor starts them afresh.
            for f in self.fields:
                if not f.init:
                    raise TypeError(
                        f"{self.cls.__name__}.{f.name} is not an __init__ field: mark it "
                        f'metadata={{"wire": False}}, or send every field'
                    )
            args = ", ".join(f"{f.name}={v}" for f, v in zip(self.fields, values, strict=True))
            lines.append(f"    return _cls({args})")
        else:
            lines.append("    o = _new(_cls)")
            frozen = self.cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
            for f, value in zip(self.fields, values, strict=True):
                set_field = f"_set(o, {f.name!r}, {value})" if frozen else f"o.{f.name} = {value}"
                lines.append(f"    {set_field}")
            lines.append("    return o")
        return "\n".join(lines) + "\n"

    # ----- one value, by its annotation: an expression, or None where it passes as is -----

    def _enc(self, tp: Any, x: str) -> str | None:
        """The expression that encodes the value of the expression `x`."""
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if self._as_is(tp):
            return None
        if origin in (typing.Union, types.UnionType):
            inner = self._optional(tp, args)
            first, name = self._bind(x)
            body = self._enc(inner, name)
            return None if body is None else f"(None if {first} is None else {body})"
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return f"{x}.value"
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            if x.isidentifier() and tp not in self.inlining:
                # NOTE: inlined: one function call less per object (the hot path's outputs).
                self.inlining.add(tp)
                fields = [f for f in dataclasses.fields(tp) if crosses(f)]
                display = self._fields_list(fields, typing.get_type_hints(tp), x)
                self.inlining.discard(tp)
                return display
            return f"{self._ref('e', _encoder_of(tp))}({x})"
        kind = origin or tp
        if kind in (list, tuple, set, frozenset):
            element = self._element(tp, args)
            item = self._temp()
            body = None if element is None else self._enc(element, item)
            if body is None:  # tuples and lists go as they are; msgpack has no sets
                return f"list({x})" if kind in (set, frozenset) else None
            return f"[{body} for {item} in {x}]"
        if kind is dict:
            key_tp, value_tp = args or (Any, Any)
            k, v = self._temp(), self._temp()
            key, value = self._enc(key_tp, k), self._enc(value_tp, v)
            return f"{{{key or k}: {value or v} for {k}, {v} in {x}.items()}}"
        raise TypeError(f"{self.cls.__name__}: a value of type {tp!r} cannot cross the socket")

    def _dec(self, tp: Any, x: str) -> str | None:
        """The expression that decodes `x` (a plain name) into a value of type `tp`."""
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if self._as_is(tp):
            return None
        if origin in (typing.Union, types.UnionType):
            body = self._dec(self._optional(tp, args), x)
            return None if body is None else f"(None if {x} is None else {body})"
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            members = {m.value: m for m in tp}
            return f"{self._ref('m', members)}[{x}]"
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            return f"{self._ref('d', _decoder_of(tp))}({x})"
        kind = origin or tp
        if kind in (list, tuple, set, frozenset):
            element = self._element(tp, args)
            item = self._temp()
            body = None if element is None else self._dec(element, item)
            if body is None:
                return None if kind is list else f"{kind.__name__}({x})"
            items = f"[{body} for {item} in {x}]"
            return items if kind is list else f"{kind.__name__}({items})"
        if kind is dict:
            key_tp, value_tp = args or (Any, Any)
            k, v = self._temp(), self._temp()
            key, value = self._dec(key_tp, k), self._dec(value_tp, v)
            return f"{{{key or k}: {value or v} for {k}, {v} in {x}.items()}}"
        raise TypeError(f"{self.cls.__name__}: a value of type {tp!r} cannot cross the socket")

    def _as_is(self, tp: Any) -> bool:
        """Whether msgpack carries values of `tp` unchanged, both ways."""
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp in _PLAIN or isinstance(tp, typing.TypeVar) or origin is typing.Literal:
            return True
        if origin in (typing.Union, types.UnionType, list, dict) or tp in (list, dict):
            return all(self._as_is(a) for a in args)
        return False  # enums, dataclasses, sets; tuples come back as lists

    def _optional(self, tp: Any, args: tuple[Any, ...]) -> Any:
        """X of a union `X | None` (one that needs converting: the caller checked)."""
        members = [a for a in args if a is not type(None)]
        if len(members) != 1:
            raise TypeError(
                f"{self.cls.__name__}: {tp!r} cannot cross the socket: a union may hold plain "
                f"values, or one other type and None"
            )
        return members[0]

    def _element(self, tp: Any, args: tuple[Any, ...]) -> Any | None:
        """The element type of a list, set or `tuple[X, ...]` (None: any, sent as it is)."""
        if not args:
            return None
        if typing.get_origin(tp) is not tuple:
            return args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        if all(self._as_is(a) for a in args):
            return None
        raise TypeError(f"{self.cls.__name__}: {tp!r} cannot cross the socket: use tuple[X, ...]")

    def _bind(self, x: str) -> tuple[str, str]:
        """`x` for its first use and a name for the next ones (an assignment expression when
        `x` is more than a name, so it is evaluated once)."""
        if x.isidentifier():
            return x, x
        name = self._temp()
        return f"({name} := {x})", name


def _encoder_of(cls: type) -> Callable[[Any], list[Any]]:
    return _ENCODERS.get(cls) or _Codec(cls).encoder


def _decoder_of(cls: type) -> Callable[[Any], Any]:
    return _DECODERS.get(cls) or _Codec(cls).decoder


# ----- the messages -----

# NOTE: built at import, so a field of a type the wire cannot carry fails at once, not on a
# request.
_Codec(Request)
_Codec(EngineCoreOutputs)


def encode_request(request: Request) -> list[Any]:
    """An ADD message's payload."""
    return _ENCODERS[Request](request)


def decode_request(values: Any) -> Request:
    """A fresh `Request` (its arrival order is the core's: the order requests reach it)."""
    request: Request = _DECODERS[Request](values)
    return request


def encode_outputs(batch: EngineCoreOutputs) -> bytes:
    """An OUTPUTS message, whole (the core sends one per step)."""
    return pack(OutputKind.OUTPUTS, _ENCODERS[EngineCoreOutputs](batch))


def decode_outputs(payload: Any) -> EngineCoreOutputs:
    batch: EngineCoreOutputs = _DECODERS[EngineCoreOutputs](payload)
    return batch
