"""``s3://bucket/prefix`` addresses: parsing and checking them needs no S3 client, so config
validation and the CLI can use it (the client and transfers are ``ckpt.object_store``'s)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from megasmol.errors import UserError

SCHEME = "s3://"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

__all__ = ["SCHEME", "S3Url", "StoreError", "is_url", "parse"]


class StoreError(UserError):
    """The bucket cannot be used as given (missing, no access, unreachable): exit code 2."""


def is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


@dataclass(frozen=True)
class S3Url:
    bucket: str
    prefix: str
    """Without leading or trailing ``/`` (empty: the bucket's top)."""

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")

    def key(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in (self.prefix, *parts) if p.strip("/"))

    def child(self, *parts: str) -> S3Url:
        return S3Url(self.bucket, self.key(*parts))

    def parent(self) -> S3Url:
        return S3Url(self.bucket, self.prefix.rpartition("/")[0])

    @property
    def name(self) -> str:
        return self.prefix.rpartition("/")[2]


def parse(url: str, what: str = "URL") -> S3Url:
    """``s3://bucket/prefix`` (``what``: the field or option it came from, for the error)."""
    if not is_url(url):
        raise StoreError(f"{what}: {url} is not an s3:// URL")
    bucket, _, prefix = url[len(SCHEME):].partition("/")
    if not _BUCKET.match(bucket):
        raise StoreError(f"{what}: {url}: {bucket!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise StoreError(f"{what}: {url}: empty, '.' or '..' parts in the prefix")
    return S3Url(bucket, prefix)
