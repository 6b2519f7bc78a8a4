"""Objects in S3-compatible storage (``s3://bucket/prefix``): the one place megasmol talks to a
bucket, through boto3.

Where and as whom come from the standard AWS settings, read by boto3 itself: the endpoint
(``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, or the profile's ``endpoint_url``), the profile
(``AWS_PROFILE``), credentials (the environment, the profile, an instance role: boto3's chain),
the region, and retries (``AWS_MAX_ATTEMPTS`` and ``AWS_RETRY_MODE``, or the profile's
``max_attempts`` and ``retry_mode``). megasmol only sets a short connect timeout and, when neither
the environment nor the profile gives them, 3 attempts in boto3's standard mode, so that an
unreachable endpoint is one line within seconds rather than a minute of silent retries; the access
check before training (:meth:`ObjectStore.check_access`) also waits at most
``CHECK_READ_TIMEOUT_S`` for each answer, so an endpoint that takes the connection and never
answers is one line within seconds too (the transfers keep a 60 s read timeout: a large part may
take that long). A profile that does not exist is one line too. Nothing secret is ever printed: a
failure names the URL, the endpoint and the service's error code.

A directory uploads as one object per file (multipart above 64 MiB, in parallel parts) and is
verified: each object's size is read back and compared with the file's, and the sha256 of every
file goes into a manifest object written after all of them, which a download checks again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from megasmol.errors import RunFailure
from megasmol.utils.s3_url import S3Url, StoreError

MANIFEST = "megasmol-manifest.json"
"""Written last into an uploaded directory: its files' sizes and sha256. A directory without it
is incomplete (an upload was interrupted)."""
MULTIPART_BYTES = 64 * 2**20
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
CHECK_READ_TIMEOUT_S = 5.0
"""The access check's read timeout: its calls are tiny (a HEAD, an empty PUT, a DELETE)."""
DEFAULT_ATTEMPTS = 3


class UploadFailed(RunFailure):
    """An upload or download did not complete (the previous ``latest`` stays as it was)."""


def make_client(read_timeout: float = READ_TIMEOUT_S):
    """An S3 client from the standard AWS settings (module docstring)."""
    try:
        import boto3
        import botocore.session
        from botocore.config import Config
        from botocore.exceptions import ProfileNotFound
    except ImportError:
        raise StoreError("s3:// checkpoints need boto3: pip install 'megasmol[s3]'") from None
    try:
        core = botocore.session.Session()
        # The retry settings of the environment or the profile win; megasmol's only where neither
        # gives one. botocore's "total_max_attempts" counts the first request, as AWS_MAX_ATTEMPTS
        # does (its "max_attempts" would count the retries only: one attempt more).
        retries: dict = {}
        if core.get_config_variable("retry_mode") is None:
            retries["mode"] = "standard"
        if core.get_config_variable("max_attempts") is None:
            retries["total_max_attempts"] = DEFAULT_ATTEMPTS
        config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=read_timeout,
                        retries=retries or None)
        return boto3.session.Session(botocore_session=core).client("s3", config=config)
    except ProfileNotFound as exc:
        raise StoreError(f"AWS_PROFILE: {exc}") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(local: Path) -> dict[str, Path]:
    return {p.relative_to(local).as_posix(): p for p in sorted(local.rglob("*")) if p.is_file()}


class ObjectStore:
    """The objects under one ``s3://bucket/prefix``."""

    def __init__(self, url: S3Url, client=None):
        self.url = url
        self.client = client if client is not None else make_client()
        self._own_client = client is None

    @property
    def endpoint(self) -> str:
        return self.client.meta.endpoint_url

    def describe(self, exc: BaseException) -> str:
        """One line for a failed call: the service's error code, or why the endpoint was not
        reached (never a credential)."""
        from botocore.exceptions import (
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ProfileNotFound,
            ReadTimeoutError,
        )

        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = error.get("Code") or "error"
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            meaning = {"NoSuchBucket": f"bucket {self.url.bucket} does not exist",
                       "404": f"bucket {self.url.bucket} does not exist",
                       "InvalidAccessKeyId": "the endpoint does not know the access key (wrong credentials?)",
                       "SignatureDoesNotMatch": "the secret key does not match (wrong credentials?)",
                       "AccessDenied": "access denied (no permission for this bucket or prefix)",
                       "403": "access denied (wrong credentials, or no permission for this bucket)",
                       }.get(str(code), f"{code}: {error.get('Message') or ''}".strip(": "))
            return f"{meaning} (HTTP {status})" if status else meaning
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
            return (f"cannot reach the endpoint {self.endpoint} (AWS_ENDPOINT_URL_S3 / "
                    "AWS_ENDPOINT_URL, or the profile's endpoint_url)")
        if isinstance(exc, ReadTimeoutError):
            return (f"the endpoint {self.endpoint} took the connection but did not answer within "
                    f"{self.client.meta.config.read_timeout:g} s (is it an S3 endpoint, and is it up?)")
        if isinstance(exc, NoCredentialsError):
            return "no AWS credentials found (AWS_ACCESS_KEY_ID / AWS_PROFILE / an instance role)"
        if isinstance(exc, ProfileNotFound):
            return f"AWS_PROFILE: {exc}"
        cause = exc.__cause__ or exc.__context__
        if isinstance(exc, self._errors()) and isinstance(cause, self._errors()):
            return self.describe(cause)  # boto3's transfer errors wrap the service's answer
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__

    def _errors(self):
        """What a call to the bucket raises when it fails: botocore's errors, and boto3's
        transfer errors (an upload the service refused is ``S3UploadFailedError``)."""
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError, Boto3Error)

    def check_access(self, what: str, write: bool = True) -> None:
        """Raise a StoreError naming ``what`` unless the bucket exists, is reachable with these
        credentials, and (``write``) takes a new object under the prefix."""
        probe = self.url.key(f".megasmol-probe-{os.getpid()}")
        client = make_client(CHECK_READ_TIMEOUT_S) if self._own_client else self.client
        try:
            client.head_bucket(Bucket=self.url.bucket)
            if write:
                client.put_object(Bucket=self.url.bucket, Key=probe, Body=b"")
                client.delete_object(Bucket=self.url.bucket, Key=probe)
            else:
                client.list_objects_v2(Bucket=self.url.bucket, Prefix=self.url.key(""), MaxKeys=1)
        except self._errors() as exc:
            raise StoreError(f"{what}: {self.url}: {ObjectStore(self.url, client).describe(exc)}") from None

    # ---- objects -----------------------------------------------------------------------------

    def list(self, under: str = "") -> dict[str, int]:
        """Every object below ``under`` (relative to the prefix): relative key -> size."""
        base = self.url.key(under)
        start = base + "/" if base else ""
        found: dict[str, int] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.url.bucket, Prefix=start):
            for item in page.get("Contents", []):
                found[item["Key"][len(start):]] = item["Size"]
        return found

    def children(self) -> list[str]:
        """The names of the "folders" directly under the prefix."""
        start = self.url.key("") + "/" if self.url.prefix else ""
        names: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.url.bucket, Prefix=start, Delimiter="/"):
            names += [p["Prefix"][len(start):].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return names

    def read_text(self, name: str) -> Optional[str]:
        """The object ``name`` (relative to the prefix) as text, or None when there is none."""
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.url.bucket, Key=self.url.key(name))["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return body.read().decode()

    def write_text(self, name: str, text: str) -> None:
        """One small object in one PUT: readers see the old or the new content, never a part."""
        self.client.put_object(Bucket=self.url.bucket, Key=self.url.key(name), Body=text.encode())

    def delete(self, under: str) -> int:
        """Delete every object below ``under`` (relative to the prefix); returns how many."""
        keys = [self.url.key(under, rel) for rel in self.list(under)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            self.client.delete_objects(Bucket=self.url.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(keys)

    # ---- directories -------------------------------------------------------------------------

    def upload_dir(self, local: Path, name: str, on_file=None) -> dict:
        """Upload directory ``local`` to ``name`` (relative to the prefix), verify every object's
        size, then write the manifest (sizes and sha256) last; returns the manifest. Raises
        UploadFailed naming the first object that failed (the manifest is then not written).
        ``on_file(relative_name)``: called before each file (the tests' fault seam)."""
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)
        files = _files(Path(local))
        manifest = {"files": {}}
        for rel, path in files.items():
            if on_file is not None:
                on_file(rel)
            try:
                self.client.upload_file(str(path), self.url.bucket, self.url.key(name, rel), Config=transfer)
            except (*self._errors(), OSError) as exc:
                raise UploadFailed(f"{self.url.child(name, rel)} was not written: "
                                   f"{self.describe(exc)}") from None
            manifest["files"][rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
        stored = self.list(name)
        for rel, entry in manifest["files"].items():
            if stored.get(rel) != entry["size"]:
                raise UploadFailed(f"{self.url.child(name, rel)}: {stored.get(rel)} bytes in the bucket, "
                                   f"{entry['size']} written (the upload did not verify)")
        self.write_text(f"{name}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True))
        return manifest

    def manifest(self, name: str) -> Optional[dict]:
        """The manifest of uploaded directory ``name``, or None when its upload did not finish."""
        text = self.read_text(f"{name}/{MANIFEST}")
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None

    def download_dir(self, name: str, local: Path) -> None:
        """Download uploaded directory ``name`` into ``local`` (created; existing files are
        replaced), checking every file against the manifest. Raises UploadFailed when the
        directory is incomplete or a file does not match."""
        manifest = self.manifest(name)
        if manifest is None:
            raise UploadFailed(f"{self.url.child(name)}: incomplete (no {MANIFEST}: its upload did "
                               "not finish)")
        local = Path(local)
        for rel, entry in manifest["files"].items():
            target = local / rel
            if not target.resolve().is_relative_to(local.resolve()) or rel.startswith("/"):
                raise UploadFailed(f"{self.url.child(name)}/{MANIFEST}: names {rel!r}, outside the "
                                   "directory (refused)")
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.client.download_file(self.url.bucket, self.url.key(name, rel), str(target))
            except (*self._errors(), OSError) as exc:
                raise UploadFailed(f"downloading {self.url.child(name, rel)} failed: "
                                   f"{self.describe(exc)}") from None
            if target.stat().st_size != entry["size"] or _sha256(target) != entry["sha256"]:
                raise UploadFailed(f"{self.url.child(name, rel)} does not match its manifest "
                                   "(size or sha256): the object was changed or damaged")
