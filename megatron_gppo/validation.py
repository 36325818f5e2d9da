"""Words for pydantic validation errors, shared by the run config and `serve`'s request models.

pydantic checks the values; these helpers find the field an error is about
and describe, in words a user reads, what that field accepts, so each caller
can put the problem on one line in its own style.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from megatron_gppo.algorithm.bounds import Bound

# pydantic error types raised by a numeric bound (Field(ge=...), ...) rather than by the type.
BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}

_NOUNS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", SecretStr: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """(X, True) for `X | None`, else (annotation, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) < len(typing.get_args(annotation)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return annotation, False


def _plural(annotation: Any, *, finite: bool) -> str:
    if typing.get_origin(annotation) is list:
        return f"lists of {_plural(typing.get_args(annotation)[0], finite=finite)}"
    return _PLURALS.get(annotation) or describe_type(annotation, finite=finite)


def describe_type(annotation: Any, *, finite: bool = False) -> str:
    """`an integer`, `one of 'a', 'b'`, `a list of strings`, `a number or a list of them`, ..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return describe_type(args[0], finite=finite)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is list:
        return f"a list of {_plural(args[0] if args else Any, finite=finite)}"
    if origin in (typing.Union, types.UnionType):
        first, *rest = args
        if rest == [list[first]]:
            return f"{describe_type(first, finite=finite)} or a list of them"
        return " or ".join(describe_type(arg, finite=finite) for arg in args)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "a mapping"
    if annotation is float and finite:
        return "a finite number"
    return _NOUNS.get(annotation, "a dict" if origin is dict else str(annotation))


def describe_field(field: FieldInfo, *, with_bound: bool = True, with_null: bool = True,
                   finite: bool = False) -> str:
    """What `field` accepts, e.g. `null or a number in [0, 1)`; `with_bound=False` leaves the range out.

    A field whose `json_schema_extra` has `{"null": "off"}` says `null (off) or ...` with its range.
    `with_null=False` leaves out that null is accepted (where null only means "the default").
    """
    annotation, nullable = _without_none(field.annotation)
    text = describe_type(annotation, finite=finite)
    if with_bound:
        bound = Bound(**{side: getattr(m, side) for m in field.metadata if isinstance(m, (Ge, Gt, Le, Lt))
                         for side in ("ge", "gt", "le", "lt") if hasattr(m, side)})
        text = bound.describe(text)
    if nullable and with_null:
        meaning = (field.json_schema_extra or {}).get("null") if with_bound else None
        text = f"null ({meaning}) or {text}" if meaning else f"null or {text}"
    return text


@dataclass(frozen=True)
class Located:
    """Where an error's `loc` points: the field names on the way, the field, and the model holding it."""

    names: list[str]
    """Field names from the root to the deepest field reached (list indices and union tags dropped)."""
    field: FieldInfo | None
    """The deepest field reached; None when the first name is not a field."""
    model: type[BaseModel]
    """The deepest model reached: the one holding `field`, or the section `field` is (or would hold an unknown name)."""
    complete: bool
    """Whether every part of `loc` was a field name."""


def locate(model: type[BaseModel], loc: tuple[int | str, ...]) -> Located:
    names: list[str] = []
    field = None
    for part in loc:
        if not isinstance(part, str) or part not in model.model_fields:
            return Located(names, field, model, complete=False)
        field = model.model_fields[part]
        names.append(part)
        inner = _without_none(field.annotation)[0]
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return Located(names, field, model, complete=len(names) == len(loc))
        model = inner
    return Located(names, field, model, complete=True)


__all__ = ["BOUND_ERRORS", "Located", "describe_field", "describe_type", "locate"]
