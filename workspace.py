"""Where the app keeps its files, how user paths are checked, and how finished files are written safely."""

from __future__ import annotations

import dataclasses
import importlib
import ipaddress
import json
import math
import os
import re
import shutil
import tempfile
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

DEFAULT_WORKSPACE = Path("workspace")
WORKSPACE_ENV = "FINETUNER_WORKSPACE"
# Set when the app is served through a public link: user paths must then stay inside the workspace.
CONFINE_ENV = "FINETUNER_CONFINE_PATHS"


class UserError(Exception):
    """An error the user can act on; the UI shows it as gr.Error, the CLI prints it as one line."""


def workspace_root(workspace: str | Path | None = None) -> Path:
    """The workspace folder: the argument, else $FINETUNER_WORKSPACE, else ./workspace (created if missing)."""
    root = Path(workspace or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise UserError(f"The workspace '{root}' is a file; give a folder (--workspace).")
    root.mkdir(parents=True, exist_ok=True)
    return root


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach a server bound to host (the app, or a run's endpoint)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def paths_confined() -> bool:
    return os.environ.get(CONFINE_ENV, "") == "1"


def path_exists(path: str | Path) -> bool:
    """Whether a path typed by a user names something here; False for a name the system cannot look up (longer than
    it allows, or holding a NUL byte) instead of raising."""
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):
        return False


def path_is_file(path: str | Path) -> bool:
    """Whether a path typed by a user names a file here; False where path_exists would say False."""
    try:
        return Path(path).expanduser().is_file()
    except (OSError, ValueError):
        return False


def shorten_path(path: str | Path, limit: int = 120) -> str:
    """A path for a one-line message: its start and end around an ellipsis when it is long."""
    text = str(path)
    return text if len(text) <= limit else f"{text[: limit // 2]}…{text[-limit // 2 :]}"


def resolve_user_path(path: str | Path, workspace: str | Path | None = None, must_exist: bool = True) -> Path:
    """Resolve a path typed or uploaded by a user; outside the workspace is refused when the app is shared."""
    if path is None or str(path).strip() == "":
        raise UserError("No path given. Type a file or folder path, or upload a file.")
    try:
        resolved = Path(str(path).strip()).expanduser().resolve()
        resolved.exists()  # a name too long for the system, or a NUL byte, fails here rather than in a caller
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UserError(
            f"Path '{shorten_path(path)}' cannot be used: {reason} ({len(str(path))} characters)."
        ) from None
    if paths_confined():
        root = workspace_root(workspace)
        if not resolved.is_relative_to(root):
            raise UserError(
                f"Path '{path}' is outside the workspace ({root}); a shared app only reads files inside it. "
                "Upload the file instead."
            )
    if must_exist and not resolved.exists():
        raise UserError(f"Path '{path}' does not exist.")
    return resolved


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; it becomes `final` only if the block finishes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that readers see the old content or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def import_function(target: str) -> Callable[..., Any]:
    """The function named "module:function", imported now: registries (training stages, job kinds, export targets)
    name their functions this way so that reading a record imports none of their code."""
    module_name, _, function_name = target.partition(":")
    return getattr(importlib.import_module(module_name), function_name)


def config_from_dict(cls: type, data: dict[str, Any] | None, where: str = "config") -> Any:
    """Build dataclass `cls` from a plain dict (YAML), recursing into nested dataclasses; unknown keys are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of option names to values.")
    data = dict(data)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"Unknown option(s) in {where}: {', '.join(unknown)}. Known options: {', '.join(sorted(names))}."
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        # `.nan` or `1e309` in YAML: no bound compares false against NaN, and inf passes every minimum.
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"Option '{name}' in {where} must be a finite number (got {value!r}).")
        # validate() compares numbers and reads strings: a quoted number or a missing value must stop here instead.
        if not fits(value, hint):
            raise UserError(f"Option '{name}' in {where} must be {describe_type(hint)} (got {value!r}).")
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = config_from_dict(hint, value, f"{where}.{name}")
        elif isinstance(value, float) and _int_only(hint):
            value = int(value)  # 16.0 from a number box or `1e3` in YAML, for an int option
        kwargs[name] = value
    return cls(**kwargs)


def fits(value: Any, hint: Any) -> bool:
    """Whether a YAML or form value has the option's type; an int option takes a whole float (forms give 16.0)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, option) for option in args)
    if hint is type(None):
        return value is None
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    base = origin or hint
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is list:
        return isinstance(value, list) and all(fits(item, args[0]) for item in value if args)
    if base is dict:
        return isinstance(value, dict) and (
            not args or all(fits(key, args[0]) and fits(item, args[1]) for key, item in value.items())
        )
    return isinstance(value, base) if isinstance(base, type) else True


def _int_only(hint: Any) -> bool:
    """Whether a number for this hint must be an int: `int` or `int | None`, not `float` or `int | float`."""
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return int in members and float not in members


def describe_type(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if option is type(None) else describe_type(option) for option in args)
    if dataclasses.is_dataclass(hint):
        return "a mapping of option names to values"
    base = origin or hint
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
    if base in names:
        return names[base]
    if base is list:
        item = describe_type(args[0]) if args else ""
        return "a list" + (f" of {item[2:]}s" if item.startswith("a ") else f" of {item} values" if item else "")
    if base is dict:
        return "a mapping" + (f" of {describe_type(args[0])} to {describe_type(args[1])}" if args else "")
    return getattr(base, "__name__", str(base))


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


class ConfigLoader(yaml.SafeLoader):
    """YAML as users mean it: `2e-4` is a number (YAML 1.1 reads an exponent without a dot as text), and a key given
    twice is an error instead of the last one winning silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            if duplicate:
                raise DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int) -> None:
        super().__init__(f"the key '{key}' appears twice (again at line {line}); keep one")
        self.key, self.line = key, line


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """YAML text read with ConfigLoader (numbers with an exponent, duplicate keys refused)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Config file '{path}' not found.")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except DuplicateKey as exc:
        raise UserError(
            f"Config file '{path}' gives the key '{exc.key}' twice (again at line {exc.line}); keep one."
        ) from None
    except yaml.YAMLError as exc:
        raise UserError(f"Config file '{path}' is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"Config file '{path}' must hold a mapping of option names to values.")
    return data


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
