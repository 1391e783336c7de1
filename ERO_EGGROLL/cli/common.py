"""What every command shares: the `--config`/`--set` arguments and the one error path.

A refusal anywhere in the package is an `EggrollError` whose message is one line that says what was wrong, where,
and what to do. `command` turns it into that line on stderr and exit code 2, so no command repeats the handling and
none can end a refusal in a traceback (a real bug still shows one).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from ERO_EGGROLL.config import Config, load_config
from ERO_EGGROLL.core.errors import EggrollError


class Main(Protocol):
    """A command's entry point: the arguments (sys.argv's when None) in, the exit code out."""

    def __call__(self, argv: Sequence[str] | None = None) -> int: ...


def command(body: Callable[[Sequence[str] | None], int]) -> Main:
    """The command's `main`: its body, with every EggrollError printed as `error: <line>` and exit code 2."""

    @functools.wraps(body)
    def main(argv: Sequence[str] | None = None) -> int:
        try:
            return body(argv)
        except EggrollError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return main


def add_config_arguments(parser: argparse.ArgumentParser, *, required: bool = True, default: str | None = None) -> None:
    """`--config PATH` and repeatable `--set SECTION.KEY=VALUE`, spelled the same in every command."""
    parser.add_argument(
        "--config",
        required=required and default is None,
        default=default,
        help="YAML config (configs/default.yaml, smoke.yaml, ero.yaml, qwen2_5_vl_7b.yaml)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value"
    )


def config_of(args: argparse.Namespace) -> Config:
    """The run config that `--config` and `--set` name (a ConfigError names the file or the setting)."""
    return load_config(args.config, args.set)
