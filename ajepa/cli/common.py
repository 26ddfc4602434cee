"""Flags shared by several `ajepa` commands, each defined once, and the one-line error format."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from ajepa.config import PRESETS


def add_set_option(p: argparse.ArgumentParser, help: str) -> None:
    """The repeatable `--set SECTION.KEY=VALUE` override flag, collected into args.overrides."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help=help)


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_device_flag(p: argparse.ArgumentParser, default: str | None = "auto", field: str | None = None) -> None:
    """`--device`: auto (CUDA when there is one), cpu, cuda or cuda:N."""
    where = f" ({field})" if field else ""
    p.add_argument("--device", default=default, help=f"auto (CUDA when available), cpu, cuda or cuda:N{where}")


def add_preset_flag(p: argparse.ArgumentParser, default: str | None, help: str) -> None:
    p.add_argument("--preset", default=default, choices=sorted(PRESETS), help=help)


def add_data_flag(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--data", default=None, required=required,
                   help="audio folder (searched recursively; subfolders are labels) or a .csv/.jsonl manifest "
                        "with a 'path' column and an optional 'label'; default: the built-in synthetic corpus")


def add_dataclass_options(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per field of dataclass `cls`, typed and defaulted from the field; the
    help text is the field's `metadata["help"]`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', f.name)} (default {f.default})"
        if hints[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            p.add_argument(flag, type=hints[f.name], default=f.default, help=help_text)


def dataclass_from_args(cls, args: argparse.Namespace, **extra):
    """Build dataclass `cls` from the flags `add_dataclass_options` made (plus `extra` fields)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **extra})


def one_line(exc: BaseException) -> str:
    """An error as one readable line: OS errors say what failed on which file."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror
    return " ".join(str(exc).split("\n")) if str(exc) else type(exc).__name__
