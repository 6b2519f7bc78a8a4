"""A real S3 server on the loopback interface for the tests: moto's server mode (``moto[server]``,
in the dev extra) in its own process, with IAM authentication on, so wrong credentials and missing
permissions fail as they do on a real endpoint.

``s3_server`` (one per test session) starts it on a free port and creates two users: one that may
do anything, one that may only read. ``s3`` (one per test) creates a fresh bucket and points the
standard AWS settings (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) of this process, and so
of every process the test starts, at the server as the first user.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

_ALLOW_ALL = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
_READ_ONLY = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket",
                                                           "s3:HeadBucket", "s3:ListAllMyBuckets"],
                             "Resource": "*"}]}
_SETUP_ACTIONS = 6
"""Requests the server answers without authentication: the two users' creation below."""


@dataclass
class S3Server:
    endpoint: str
    writer: dict
    reader: dict
    """``{"AWS_ACCESS_KEY_ID": ..., "AWS_SECRET_ACCESS_KEY": ...}`` of each user."""

    def env(self, keys: dict) -> dict:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1", **keys}

    def user(self, policy: dict) -> dict:
        """A new user with ``policy`` (an IAM policy document, checked by the server on every
        request): its keys, as ``writer`` and ``reader`` are."""
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id=self.writer["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key=self.writer["AWS_SECRET_ACCESS_KEY"])
        name = f"user-{uuid.uuid4().hex[:12]}"
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

    def client(self, keys: dict | None = None):
        import boto3

        keys = keys or self.writer
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])


def _wait_for(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited: {log.read_text(errors='replace')[-2000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("moto server did not start")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    import boto3

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_ACTIONS)}
    # The server logs a line per request on stderr: into a file, never a pipe nobody reads (a
    # full pipe blocks the server's next write, and with it every request after it).
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        _wait_for(port, proc, log)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        users = {}
        for name, policy in (("writer", _ALLOW_ALL), ("reader", _READ_ONLY)):
            iam.create_user(UserName=name)
            iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=name)["AccessKey"]
            users[name] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                           "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
        yield S3Server(endpoint, users["writer"], users["reader"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Bucket:
    server: S3Server
    name: str

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.name}/{prefix}".rstrip("/")

    def keys(self, prefix: str = "") -> dict[str, int]:
        client = self.server.client()
        found = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            found.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
        return found

    def text(self, key: str) -> str:
        return self.server.client().get_object(Bucket=self.name, Key=key)["Body"].read().decode()


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """A new bucket, and this process's AWS settings pointing at it as the writing user."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("MEGASMOL_S3_CACHE", str(tmp_path / "s3-cache"))
    for key, value in s3_server.env(s3_server.writer).items():
        monkeypatch.setenv(key, value)
    return Bucket(s3_server, name)
