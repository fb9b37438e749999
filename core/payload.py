"""Input bytes from what a request carries: raw base64, a data URI, an http(s) URL, s3:// URL.

Every source is capped in bytes. URLs are fetched with a timeout and a bounded retry on
transient failures, and refused when any address they resolve to (or redirect to) is
private, loopback or link-local (`core/netguard.py`), unless ALLOW_PRIVATE_URLS lifts it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import requests

from core.config import Settings
from core.errors import FetchFailed, InvalidInput, MediaDecodeFailed, PayloadTooLarge
from core.media import sniff_media_type
from core.netguard import check_public_host, redact_url
from core.retry import backoff_s
from core.storage import BucketTarget, s3_client

log = logging.getLogger("worker.payload")

MAX_REDIRECTS = 5
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]{1,15}://")


@dataclass(frozen=True)
class Payload:
    data: bytes
    media_type: str | None
    """Sniffed from the bytes; None when not a known image or video type."""
    source: str
    """`base64`, `data_uri`, `url` or `s3`."""


def load_payload(
    ref: str,
    settings: Settings,
    *,
    field: str = "image",
    bucket: BucketTarget | None = None,
) -> Payload:
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidInput(f"{field} is empty")
    ref = ref.strip()
    limit = settings.max_input_bytes
    if ref[:5].lower() == "data:":
        data, source = _decode_data_uri(ref, field, limit), "data_uri"
    elif ref.startswith(("http://", "https://")):
        data, source = fetch_url(ref, settings, field=field), "url"
    elif ref.startswith("s3://"):
        data, source = fetch_s3(ref, settings, bucket, field=field), "s3"
    elif _SCHEME.match(ref):
        raise InvalidInput(
            f"{field}: unsupported URL scheme {ref.split('://')[0]!r}; "
            "use http(s)://, s3://, a data URI or raw base64"
        )
    else:
        data, source = decode_base64(ref, field, limit), "base64"
    if not data:
        raise MediaDecodeFailed(f"{field}: the payload is empty (0 bytes)")
    return Payload(data=data, media_type=sniff_media_type(data), source=source)


def decode_base64(text: str, field: str, limit: int) -> bytes:
    compact = "".join(text.split()).encode("ascii", errors="replace")
    # The decoded size, exactly: 3 bytes per 4 characters, less the padding.
    size = len(compact) * 3 // 4 - len(compact[-2:]) + len(compact[-2:].rstrip(b"="))
    if size > limit:
        raise PayloadTooLarge(
            f"{field} is about {size} bytes; the limit is {limit} "
            "(MAX_INPUT_BYTES); send a URL or a smaller file"
        )
    compact += b"=" * (-len(compact) % 4)
    try:
        if b"-" in compact or b"_" in compact:
            return base64.urlsafe_b64decode(compact)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(
            f"{field} is neither valid base64, a data URI, an http(s) URL nor an s3:// URL"
        ) from exc


_UNQUOTE_CHUNK = 1 << 16


def _decode_data_uri(uri: str, field: str, limit: int) -> bytes:
    header, sep, body = uri.partition(",")
    if not sep:
        raise InvalidInput(f"{field}: a data URI needs a comma before its data")
    # RFC 2397: `;base64` ends the media type; like the scheme, it is case-insensitive.
    if header.lower().split(";")[-1].strip() == "base64":
        return decode_base64(body, field, limit)
    # Percent-encoded: every `%XX` is one byte, so the size is known before decoding.
    size = len(body) - 2 * body.count("%")
    if size > limit:
        raise PayloadTooLarge(f"{field} is {size} bytes; the limit is {limit} (MAX_INPUT_BYTES)")
    # unquote_to_bytes makes one object per `%` (about 80 bytes per byte decoded): in 64 KB
    # chunks that stays small.
    parts, start = [], 0
    while start < len(body):
        end = min(start + _UNQUOTE_CHUNK, len(body))
        while end < len(body) and "%" in body[end - 2 : end]:
            end += 1  # never split a `%XX`
        parts.append(unquote_to_bytes(body[start:end]))
        start = end
    return b"".join(parts)


# --------------------------------------------------------------------------------------------
# http(s)


def fetch_url(url: str, settings: Settings, *, field: str = "image") -> bytes:
    limit = settings.max_input_bytes
    attempts = settings.fetch_retries + 1
    last_error = "no attempt made"
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_s(attempt))
        try:
            return _fetch_once(url, settings, field, limit)
        except _Transient as exc:
            last_error = str(exc)
            log.warning("%s: fetch attempt %d/%d failed: %s", field, attempt + 1, attempts, exc)
    raise FetchFailed(
        f"{field}: could not fetch {redact_url(url)} after {attempts} tries: {last_error}"
    )


class _Transient(Exception):
    pass


def _fetch_once(url: str, settings: Settings, field: str, limit: int) -> bytes:
    timeout = (min(10.0, settings.fetch_timeout_s), settings.fetch_timeout_s)
    for _hop in range(MAX_REDIRECTS + 1):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidInput(f"{field}: {redact_url(url)} is not an http(s) URL")
        check_public_host(parts.hostname, parts.port, settings, field)
        try:
            response = requests.get(url, stream=True, timeout=timeout, allow_redirects=False)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        except requests.RequestException as exc:
            raise FetchFailed(f"{field}: could not fetch {redact_url(url)} ({exc})") from exc
        with response:
            if response.is_redirect and "location" in response.headers:
                url = urljoin(url, response.headers["location"])
                continue
            if response.status_code in _TRANSIENT_STATUS:
                raise _Transient(f"HTTP {response.status_code}")
            if response.status_code >= 400:
                raise FetchFailed(
                    f"{field}: {redact_url(url)} answered HTTP {response.status_code}",
                    status=response.status_code,
                )
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise PayloadTooLarge(
                    f"{field}: {redact_url(url)} is {declared} bytes; the limit is {limit} "
                    "(MAX_INPUT_BYTES)"
                )
            chunks, total = [], 0
            try:
                for chunk in response.iter_content(chunk_size=256 * 1024):
                    total += len(chunk)
                    if total > limit:
                        raise PayloadTooLarge(
                            f"{field}: {redact_url(url)} is over the {limit}-byte limit"
                        )
                    chunks.append(chunk)
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise _Transient(f"download interrupted: {exc}") from exc
            return b"".join(chunks)
    raise FetchFailed(f"{field}: more than {MAX_REDIRECTS} redirects from {redact_url(url)}")


# --------------------------------------------------------------------------------------------
# s3://bucket/key


def fetch_s3(
    url: str, settings: Settings, bucket: BucketTarget | None, *, field: str = "image"
) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    parts = urlsplit(url)
    name, key = parts.netloc, parts.path.lstrip("/")
    if not name or not key:
        raise InvalidInput(f"{field}: {url} is not of the form s3://bucket/key")
    # The job's s3Config, else the BUCKET_* credentials (a bucket name is not needed to read).
    target = BucketTarget(
        bucket=name,
        access_key_id=bucket.access_key_id if bucket else settings.bucket_access_key_id,
        secret_access_key=bucket.secret_access_key if bucket else settings.bucket_secret_access_key,
        endpoint_url=bucket.endpoint_url if bucket else settings.bucket_endpoint_url,
        region=bucket.region if bucket else settings.bucket_region,
    )
    limit = settings.max_input_bytes
    try:
        client = s3_client(target, settings)
        head = client.head_object(Bucket=name, Key=key)
        if int(head["ContentLength"]) > limit:
            raise PayloadTooLarge(
                f"{field}: {url} is {head['ContentLength']} bytes; the limit is {limit}"
            )
        body = client.get_object(Bucket=name, Key=key)["Body"]
        try:
            data = body.read(limit + 1)
        finally:
            body.close()
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise FetchFailed(f"{field}: {url} does not exist") from exc
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise FetchFailed(
                f"{field}: access to {url} was denied; check BUCKET_ACCESS_KEY_ID and "
                "BUCKET_SECRET_ACCESS_KEY (or the job's s3Config)"
            ) from exc
        raise FetchFailed(f"{field}: could not read {url} ({code or exc})") from exc
    except BotoCoreError as exc:
        raise FetchFailed(f"{field}: could not read {url} ({exc})") from exc
    if len(data) > limit:
        raise PayloadTooLarge(f"{field}: {url} is over the {limit}-byte limit")
    return data
