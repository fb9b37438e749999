"""Artifacts: S3 upload (boto3, multipart, presigned URL), a local directory, or inline base64.

Where an artifact goes, in order: a bucket (from the job's `s3Config` or the `BUCKET_*`
settings) -> S3; else `OUTPUT_DIR` -> a local file; else inline base64 while the job's inline
budget lasts; else `upload_failed`, saying how to configure a bucket. A file is never
reported as uploaded unless S3 confirmed it with the same size.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import mimetypes
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from core.config import Settings
from core.errors import InvalidInput, UploadFailed
from core.naming import safe_name, safe_name_error
from core.netguard import check_url

log = logging.getLogger("worker.storage")

MULTIPART_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class BucketTarget:
    bucket: str
    access_key_id: str | None
    secret_access_key: str | None
    endpoint_url: str | None = None
    region: str | None = None
    key_prefix: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> BucketTarget | None:
        """The BUCKET_* settings; with no BUCKET_NAME, RunPod's `rp_upload` convention: a
        virtual-host BUCKET_ENDPOINT_URL (`https://<bucket>.s3.<region>.amazonaws.com`) names
        the bucket and the region."""
        endpoint = settings.bucket_endpoint_url or None
        bucket, region = settings.bucket_name, settings.bucket_region
        if not bucket and endpoint:
            named = bucket_in_endpoint(endpoint)
            if named is not None:
                endpoint, bucket, region = named.endpoint, named.bucket, region or named.region
        if not (bucket and settings.bucket_access_key_id):
            return None
        return cls(
            bucket=bucket,
            access_key_id=settings.bucket_access_key_id,
            secret_access_key=settings.bucket_secret_access_key,
            endpoint_url=endpoint,
            region=region,
            key_prefix=settings.bucket_key_prefix,
        )

    @classmethod
    def from_job(cls, s3_config: Any, settings: Settings) -> BucketTarget | None:
        """RunPod's per-job `s3Config` (accessId, accessSecret, bucketName, endpointUrl)."""
        if not s3_config:
            return None
        if not isinstance(s3_config, dict) or not s3_config.get("bucketName"):
            raise InvalidInput("s3Config needs bucketName, accessId, accessSecret, endpointUrl")
        endpoint = s3_config.get("endpointUrl") or None
        if endpoint:
            if not isinstance(endpoint, str):
                raise InvalidInput("s3Config.endpointUrl must be an http(s) URL")
            # The job chose it: the same parser and guard as every URL a job names. boto3
            # connects on its own, so it gets the URL as that parser normalised it (no form two
            # parsers read differently survives the check) and every address the host resolves
            # to now was checked. What remains is DNS rebinding between this check and boto3's
            # own lookup (a name that answers public now and private later); pinning boto3 to
            # the checked IP would break SigV4's signed Host and TLS for the hostname.
            endpoint = check_url(
                endpoint,
                allow_private=settings.allow_private_urls,
                timeout=min(settings.fetch_timeout_s, settings.fetch_deadline_s),
                field="s3Config.endpointUrl",
            ).target.url
        return cls(
            bucket=str(s3_config["bucketName"]),
            access_key_id=s3_config.get("accessId"),
            secret_access_key=s3_config.get("accessSecret"),
            endpoint_url=endpoint,
            region=s3_config.get("region") or settings.bucket_region,
            key_prefix=settings.bucket_key_prefix,
        )


@dataclass(frozen=True)
class NamedEndpoint:
    endpoint: str
    """The service endpoint, without the bucket's label."""
    bucket: str
    region: str | None


# `<bucket>.s3.<region>.<provider domain>`: AWS, Backblaze B2 and other S3 hosts that use it.
_VIRTUAL_HOST = re.compile(
    r"^(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])\.(?P<service>s3[.-](?P<region>[a-z0-9-]+)\..+)$"
)


def bucket_in_endpoint(url: str) -> NamedEndpoint | None:
    """The bucket a virtual-host endpoint URL names (RunPod's `rp_upload` reads it so), with
    the region and the endpoint to call; None for a plain service endpoint."""
    parts = urlsplit(url)
    match = _VIRTUAL_HOST.match((parts.hostname or "").lower())
    if parts.scheme not in ("http", "https") or match is None:
        return None
    service = match["service"]
    port = f":{parts.port}" if parts.port else ""
    return NamedEndpoint(f"{parts.scheme}://{service}{port}", match["bucket"], match["region"])


def s3_client(target: BucketTarget, settings: Settings, *, timeout_s: float | None = None) -> Any:
    """A boto3 S3 client; `timeout_s` caps each connect and read (an input's deadline)."""
    import boto3
    from botocore.config import Config

    read_timeout = min(settings.s3_timeout_s, timeout_s or settings.s3_timeout_s)
    config = Config(
        connect_timeout=min(10.0, read_timeout),
        read_timeout=read_timeout,
        retries={"max_attempts": settings.s3_retries + 1, "mode": "standard"},
        signature_version="s3v4",
        s3={"addressing_style": "path"} if target.endpoint_url else None,
    )
    return boto3.client(
        "s3",
        endpoint_url=target.endpoint_url,
        aws_access_key_id=target.access_key_id,
        aws_secret_access_key=target.secret_access_key,
        region_name=target.region or "us-east-1",
        config=config,
    )


def sha256_of(source: bytes | Path) -> str:
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()
    digest = hashlib.sha256()
    with source.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    """Puts one job's artifacts where the settings and the job say."""

    def __init__(self, settings: Settings, job_id: str, bucket: BucketTarget | None) -> None:
        self.settings = settings
        # The folder or key part every artifact of the job goes under. A platform job id may
        # hold a `/` (made `_`); what is left must still be one safe name: never `.` or `..`.
        # Names from a request (an app's task id) are checked where the request is parsed.
        self.job_id = safe_name(re.sub(r"[^A-Za-z0-9._-]", "_", job_id), "job id")
        self.bucket = bucket
        self.inline_budget = settings.inline_max_bytes
        self._client: Any = None

    @property
    def mode(self) -> str:
        if self.bucket:
            return "s3"
        if self.settings.output_dir:
            return "local"
        return "inline"

    def put(self, name: str, data: bytes | Path, content_type: str | None = None) -> dict[str, Any]:
        """Store one artifact and describe it: name, bytes, sha256, content type, where."""
        if len(name) > 255 or any(safe_name_error(part) for part in name.split("/")):
            raise ValueError(f"unsafe artifact name {name!r}")  # ours, never a request's: a bug
        content_type = content_type or mimetypes.guess_type(name)[0] or "application/octet-stream"
        size = len(data) if isinstance(data, bytes) else data.stat().st_size
        record: dict[str, Any] = {
            "name": name,
            "bytes": size,
            "sha256": sha256_of(data),
            "content_type": content_type,
        }
        if self.mode == "s3":
            record.update(self._put_s3(name, data, size, content_type, record["sha256"]))
        elif self.mode == "local":
            record.update(self._put_local(name, data))
        else:
            record.update(self._put_inline(name, data, size))
        base = self.settings.public_base_url
        if base and record["storage"] in ("s3", "local"):
            key = record["key"] if record["storage"] == "s3" else f"{self.job_id}/{name}"
            record["public_url"] = f"{base.rstrip('/')}/{key}"
        return record

    # -- destinations ---------------------------------------------------------------------

    def _key(self, name: str) -> str:
        assert self.bucket is not None
        prefix = self.bucket.key_prefix.strip("/")
        return "/".join(p for p in (prefix, self.job_id, name) if p)

    def _put_s3(
        self, name: str, data: bytes | Path, size: int, content_type: str, sha256: str
    ) -> dict[str, Any]:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        assert self.bucket is not None
        key = self._key(name)
        transfer = TransferConfig(
            multipart_threshold=MULTIPART_CHUNK_BYTES,
            multipart_chunksize=MULTIPART_CHUNK_BYTES,
            max_concurrency=4,
        )
        extra = {"ContentType": content_type, "Metadata": {"sha256": sha256}}
        try:
            if self._client is None:
                self._client = s3_client(self.bucket, self.settings)
            body: BinaryIO
            with io.BytesIO(data) if isinstance(data, bytes) else data.open("rb") as body:
                self._client.upload_fileobj(
                    body, self.bucket.bucket, key, ExtraArgs=extra, Config=transfer
                )
            head = self._client.head_object(Bucket=self.bucket.bucket, Key=key)
            if int(head["ContentLength"]) != size:
                raise UploadFailed(
                    f"S3 holds {head['ContentLength']} bytes for {key}, expected {size}"
                )
            url = self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket.bucket, "Key": key},
                ExpiresIn=self.settings.presign_expires_s,
            )
        except (BotoCoreError, ClientError) as exc:
            raise UploadFailed(
                f"could not upload {name} to s3://{self.bucket.bucket}/{key}: {exc}"
            ) from exc
        return {"storage": "s3", "bucket": self.bucket.bucket, "key": key, "url": url}

    def _put_local(self, name: str, data: bytes | Path) -> dict[str, Any]:
        assert self.settings.output_dir is not None
        path = Path(self.settings.output_dir) / self.job_id / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, bytes):
                path.write_bytes(data)
            else:
                shutil.copyfile(data, path)
        except OSError as exc:
            raise UploadFailed(f"could not write {name} to OUTPUT_DIR ({exc})") from exc
        return {"storage": "local", "path": str(path.resolve())}

    def _put_inline(self, name: str, data: bytes | Path, size: int) -> dict[str, Any]:
        encoded = 4 * -(-size // 3)  # what it adds to the result, as base64
        if encoded > self.inline_budget:
            raise UploadFailed(
                f"{name} is {size} bytes ({encoded} as base64), over what is left of the "
                "inline budget "
                f"({self.inline_budget} of INLINE_MAX_BYTES={self.settings.inline_max_bytes}); "
                "set BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY and "
                "BUCKET_NAME (or send s3Config with the job) to receive it from S3"
            )
        self.inline_budget -= encoded
        raw = data if isinstance(data, bytes) else data.read_bytes()
        return {"storage": "inline", "data": base64.b64encode(raw).decode("ascii")}


def read_artifact(record: dict[str, Any]) -> bytes | None:
    """The bytes of an artifact this worker stored inline or in OUTPUT_DIR; None for one in S3
    (its presigned `url` is how a client reads it)."""
    if record.get("storage") == "inline":
        return base64.b64decode(record["data"])
    if record.get("storage") == "local":
        return Path(record["path"]).read_bytes()
    return None
