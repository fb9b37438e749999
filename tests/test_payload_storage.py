"""Input fetching (base64, data URI, loopback HTTP, moto S3) and artifact storage."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
import requests

from core.config import Settings
from core.errors import FetchFailed, InvalidInput, MediaDecodeFailed, PayloadTooLarge, UploadFailed
from core.payload import load_payload
from core.progress import ProgressReporter
from core.storage import ArtifactStore, BucketTarget
from tests.conftest import HttpServer, S3Server

DATA = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9"


def settings(**overrides: object) -> Settings:
    base = {"allow_private_urls": True, "fetch_retries": 2, "fetch_timeout_s": 5}
    base.update(overrides)
    return Settings(**base)  # type: ignore[arg-type]


def test_base64_forms() -> None:
    b64 = base64.b64encode(DATA).decode()
    assert load_payload(b64, settings()).data == DATA
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    assert load_payload(wrapped, settings()).data == DATA
    assert load_payload(b64.rstrip("="), settings()).data == DATA
    assert load_payload(base64.urlsafe_b64encode(DATA).decode(), settings()).data == DATA
    payload = load_payload(f"data:image/jpeg;base64,{b64}", settings())
    assert payload.data == DATA and payload.media_type == "image/jpeg"
    assert payload.source == "data_uri"


def test_bad_base64_and_schemes() -> None:
    with pytest.raises(InvalidInput, match="base64"):
        load_payload("this is not base64!", settings())
    with pytest.raises(InvalidInput, match="scheme"):
        load_payload("ftp://example.com/a.jpg", settings())
    with pytest.raises(InvalidInput, match="empty"):
        load_payload("   ", settings())
    with pytest.raises(MediaDecodeFailed, match="0 bytes"):
        load_payload("data:image/png;base64,", settings())
    with pytest.raises(PayloadTooLarge, match="MAX_INPUT_BYTES"):
        load_payload(base64.b64encode(DATA).decode(), settings(max_input_bytes=100))


def test_http_fetch_with_retries_and_caps(http_server: HttpServer) -> None:
    (http_server.root / "a.jpg").write_bytes(DATA)
    base = http_server.base_url
    payload = load_payload(f"{base}/a.jpg", settings())
    assert payload.data == DATA and payload.source == "url" and payload.media_type == "image/jpeg"

    # Two 503s then success: retried within the bound.
    assert load_payload(f"{base}/flaky/2/a.jpg", settings()).data == DATA
    assert http_server.hits["/flaky/2/a.jpg"] == 3
    # More failures than retries: a clear fetch_failed, after exactly retries+1 tries.
    with pytest.raises(FetchFailed, match="after 3 tries"):
        load_payload(f"{base}/flaky/9/a.jpg", settings())
    assert http_server.hits["/flaky/9/a.jpg"] == 3

    with pytest.raises(FetchFailed, match="HTTP 404"):
        load_payload(f"{base}/missing.jpg", settings())
    with pytest.raises(PayloadTooLarge):
        load_payload(f"{base}/a.jpg", settings(max_input_bytes=100))
    assert load_payload(f"{base}/redirect?to=/a.jpg", settings()).data == DATA


def test_private_addresses_are_refused_by_default(http_server: HttpServer) -> None:
    (http_server.root / "private.jpg").write_bytes(DATA)
    strict = settings(allow_private_urls=False)
    for url in (
        f"{http_server.base_url}/private.jpg",
        "http://localhost/a.jpg",
        "http://10.1.2.3/a.jpg",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/a.jpg",
    ):
        with pytest.raises(InvalidInput, match="private or loopback"):
            load_payload(url, strict)
    assert "/private.jpg" not in http_server.hits  # refused before any request


def test_s3_fetch(s3_server: S3Server) -> None:
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="in/a.jpg", Body=DATA)
    config = settings(
        bucket_endpoint_url=s3_server.endpoint_url,
        bucket_access_key_id="testing",
        bucket_secret_access_key="testing",
    )
    payload = load_payload(f"s3://{s3_server.bucket}/in/a.jpg", config)
    assert payload.data == DATA and payload.source == "s3"
    with pytest.raises(FetchFailed, match="does not exist"):
        load_payload(f"s3://{s3_server.bucket}/in/none.jpg", config)
    with pytest.raises(PayloadTooLarge):
        load_payload(
            f"s3://{s3_server.bucket}/in/a.jpg", config.model_copy(update={"max_input_bytes": 10})
        )
    with pytest.raises(InvalidInput, match="s3://bucket/key"):
        load_payload("s3://only-bucket", config)


def test_store_inline_local_and_s3(tmp_path: Path, s3_server: S3Server) -> None:
    data = b"artifact-bytes" * 100
    digest = hashlib.sha256(data).hexdigest()

    inline = ArtifactStore(settings(inline_max_bytes=2000), "job-1", None)  # base64: 1868
    record = inline.put("a.bin", data)
    assert record["storage"] == "inline" and base64.b64decode(record["data"]) == data
    assert record["sha256"] == digest and record["bytes"] == len(data)
    with pytest.raises(UploadFailed, match="BUCKET_NAME"):
        inline.put("b.bin", data)  # the budget is spent

    local = ArtifactStore(settings(output_dir=tmp_path), "job-1", None)
    record = local.put("dir/a.bin", data)
    assert Path(record["path"]).read_bytes() == data

    config = settings(
        bucket_endpoint_url=s3_server.endpoint_url,
        bucket_access_key_id="testing",
        bucket_secret_access_key="testing",
        bucket_name=s3_server.bucket,
        bucket_key_prefix="results",
    )
    store = ArtifactStore(config, "job/1", BucketTarget.from_settings(config))
    big = bytes(range(256)) * (20 * 1024 * 1024 // 256 + 7)  # > one multipart chunk
    source = tmp_path / "big.bin"
    source.write_bytes(big)
    record = store.put("big.bin", source)
    assert record["key"] == "results/job_1/big.bin"
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=record["key"])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == record["sha256"] == hashlib.sha256(big).hexdigest()
    assert requests.get(record["url"], timeout=30).content == body  # the presigned URL works


def test_upload_failure_is_reported_not_hidden(tmp_path: Path, s3_server: S3Server) -> None:
    config = settings(
        bucket_endpoint_url=s3_server.endpoint_url,
        bucket_access_key_id="testing",
        bucket_secret_access_key="testing",
        bucket_name="no-such-bucket",
        s3_retries=1,
    )
    store = ArtifactStore(config, "job", BucketTarget.from_settings(config))
    with pytest.raises(UploadFailed, match="no-such-bucket"):
        store.put("a.bin", b"x")


def test_job_s3_config_overrides_settings() -> None:
    target = BucketTarget.from_job(
        {
            "accessId": "a",
            "accessSecret": "b",
            "bucketName": "c",
            "endpointUrl": "http://127.0.0.1:1",
        },
        settings(),
    )
    assert target is not None and (target.bucket, target.endpoint_url) == (
        "c",
        "http://127.0.0.1:1",
    )
    with pytest.raises(InvalidInput, match="bucketName"):
        BucketTarget.from_job({"accessId": "a"}, settings())
    # The job picks the endpoint, so the private-address guard applies to it.
    with pytest.raises(InvalidInput, match="private or loopback"):
        BucketTarget.from_job(
            {"bucketName": "c", "endpointUrl": "http://127.0.0.1:9000"},
            settings(allow_private_urls=False),
        )


def test_progress_is_throttled_and_stops_after_close() -> None:
    sent: list[dict] = []
    now = [0.0]
    reporter = ProgressReporter(
        {"id": "j"}, lambda job, update: sent.append(update), 1.0, lambda: now[0]
    )
    assert reporter.update("extracting_frames", 0)
    assert not reporter.update("extracting_frames", 10)  # same stage, too soon
    now[0] = 1.5
    assert reporter.update("extracting_frames", 20, "frame 20")
    assert reporter.update("training", 0)  # a new stage always goes out
    assert reporter.update("training", 100, force=True)  # final numbers are never dropped
    reporter.close()
    assert not reporter.update("exporting", 0)
    assert [(u["stage"], u["progress"]) for u in sent] == [
        ("extracting_frames", 0),
        ("extracting_frames", 20),
        ("training", 0),
        ("training", 100),
    ]
    assert sent[1]["message"] == "frame 20"
