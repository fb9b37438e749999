"""Input bytes from what a request carries: raw base64, a data URI, an http(s) URL, s3:// URL.

Every source is capped in bytes, and can land in memory (`load_payload`) or in a file
(`load_payload_to_file`, for the splat worker's large videos and zips). A URL fetch has one
total deadline (FETCH_DEADLINE_S: every try, redirect and the whole body), a bounded retry on
transient failures, and ends as `cancelled` when the job is stopped (`core/control.py`). Every
URL, and every redirect, goes through the private-address guard (`core/netguard.py`): parsed
once, resolved once, refused when private, loopback or link-local (unless
ALLOW_PRIVATE_URLS lifts it), and connected to at the address that was checked. URLs are
echoed in messages and logs only through `redact_url` (no query string, no userinfo).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import logging
import re
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

from urllib3.exceptions import DecodeError
from urllib3.response import BaseHTTPResponse

from core import control
from core.config import Settings
from core.errors import Cancelled, FetchFailed, InvalidInput, MediaDecodeFailed, PayloadTooLarge
from core.media import sniff_media_type
from core.naming import safe_name_error
from core.netguard import (
    CERTIFICATE_ERRORS,
    NETWORK_ERRORS,
    Deadline,
    check_url,
    describe,
    redact_text,
    redact_url,
    send,
)
from core.retry import backoff_s
from core.storage import BucketTarget, s3_client

log = logging.getLogger("worker.payload")

MAX_REDIRECTS = 5
CHUNK_BYTES = 256 * 1024
_SNIFF_BYTES = 4096
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]{1,15}://")


def _request_headers() -> dict[str, str]:
    import requests.utils

    # What requests sent before fetching moved onto the pinned connection.
    return {
        "User-Agent": requests.utils.default_user_agent(),
        "Accept": "*/*",
        "Accept-Encoding": "gzip, deflate",
    }


@dataclass(frozen=True)
class Payload:
    data: bytes
    media_type: str | None
    """Sniffed from the bytes; None when not a known image or video type."""
    source: str
    """`base64`, `data_uri`, `url` or `s3`."""


@dataclass(frozen=True)
class FilePayload:
    path: Path
    bytes: int
    media_type: str | None
    source: str


class _Sink(Protocol):
    def write(self, chunk: bytes) -> None: ...

    def reset(self) -> None:
        """Drop what an interrupted try wrote."""


class _MemorySink:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def reset(self) -> None:
        self.chunks.clear()

    def value(self) -> bytes:
        return b"".join(self.chunks)


class _FileSink:
    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle

    def write(self, chunk: bytes) -> None:
        self.handle.write(chunk)

    def reset(self) -> None:
        self.handle.seek(0)
        self.handle.truncate()


def load_payload(
    ref: str,
    settings: Settings,
    *,
    field: str = "image",
    bucket: BucketTarget | None = None,
) -> Payload:
    sink = _MemorySink()
    source = _load(ref, settings, field, bucket, sink)
    data = sink.value()
    if not data:
        raise MediaDecodeFailed(f"{field}: the payload is empty (0 bytes)")
    return Payload(data=data, media_type=sniff_media_type(data), source=source)


def load_payload_to_file(
    ref: str,
    settings: Settings,
    path: Path,
    *,
    field: str = "video",
    bucket: BucketTarget | None = None,
) -> FilePayload:
    """As `load_payload`, but the bytes go to `path` as they arrive, never all in memory."""
    with path.open("wb") as handle:
        source = _load(ref, settings, field, bucket, _FileSink(handle))
    size = path.stat().st_size
    if not size:
        raise MediaDecodeFailed(f"{field}: the payload is empty (0 bytes)")
    with path.open("rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    return FilePayload(path=path, bytes=size, media_type=sniff_media_type(head), source=source)


def _load(
    ref: str, settings: Settings, field: str, bucket: BucketTarget | None, sink: _Sink
) -> str:
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidInput(f"{field} is empty")
    ref = ref.strip()
    limit = settings.max_input_bytes
    if ref[:5].lower() == "data:":
        sink.write(_decode_data_uri(ref, field, limit))
        return "data_uri"
    if ref.startswith(("http://", "https://")):
        _fetch_url_into(ref, settings, field, sink)
        return "url"
    if ref.startswith("s3://"):
        _fetch_s3_into(ref, settings, bucket, field, sink)
        return "s3"
    if ref.startswith(UPLOAD_SCHEME):
        _read_upload_into(ref, settings, field, sink)
        return "upload"
    if _SCHEME.match(ref):
        raise InvalidInput(
            f"{field}: unsupported URL scheme {ref.split('://')[0]!r}; "
            "use http(s)://, s3://, upload://, a data URI or raw base64"
        )
    sink.write(decode_base64(ref, field, limit))
    return "base64"


UPLOAD_SCHEME = "upload://"


def upload_path(ref: str, settings: Settings, field: str) -> Path:
    """The file an `upload://<id>` names: a file the local server's upload route received,
    in UPLOAD_DIR. The id is one safe name, so nothing outside that folder can be named."""
    name = ref[len(UPLOAD_SCHEME) :]
    problem = safe_name_error(name)
    if problem:
        raise InvalidInput(f"{field}: bad upload id: {problem}")
    path = Path(settings.upload_dir) / name
    if not path.is_file():
        raise InvalidInput(
            f"{field}: no upload {name!r} here (upload:// names a file the local server's "
            "upload route received; on RunPod send a URL instead)"
        )
    return path


def _read_upload_into(ref: str, settings: Settings, field: str, sink: _Sink) -> None:
    path = upload_path(ref, settings, field)
    size = path.stat().st_size
    if size > settings.max_input_bytes:
        raise PayloadTooLarge(
            f"{field} is {size} bytes; the limit is {settings.max_input_bytes} (MAX_INPUT_BYTES)"
        )
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            if control.cancel_requested():
                raise Cancelled("the job was cancelled while reading its upload")
            sink.write(chunk)


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
    sink = _MemorySink()
    _fetch_url_into(url, settings, field, sink)
    return sink.value()


class _Transient(Exception):
    pass


def _fetch_url_into(url: str, settings: Settings, field: str, sink: _Sink) -> None:
    attempts = settings.fetch_retries + 1
    shown = redact_url(url)
    last_error = "no attempt finished"
    with Deadline(settings.fetch_deadline_s, control.current()) as deadline:
        for attempt in range(attempts):
            if attempt:
                deadline.sleep(backoff_s(attempt))
            _stop_if_due(deadline, field, shown, last_error)
            sink.reset()
            try:
                _fetch_once(url, settings, field, sink, deadline)
                return
            except _Transient as exc:
                _stop_if_due(deadline, field, shown, str(exc))  # the cut may be the deadline's
                last_error = str(exc)
                log.warning(
                    "%s: fetch attempt %d/%d failed: %s", field, attempt + 1, attempts, last_error
                )
    raise FetchFailed(f"{field}: could not fetch {shown} after {attempts} tries: {last_error}")


def _stop_if_due(deadline: Deadline, field: str, shown: str, last_error: str) -> None:
    reason = deadline.reason()
    if reason == "cancelled":
        raise Cancelled(
            f"{field}: the download of {shown} stopped: the job was cancelled "
            "(or ran past its execution timeout)"
        )
    if reason == "deadline":
        raise FetchFailed(
            f"{field}: could not fetch {shown} within {deadline.seconds:g} s "
            f"(FETCH_DEADLINE_S; SPLAT_FETCH_DEADLINE_S for splat inputs): {last_error}"
        )


def _fetch_once(url: str, settings: Settings, field: str, sink: _Sink, deadline: Deadline) -> None:
    limit = settings.max_input_bytes
    hop_field = field
    for _hop in range(MAX_REDIRECTS + 1):
        timeout = max(0.01, min(settings.fetch_timeout_s, deadline.remaining()))
        try:
            checked = check_url(
                url, allow_private=settings.allow_private_urls, timeout=timeout, field=hop_field
            )
        except FetchFailed as exc:  # no address: permanent, unless the deadline cut DNS short
            _stop_if_due(deadline, field, redact_url(url), exc.message)
            raise
        shown = redact_url(checked.target.url)
        try:
            connection, response = send(
                checked, "GET", timeout=timeout, headers=_request_headers(), deadline=deadline
            )
        except CERTIFICATE_ERRORS as exc:
            _stop_if_due(deadline, field, shown, describe(exc))
            raise FetchFailed(f"{field}: TLS with {shown} failed ({describe(exc)})") from exc
        except NETWORK_ERRORS as exc:
            raise _Transient(describe(exc)) from exc
        with closing(connection), closing(response):
            location = response.headers.get("location")
            if response.status in _REDIRECT_STATUS and location:
                url = urljoin(checked.target.url, location)
                hop_field = f"{field} (redirected from {shown})"
                continue
            if response.status in _TRANSIENT_STATUS:
                raise _Transient(f"HTTP {response.status}")
            if response.status >= 400:
                raise FetchFailed(
                    f"{field}: {shown} answered HTTP {response.status}", status=response.status
                )
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise PayloadTooLarge(
                    f"{field}: {shown} is {declared} bytes; the limit is {limit} (MAX_INPUT_BYTES)"
                )
            total = 0
            try:
                for chunk in _body(response, field, shown, deadline):
                    total += len(chunk)
                    if total > limit:
                        raise PayloadTooLarge(f"{field}: {shown} is over the {limit}-byte limit")
                    sink.write(chunk)
                    _stop_if_due(deadline, field, shown, f"{total} bytes had arrived")
            except _Transient as exc:  # cut by the deadline or a cancel, or by the network
                _stop_if_due(deadline, field, shown, _arrived(exc.__cause__, total))
                raise
            # A socket shut down by the deadline or a cancel can read as a clean end.
            _stop_if_due(deadline, field, shown, f"{total} bytes had arrived")
            return
    raise FetchFailed(f"{field}: more than {MAX_REDIRECTS} redirects from {redact_url(url)}")


def _body(
    response: BaseHTTPResponse, field: str, shown: str, deadline: Deadline
) -> Iterator[bytes]:
    """The body, decoded, in chunks; network errors become transient, a bad encoding not."""
    try:
        yield from response.stream(CHUNK_BYTES, decode_content=True)
    except DecodeError as exc:
        _stop_if_due(deadline, field, shown, describe(exc))
        encoding = response.headers.get("content-encoding", "?")
        raise FetchFailed(
            f"{field}: {shown} sent a body that does not decode as its Content-Encoding "
            f"({encoding}) says"
        ) from exc
    except NETWORK_ERRORS as exc:
        raise _Transient(f"download interrupted: {_why(exc)}") from exc


def _why(exc: BaseException) -> str:
    """A network error in words; a body shorter than its Content-Length says so."""
    cut = _incomplete(exc)
    if cut is None:
        return describe(exc)
    read, expected = cut
    return (
        f"the connection closed after {read} bytes, {expected} short of the "
        "declared Content-Length (IncompleteRead)"
    )


def _arrived(exc: BaseException | None, total: int) -> str:
    cut = _incomplete(exc) if exc is not None else None
    if cut is None:
        return f"{total} bytes of the body had arrived"
    read, expected = cut
    return f"{read} of the {read + expected} bytes of the body had arrived"


def _incomplete(exc: BaseException) -> tuple[int, int] | None:
    """(bytes read, bytes missing) when the error is a body cut short."""
    cut = exc if isinstance(exc, http.client.IncompleteRead) else None
    cut = cut or next((a for a in exc.args if isinstance(a, http.client.IncompleteRead)), None)
    if cut is None or not isinstance(cut.expected, int):
        return None
    partial = cut.partial
    return (partial if isinstance(partial, int) else len(partial)), cut.expected


# --------------------------------------------------------------------------------------------
# s3://bucket/key


def fetch_s3(
    url: str, settings: Settings, bucket: BucketTarget | None, *, field: str = "image"
) -> bytes:
    sink = _MemorySink()
    _fetch_s3_into(url, settings, bucket, field, sink)
    return sink.value()


def _fetch_s3_into(
    url: str, settings: Settings, bucket: BucketTarget | None, field: str, sink: _Sink
) -> None:
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
    with Deadline(settings.fetch_deadline_s, control.current()) as deadline:
        try:
            # botocore bounds each call by its own timeouts and retries; the deadline bounds
            # the body, which is where a slow server holds a job.
            client = s3_client(target, settings, timeout_s=max(0.01, deadline.remaining()))
            head = client.head_object(Bucket=name, Key=key)
            if int(head["ContentLength"]) > limit:
                raise PayloadTooLarge(
                    f"{field}: {url} is {head['ContentLength']} bytes; the limit is {limit}"
                )
            body = client.get_object(Bucket=name, Key=key)["Body"]
            shutdown = getattr(getattr(body, "_raw_stream", None), "shutdown", None)
            if callable(shutdown):
                deadline.attach(shutdown)
            try:
                total = 0
                for chunk in body.iter_chunks(CHUNK_BYTES):
                    total += len(chunk)
                    if total > limit:
                        raise PayloadTooLarge(f"{field}: {url} is over the {limit}-byte limit")
                    sink.write(chunk)
                    _stop_if_due(deadline, field, url, f"{total} bytes read")
            finally:
                body.close()
            _stop_if_due(deadline, field, url, f"{total} bytes read")
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
            _stop_if_due(deadline, field, url, redact_text(str(exc)))
            raise FetchFailed(f"{field}: could not read {url} ({redact_text(str(exc))})") from exc
