"""`loragate bench`, a multi-adapter load generator: `workload` (the seeded request sequence, traces), `client` (one
timed streamed request), `scrape` (the gateway's adapter counters), `runner` (targets x rounds), `report` (summaries,
JSON, text), `plot` (the PNG), `cli` (the subcommand). Library use: `loragate.bench.runner.run_bench(config)`.

Only argparse-level code is imported here, so `loragate --help` stays fast.
"""

from loragate.bench.cli import register
from loragate.bench.config import BenchError
from loragate.bench.workload import WorkloadError

# What `loragate bench` prints as one line (`error: ...`, exit status 2): bad flags, traces, unreachable targets.
USER_ERRORS = (BenchError, WorkloadError)

__all__ = ["USER_ERRORS", "register"]
