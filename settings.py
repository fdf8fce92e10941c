"""One home per setting: help text, bounds and choices live in each config field's metadata.

A stage's dataclass declares its fields with `option(...)`; its `validate()` calls `check(self)` for bounds and
choices, the UI builds its widgets from `describe(...)` and the CLI its flags from `add_config_flags(...)`; code
names a setting through `keys(cls)` rather than a typed string.
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
    return _plain(_hint(cls, name))[0]


class Keys:
    """The keys of a config's options as attributes, so that code names a setting through its dataclass and a
    renamed field fails where it is named: `keys(TrainConfig).dataset.source` is "dataset.source", the key of the
    Train tab's widget, of YAML and of the `--dataset.source` flag."""

    def __init__(self, cls: type, prefix: str = "") -> None:
        self._cls, self._prefix = cls, prefix

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in {item.name for item in dataclasses.fields(self._cls)}:
            raise AttributeError(f"{self._cls.__name__} has no option '{name}'")
        hint = typing.get_type_hints(self._cls)[name]
        if dataclasses.is_dataclass(hint):
            return Keys(hint, f"{self._prefix}{name}.")
        return f"{self._prefix}{name}"

    def __str__(self) -> str:
        return self._prefix.rstrip(".")


def keys(cls: type) -> Keys:
    """The option keys of dataclass `cls` as attributes (see Keys)."""
    return Keys(cls)


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
    choices = meta.choice_list()
    if choices is not None and value not in choices:
        raise UserError(f"{name} must be one of: {', '.join(map(str, choices))} (got {value!r}).")
    check_bounds(item, value, name)


def check_bounds(item: dataclasses.Field, value: Any, name: str) -> None:
    """UserError when `value` is a number that is not finite or lies outside the field's bounds."""
    meta = item.metadata[KEY]
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name} must be a finite number (got {value!r}).")
    bounds = meta.bounds_text()
    if bounds and _is_number(value) and not meta.in_bounds(value):
        raise UserError(f"{name} must be {bounds} (got {value!r}); try {_suggestion(item, meta)}.")


def _suggestion(item: dataclasses.Field, meta: Option) -> str:
    """The field's default when it is in bounds, else the nearest bound."""
    value = item.default_factory() if item.default is MISSING else item.default
    if _is_number(value) and meta.in_bounds(value):
        return f"{value!r} (the default)"
    return f"{meta.minimum:g}" if meta.minimum is not None and not meta.exclusive_minimum else "a value in that range"


# ---------------------------------------------------------------- command-line flags

# Where a generated flag stores its value in argparse's namespace; `given_settings` reads these back.
FLAG_DEST = "setting:"


def option_keys(cls: type, prefix: str = "") -> list[str]:
    """The key of every option of dataclass `cls`, nested dataclasses dotted: "lora_r", "model.name_or_path"."""
    hints = typing.get_type_hints(cls)
    keys = []
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            keys += option_keys(hints[item.name], f"{prefix}{item.name}.")
        elif KEY in item.metadata:
            keys.append(f"{prefix}{item.name}")
    return keys


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    names: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    section: str = "",
    aliases: dict[str, str] | None = None,
) -> None:
    """A `--KEY VALUE` flag for every option of dataclass `cls`, KEY as in YAML and the Train tab's fields (nested
    ones dotted: `--model.name_or_path`; `--lora-r` works too, not shown in --help), typed, bounded and with the
    choices and help of the field's metadata, so a field added to a config is a flag of every command that takes it.

    A flag sets nothing unless given: `given_settings(args)` holds what the command line overrides, over a YAML file
    or the config's defaults. names: only these keys; exclude: keys or sections the command takes otherwise (a
    positional RUN); section: where the values land in `given_settings` (`main.py dataset --split` is
    dataset.split); aliases: another spelling of a key's flag (`--quant` for quants). Choices given as a function
    are left to `check()`, so building a parser reads no ML library. Advanced options and nested sections get
    groups of their own in `--help`.
    """
    excluded = set(exclude)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key in list(names) if names is not None else option_keys(cls):
        if key in excluded or key.partition(".")[0] in excluded:
            continue
        meta = describe(cls, key)
        nested_in = key.rpartition(".")[0]
        title = "advanced options" if meta.advanced else f"{nested_in} options" if nested_in else ""
        if title not in groups:
            groups[title] = parser.add_argument_group(title) if title else parser
        dest = FLAG_DEST + (f"{section}.{key}" if section else key)
        kwargs = {"dest": dest, "default": argparse.SUPPRESS, **_flag_kind(cls, key, meta)}
        spellings = [f"--{key}", *([aliases[key]] if aliases and key in aliases else [])]
        groups[title].add_argument(*spellings, help=_flag_help(cls, key, meta), **kwargs)
        dashed = f"--{key.replace('_', '-')}"
        if dashed != spellings[0]:  # the same flag with dashes (`--max-seq-length`), left out of --help
            parser.add_argument(dashed, help=argparse.SUPPRESS, **kwargs)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, nested by section: {"lora_r": 8, "dataset": {"source": "d.jsonl"}}."""
    given: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith(FLAG_DEST):
            *sections, name = dest.removeprefix(FLAG_DEST).split(".")
            target = given
            for section in sections:
                target = target.setdefault(section, {})
            target[name] = value
    return given


def merge_settings(base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`base` (a config's settings, e.g. from YAML) with `given` over it, section by section."""
    merged = dict(base)
    for name, value in given.items():
        inner = merged.get(name)
        merged[name] = merge_settings(inner, value) if isinstance(inner, dict) and isinstance(value, dict) else value
    return merged


def _flag_kind(cls: type, key: str, meta: Option) -> dict[str, Any]:
    """argparse's type, nargs and choices for field `key` of `cls`, from its type hint and metadata."""
    hint = _hint(cls, key)
    base, args = _plain(hint)
    if base is bool:
        return {"action": argparse.BooleanOptionalAction}
    if base in (int, float, str):
        kwargs: dict[str, Any] = {"type": _converter(cls, key, hint), "metavar": _METAVARS[base]}
        if meta.choices is not None and not callable(meta.choices):
            kwargs.update(choices=meta.choice_list(), metavar=None)
        return kwargs
    item = args[0] if args else str
    if base is list and item in (int, float, str):
        # Comma-separated and repeatable (`--quants q4_k_m,q8_0`); a single value, so it never swallows a positional.
        return {"type": _items(item), "action": _Extend, "metavar": "A,B"}
    if base is list and _plain(item)[0] is dict:
        return {"type": _json_object, "action": _Extend, "metavar": "JSON"}
    if base is dict and args in ((), (str, str)):
        return {"type": _pairs, "action": _Merge, "metavar": "K=V,…"}
    raise TypeError(f"{cls.__name__}.{key}: no command-line flag for type {hint!r}")


_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _hint(cls: type, key: str) -> Any:
    """The type hint of field `key` of `cls` (dotted for nested ones), as declared: `int | None` stays so."""
    head, _, rest = key.partition(".")
    hint = typing.get_type_hints(cls)[head]
    return _hint(hint, rest) if rest else hint


def _flag_help(cls: type, key: str, meta: Option) -> str:
    default = default_of(cls, key)
    if isinstance(default, list):
        default = ",".join(map(str, default)) or "none"
    elif isinstance(default, dict):
        default = ",".join(f"{name}={value}" for name, value in default.items()) or "none"
    elif default == "":
        default = "empty"
    facts = [text for text in (meta.bounds_text(), f"default: {default}") if text]
    return f"{meta.help} ({'; '.join(facts)})".replace("%", "%%")


def _converter(cls: type, key: str, hint: Any) -> Callable[[str], Any]:
    """argparse's `type` for a number or text field: the value, or a UserError naming the field's bounds."""
    base = _plain(hint)[0]
    head, _, name = key.rpartition(".")
    owner = _hint(cls, head) if head else cls
    item = {field.name: field for field in dataclasses.fields(owner)}[name]

    def convert(text: str) -> Any:
        if fits(None, hint) and text.lower() == "none":
            return None
        value = base(text)  # ValueError: argparse says "invalid int value: '2.5'"
        # A UserError passes through argparse: the CLI prints it as one line, worded as for the same value in YAML.
        # Choices are argparse's, or (read from an ML library) left to check(): a flag imports nothing.
        check_bounds(item, value, key)
        return value

    convert.__name__ = base.__name__
    return convert


def _items(kind: type) -> Callable[[str], list]:
    def convert(text: str) -> list:
        return [kind(part.strip()) for part in text.split(",") if part.strip()]

    convert.__name__ = f"{kind.__name__} list"
    return convert


def _json_object(text: str) -> list[dict]:
    import json

    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a JSON object ({exc}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return [value]


def _pairs(text: str) -> dict[str, str]:
    pairs = {}
    for part in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(
                f"takes NAME=VALUE pairs, comma-separated (e.g. output=answer), not {part!r}"
            )
        pairs[name.strip()] = value.strip()
    return pairs


class _Extend(argparse.Action):
    """A list flag: its first use replaces the YAML's list, each further use adds to it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *values])


class _Merge(argparse.Action):
    """A mapping flag: its first use replaces the YAML's mapping, each further use adds to it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), **values})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _plain(hint: Any) -> tuple[Any, tuple]:
    """(base type, its arguments) of a hint, with `| None` dropped: `int | None` → (int, ())."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kept = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(kept) == 1:
            hint = kept[0]
    return typing.get_origin(hint) or hint, typing.get_args(hint)
