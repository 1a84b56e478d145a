"""`python -m gateway [FLAGS]`: the same as `loragate serve [FLAGS]`."""

from __future__ import annotations

import sys

from loragate.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["serve", *sys.argv[1:]]))
