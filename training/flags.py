"""Command-line flags generated from the configuration dataclasses, and the dataclasses back.

Each field of :class:`~training.config.TrainConfig`, :class:`~training.data.DataConfig` and
:class:`~training.model_config.ModelConfig` becomes one flag: ``--`` + the field's name with
dashes, its type from the annotation, its default from the dataclass, and its help from the
field's docstring (the string literal under it) or its ``help`` metadata. A new field is a new
flag, with no change to :mod:`training.cli`.

- ``bool`` fields get both forms (``--report`` / ``--no-report``);
- ``int | None`` and the like take the inner type; ``None`` means "not given";
- ``tuple[int, ...]`` is written ``256,128`` (``''`` for none), and
  ``tuple[tuple[int, ...], ...]`` ``32,32/64,64`` ('/' between groups);
- field metadata may add ``flag`` (another flag name), ``aliases``, ``metavar``, ``help``.

No torch here: ``--help`` must answer at once.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right under it), by field name."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a frozen install): no help, still flags
        return {}
    (node,) = ast.parse(source).body
    assert isinstance(node, ast.ClassDef)
    docs: dict[str, str] = {}
    for statement, following in zip(node.body, node.body[1:], strict=False):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def field_help(cls: type, item: dataclasses.Field[Any]) -> str:
    """The one-line help of a field: its ``help`` metadata, else its docstring."""
    return str(item.metadata.get("help") or field_docs(cls).get(item.name, ""))


def flag_name(item: dataclasses.Field[Any]) -> str:
    return str(item.metadata.get("flag", "--" + item.name.replace("_", "-")))


def parse_ints(text: str) -> tuple[int, ...]:
    """``256,128`` -> (256, 128); ``''`` -> ()."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid list '{text}': write integers separated by commas, e.g. 256,128"
        ) from None


def parse_int_groups(text: str) -> tuple[tuple[int, ...], ...]:
    """``32,32/64,64`` -> ((32, 32), (64, 64)): '/' between groups, ',' inside one."""
    try:
        return tuple(tuple(int(c) for c in group.split(",")) for group in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid groups '{text}': write integers like 32,32/64,64/128"
        ) from None


_PARSERS: dict[Any, Callable[[str], Any]] = {
    Path: Path,
    int: int,
    float: float,
    str: str,
    tuple[int, ...]: parse_ints,
    tuple[tuple[int, ...], ...]: parse_int_groups,
}
_METAVARS: dict[Any, str] = {
    tuple[int, ...]: "N,N",
    tuple[tuple[int, ...], ...]: "N,N/N",
}


def _without_none(hint: Any) -> Any:
    """``int | None`` -> int; other hints as they are."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none to show (``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def add_fields(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    names: Iterable[str] | None = None,
    not_given: str | None = None,
    extra_help: Mapping[str, str] | None = None,
) -> list[str]:
    """One flag per field of ``cls`` (those in ``names``, else every flat one); returns their
    names, each the ``dest`` of its flag.

    ``not_given``: every flag defaults to ``None`` (not given) instead of the field's default,
    and the help says where the value comes from then (e.g. "the preset's"), for settings that
    come from elsewhere unless overridden. ``extra_help`` adds text a docstring cannot hold
    (values known at run time, such as the presets).
    """
    hints = typing.get_type_hints(cls)
    chosen = set(names) if names is not None else None
    added = []
    for item in dataclasses.fields(cls):
        if chosen is not None and item.name not in chosen:
            continue
        hint = _without_none(hints[item.name])
        if dataclasses.is_dataclass(hint) or typing.get_origin(hint) is dict:
            if chosen is None:
                continue  # nested settings get flags of their own
            raise TypeError(f"{cls.__name__}.{item.name} ({hint}) cannot be one flag")
        if item.default is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{item.name} has no default to give its flag")
        help_text = field_help(cls, item)
        if extra_help and item.name in extra_help:
            help_text = f"{help_text} {extra_help[item.name]}".strip()
        if not_given is not None:
            help_text = f"{help_text} (default: {not_given})"
        elif hint is bool:
            help_text = f"{help_text} (default: {'on' if item.default else 'off'})"
        options: dict[str, Any] = {
            "dest": item.name,
            "default": None if not_given is not None else item.default,
            "help": help_text.replace("%", "%%"),  # argparse formats help with %
        }
        flags = [flag_name(item), *item.metadata.get("aliases", ())]
        if hint is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **options)
        elif hint in _PARSERS:
            metavar = item.metadata.get("metavar", _METAVARS.get(hint))
            parser.add_argument(*flags, type=_PARSERS[hint], metavar=metavar, **options)
        else:
            raise TypeError(f"{cls.__name__}.{item.name}: no flag for the type {hint}")
        added.append(item.name)
    return added


def given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The flags among ``names`` that were given (not None)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def values(args: argparse.Namespace, cls: type, **nested: Any) -> Any:
    """An instance of ``cls`` from the flags ``add_fields`` added (``nested``: values for the
    fields that are not flags, such as a nested dataclass)."""
    kwargs = {
        item.name: getattr(args, item.name)
        for item in dataclasses.fields(cls)
        if item.name not in nested and hasattr(args, item.name)
    }
    return cls(**kwargs, **nested)
