"""The `pydantic.ValidationError`s of `MailConfig`, with secrets masked.

A config error must never echo the password (or a private key pasted into
``pinned_certificates``): :func:`_redacted` masks what pydantic would show,
and :func:`_combination_error` builds the errors of rules that span fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, get_args

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydantic_core.core_schema import ErrorType

_MASK = "**********"
# Fields whose raw input must never appear in a ValidationError: the password,
# and pinned_certificates (someone may paste a private key there by mistake).
_SECRET_FIELDS = ("password", "pinned_certificates")
# Errors whose input may be anything, a secret included: a whole JSON document,
# or the value of an unknown field (a misspelt "passwd").
_OPAQUE_ERRORS = frozenset({"json_invalid", "extra_forbidden"})
_BUILTIN_ERRORS = frozenset(get_args(ErrorType))


def _redacted(exc: ValidationError) -> ValidationError | None:
    """``exc`` with every echo of a secret masked, or None when it echoes none.

    ``hide_input_in_errors`` only hides inputs in ``str(exc)``; ``exc.errors()``
    and ``exc.json()`` still carry them, and so does ``str()`` of an enclosing
    model that does not set it.
    """
    details: list[InitErrorDetails] = []
    changed = False
    for error in exc.errors(include_url=False):
        value = error["input"]
        if error["type"] in _OPAQUE_ERRORS or error["loc"][:1] in [(f,) for f in _SECRET_FIELDS]:
            value = _MASK
        elif isinstance(value, Mapping) and any(value.get(f) for f in _SECRET_FIELDS):
            value = {**value, **{f: _MASK for f in _SECRET_FIELDS if value.get(f)}}
        changed = changed or value is not error["input"]
        kind = error["type"]
        detail = InitErrorDetails(
            type=kind if kind in _BUILTIN_ERRORS else PydanticCustomError(kind, error["msg"]),
            loc=error["loc"],
            input=value,
        )
        if "ctx" in error:
            detail["ctx"] = error["ctx"]
        details.append(detail)
    if not changed:
        return None
    return ValidationError.from_exception_data(exc.title, details, hide_input=True)


def _combination_error(title: str, problems: list[tuple[str, Any, str]]) -> ValidationError:
    return ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(
                type="value_error", loc=(field,), input=value, ctx={"error": ValueError(msg)}
            )
            for field, value, msg in problems
        ],
        hide_input=True,
    )
