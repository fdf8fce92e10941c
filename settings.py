"""One home per setting: help text, bounds and choices live in each config field's metadata.

A stage's dataclass declares its fields with `option(...)`; its `validate()` calls `check(self)` for bounds and
choices, the UI builds its widgets from `describe(...)` and the CLI its flags from `add_arguments(...)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING
from typing import Any

from workspace import UserError, describe_type, fits

# Where an Option is kept in a field's metadata.
KEY = "option"

Choices = Sequence[Any] | Callable[[], Iterable[Any]]


@dataclasses.dataclass(frozen=True)
class Option:
    """What a user is told about one setting and which values it accepts.

    choices: the allowed values, or a function returning them (read on first use, e.g. from transformers, which
    must not be imported before Unsloth in a training process).
    """

    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: Choices | None = None
    label: str | None = None
    advanced: bool = False

    def choice_list(self) -> tuple[Any, ...] | None:
        """The allowed values, or None when any value of the field's type is allowed."""
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def bounds_text(self) -> str:
        """The allowed range in words, e.g. 'above 0 and at most 1'; '' when unbounded."""
        parts = []
        if self.minimum is not None:
            low = _number_text(self.minimum)
            parts.append(f"above {low}" if self.exclusive_minimum else f"at least {low}")
        if self.maximum is not None:
            high = _number_text(self.maximum)
            parts.append(f"below {high}" if self.exclusive_maximum else f"at most {high}")
        return " and ".join(parts)

    def in_bounds(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum):
            return False
        if self.maximum is not None and (value >= self.maximum if self.exclusive_maximum else value > self.maximum):
            return False
        return True


def _number_text(value: float) -> str:
    """A bound as a user reads it: 1048576, not 1.04858e+06."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def option(
    default: Any = MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | Any = MISSING,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    exclusive_maximum: bool = False,
    choices: Choices | None = None,
    label: str | None = None,
    advanced: bool = False,
) -> Any:
    """A dataclass field whose metadata holds its Option (help, bounds, choices, label)."""
    meta = Option(help, minimum, maximum, exclusive_minimum, exclusive_maximum, choices, label, advanced)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={KEY: meta})


def describe(cls: type, name: str) -> Option:
    """The Option of field `name` of dataclass `cls` (dotted for nested ones: "model.name_or_path"), label filled in."""
    head, _, rest = name.partition(".")
    fields = {item.name: item for item in dataclasses.fields(cls)}
    if head not in fields:
        raise KeyError(f"{cls.__name__} has no field '{head}'")
    if rest:
        return describe(typing.get_type_hints(cls)[head], rest)
    meta = fields[head].metadata.get(KEY)
    if meta is None:
        raise KeyError(f"{cls.__name__}.{head} is not declared with settings.option(...)")
    return meta if meta.label else dataclasses.replace(meta, label=head.replace("_", " ").capitalize())


def default_of(cls: type, name: str) -> Any:
    """The default value of field `name` of dataclass `cls` (dotted for nested ones)."""
    head, _, rest = name.partition(".")
    item = {f.name: f for f in dataclasses.fields(cls)}[head]
    if rest:
        return default_of(typing.get_type_hints(cls)[head], rest)
    return item.default_factory() if item.default is MISSING else item.default


def field_type(cls: type, name: str) -> type:
    """The plain type of field `name` of `cls` (dotted for nested ones), `| None` dropped: `int | None` → int."""
    head, _, rest = name.partition(".")
    hint = typing.get_type_hints(cls)[head]
    return field_type(hint, rest) if rest else _plain(hint)[0]


def check(config: Any, where: str = "") -> None:
    """Raise UserError for the first field of `config` whose value breaks its bounds or choices (nested too)."""
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        name = f"{where}{item.name}"
        if dataclasses.is_dataclass(value):
            check(value, f"{name}.")
        elif KEY in item.metadata:
            check_value(item, hints[item.name], value, name)


def check_value(item: dataclasses.Field, hint: Any, value: Any, name: str) -> None:
    """UserError unless `value` fits the field's type, bounds and choices."""
    meta = item.metadata[KEY]
    # A config built from widget values skips config_from_dict: a half-typed number arrives here as None.
    if not fits(value, hint):
        raise UserError(f"{name} must be {describe_type(hint)} (got {value!r}).")
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} must be a finite number (got {value!r}).")
    choices = meta.choice_list()
    if choices is not None and value not in choices:
        raise UserError(f"{name} must be one of: {', '.join(map(str, choices))} (got {value!r}).")
    bounds = meta.bounds_text()
    if bounds and _is_number(value) and not meta.in_bounds(value):
        raise UserError(f"{name} must be {bounds} (got {value!r}); try {_suggestion(item, meta)}.")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _suggestion(item: dataclasses.Field, meta: Option) -> str:
    """The field's default when it is in bounds, else the nearest bound."""
    value = item.default_factory() if item.default is MISSING else item.default
    if _is_number(value) and meta.in_bounds(value):
        return f"{value!r} (the default)"
    return f"{meta.minimum:g}" if meta.minimum is not None and not meta.exclusive_minimum else "a value in that range"


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    names: Iterable[str] | None = None,
    prefix: str = "",
) -> None:
    """Add a `--<prefix><name>` flag for each named field of `cls` (all when None), typed, with default and help.

    Choices given as a function are left to `check()`, so building a parser reads no ML library. Advanced options
    go to an "advanced options" group of `--help`. Flags store into `<prefix><name>` with '-' as '_';
    `arguments_to_dict` reads them back.
    """
    hints = typing.get_type_hints(cls)
    advanced = None
    for name in _names(cls, names):
        meta = describe(cls, name)
        flag = f"--{prefix}{name}".replace("_", "-")
        kwargs: dict[str, Any] = {
            "dest": _dest(prefix, name),
            "default": default_of(cls, name),
            "help": meta.help.replace("%", "%%") + " (default: %(default)s)",
        }
        base, args = _plain(hints[name])
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif base is list:
            kwargs.update(nargs="*", type=args[0] if args else str)
        elif base in (int, float, str):
            kwargs["type"] = base
        else:
            raise TypeError(f"{cls.__name__}.{name}: no command-line flag for type {hints[name]!r}")
        if meta.choices is not None and not callable(meta.choices):
            kwargs["choices"] = meta.choice_list()
        if meta.advanced and isinstance(parser, argparse.ArgumentParser):
            advanced = advanced or parser.add_argument_group("advanced options")
            advanced.add_argument(flag, **kwargs)
        else:
            parser.add_argument(flag, **kwargs)


def arguments_to_dict(
    args: argparse.Namespace, cls: type, names: Iterable[str] | None = None, prefix: str = ""
) -> dict:
    """The values of the flags `add_arguments` added, keyed by field name (for `workspace.config_from_dict`).

    Each value is checked against its field's bounds here, because some flags (`main.py dataset
    --max-seq-length`) go straight to a stage function without a config's validate()."""
    values = {name: getattr(args, _dest(prefix, name)) for name in _names(cls, names)}
    hints = typing.get_type_hints(cls)
    fields = {item.name: item for item in dataclasses.fields(cls)}
    for name, value in values.items():
        if not callable(describe(cls, name).choices):  # choices read from an ML library are left to validate()
            check_value(fields[name], hints[name], value, name)
    return values


def _names(cls: type, names: Iterable[str] | None) -> list[str]:
    return list(names) if names is not None else [item.name for item in dataclasses.fields(cls) if KEY in item.metadata]


def _dest(prefix: str, name: str) -> str:
    return f"{prefix}{name}".replace("-", "_")


def _plain(hint: Any) -> tuple[Any, tuple]:
    """(base type, its arguments) of a hint, with `| None` dropped: `int | None` → (int, ())."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kept = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(kept) == 1:
            hint = kept[0]
    return typing.get_origin(hint) or hint, typing.get_args(hint)
