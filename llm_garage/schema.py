"""A small typed-settings toolkit: each setting is one dataclass field carrying its default,
its type, a one-line meaning and a checker. The README's settings reference is generated from
these fields, so a setting is defined exactly once."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

REQUIRED = object()


class Invalid(Exception):
    """A value that a checker refuses: `problem` says what is wrong, `accepts` what would do."""

    def __init__(self, problem: str, accepts: str = ""):
        super().__init__(problem)
        self.problem = problem
        self.accepts = accepts


def setting(
    default: Any = REQUIRED,
    *,
    doc: str,
    type: str,
    check: Callable[[Any], Any] | None = None,
    flag: str | None = None,
    secret: bool = False,
) -> Any:
    """Declare one setting. Mutable defaults are copied for every instance."""
    metadata = {"doc": doc, "type": type, "check": check, "flag": flag, "secret": secret}
    if default is REQUIRED:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, dict | list):
        return dataclasses.field(default_factory=lambda: _copy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def fields_of(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "doc" in f.metadata]


def is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


class SettingProblem:
    """One problem with one setting of one host: a line of the one error a run raises for
    all of them (`fleet.SettingsError`)."""

    def __init__(self, host: str, path: str, problem: str, accepts: str = ""):
        self.host, self.path, self.problem, self.accepts = host, path, problem, accepts
        self.text = f"host {host!r}: {path}: {problem}"
        if accepts:
            self.text += f" (accepted: {accepts})"

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"SettingProblem({self.text!r})"


def build(cls, raw: Any, *, host: str, path: str, errors: list[SettingProblem]):
    """Build a `cls` instance from a raw mapping, appending every problem found to `errors`.

    Returns None when the mapping itself is unusable."""
    if not isinstance(raw, Mapping):
        errors.append(SettingProblem(host, path, f"expected a mapping, got {_show(raw)}"))
        return None
    known = {f.name: f for f in fields_of(cls)}
    values: dict[str, Any] = {}
    for key in raw:
        if key not in known:
            errors.append(unknown_key(host, path, key, known))
    for name, f in known.items():
        where = f"{path}.{name}" if path else name
        if name not in raw or (raw[name] is None and not is_required(f)):
            if is_required(f):
                errors.append(SettingProblem(host, where, "is required: " + f.metadata["doc"]))
                continue
            values[name] = default_of(f)
            continue
        check = f.metadata["check"]
        try:
            values[name] = check(raw[name]) if check else raw[name]
        except Invalid as e:
            errors.append(SettingProblem(host, where, e.problem, e.accepts))
    if any(name not in values for name in known):
        return None
    return cls(**values)


def unknown_key(host: str, path: str, key: Any, known) -> SettingProblem:
    where = f"{path}.{key}" if path else str(key)
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
    if close:
        return SettingProblem(host, where, f"unknown setting (did you mean {close[0]!r}?)")
    return SettingProblem(host, where, "unknown setting", ", ".join(sorted(known)))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- checkers -------------------------------------------------------------------------------


def is_bool(value):
    if isinstance(value, bool):
        return value
    raise Invalid(f"expected true or false, got {_show(value)}", "true, false")


def optional(check):
    def inner(value):
        return None if value is None else check(value)

    return inner


def is_str(pattern: str | None = None, accepts: str = "text"):
    regex = re.compile(pattern) if pattern else None

    def inner(value):
        if not isinstance(value, str) or not value:
            raise Invalid(f"expected {accepts}, got {_show(value)}", accepts)
        if regex and not regex.fullmatch(value):
            raise Invalid(f"{value!r} is not valid", accepts)
        return value

    return inner


def is_abs_path(value):
    if not isinstance(value, str) or not value.startswith("/") or "\n" in value:
        raise Invalid(f"expected an absolute path, got {_show(value)}", "a path starting with /")
    return value.rstrip("/") or "/"


def is_int(lo: int | None = None, hi: int | None = None):
    accepts = "a whole number" + (
        f" from {lo}" if lo is not None else ""
    ) + (f" to {hi}" if hi is not None else "")

    def inner(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected a whole number, got {_show(value)}", accepts)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise Invalid(f"{value} is out of range", accepts)
        return value

    return inner


def is_number(lo: float | None = None, hi: float | None = None, positive: bool = False):
    accepts = "a positive number" if positive else "a number"
    if lo is not None:
        accepts += f" from {lo}"
    if hi is not None:
        accepts += f" to {hi}"

    def inner(value):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid(f"expected a number, got {_show(value)}", accepts)
        if not math.isfinite(value):
            raise Invalid(f"{value} is not a finite number", accepts)
        if positive and value <= 0:
            raise Invalid(f"{value} is not a positive number", accepts)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise Invalid(f"{value} is out of range", accepts)
        return value

    return inner


def one_of(*choices):
    accepts = ", ".join(repr(c) if isinstance(c, str) else str(c) for c in choices)

    def inner(value):
        if value not in choices or isinstance(value, bool) != any(
            isinstance(c, bool) and c == value for c in choices
        ):
            raise Invalid(f"{_show(value)} is not one of the choices", accepts)
        return value

    return inner


def list_of(check, min_len: int = 0, what: str = "items"):
    def inner(value):
        if not isinstance(value, list | tuple):
            raise Invalid(f"expected a list of {what}, got {_show(value)}", f"a list of {what}")
        if len(value) < min_len:
            raise Invalid(f"expected at least {min_len} {what}", f"a list of {what}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(check(item))
            except Invalid as e:
                raise Invalid(f"item {i}: {e.problem}", e.accepts) from None
        return out

    return inner


def either(*checks, accepts: str):
    def inner(value):
        for check in checks:
            try:
                return check(value)
            except Invalid:
                continue
        raise Invalid(f"{_show(value)} is not valid", accepts)

    return inner


def mapping_of(value_check, key_pattern: str = r".+", key_accepts: str = "a name"):
    key_regex = re.compile(key_pattern)

    def inner(value):
        if not isinstance(value, Mapping):
            raise Invalid(f"expected a mapping, got {_show(value)}", "a mapping of name: value")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or not key_regex.fullmatch(key):
                raise Invalid(f"key {key!r} is not valid", key_accepts)
            try:
                out[key] = value_check(item)
            except Invalid as e:
                raise Invalid(f"{key}: {e.problem}", e.accepts) from None
        return out

    return inner
