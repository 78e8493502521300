"""Command lines as the users of the seed tools type them (TotalSegmentator, the mesh/Blender chain,
the liver vessel pipeline: ``../shared/reference/``), on top of typer's (click's) parser.

* An on/off flag is a flag: ``--fast``, shown in help without a ``<bool>`` type; for scripts written
  for ``--fast true`` it also takes ``true|false|yes|no|on|off|1|0`` as its next word or after ``=``
  (``--fast false`` is the flag left out).
* Options that take several values, as TotalSegmentator's ``--roi_subset liver aorta`` does: click takes
  one value per use, so the words after such an option, up to the next option, become one use each.

:func:`install` applies both to every command of a click group, its sub-groups included.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import typer
from typer.core import TyperGroup, TyperOption

TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})
#: Options whose next words, up to the next option, are all theirs.
MULTI_VALUE_OPTIONS = frozenset({"--roi_subset", "--roi-subset"})


def _flags(command: Any) -> dict[str, TyperOption]:
    """Every spelling of the command's on/off flags -> the option."""
    found: dict[str, TyperOption] = {}
    for param in command.params:
        if isinstance(param, TyperOption) and param.is_flag and not param.count and not param.secondary_opts:
            for spelling in param.opts:
                if spelling.startswith("--"):
                    found[spelling] = param
    return found


def normalise(command: Any, args: Iterable[str]) -> list[str]:
    """``args`` of ``command`` with ``--flag true|false`` and multi-value options in click's terms."""
    flags = _flags(command)
    words = list(args)
    out: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":
            out += words[i:]
            break
        name, eq, value = word.partition("=")
        if name in flags and eq:
            if value.lower() in TRUE_WORDS:
                out.append(name)
            elif value.lower() not in FALSE_WORDS:
                raise typer.BadParameter(f"{value!r} is not true or false", param_hint=name)
            i += 1
            continue
        if word in flags and i + 1 < len(words) and words[i + 1].lower() in TRUE_WORDS | FALSE_WORDS:
            if words[i + 1].lower() in TRUE_WORDS:
                out.append(word)
            i += 2
            continue
        if word in MULTI_VALUE_OPTIONS:
            j = i + 1
            while j < len(words) and not words[j].startswith("-"):
                out += [word, words[j]]
                j += 1
            if j == i + 1:
                out.append(word)  # click says the value is missing
            i = j
            continue
        out.append(word)
        i += 1
    return out


def _show_as_flags(command: Any) -> None:
    """No type column for on/off flags in help (typer shows ``<bool>``, which reads as 'takes a value')."""
    for option in set(_flags(command).values()):
        if option.metavar is None:
            option.metavar = ""


def _help_without_type(option: Any) -> Any:
    """``--help`` shown as the flag it is (typer makes it per call, so :func:`_show_as_flags` misses it)."""
    if option is not None and option.metavar is None:
        option.metavar = ""
    return option


@functools.cache
def _with_flag_help(cls: type) -> type:
    """``cls`` (a command's class) with :func:`_help_without_type` on its help option."""

    def get_help_option(self: Any, ctx: Any) -> Any:
        return _help_without_type(cls.get_help_option(self, ctx))  # type: ignore[attr-defined]

    return type(f"Flags{cls.__name__}", (cls,), {"get_help_option": get_help_option, "flag_help": True})


class FlagsGroup(TyperGroup):
    """A group whose commands parse their arguments through :func:`normalise`."""

    def get_help_option(self, ctx: Any) -> Any:
        return _help_without_type(super().get_help_option(ctx))

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[Any, Any, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None and not isinstance(command, TyperGroup):
            rest = normalise(command, rest)
        return name, command, rest


def install(group: TyperGroup) -> None:
    """Give every command under ``group`` (sub-groups too) the behaviour above."""
    for command in group.commands.values():
        if isinstance(command, TyperGroup):
            if not isinstance(command, FlagsGroup):
                command.__class__ = type(f"Flags{type(command).__name__}", (FlagsGroup, type(command)), {})
            install(command)
        else:
            if not getattr(command, "flag_help", False):
                command.__class__ = _with_flag_help(type(command))
            _show_as_flags(command)
    _show_as_flags(group)
