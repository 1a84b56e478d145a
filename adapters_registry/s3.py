"""The S3 backend (any S3-compatible server): keys under `s3://bucket/prefix/`.

Create-only writes use a conditional put (`IfNoneMatch="*"`), alias updates a conditional put on the ETag
(`IfMatch`), so no lock service is needed. Blobs are content-addressed, so they are uploaded with an existence check
and a plain (multipart-capable) upload: two writers of one blob write the same bytes. `touch` copies an object onto
itself with `MetadataDirective=REPLACE` (S3 refuses a plain self-copy), which gives it a new LastModified; ages are
measured on the server's clock (the `Date` header), not this machine's. The endpoint comes from
$LORAGATE_S3_ENDPOINT_URL or $AWS_ENDPOINT_URL; credentials from the usual AWS variables or files.

Timeouts are explicit (botocore's defaults, 60 s per connect and per read with up to 4 retries, would hold a request
for minutes when the server hangs): a connect gives up after CONNECT_TIMEOUT_S, a read that receives nothing for
READ_TIMEOUT_S, and one retry is made. Registry records are small; blob transfers are chunked, so the read timeout
bounds the silence between chunks, not the transfer.
"""

from __future__ import annotations

import email.utils
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adapters_registry.errors import StorageError
from adapters_registry.store import ObjectStat, ObjectStore, check_storage_key

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 5.0
MAX_ATTEMPTS = 2  # botocore's "standard" retry mode counts the first try

_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
_MISSING = {"NoSuchKey", "404", "NotFound"}


def _code(exc: Exception) -> str:
    response: dict[str, Any] = getattr(exc, "response", {}) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3Store(ObjectStore):
    def __init__(self, bucket: str, prefix: str = "", client: Any = None, endpoint_url: str | None = None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.location = f"s3://{bucket}/{self.prefix}".rstrip("/")
        endpoint = endpoint_url or os.environ.get("LORAGATE_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL")
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        )
        self.client: Any = client or boto3.client("s3", endpoint_url=endpoint or None, config=config)

    @classmethod
    def from_url(cls, url: str) -> S3Store:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise StorageError(f"{url}: expected s3://BUCKET[/PREFIX]")
        return cls(bucket, prefix)

    def _key(self, key: str) -> str:
        return self.prefix + check_storage_key(key)

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            raise StorageError(f"{self.location}/{key}: {_code(exc) or 'error'}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"{self.location}/{key}: {exc}") from exc

    def get_with_token(self, key: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        with self._errors(key):
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return None
                raise
            return obj["Body"].read(), str(obj["ETag"])

    def get_bytes(self, key: str) -> bytes | None:
        got = self.get_with_token(key)
        return None if got is None else got[0]

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(key):
            try:
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return False
                raise
            return True

    def _conditional_put(self, key: str, data: bytes, **condition: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(key):
            try:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
            except ClientError as exc:
                if condition and _code(exc) in _PRECONDITION:
                    return False
                raise
            return True

    def put_bytes(self, key: str, data: bytes, if_absent: bool = False) -> bool:
        return self._conditional_put(key, data, **({"IfNoneMatch": "*"} if if_absent else {}))

    def put_if_match(self, key: str, data: bytes, token: str | None) -> bool:
        return self._conditional_put(key, data, **({"IfMatch": token} if token else {"IfNoneMatch": "*"}))

    def put_file(self, key: str, path: Path, if_absent: bool = False) -> bool:
        if if_absent and self.exists(key):
            return False
        with self._errors(key):
            self.client.upload_file(str(path), self.bucket, self._key(key))
        return True

    def get_file(self, key: str, dest: Path) -> bool:
        from botocore.exceptions import ClientError

        with self._errors(key):
            try:
                self.client.download_file(self.bucket, self._key(key), str(dest))
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return False
                raise
        return True

    def probe(self) -> bool:
        with self._errors(""):
            listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        return bool(listing.get("KeyCount") or listing.get("Contents"))

    def list_children(self, prefix: str) -> list[str]:
        names: set[str] = set()
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix, Delimiter="/"
            )
            for page in pages:
                start = len(self.prefix + prefix)
                names.update(p["Prefix"][start:].rstrip("/") for p in page.get("CommonPrefixes", []))
                names.update(obj["Key"][start:] for obj in page.get("Contents", []))
        return sorted(names)

    def list_keys(self, prefix: str) -> list[str]:
        keys: list[str] = []
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                keys.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        with self._errors(key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def stats(self, prefix: str) -> dict[str, ObjectStat]:
        out: dict[str, ObjectStat] = {}
        with self._errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(self.prefix) :]] = ObjectStat(int(obj["Size"]), obj["LastModified"].timestamp())
        return out

    def now(self) -> float:
        with self._errors(""):
            response = self.client.head_bucket(Bucket=self.bucket)
        date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not date:
            log.warning("%s: no Date header; measuring ages on this machine's clock", self.location)
            return time.time()
        return email.utils.parsedate_to_datetime(date).timestamp()

    def touch(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        source = {"Bucket": self.bucket, "Key": self._key(key)}
        with self._errors(key):
            try:  # the managed copy switches to a multipart copy above 5 GB, where copy_object would fail
                self.client.copy(source, self.bucket, self._key(key), ExtraArgs={"MetadataDirective": "REPLACE"})
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return False
                raise
        return True

    def delete_if_older(self, key: str, cutoff: float) -> bool:
        from botocore.exceptions import ClientError

        # S3 has no conditional delete on age: a touch landing between these two requests is lost (see gc.py)
        with self._errors(key):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return False
                raise
            if head["LastModified"].timestamp() > cutoff:
                return False
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        return True
