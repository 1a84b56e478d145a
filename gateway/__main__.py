"""`python -m gateway [FLAGS]`: the same as `loragate serve [FLAGS]`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from gateway import cli


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway", description=cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    args = cli.add_arguments(parser).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return cli.serve(args)
    except cli.USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
