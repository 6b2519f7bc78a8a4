"""A local S3-compatible server for trying ``checkpoint.dir: s3://...`` without a cloud account
(docs/checkpoints.md runs it): moto's server mode (``pip install 'moto[server]'``, in the dev extra)
on the loopback interface, with one bucket.

    python tools/local_s3.py start --dir runs/s3 --port 5055 --bucket demo-ckpts
    . runs/s3/aws.env      # the standard AWS settings pointing at it
    python tools/local_s3.py stop --dir runs/s3

``start`` leaves the server running in the background (its process id in ``DIR/server.pid``, its
log in ``DIR/server.log``) and writes ``DIR/aws.env``: ``AWS_ENDPOINT_URL`` and test credentials
(moto accepts any), and ``MEGASMOL_S3_CACHE`` (where readers keep downloaded checkpoints).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def start(folder: Path, port: int, bucket: str) -> None:
    import boto3

    folder.mkdir(parents=True, exist_ok=True)
    log = open(folder / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    (folder / "server.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the S3 server did not start: see {folder / 'server.log'}")
        time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    settings = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AWS_DEFAULT_REGION": "us-east-1", "MEGASMOL_S3_CACHE": str(folder / "cache")}
    (folder / "aws.env").write_text("".join(f"export {k}={v}\n" for k, v in settings.items()))
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket=bucket)
    print(f"S3 server on {endpoint} with bucket {bucket}; its settings: . {folder / 'aws.env'}")


def stop(folder: Path) -> None:
    pid_file = folder / "server.pid"
    if not pid_file.is_file():
        raise SystemExit(f"no server started from {folder} ({pid_file} is missing)")
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    pid_file.unlink()
    print("stopped the S3 server")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, default=Path("runs/s3"), help="pid, log and settings")
    parser.add_argument("--port", type=int, default=5055)
    parser.add_argument("--bucket", default="demo-ckpts")
    args = parser.parse_args()
    if args.action == "start":
        start(args.dir, args.port, args.bucket)
    else:
        stop(args.dir)


if __name__ == "__main__":
    main()
