"""The `loragate` command: one root parser; each package contributes its subcommands.

Subcommand modules must stay light to import (argparse only): heavy imports happen inside the handlers, so
`loragate registry list` does not load torch. Each declares `USER_ERRORS` next to its `register()`: the exception
classes of its own package that mean a failure the user can fix (each `str()` one line). `main` prints those as
`error: ...` with exit status 2; any other exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

# (module, function) pairs that add subcommands to the root parser, in help order.
SUBCOMMAND_MODULES = (
    "training.cli",
    "training.merge_cli",
    "adapters_registry.cli",
    "gateway.cli",
    "gateway.keys_cli",
    "loragate.demo",
    "loragate.dev",
    "loragate.bench",
)

Handler = Callable[[argparse.Namespace], int]
USER_ERROR_STATUS = 2


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loragate", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging (and the INFO lines of every command)"
    )
    parser.add_argument("--version", action="version", version=f"loragate {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        known = set(sub.choices)
        module.register(sub)
        user_errors: tuple[type[Exception], ...] = getattr(module, "USER_ERRORS", ())  # none: tracebacks only
        for command in set(sub.choices) - known:
            sub.choices[command].set_defaults(user_errors=user_errors)
    return parser


def version() -> str:
    """The installed distribution's version (what pip and `loragate --version` report), else the package's own."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("loragate")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from loragate import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    # A command prints what was asked for; log lines only when they are its output (serve, train, merge, demo set
    # `log_level` INFO) or with -v.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else getattr(args, "log_level", logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    handler: Handler = args.handler
    user_errors: tuple[type[Exception], ...] = args.user_errors
    try:
        return handler(args)
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_STATUS
    except KeyboardInterrupt:
        return 130
