"""`python -m loragate COMMAND ...`: the same as `loragate COMMAND ...` (what `accelerate launch -m loragate train`
starts in each process)."""

from loragate.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
