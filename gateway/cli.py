"""`loragate serve`: run the gateway (managed vLLM engines, or external ones by URL/DNS/file).

loragate serve --base tiny --port 8000 --engines 2 --max-loras 4 [--registry DIR]
loragate serve --config gateway.yaml
loragate serve --engine-url http://10.0.0.5:8000 --base-name tiny      # external mode
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from adapters_registry.errors import RegistryError
from gateway.errors import StartupError

# What `loragate serve` prints as one line (`error: ...`, exit status 2) instead of a traceback.
USER_ERRORS = (StartupError, RegistryError)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(handler=serve, log_level=logging.INFO)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", type=Path, help="YAML settings file (flags and LORAGATE_* env override it)")
    parser.add_argument("--base", help="registry base name or model directory (managed mode)")
    parser.add_argument("--base-name", help="served name of the base model")
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default 8000)")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics on this port instead of the API port")
    parser.add_argument("--registry", help="registry location (directory or s3://bucket/prefix)")
    parser.add_argument("--engines", type=int, dest="engine_count", metavar="N", help="number of managed vLLM engines")
    parser.add_argument("--max-loras", type=int, help="adapters per batch in each engine")
    parser.add_argument("--max-cpu-loras", type=int, help="adapters resident per engine (default: --max-loras)")
    parser.add_argument(
        "--max-registered-loras",
        type=int,
        help="adapters kept registered per engine (default: --max-cpu-loras; above it vLLM's own cache reloads them)",
    )
    parser.add_argument("--max-lora-rank", type=int, help="largest adapter rank the engines accept")
    parser.add_argument(
        "--max-model-len",
        type=int,
        metavar="N",
        help="context length of the managed engines (default: the base's own, at most engines.max_model_len_cap)",
    )
    parser.add_argument(
        "--tool-call-parser",
        metavar="NAME",
        help="vLLM tool-call parser of the managed engines: auto (from the base's chat template; the default), "
        "none, or a vLLM parser name (hermes, llama3_json, mistral, ...)",
    )
    parser.add_argument(
        "--enable-auto-tool-choice",
        action=argparse.BooleanOptionalAction,
        default=None,
        help='vLLM --enable-auto-tool-choice (tool_choice "auto"); default: on whenever a parser is in use',
    )
    parser.add_argument(
        "--chat-template", metavar="FILE", help="chat template for the managed engines instead of the base's own"
    )
    parser.add_argument("--pin", action="append", default=[], metavar="REF", help="pinned adapter (repeatable)")
    parser.add_argument(
        "--prewarm",
        action="append",
        default=[],
        metavar="REF",
        help="adapter (or glob over names, '*' for all) each engine loads its share of before traffic (repeatable)",
    )
    parser.add_argument(
        "--engine-url",
        action="append",
        default=[],
        metavar="URL",
        help="external engine URL (repeatable; implies external mode)",
    )
    parser.add_argument("--discovery-dns", metavar="HOST", help="headless-service name listing external engines")
    parser.add_argument("--discovery-port", type=int, help="engine port for --discovery-dns")
    parser.add_argument("--discovery-file", type=Path, help="file with one external engine URL per line")
    parser.add_argument(
        "--workers", type=int, metavar="N", help="processes serving the completion routes (default 1; see README)"
    )
    return parser


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags as nested settings overrides (only the flags that were given)."""
    engines = {
        "count": args.engine_count,
        "max_loras": args.max_loras,
        "max_cpu_loras": args.max_cpu_loras,
        "max_registered_loras": args.max_registered_loras,
        "max_lora_rank": args.max_lora_rank,
        "max_model_len": args.max_model_len,
        "tool_call_parser": args.tool_call_parser,
        "enable_auto_tool_choice": args.enable_auto_tool_choice,
        "chat_template": args.chat_template,
    }
    external = {
        "urls": args.engine_url or None,
        "discovery_host": args.discovery_dns,
        "discovery_port": args.discovery_port,
        "discovery_file": args.discovery_file,
    }
    if args.engine_url or args.discovery_dns or args.discovery_file:
        external.update(
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            max_registered_loras=args.max_registered_loras,
            max_lora_rank=args.max_lora_rank,
        )
        engines = {}
    result: dict[str, Any] = {
        "base": args.base,
        "base_name": args.base_name,
        "host": args.host,
        "port": args.port,
        "metrics_port": args.metrics_port,
        "registry": args.registry,
        "mode": "external" if (args.engine_url or args.discovery_dns or args.discovery_file) else None,
        "engines": {k: v for k, v in engines.items() if v is not None} or None,
        "external": {k: v for k, v in external.items() if v is not None} or None,
        "adapters": {
            **({"pinned": args.pin} if args.pin else {}),
            **({"prewarm": args.prewarm} if args.prewarm else {}),
        }
        or None,
        "workers": getattr(args, "workers", None),
    }
    return result


def lean_log_records() -> None:
    """The gateway's log format names no thread, process or source line: stop logging from looking them up for every
    record (the logging HOWTO's "Optimization"), since a usage line per request makes that cost count."""
    import logging

    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no caller lookup (findCaller)


def freeze_heap() -> None:
    """Move what start-up built (modules, settings, the registry client) out of the collector's reach, as vLLM's API
    server does before it serves: a full collection then scans only what requests made, not the whole process
    (about 15 ms for the imports alone here), so it no longer pauses the requests in flight for that long."""
    import gc

    gc.collect()
    gc.freeze()


def serve(args: argparse.Namespace) -> int:
    import logging
    import tempfile

    from pydantic import ValidationError

    from adapters_registry import open_registry
    from gateway.app import create_app
    from gateway.base_model import resolve_served_base
    from gateway.metrics_server import MetricsPortError, bind
    from gateway.security import choose_bind
    from gateway.server import gateway_server
    from gateway.settings import load_settings

    try:
        settings = load_settings(args.config, **overrides(args))
    except FileNotFoundError as exc:
        raise StartupError(str(exc)) from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise StartupError(f"invalid settings{' (' + where + ')' if where else ''}: {first['msg']}") from exc
    registry = open_registry(settings.registry)
    resolve_served_base(settings, registry)  # a wrong --base is a one-line error here, not a traceback at start-up
    if not registry.list_bases() and not registry.adapter_names():  # a mistyped location reads as empty
        logging.getLogger("gateway").warning(
            "the registry at %s holds no base and no adapter: only the base model will be served", registry.location
        )
    for ref in settings.adapters.pinned:  # a pin of a version that does not exist, likewise
        registry.resolve(ref)
    for ref in settings.adapters.prewarm:  # and a prewarm reference (a glob pattern may match nothing yet)
        if not any(char in ref for char in "*?["):
            registry.resolve_split(ref)
    # Local mode (no API keys in the registry's store) stays on loopback unless security.allow_open_bind is set.
    host, warning = choose_bind(settings.security, registry.store, settings.host)
    if warning:
        logging.getLogger("gateway").warning("%s", warning)
    settings = settings.model_copy(update={"host": host})  # the metrics port binds where the API does
    if settings.metrics_port is not None:
        bind(host, settings.metrics_port).close()  # a taken port is a one-line error, not a failed start-up
    if settings.workers > 1:  # the primary: workers serve the public port, it serves them on a Unix socket
        try:
            bind(host, settings.port).close()
        except MetricsPortError as exc:
            raise StartupError(str(exc).replace("/metrics", "the gateway")) from exc
        worker_dir = Path(tempfile.mkdtemp(prefix="loragate-workers-"))
        app = create_app(settings, registry=registry, worker_dir=worker_dir)
        server = gateway_server(app, uds=str(worker_dir / "primary.sock"), log_level="info", access_log=False)
    else:
        app = create_app(settings, registry=registry)
        server = gateway_server(
            app,
            host=host,
            port=settings.port,
            timeout_keep_alive=settings.keep_alive_s,
            log_level="info",
            access_log=False,
        )
    lean_log_records()
    freeze_heap()
    server.run()
    return 0
