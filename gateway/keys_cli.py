"""`loragate keys create|list|revoke`: manage the gateway's API keys in the registry's store.

    loragate keys create --name acme --adapters 'acme*' --rpm 60 --expires 2027-01-31   # prints the key once
    loragate keys list [--json]
    loragate keys revoke <key id or name>

Every action is written to the audit log (logger ``loragate.audit`` and the store's ``audit/`` prefix).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from gateway.keys import KeyStoreError

if TYPE_CHECKING:
    from adapters_registry.audit import AuditLog
    from gateway.keys import KeyStore

# What `loragate keys` prints as one line (`error: ...`, exit status 2) instead of a traceback.
USER_ERRORS = (KeyStoreError,)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("keys", help="create, list and revoke gateway API keys")
    keys = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    def with_registry(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--registry", default=None, help="registry location (default: $LORAGATE_REGISTRY)")
        return p

    create = with_registry(keys.add_parser("create", help="create a key and print it once"))
    create.add_argument("--name", required=True, help="a label for the key (unique among active keys)")
    create.add_argument("--adapters", default="*", help="comma-separated adapter name globs, e.g. 'acme*,bot'")
    create.add_argument("--bases", default="*", help="comma-separated base model name globs")
    create.add_argument("--rpm", type=int, default=None, help="requests per minute")
    create.add_argument("--tpm", type=int, default=None, help="tokens (prompt + completion) per minute")
    create.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at once")
    create.add_argument("--expires", default=None, help="ISO date (valid through that UTC day) or datetime")
    create.add_argument("--admin", action="store_true", help="may use /admin/*, load/unload adapters, write")
    create.set_defaults(handler=run_create)

    listing = with_registry(keys.add_parser("list", help="list keys (never the secrets)"))
    listing.add_argument("--json", action="store_true", help="one JSON array of the keys' public records")
    listing.set_defaults(handler=run_list)

    revoke = with_registry(keys.add_parser("revoke", help="revoke a key by id or name"))
    revoke.add_argument("key", help="key id or name")
    revoke.set_defaults(handler=run_revoke)


def _open(location: str | None) -> tuple[KeyStore, AuditLog]:
    from adapters_registry import open_registry
    from adapters_registry.audit import AuditLog
    from gateway.keys import KeyStore

    store = open_registry(location).store
    return KeyStore(store, cache_ttl_s=0), AuditLog.for_cli(store)


def run_create(args: argparse.Namespace) -> int:
    from adapters_registry.audit import cli_actor
    from gateway.keys import parse_expiry, parse_patterns

    keys, audit = _open(args.registry)
    try:
        expires = parse_expiry(args.expires, datetime.now(UTC)) if args.expires else None
        created = keys.create(
            args.name,
            adapters=parse_patterns(args.adapters),
            bases=parse_patterns(args.bases),
            rpm=args.rpm,
            tpm=args.tpm,
            max_concurrency=args.max_concurrency,
            expires_at=expires,
            admin=args.admin,
        )
    except KeyStoreError as exc:
        audit.record(cli_actor(), "keys.create", args.name, "error", error=str(exc))
        raise
    audit.record(cli_actor(), "keys.create", created.record.key_id, "ok", details=created.record.public())
    print(created.secret)
    print(
        f"created key {created.record.key_id} ({created.record.name}); it is shown only now, store it safely",
        file=sys.stderr,
    )
    return 0


def run_list(args: argparse.Namespace) -> int:
    keys, _ = _open(args.registry)
    now = datetime.now(UTC)
    records = keys.list()
    if args.json:  # one JSON document, as every other --json prints
        print(json.dumps([record.public() for record in records], sort_keys=True, indent=1))
        return 0
    for record in records:
        state = (
            "revoked" if record.revoked else "expired" if record.expires_at and record.expires_at <= now else "active"
        )
        limits = " ".join(
            f"{label}={value}"
            for label, value in (("rpm", record.rpm), ("tpm", record.tpm), ("conc", record.max_concurrency))
            if value is not None
        )
        expires = record.expires_at.isoformat() if record.expires_at else "never"
        print(
            f"{record.key_id}  {record.name}  {state}{'  admin' if record.admin else ''}  "
            f"adapters={','.join(record.adapters) or '-'}  bases={','.join(record.bases) or '-'}  "
            f"expires={expires}{'  ' + limits if limits else ''}"
        )
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    from adapters_registry.audit import cli_actor

    keys, audit = _open(args.registry)
    try:
        record = keys.revoke(args.key)
    except KeyStoreError as exc:
        audit.record(cli_actor(), "keys.revoke", args.key, "error", error=str(exc))
        raise
    audit.record(cli_actor(), "keys.revoke", record.key_id, "ok", details={"name": record.name})
    print(f"revoked {record.key_id} ({record.name})")
    return 0
