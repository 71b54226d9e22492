"""Typed config dataclasses <-> command-line flags and JSON.

Every stage is ``main(cfg: SomeConfig)`` with ``SomeConfig`` a ``@dataclass``. This module turns
such a class into argparse flags (nested dataclasses become dotted flags, ``--model.dim 256``,
as in torchtitan), reads a JSON file given with ``--config`` underneath the flags, and turns a
resolved config back into JSON for ``meta.json``. Stages themselves never touch argparse.

Field metadata understood here:
- ``help``: the flag's help text;
- ``positional=True``: a positional argument instead of a ``--flag``;
- ``choices``: allowed values;
- ``nargs="+"``: a list flag that takes several values even though the command has a positional argument.

List fields take several values, each of which may itself be comma-separated (``a.txt b.txt`` is
``a.txt,b.txt``), so a shell glob works: a positional list takes every remaining word
(``llamalab tokenizer train corpus/*.txt``); a list flag (``--data a.json b.json``) takes the words up
to the next flag in commands without a positional argument, and only the comma form otherwise (the
flag would swallow the positional: ``eval run --task a,b MODEL``), unless the field opts in with
``nargs="+"``. A repeated list flag adds to the list.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

from llamalab.common import LlamalabError

C = TypeVar("C")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _converter(tp: Any) -> Callable[[str], Any]:
    base, _ = _unwrap_optional(tp)
    origin = typing.get_origin(base)
    if base is bool:
        return _parse_bool
    if base in (int, float, str):
        return base
    if origin in (list, tuple) or base in (list, tuple):
        args = typing.get_args(base)
        inner = args[0] if args else str
        conv = _converter(inner)
        return lambda s: [conv(x) for x in s.split(",") if x != ""]
    if origin is dict or base is dict:
        return json.loads
    if origin is typing.Literal:
        return str
    return str


def _is_list(tp: Any) -> bool:
    base, _ = _unwrap_optional(tp)
    return typing.get_origin(base) in (list, tuple) or base in (list, tuple)


class _ListAction(argparse.Action):
    """Store a list field: flattens the words (each already split on commas); a repeated flag adds to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values and isinstance(values[0], list):  # several words
            values = [x for word in values for x in word]
        prev = getattr(namespace, self.dest, None) if option_string else None
        setattr(namespace, self.dest, (prev if isinstance(prev, list) else []) + list(values))


def _has_positional(cls: type) -> bool:
    return any(f.metadata.get("positional") for f, _ in _fields(cls))


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """The init fields of ``cls``; those declared by a base class with ``FLAGS_LAST = True`` (shared run flags)
    come after the subclass's own, so ``--help`` starts with what the command is about."""
    hints = typing.get_type_hints(cls)
    fields = [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]
    tail = next((b for b in cls.__mro__[1:] if b.__dict__.get("FLAGS_LAST")), None)
    if tail is None:
        return fields
    last = {f.name for f in dataclasses.fields(tail)}
    return [p for p in fields if p[0].name not in last] + [p for p in fields if p[0].name in last]


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                       multi_flags: bool | None = None) -> None:
    """Add one flag per field of ``cls`` (recursively for nested dataclasses).

    ``multi_flags``: list flags take several words (default: when ``cls`` has no positional field)."""
    if multi_flags is None:
        multi_flags = not _has_positional(cls)
    for f, tp in _fields(cls):
        base, _ = _unwrap_optional(tp)
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(base):
            add_dataclass_args(parser, base, prefix=f"{name}.", multi_flags=multi_flags)
            continue
        help_ = f.metadata.get("help", "")
        kw: dict[str, Any] = {"type": _converter(tp), "help": help_, "default": argparse.SUPPRESS}
        if base is bool:
            kw.update(nargs="?", const=True, metavar="BOOL")
        choices = f.metadata.get("choices")
        if typing.get_origin(base) is typing.Literal:
            choices = list(typing.get_args(base))
        if choices:
            kw["choices"] = choices
        positional = bool(f.metadata.get("positional")) and not prefix
        if _is_list(tp):
            kw["action"] = _ListAction
            if positional:
                kw["nargs"] = "*"
            elif multi_flags or f.metadata.get("nargs") == "+":
                kw["nargs"] = "+"
        if positional:
            kw.pop("default")
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                kw.setdefault("nargs", "?")
                kw["default"] = argparse.SUPPRESS
            parser.add_argument(f.name, metavar=f.name.upper(), **kw)
        else:
            kw.setdefault("metavar", f.metadata.get("metavar"))
            aliases = list(f.metadata.get("aliases", ())) if not prefix else []  # e.g. ["-k"]
            parser.add_argument(f"--{name.replace('_', '-')}", *aliases, dest=name, **kw)


def from_dict(cls: type[C], data: dict[str, Any], where: str = "config") -> C:
    """Build ``cls`` from a (possibly nested) dict; unknown keys are an error naming the field."""
    if not isinstance(data, dict):
        raise LlamalabError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name: tp for f, tp in _fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise LlamalabError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {}
    for k, v in data.items():
        base, _ = _unwrap_optional(known[k])
        if dataclasses.is_dataclass(base) and isinstance(v, dict):
            v = from_dict(base, v, where=f"{where}.{k}")
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise LlamalabError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def build_parser(cls: type, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", dest="__config__", default=None, metavar="JSON",
                   help="a JSON file of field values; flags given on the command line override it")
    p.add_argument("--debug", dest="__debug__", action="store_true", help="show tracebacks")
    add_dataclass_args(p, cls)
    return p


def config_from_namespace(cls: type[C], ns: argparse.Namespace) -> C:
    data: dict[str, Any] = {}
    path = getattr(ns, "__config__", None)
    if path:
        from llamalab.common import read_json

        data = read_json(path, what="config file")
    for k, v in vars(ns).items():
        if k.startswith("__"):
            continue
        _set_dotted(data, k, v)
    cfg = from_dict(cls, data, where=str(path) if path else "config")
    post = getattr(cfg, "validate", None)
    if callable(post):
        post()
    return cfg


def parse_config(cls: type[C], argv: list[str] | None = None, prog: str = "llamalab",
                 description: str | None = None) -> tuple[C, bool]:
    ns = build_parser(cls, prog, description).parse_args(argv)
    return config_from_namespace(cls, ns), bool(getattr(ns, "__debug__", False))


def save_config(cfg: Any, path: str | Path) -> None:
    from llamalab.common import write_json_atomic

    write_json_atomic(path, to_dict(cfg))
