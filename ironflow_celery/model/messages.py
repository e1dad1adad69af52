"""Inputs, events and effects: pydantic models that serialise to internally tagged JSON.

A `Message` subclass named ``Deposited`` with a field ``amount`` serialises to
``{"type": "Deposited", "amount": 10}``, the shape ironflow (serde's internally tagged
enums) stores, so one database can be read by both engines. A `TaggedUnion` decodes such
JSON back into the right class and says clearly what is wrong when it cannot.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from ironflow_celery.errors import InvalidPayload, InvalidWorkflowDefinition

__all__ = [
    "TAG",
    "Message",
    "TaggedUnion",
    "ValueCodec",
    "union_members",
]

TAG = "type"


class Message(BaseModel):
    """Base class of inputs, events and effects; the JSON tag is the class name.

    Set ``type_tag = "..."`` on a subclass to store another tag (for example when a
    class is renamed but old events must still load).
    """

    model_config = ConfigDict(frozen=True)

    type_tag: ClassVar[str] = ""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if TAG in cls.model_fields:
            raise InvalidWorkflowDefinition(
                f"{cls.__qualname__} declares a field named {TAG!r}; that key holds the tag"
            )
        if "type_tag" not in cls.__dict__ or not cls.__dict__["type_tag"]:
            cls.type_tag = cls.__name__

    def to_json(self) -> dict[str, Any]:
        """The internally tagged JSON object of this message."""
        return {TAG: self.type_tag, **self.model_dump(mode="json")}


def _format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err.get("loc", ())) or "(root)"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


def union_members(declared: Any) -> tuple[type[Message], ...]:
    """The Message classes named by a declaration: one class, ``A | B`` or ``Union[A, B]``."""
    if declared is None or declared is type(None):
        return ()
    origin = typing.get_origin(declared)
    if origin is typing.Union or isinstance(declared, types.UnionType):
        members: list[type[Message]] = []
        for arg in typing.get_args(declared):
            members.extend(union_members(arg))
        return tuple(members)
    if isinstance(declared, Iterable) and not isinstance(declared, (str, bytes, type)):
        members = []
        for arg in declared:
            members.extend(union_members(arg))
        return tuple(members)
    if isinstance(declared, type) and issubclass(declared, Message):
        return (declared,)
    raise InvalidWorkflowDefinition(f"{declared!r} is not a Message subclass (or a union of them)")


class TaggedUnion:
    """Encodes and decodes one workflow's inputs, events or effects by their ``type`` tag."""

    def __init__(self, workflow_type: str, kind: str, members: Iterable[type[Message]]) -> None:
        self.workflow_type = workflow_type
        self.kind = kind
        self.by_tag: dict[str, type[Message]] = {}
        for member in members:
            other = self.by_tag.get(member.type_tag)
            if other is not None and other is not member:
                raise InvalidWorkflowDefinition(
                    f"workflow type '{workflow_type}': {kind} tag {member.type_tag!r} is used "
                    f"by both {other.__qualname__} and {member.__qualname__}"
                )
            self.by_tag[member.type_tag] = member
        self.classes = frozenset(self.by_tag.values())

    def __bool__(self) -> bool:
        return bool(self.by_tag)

    def __contains__(self, value: object) -> bool:
        return type(value) in self.classes

    def encode(self, value: Any) -> dict[str, Any]:
        """The tagged JSON of `value`; it must be one of this union's classes."""
        if type(value) not in self.classes:
            raise InvalidPayload(
                self.workflow_type,
                self.kind,
                f"expected one of {self.tags()}, got {type(value).__qualname__}",
            )
        encoded: dict[str, Any] = value.to_json()
        return encoded

    def decode(self, payload: Any) -> Message:
        """Validate tagged JSON (or an instance) into the matching Message class."""
        if type(payload) in self.classes and isinstance(payload, Message):
            return payload
        if isinstance(payload, Message):
            raise InvalidPayload(
                self.workflow_type,
                self.kind,
                f"{type(payload).__qualname__} is not one of {self.tags()}",
            )
        if not isinstance(payload, Mapping):
            raise InvalidPayload(
                self.workflow_type,
                self.kind,
                f"expected a JSON object with a {TAG!r} tag, got {type(payload).__name__}",
            )
        tag = payload.get(TAG)
        if tag is None:
            raise InvalidPayload(
                self.workflow_type, self.kind, f"missing {TAG!r} tag; expected one of {self.tags()}"
            )
        cls = self.by_tag.get(tag) if isinstance(tag, str) else None
        if cls is None:
            raise InvalidPayload(
                self.workflow_type,
                self.kind,
                f"unknown variant {tag!r}; expected one of {self.tags()}",
            )
        fields = {k: v for k, v in payload.items() if k != TAG}
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            raise InvalidPayload(
                self.workflow_type, self.kind, f"{tag}: {_format_validation_error(exc)}"
            ) from None

    def tags(self) -> list[str]:
        return sorted(self.by_tag)


class ValueCodec:
    """Encodes and decodes a plain typed value (a state, a rejection) with pydantic."""

    def __init__(self, workflow_type: str, kind: str, declared: Any) -> None:
        self.workflow_type = workflow_type
        self.kind = kind
        self.declared = declared
        self.adapter: TypeAdapter[Any] = TypeAdapter(declared)

    def encode(self, value: Any) -> Any:
        if isinstance(value, Message):
            return value.to_json()
        try:
            return self.adapter.dump_python(value, mode="json")
        except Exception as exc:  # pydantic raises several types here
            raise InvalidPayload(self.workflow_type, self.kind, str(exc)) from None

    def decode(self, payload: Any) -> Any:
        try:
            return self.adapter.validate_python(payload)
        except ValidationError as exc:
            raise InvalidPayload(
                self.workflow_type, self.kind, _format_validation_error(exc)
            ) from None
