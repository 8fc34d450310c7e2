"""Where a `MailConfig` comes from besides code: environment variables and files.

Each function returns the raw settings; ``MailConfig.from_env`` and
``MailConfig.from_file`` validate them.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._config_errors import _MASK, _combination_error

_TUPLE_FIELDS = frozenset({"pinned_certificates", "pinned_fingerprints"})


def _env_settings(
    prefix: str,
    environ: Mapping[str, str] | None,
    ignore: Iterable[str],
    fields: Iterable[str],
    title: str,
) -> dict[str, Any]:
    """The settings named ``prefix`` + field name in capitals in ``environ``
    (`os.environ` when None); an unknown or malformed one raises a
    `pydantic.ValidationError` titled ``title``."""
    if not prefix:
        raise ValueError("prefix must not be empty")
    env = os.environ if environ is None else environ
    skip = set(ignore)
    known = {prefix + name.upper(): name for name in fields}
    data: dict[str, Any] = {}
    problems: list[tuple[str, Any, str]] = []
    for var, raw in env.items():
        if not var.startswith(prefix) or var in skip or raw == "":
            continue
        name = known.get(var)
        if name is None:
            problems.append(
                (var, _MASK, f"{var} is not a MailConfig setting; known: {', '.join(known)}")
            )
        elif name in _TUPLE_FIELDS and raw.lstrip().startswith("["):
            try:
                data[name] = json.loads(raw)
            except json.JSONDecodeError as exc:
                problems.append((var, raw, f"{var} is not a valid JSON array: {exc.msg}"))
        else:
            data[name] = raw
    if problems:
        raise _combination_error(title, problems)
    return data


def _file_settings(path: str | os.PathLike[str]) -> Any:
    """The settings in a ``.toml`` or ``.json`` file: its top-level keys, or the
    keys of its ``smtpnotify`` table/object when it has one."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix == ".toml":
        with file.open("rb") as fh:
            data: Any = tomllib.load(fh)
    elif suffix == ".json":
        with file.open("rb") as fh:
            data = json.load(fh)
    else:
        raise ValueError(f"unsupported config file type {file.suffix!r}: use .toml or .json")
    if isinstance(data, dict) and isinstance(data.get("smtpnotify"), dict):
        data = data["smtpnotify"]
    return data
