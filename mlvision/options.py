"""Options declared once: a dataclass field's metadata is its command-line option, its help, its allowed values and
its identity rule (the style of peft's `LoraConfig`: `field(default=..., metadata={"help": ...})`).

`StudyConfig` (mlvision/config.py) and `BenchConfig` (benchmarks/options.py) declare each option as one field; this
module turns those declarations into argparse options, reads the options given back into field values, checks the
values a config may hold, and reads a JSON or YAML config file. The keys a field's metadata may hold:

- `help` (every field): what the option does, without its default; the help adds "(default: X)" from the values
  the parser is built with (the chosen profile's), never from a literal.
- `flag`: the option's name where it is not `--field-name` (`BenchConfig.sections` is `--bench-sections`).
- `cli`: False for a field no option sets (another option fills it, e.g. `--adapters` the given adapters).
- `choices`: the values a user may write (on the command line and in a config file).
- `type`: the argparse converter of one value, where the annotation's type is not it; `metavar`; `action`
  ("store_true" for a flag without a --no- form; other bools get --X / --no-X).
- `parse`: turns what a user wrote (the option's list, or a config file's value) into the field's value.
- `unset`: words for the default when it is None or empty ("all of the split").
- `at_least` / `above` / `at_most`: the allowed range, checked for every value a config holds (each item of a
  tuple); `not_empty`: a tuple must hold one item at least; `why`: the reason, added to the refusal.
- `may_be_empty`: a tuple option given with no value sets the empty tuple (`--subset-methods` alone: none).
- `identity_default`: for a field added after results were stored, the value at which it is left out of the
  stored identity, so the runs stored before it existed keep their ids.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import Field, fields
from pathlib import Path

from mlvision.errors import MLVisionError, UnknownNameError, error_reason
from mlvision.store import relative_to_repo

CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def flag(f: Field) -> str:
    """The option's name: `--field-name` unless the field's metadata names another."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def dest(f: Field) -> str:
    """Where argparse keeps the option's value (from the flag: a study's and a benchmark's `max_k` differ)."""
    return flag(f).removeprefix("--").replace("-", "_")


def cli_fields(cls) -> list[Field]:
    return [f for f in fields(cls) if f.metadata.get("cli", True)]


def add_field_arguments(parser, cls, defaults) -> None:
    """One option per field of the dataclass `cls` (in field order), its help ending in "(default: X)" with X taken
    from `defaults` (an instance: the chosen profile). Every option's argparse default is None, meaning "not given",
    so `changes_from_args` tells what was given from what the profile decides."""
    hints = typing.get_type_hints(cls)
    for f in cli_fields(cls):
        meta = f.metadata
        kind, many = _value_type(hints[f.name])
        kwargs = {"dest": dest(f), "default": None}
        if "action" in meta:
            kwargs["action"] = meta["action"]
        elif kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta.get("type", kind if kind in (int, float, str, Path) else str)
            if many:
                kwargs["nargs"] = "*" if meta.get("may_be_empty") else "+"
        for key in ("choices", "metavar"):
            if key in meta:
                kwargs[key] = meta[key]
        text = meta["help"]
        if meta.get("action") != "store_true":  # a plain flag is off unless given
            text += f" (default: {default_text(getattr(defaults, f.name), f)})"
        kwargs["help"] = text.replace("%", "%%")  # argparse formats help with %
        parser.add_argument(flag(f), **kwargs)


def default_text(value, f: Field) -> str:
    """A default as the help shows it: lists space-separated, pairs as A=B, paths relative to the repository."""
    if value is None or value == ():
        return f.metadata.get("unset", "none")
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join("=".join(map(str, item)) if isinstance(item, tuple) else str(item) for item in value)
    if isinstance(value, Path):
        return relative_to_repo(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def changes_from_args(args: argparse.Namespace, cls) -> dict:
    """{field: value} of the options given on the command line (lists as tuples, `parse` applied)."""
    changes = {}
    for f in cli_fields(cls):
        value = getattr(args, dest(f), None)
        if value is None:
            continue
        value = tuple(value) if isinstance(value, list) else value
        changes[f.name] = f.metadata["parse"](value) if "parse" in f.metadata else value
    return changes


def check_values(config) -> None:
    """Refuse a value outside its field's declared range, in one line naming the option and the range; called by
    the dataclasses' `__post_init__`, so every way of making a config (options, a file, `replace`) is checked."""
    for f in fields(config):
        meta, value = f.metadata, getattr(config, f.name)
        if meta.get("not_empty") and not value:
            raise MLVisionError(f"{flag(f)} needs at least one value")
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, (int, float)) and not isinstance(item, bool) and _outside(item, meta):
                why = f" ({meta['why']})" if "why" in meta else ""
                raise MLVisionError(f"{flag(f)} must be {_range_words(meta)}, got {item}{why}")


def _outside(value: float, meta) -> bool:
    if "at_least" in meta and value < meta["at_least"]:
        return True
    if "above" in meta and value <= meta["above"]:
        return True
    return "at_most" in meta and value > meta["at_most"]


def _range_words(meta) -> str:
    low = meta.get("at_least", meta.get("above"))
    if "at_most" in meta:
        return f"between {low} and {meta['at_most']}"
    return f">= {low}" if "at_least" in meta else f"> {low}"


def is_config_file(name: str) -> bool:
    """Whether `--config NAME` names a file (by its ending) rather than a profile."""
    return name.lower().endswith(CONFIG_FILE_SUFFIXES)


def read_config_file(path: str | Path, cls, extra_keys: tuple[str, ...] = ()) -> dict:
    """The mapping a JSON or YAML config file holds, each field's value converted to its type (lists to tuples,
    `parse` applied, `choices` checked). A key that is no field of `cls` (nor one of `extra_keys`) is refused in
    one line naming it and the valid keys."""
    path = Path(path)
    if not path.is_file():
        raise MLVisionError(f"--config {path}: no such file (a .json/.yaml/.yml file, or a profile name)")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml  # pyyaml: a dependency of accelerate, datasets, peft and timm

            data = yaml.safe_load(text)
    except Exception as error:  # JSON or YAML syntax: the parser's first line says where
        raise MLVisionError(f"--config {path}: cannot read it ({error_reason(error)})") from None
    data = {} if data is None else data  # an empty YAML file sets nothing
    if not isinstance(data, dict):
        raise MLVisionError(f"--config {path}: expected a mapping of option names to values, got {type(data).__name__}")
    by_name = {f.name: f for f in fields(cls)}
    valid = (*extra_keys, *by_name)
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key in extra_keys:
            values[key] = value
            continue
        if key not in by_name:
            raise UnknownNameError(f"--config {path}: unknown key {key!r}; valid keys: {', '.join(valid)}")
        f = by_name[key]
        where = f"--config {path}: {key}"
        value = f.metadata["parse"](value) if "parse" in f.metadata and value is not None else value
        value = _convert(value, hints[key], where)
        choices = f.metadata.get("choices")
        for item in value if isinstance(value, tuple) else (value,):
            if choices is not None and item not in choices:
                raise UnknownNameError(f"{where}: {item!r} is not one of {', '.join(map(str, choices))}")
        values[key] = value
    return values


def _value_type(hint) -> tuple[type, bool]:
    """(the type of one value, whether the option takes several) of a field's annotation."""
    hint = _without_none(hint)
    if typing.get_origin(hint) is tuple:
        return typing.get_args(hint)[0], True
    return hint, False


def _without_none(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return inner
    return hint


def _convert(value, hint, where: str):
    """A config file's value as a value of the annotation `hint` (JSON and YAML have lists, not tuples or paths)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return (
            None
            if value is None and type(None) in typing.get_args(hint)
            else _convert(value, _without_none(hint), where)
        )
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise MLVisionError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(item, args[0], where) for item in value)
        if len(value) != len(args):
            raise MLVisionError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_convert(item, arg, where) for item, arg in zip(value, args))
    if hint is Path and isinstance(value, str):
        return Path(value)
    if hint is float and isinstance(value, str):  # YAML reads 3e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, hint) and not (hint is not bool and isinstance(value, bool)):
        return value
    raise MLVisionError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
