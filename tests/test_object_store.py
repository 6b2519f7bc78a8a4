"""The storage layer against a real S3 server on the loopback interface (tests/s3_fixtures.py)."""

import json
import shutil
import time

import pytest

from megasmol.ckpt.object_store import MANIFEST, ObjectStore, UploadFailed
from megasmol.ckpt.remote import RemoteCheckpoints, fetch
from megasmol.utils.s3_url import StoreError, parse
from tests.conftest import cli_in_process


def _iteration(root, name, size=1000, extra=b""):
    it = root / name
    (it / "tokenizer").mkdir(parents=True)
    (it / "__0_0.distcp").write_bytes(bytes(range(256)) * (size // 256) + extra)
    (it / "megasmol.json").write_text('{"format": 1}')
    (it / "tokenizer" / "tokenizer.json").write_text("{}")
    return it


def test_parse():
    url = parse("s3://my-bucket/runs/a/")
    assert (url.bucket, url.prefix, str(url), url.key("latest")) == ("my-bucket", "runs/a", "s3://my-bucket/runs/a",
                                                                      "runs/a/latest")
    assert str(parse("s3://my-bucket")) == "s3://my-bucket"
    with pytest.raises(StoreError, match="checkpoint.dir: s3://A_B/x: 'A_B' is not a valid bucket"):
        parse("s3://A_B/x", "checkpoint.dir")
    with pytest.raises(StoreError, match="'..' parts"):
        parse("s3://bucket/a/../b")


def test_upload_verify_download_and_prune(s3, tmp_path):
    remote = RemoteCheckpoints(s3.url("run"))
    for step in (1, 2, 3):
        remote.upload(_iteration(tmp_path / "local", f"iter_000000{step}", size=1000 * step))
    assert s3.text("run/latest") == "iter_0000003\n"
    keys = s3.keys("run/iter_0000002/")
    assert keys["run/iter_0000002/__0_0.distcp"] == 2000 - 2000 % 256
    assert f"run/iter_0000002/{MANIFEST}" in keys and "run/iter_0000002/tokenizer/tokenizer.json" in keys
    assert remote.prune(keep_last=2) == ["iter_0000001"]
    assert remote.complete() == ["iter_0000002", "iter_0000003"]
    assert not s3.keys("run/iter_0000001/")

    local = remote.download("iter_0000003", tmp_path / "back")
    original = tmp_path / "local" / "iter_0000003"
    assert (local / "__0_0.distcp").read_bytes() == (original / "__0_0.distcp").read_bytes()
    assert not (local / MANIFEST).exists()
    # A changed object no longer matches its manifest: the download says so and leaves no copy.
    s3.server.client().put_object(Bucket=s3.name, Key="run/iter_0000002/__0_0.distcp", Body=b"x")
    with pytest.raises(UploadFailed, match="does not match its manifest"):
        remote.download("iter_0000002", tmp_path / "back")
    assert not (tmp_path / "back" / "iter_0000002").exists()


def test_interrupted_upload_leaves_previous_latest(s3, tmp_path):
    remote = RemoteCheckpoints(s3.url("run"))
    remote.upload(_iteration(tmp_path, "iter_0000001"))

    def die(rel):
        if rel == "megasmol.json":
            raise UploadFailed("killed halfway")

    with pytest.raises(UploadFailed):
        remote.upload(_iteration(tmp_path, "iter_0000002"), on_file=die)
    assert remote.latest() == "iter_0000001"
    assert remote.iterations() == ["iter_0000001", "iter_0000002"]  # objects of the cut upload
    assert remote.complete() == ["iter_0000001"]
    remote.upload(_iteration(tmp_path, "iter_0000003"))
    assert remote.prune(keep_last=5) == ["iter_0000002"]  # incomplete, older than latest


def test_fetch_downloads_latest_once(s3, tmp_path, capsys):
    remote = RemoteCheckpoints(s3.url("a/b"))
    remote.upload(_iteration(tmp_path, "iter_0000004"))
    local = fetch(s3.url("a/b"))
    assert local.name == "iter_0000004" and (local / "megasmol.json").is_file()
    assert "downloading" in capsys.readouterr().out
    assert fetch(s3.url("a/b/iter_0000004")) == local
    assert "downloading" not in capsys.readouterr().out  # the cached copy
    with pytest.raises(Exception, match="no complete checkpoint"):
        fetch(s3.url("elsewhere"))


def test_access_errors_are_one_line(s3, s3_server, monkeypatch):
    store = ObjectStore(parse(s3.url("run")))
    store.check_access("checkpoint.dir")
    with pytest.raises(StoreError, match=r"^checkpoint.dir: s3://no-such-bucket/x: bucket no-such-bucket "
                                         "does not exist"):
        ObjectStore(parse("s3://no-such-bucket/x")).check_access("checkpoint.dir")
    for key, value in s3_server.reader.items():
        monkeypatch.setenv(key, value)
    ObjectStore(parse(s3.url("run"))).check_access("checkpoint.dir", write=False)
    with pytest.raises(StoreError, match="access denied"):
        ObjectStore(parse(s3.url("run"))).check_access("checkpoint.dir")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StoreError, match="wrong credentials") as caught:
        ObjectStore(parse(s3.url("run"))).check_access("checkpoint.dir")
    assert "wrong" not in str(caught.value).replace("wrong credentials", "")  # no secret shown
    # Nothing listens there: refused within seconds, naming the endpoint.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach the endpoint http://127.0.0.1:9"):
        ObjectStore(parse(s3.url("run"))).check_access("checkpoint.dir")
    assert time.monotonic() - started < 15


def test_the_endpoint_credentials_and_retries_come_from_the_environment_or_a_profile(s3, s3_server, tmp_path,
                                                                                    monkeypatch):
    """The standard AWS settings, read by boto3: with no AWS_* credentials or endpoint in the
    environment, ``AWS_PROFILE`` names a profile whose config gives the endpoint and the retries
    and whose credentials file gives the keys; megasmol's 3 attempts (the first request
    included, as ``AWS_MAX_ATTEMPTS`` counts them) only where neither gives a number. A profile
    that does not exist is one line naming the field, the URL and the profile (a traceback from
    boto3 before)."""
    from megasmol.ckpt.object_store import make_client

    assert make_client().meta.config.retries == {"total_max_attempts": 3, "mode": "standard"}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("AWS_RETRY_MODE", "legacy")
    assert make_client().meta.config.retries == {"total_max_attempts": 7, "mode": "legacy"}
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
                "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(var)
    (tmp_path / "config").write_text(f"[profile ckpts]\nendpoint_url = {s3_server.endpoint}\n"
                                     "region = us-east-1\nmax_attempts = 2\nretry_mode = adaptive\n")
    (tmp_path / "credentials").write_text(
        f"[ckpts]\naws_access_key_id = {s3_server.writer['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {s3_server.writer['AWS_SECRET_ACCESS_KEY']}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "ckpts")
    remote = RemoteCheckpoints(s3.url("run"))
    assert remote.store.endpoint == s3_server.endpoint
    assert remote.store.client.meta.config.retries == {"total_max_attempts": 2, "mode": "adaptive"}
    remote.store.check_access("checkpoint.dir")
    remote.upload(_iteration(tmp_path / "local", "iter_0000001"))

    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    with pytest.raises(StoreError) as caught:
        RemoteCheckpoints(s3.url("run"))
    assert str(caught.value) == (f"checkpoint.dir: {s3.url('run')}: AWS_PROFILE: The config profile "
                                 "(no-such-profile) could not be found")
    out = tmp_path / "hf"
    said = cli_in_process("export-hf", "--checkpoint", s3.url("run"), "--out", str(out))
    assert said.returncode == 2 and "Traceback" not in said.stderr, said.stderr
    assert said.stderr.strip() == (f"megasmol export-hf: error: --checkpoint: {s3.url('run')}: AWS_PROFILE: "
                                   "The config profile (no-such-profile) could not be found")
    monkeypatch.delenv("AWS_PROFILE")  # boto3's default session, which the fixture's client uses
    assert s3.text("run/latest") == "iter_0000001\n"  # the profile's upload, read as the fixture's user


def _access_check_at(s3, monkeypatch, port: int) -> tuple[str, str, float]:
    """The access check before training against the endpoint on loopback ``port``: the endpoint,
    the one line it raised, and the seconds it took."""
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        ObjectStore(parse(s3.url("run"))).check_access("checkpoint.dir")
    return endpoint, str(caught.value), time.monotonic() - started


def test_an_endpoint_that_takes_the_connection_and_never_answers_is_one_line_within_seconds(s3, monkeypatch):
    """A socket that accepts connections and never answers (a hung proxy, a wrong port): the
    access check before training says so in one line within seconds (a short read timeout and 3
    attempts), not after the transfers' 60 s read timeout times 3."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes each connect; nobody ever reads or answers
        endpoint, said, took = _access_check_at(s3, monkeypatch, silent.getsockname()[1])
    assert said == (f"checkpoint.dir: {s3.url('run')}: the endpoint {endpoint} took the "
                    "connection but did not answer within 5 s (is it an S3 endpoint, and "
                    "is it up?)")
    assert 5 <= took < 30, took


def test_an_endpoint_whose_connects_time_out_is_one_line_within_seconds(s3, monkeypatch):
    """Connects that time out (a firewall dropping packets, a host that is down): here a socket
    whose accept queue is full, so the kernel drops every new SYN. One line naming the endpoint,
    after 3 attempts of ``CONNECT_TIMEOUT_S``: seconds, not minutes."""
    import socket

    with socket.socket() as full, socket.socket() as waiting:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        waiting.connect(full.getsockname())  # fills the queue: nothing is ever accepted
        endpoint, said, took = _access_check_at(s3, monkeypatch, full.getsockname()[1])
    assert said == (f"checkpoint.dir: {s3.url('run')}: cannot reach the endpoint {endpoint} "
                    "(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, or the profile's endpoint_url)")
    assert 10 <= took < 30, took  # 3 connects of 5 s each


def test_a_latest_naming_an_incomplete_checkpoint_is_refused_and_never_read(s3, tmp_path):
    """The bucket's ``latest`` names an iteration whose objects are incomplete (no manifest: its
    upload was cut, and something else moved ``latest``): a run on that prefix is refused before
    step 1 in one line naming the complete ones, and a reader is refused too; neither downloads
    anything, and the bucket is left as it was."""
    from megasmol.config.run import load_run_config
    from megasmol.train.bucket import prepare
    from tests.train_fixtures import write_training_run

    remote = RemoteCheckpoints(s3.url("run"))
    remote.upload(_iteration(tmp_path / "src", "iter_0000002"))

    def cut(rel):
        if rel == "megasmol.json":
            raise UploadFailed("killed halfway")

    with pytest.raises(UploadFailed):
        remote.upload(_iteration(tmp_path / "src", "iter_0000004"), on_file=cut)
    s3.server.client().put_object(Bucket=s3.name, Key="run/latest", Body=b"iter_0000004\n")
    before = s3.keys("run/")

    config = load_run_config(write_training_run(tmp_path / "job", steps=5, checkpoint={"dir": s3.url("run")}))
    with pytest.raises(StoreError) as caught:
        prepare(config)
    assert str(caught.value) == (f"checkpoint.dir: {s3.url('run')}: latest names iter_0000004, whose upload "
                                 "did not finish (no manifest); complete ones: iter_0000002: point latest "
                                 "at a complete one, or give this run a new prefix")
    assert not config.checkpoint_dir.exists() or not any(config.checkpoint_dir.iterdir())
    for url in (s3.url("run"), s3.url("run/iter_0000004")):
        with pytest.raises(StoreError, match=r"^--checkpoint: s3://\S+: no complete checkpoint"):
            fetch(url)
    assert s3.keys("run/") == before and s3.text("run/latest") == "iter_0000004\n"


def test_multi_storage_client_stays_off_whatever_is_installed(tmp_path, megatron_runtime):
    """Megatron-Core turns multi-storage-client on when the package is installed: megasmol turns it
    off before every checkpoint write and read (as if it were installed here: enabled first)."""
    import torch
    from megatron.core.msc_utils import MultiStorageClientFeature

    from megasmol.ckpt import trust
    from megasmol.ckpt.checkpoint import save_checkpoint

    class Tiny(torch.nn.Module):
        def sharded_state_dict(self):
            from megatron.core.dist_checkpointing.mapping import ShardedTensor

            return {"w": ShardedTensor.from_rank_offsets("w", torch.ones(2))}

    MultiStorageClientFeature.enable()
    save_checkpoint(Tiny(), tmp_path, 1, {})
    assert not MultiStorageClientFeature._enabled
    MultiStorageClientFeature.enable()
    trust.install()
    assert not MultiStorageClientFeature._enabled


def test_a_resume_takes_whichever_copy_is_complete_and_newer(s3, tmp_path, capsys):
    """``train.bucket.prepare`` with a staging directory and a bucket that each hold checkpoints:
    the bucket's newer one is downloaded, a newer local one uploaded, an incomplete copy on either
    side never taken, and two copies of the same step left as they are."""
    from megasmol.config.run import load_run_config
    from megasmol.train.bucket import prepare
    from tests.train_fixtures import write_training_run

    path = write_training_run(tmp_path / "run", steps=10, checkpoint={"dir": s3.url("run")})
    config = load_run_config(path)
    staging = config.checkpoint_dir
    remote = RemoteCheckpoints(s3.url("run"))

    def checkpoint(root, step):  # complete as a save leaves it (megasmol.json and metadata.json)
        it = _iteration(root, f"iter_{step:07d}", extra=bytes([step]))
        (it / "megasmol.json").write_text(json.dumps({"run_config": config.to_dict()}))
        (it / "metadata.json").write_text("{}")
        return it

    def local_latest(name):
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "latest").write_text(name + "\n")

    # The bucket's is newer than the local one: downloaded into the staging directory.
    checkpoint(staging, 2)
    local_latest("iter_0000002")
    remote.upload(checkpoint(tmp_path / "elsewhere", 4))
    prepare(config)
    assert (staging / "latest").read_text() == "iter_0000004\n"
    assert (staging / "iter_0000004" / "__0_0.distcp").read_bytes().endswith(bytes([4]))
    assert "downloaded iter_0000004 from " in capsys.readouterr().out

    # The local one is newer (its upload did not finish): uploaded, and the bucket's latest moves.
    checkpoint(staging, 6)
    local_latest("iter_0000006")
    prepare(config)
    said = capsys.readouterr().out
    assert "the local iter_0000006 is newer than the bucket's latest (iter_0000004)" in said
    assert remote.latest() == "iter_0000006" and remote.store.manifest("iter_0000006") is not None

    # An incomplete newer copy on either side is not taken: the bucket's cut upload of step 8
    # (no manifest), and a local step 10 without its megasmol.json; the same step 6 on both: as is.
    def cut(rel):
        if rel == "megasmol.json":
            raise UploadFailed("killed halfway")

    with pytest.raises(UploadFailed):
        remote.upload(checkpoint(tmp_path / "elsewhere", 8), on_file=cut)
    (checkpoint(staging, 10) / "megasmol.json").unlink()
    local_latest("iter_0000010")
    prepare(config)
    assert capsys.readouterr().out == ""  # nothing to download or upload
    assert remote.latest() == "iter_0000006" and s3.text("run/latest") == "iter_0000006\n"

    # The newest local copies lost: the newest complete one left (step 4) is older than the
    # bucket's latest, which comes back.
    for name in ("iter_0000006", "iter_0000010"):
        shutil.rmtree(staging / name)
    prepare(config)
    assert (staging / "latest").read_text() == "iter_0000006\n" and (staging / "iter_0000006").is_dir()
    assert "(the local copy was older: iter_0000004;" in capsys.readouterr().out


def test_an_upload_to_an_endpoint_that_stopped_answering_is_one_line(s3, tmp_path, monkeypatch, capsys):
    """Rank 0's background uploads (``train.bucket.BucketUploads``): the first reaches the bucket;
    then nothing answers at the endpoint any more (a connection refused, as from a stopped
    server): one line naming the endpoint and the latest that stays, and closing the run says
    the newest checkpoint is not in the bucket."""
    from megasmol.ckpt.object_store import make_client
    from megasmol.train.bucket import BucketUploads

    uploads = BucketUploads(s3.url("run"), keep_last=0)
    uploads.submit(_iteration(tmp_path, "iter_0000001"), 1)
    uploads.wait()
    assert s3.text("run/latest") == "iter_0000001\n" and uploads.failure is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    uploads.remote.store.client = make_client()
    uploads.submit(_iteration(tmp_path, "iter_0000002"), 2)
    with pytest.raises(UploadFailed, match="the local copy is complete: run again to upload it"):
        uploads.close()
    said = [line for line in capsys.readouterr().out.splitlines() if "failed" in line]
    assert said == [f"checkpoints: uploading iter_0000002 to {s3.url('run')} failed: "
                    f"{s3.url('run')}/iter_0000002/__0_0.distcp was not written: cannot reach the "
                    "endpoint http://127.0.0.1:9 (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, or the "
                    "profile's endpoint_url); the bucket's latest stays iter_0000001"], said
    assert s3.text("run/latest") == "iter_0000001\n"


def test_an_upload_that_stops_on_a_bug_fails_the_run_and_keeps_latest(s3, tmp_path, monkeypatch, capsys):
    """An exception the upload thread does not expect (a bug, not the bucket) is not lost with the
    thread: its traceback is printed, one line says the bucket's latest stays, and the run's close
    raises, so a run whose newest checkpoint is not in the bucket never ends with exit 0."""
    from megasmol.train.bucket import BucketUploads

    uploads = BucketUploads(s3.url("run"), keep_last=0)
    uploads.submit(_iteration(tmp_path, "iter_0000001"), 1)
    uploads.wait()

    def broken(*args, **kwargs):
        raise ValueError("a bug in the uploader")

    monkeypatch.setattr(uploads.remote, "upload", broken)
    uploads.submit(_iteration(tmp_path, "iter_0000002"), 2)
    with pytest.raises(UploadFailed, match="unexpected ValueError: a bug in the uploader"):
        uploads.close()
    captured = capsys.readouterr()
    assert "Traceback" in captured.err and "ValueError: a bug in the uploader" in captured.err
    assert [line for line in captured.out.splitlines() if "unexpected" in line] == [
        f"checkpoints: uploading iter_0000002 to {s3.url('run')} stopped on an unexpected ValueError: "
        "a bug in the uploader; the bucket's latest stays iter_0000001"]
    assert s3.text("run/latest") == "iter_0000001\n"


def test_training_never_waits_for_an_upload(s3, tmp_path, monkeypatch, capsys):
    """Rank 0's commit step (``Checkpointer.committed``, with ``keep_last: 1``) for three
    checkpoints while the first one uploads slowly (held at its first file): each commit returns
    at once; the second, superseded while it waited, is skipped with one line, never uploaded, and
    pruned from staging as any older copy; the third is uploaded next; the bucket's ``latest``
    names 1 then 3 (each complete when named); no staging copy goes before its upload ended."""
    import threading
    from types import SimpleNamespace

    from megasmol.config.run import load_run_config
    from megasmol.train.callbacks import Console
    from megasmol.train.checkpointing import Checkpointer
    from megasmol.utils.faults import FaultPlan
    from tests.train_fixtures import write_training_run

    config = load_run_config(write_training_run(tmp_path / "run", steps=10,
                                                checkpoint={"dir": s3.url("run"), "keep_last": 1}))
    staging = config.checkpoint_dir
    release, began = threading.Event(), threading.Event()
    uploading: list[int] = []  # the steps whose upload began, in order
    gone: list[str] = []  # staging copies found missing while they uploaded

    class SlowFirstUpload(FaultPlan):
        def before_upload(self, step, index):
            if not (staging / f"iter_{step:07d}").is_dir():
                gone.append(f"iter_{step:07d}")
            if index == 0:
                uploading.append(step)
            if step == 1:
                began.set()
                release.wait(60)

    setup = SimpleNamespace(is_logging_rank=True, faults=SlowFirstUpload())
    checkpointer = Checkpointer(config, setup, Console(True), None)
    store = checkpointer.uploads.remote.store
    named: list[tuple[str, bool]] = []  # each write of the bucket's latest: (name, complete then)
    write_text = store.write_text

    def recording(name, text):
        if name == "latest":
            named.append((text.strip(), store.manifest(text.strip()) is not None))
        write_text(name, text)

    monkeypatch.setattr(store, "write_text", recording)

    def commit(step):  # what a save leaves before its commit hook: the files, then latest
        it = _iteration(staging, f"iter_{step:07d}", extra=bytes([step]))
        (it / "metadata.json").write_text("{}")
        (staging / "latest").write_text(it.name + "\n")
        started = time.perf_counter()
        checkpointer.committed(it, step, started)
        return time.perf_counter() - started

    took = [commit(1)]
    assert began.wait(30)
    took += [commit(2), commit(3)]
    assert max(took) < 2, took  # the upload holds for up to 60 s: nobody waited for it
    local = sorted(p.name for p in staging.glob("iter_*"))
    assert local == ["iter_0000001", "iter_0000003"], local  # 1 uploading; 2 skipped and pruned
    said = capsys.readouterr().out
    assert "checkpoints: skipped upload of iter_0000002: iter_0000003 is newer\n" in said, said
    assert named == [] and not s3.keys("run/latest")  # nothing named while the first uploads

    release.set()
    checkpointer.close()  # waits for the newest to be in the bucket
    assert uploading == [1, 3] and gone == []
    assert named == [("iter_0000001", True), ("iter_0000003", True)]
    remote = checkpointer.uploads.remote
    assert remote.latest() == "iter_0000003" and remote.complete() == ["iter_0000003"]
    assert not s3.keys("run/iter_0000002/")
    said = capsys.readouterr().out
    assert said.index("uploaded iter_0000001") < said.index("uploaded iter_0000003"), said
    back = remote.download("iter_0000003", tmp_path / "back")
    assert (back / "__0_0.distcp").read_bytes().endswith(bytes([3]))
    # Once its upload is done, the first copy is pruned under keep_last like any other.
    assert sorted(p.name for p in staging.glob("iter_*")) == ["iter_0000003"]
