"""Hostile URLs and hostile servers, on real loopback sockets: URLs that two parsers read
differently, DNS that answers differently the second time, IPv6 forms that carry a private
IPv4, redirects to private addresses, servers that send a byte now and then, lie about the
length or send broken gzip, a cancel during a download, and signed URLs in messages and logs.
Each case goes through the real code path (load_payload, the worker in process, the local
endpoint server) and the worker serves a good request after it."""

from __future__ import annotations

import base64
import gzip
import ipaddress
import logging
import socket
import ssl
import threading
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from core.config import Settings
from core.errors import Cancelled, FetchFailed, InvalidInput, PayloadTooLarge
from core.payload import load_payload
from tests.conftest import jpeg_b64, scene_image
from tests.serve_helpers import Recorder, gated_handler, local_server, wait_until

JPEG = base64.b64decode(jpeg_b64(scene_image(320, 240, seed=5)))
SECRET = "s3cr3t-signature-value"


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "allow_private_urls": False,
        "fetch_retries": 0,
        "fetch_timeout_s": 5,
        "fetch_deadline_s": 10,
    }
    base.update(overrides)
    return Settings(**base)


# ----------------------------------------------------------------------------------------------
# A raw loopback HTTP server: each connection's request head is recorded, then `behave` writes
# whatever bytes it likes (a correct response, a lie, a trickle) and the connection is closed.

Behave = Callable[[socket.socket, bytes, threading.Event], None]


class RawServer:
    def __init__(
        self,
        behave: Behave,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.behave = behave
        self.tls_context = tls_context
        self.host = host
        self.listener = socket.create_server((host, port))
        self.port = int(self.listener.getsockname()[1])
        self.requests: list[bytes] = []
        self.closed = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def hits(self) -> int:
        with self.lock:
            return len(self.requests)

    def url(self, path: str = "/a.jpg") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def close(self) -> None:
        self.closed.set()
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        if self.tls_context is not None:
            try:
                conn.settimeout(5)
                conn = self.tls_context.wrap_socket(conn, server_side=True)
            except (OSError, ValueError):
                conn.close()
                return
        with conn:
            conn.settimeout(5)
            head = b""
            try:
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    head += chunk
            except OSError:
                return
            with self.lock:
                self.requests.append(head)
            with suppress(OSError):  # the client went away
                self.behave(conn, head, self.closed)


@contextmanager
def raw_server(
    behave: Behave, host: str = "127.0.0.1", tls_context: ssl.SSLContext | None = None
) -> Iterator[RawServer]:
    server = RawServer(behave, host, tls_context=tls_context)
    try:
        yield server
    finally:
        server.close()


def respond(body: bytes, status: str = "200 OK", **headers: str) -> Behave:
    def behave(conn: socket.socket, head: bytes, closed: threading.Event) -> None:
        lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        conn.sendall(body)  # not concatenated: no copy of a large body in this process

    return behave


def trickle(total: int, every_s: float, give_up_s: float = 8.0) -> Behave:
    """Declares `total` bytes, then sends one byte every `every_s` seconds (and hangs up after
    `give_up_s`, so that a client without a deadline fails a test instead of hanging it)."""

    def behave(conn: socket.socket, head: bytes, closed: threading.Event) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
        ends = time.monotonic() + give_up_s
        for i in range(total):
            if closed.wait(every_s) or time.monotonic() > ends:
                return
            conn.sendall(JPEG[i % len(JPEG) : i % len(JPEG) + 1])

    return behave


def short_body(declared: int, sent: bytes) -> Behave:
    def behave(conn: socket.socket, head: bytes, closed: threading.Event) -> None:
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\n\r\n".encode() + sent)

    return behave


def redirect(location: str) -> Behave:
    def behave(conn: socket.socket, head: bytes, closed: threading.Event) -> None:
        conn.sendall(
            f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode()
        )

    return behave


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture()
def worker_env(inprocess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The in-process worker with these settings (read once per process, so reset)."""

    def apply(**env: str) -> Any:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        inprocess.reset()
        return inprocess

    return apply


def detect(image: str, **options: Any) -> dict[str, Any]:
    return {
        "task": "object-detection",
        "image": image,
        "options": {"threshold": 0.0, "max_det": 3, **options},
    }


def assert_serves_good_request(call: Any) -> None:
    good = call(detect(base64.b64encode(JPEG).decode()))
    assert "error" not in good and good["results"][0]["detections"], good


# ----------------------------------------------------------------------------------------------
# 1. One parser, one checked target, one resolution


def test_backslash_url_is_refused_before_any_connection() -> None:
    """urlsplit reads host 1.1.1.1 here; urllib3 (what requests uses) connects to loopback."""
    with raw_server(respond(JPEG)) as server:
        url = f"http://127.0.0.1:{server.port}\\@1.1.1.1/x.jpg"
        with pytest.raises(InvalidInput, match="backslash"):
            load_payload(url, settings())
        assert server.hits == 0


@pytest.mark.parametrize(
    ("url", "word"),
    [
        ("http://user@{host}/a.jpg", "userinfo"),
        ("http://@{host}/a.jpg", "userinfo"),
        ("http://1.1.1.1@{host}/a.jpg", "userinfo"),
        ("http://{host}/a\tb.jpg", "control"),
        ("http://{host}/a b.jpg", "whitespace"),
        ("http://{host}\u200b/a.jpg", "control"),
        ("http:///a.jpg", "host"),
        ("http://{hostname}:0/a.jpg", "port"),
        ("http://{hostname}:70000/a.jpg", "port"),
        ("http://[::1%25lo]:80/a.jpg", "IPv6"),
    ],
)
def test_ambiguous_urls_are_refused_before_any_connection(url: str, word: str) -> None:
    with raw_server(respond(JPEG)) as server:
        host = f"127.0.0.1:{server.port}"
        with pytest.raises(InvalidInput, match=word):
            # Private addresses allowed: the URL's form alone is refused.
            load_payload(
                url.format(host=host, hostname="127.0.0.1"), settings(allow_private_urls=True)
            )
        assert server.hits == 0


def test_s3_endpoint_with_backslash_gets_no_signed_request(worker_env) -> None:
    """The job's own s3Config.endpointUrl: refused with the same parser, nothing uploaded."""
    call = worker_env(S3_RETRIES="0")
    with raw_server(respond(b"", status="500 Internal Server Error")) as server:
        job_extra = {
            "s3Config": {
                "accessId": "a",
                "accessSecret": "b",
                "bucketName": "c",
                "endpointUrl": f"http://127.0.0.1:{server.port}\\@1.1.1.1",
            }
        }
        result = call(detect(base64.b64encode(JPEG).decode(), annotate=True), **job_extra)
        assert result["error_code"] == "invalid_input", result
        assert "s3Config.endpointUrl" in result["error"] and "backslash" in result["error"]
        assert server.hits == 0
    assert_serves_good_request(call)


def test_s3_endpoint_is_checked_and_normalised() -> None:
    """boto3 connects on its own: it gets the URL as the guard's parser read it."""
    from core.storage import BucketTarget

    target = BucketTarget.from_job(
        {"bucketName": "c", "endpointUrl": "HTTP://LocalHost:9000"},
        settings(allow_private_urls=True),
    )
    assert target is not None and target.endpoint_url == "http://localhost:9000"

    for endpoint, word in (
        ("http://user:pw@127.0.0.1:9000", "userinfo"),
        ("http://[::ffff:127.0.0.1]:9000", "private"),
        ("http://[64:ff9b::7f00:1]:9000", "private"),
        ("ftp://s3.example.com", "http"),
    ):
        with pytest.raises(InvalidInput, match=word):
            BucketTarget.from_job({"bucketName": "c", "endpointUrl": endpoint}, settings())


def test_splatt_filebin_url_with_backslash_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import core.apps
    from core.config import get_settings

    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("WORK_DIR", str(tmp_path))
    monkeypatch.delenv("ALLOW_PRIVATE_URLS", raising=False)
    get_settings.cache_clear()
    try:
        with raw_server(respond(b"not a video")) as server:
            result = core.apps.run_splat(
                {
                    "id": "splatt-1",
                    "input": {
                        "task_id": "t1",
                        "filebin_url": f"http://127.0.0.1:{server.port}\\@1.1.1.1/bin",
                        "filename": "clip.mp4",
                    },
                }
            )
            assert result["error_code"] == "invalid_input", result
            assert "backslash" in result["error"]
            assert server.hits == 0
    finally:
        get_settings.cache_clear()


def _treat_first_loopback_as_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """127.0.0.1 stands for a public server in the redirect tests (tests have no internet);
    every other private address keeps the guard's own answer."""
    import core.netguard

    real = core.netguard.is_public_address

    def is_public(address: Any) -> bool:
        return address == ipaddress.IPv4Address("127.0.0.1") or real(address)

    monkeypatch.setattr(core.netguard, "is_public_address", is_public, raising=False)


PUBLIC_TEST_IP = "93.184.216.34"  # a global address; never reached: connecting is refused


def test_dns_rebinding_cannot_move_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The name answers a public address first, loopback after: the fetch resolves once and
    connects only to the address it checked, never to the loopback server."""
    import urllib3.util.connection

    real_getaddrinfo = socket.getaddrinfo
    real_connect = urllib3.util.connection.create_connection
    lookups: list[str] = []
    connected: list[str] = []

    with raw_server(respond(JPEG)) as loopback:

        def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            if host == "rebind.test":
                lookups.append(host)
                address = PUBLIC_TEST_IP if len(lookups) == 1 else "127.0.0.1"
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
            return real_getaddrinfo(host, port, *args, **kwargs)

        def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> Any:
            connected.append(address[0])
            if address[0] == PUBLIC_TEST_IP:  # the public host is down (and tests are offline)
                raise ConnectionRefusedError("connection refused")
            return real_connect(address, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(urllib3.util.connection, "create_connection", create_connection)
        with pytest.raises(FetchFailed):
            load_payload(f"http://rebind.test:{loopback.port}/a.jpg", settings())
        assert loopback.hits == 0
        assert connected == [PUBLIC_TEST_IP] and lookups == ["rebind.test"]


def test_connection_is_pinned_to_the_checked_address_with_the_host_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The name answers the checked ('public') address first and another one after: the
    second answer is never used, and the request still names its host (Host header)."""
    _treat_first_loopback_as_public(monkeypatch)
    real_getaddrinfo = socket.getaddrinfo
    with raw_server(respond(JPEG)) as first:
        try:
            second_server = RawServer(respond(b"wrong server"), host="127.0.0.2", port=first.port)
        except OSError:
            pytest.skip("127.0.0.2 cannot be bound here")
        try:
            answers: list[str] = []

            def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
                if host == "pinned.test":
                    address = "127.0.0.1" if not answers else "127.0.0.2"
                    answers.append(address)
                    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
                return real_getaddrinfo(host, port, *args, **kwargs)

            monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
            payload = load_payload(f"http://pinned.test:{first.port}/a.jpg", settings())
            assert payload.data == JPEG
            assert first.hits == 1 and second_server.hits == 0 and answers == ["127.0.0.1"]
            assert f"Host: pinned.test:{first.port}\r\n".encode() in first.requests[0]
        finally:
            second_server.close()


def _tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for `tls.test` only: (ca.pem, cert.pem, key.pem)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key: Any, issuer: Any, issuer_key: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("tls.test")]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = cert("test CA", ca_key, ca_name, ca_key, True)
    leaf = cert("tls.test", key, ca_name, ca_key, False)
    paths = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_https_is_pinned_with_sni_and_certificate_checked_for_the_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Connected to the checked IP, TLS still sends SNI `tls.test` and verifies the
    certificate for `tls.test`; the same server reached by its IP fails verification."""
    import certifi

    ca, cert_file, key_file = _tls_files(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_file, key_file)
    names: list[str | None] = []

    def record_sni(sock: Any, name: str | None, context: Any) -> None:
        names.append(name)

    server_context.sni_callback = record_sni
    with raw_server(respond(JPEG), tls_context=server_context) as server:
        real_getaddrinfo = socket.getaddrinfo

        def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
            if host == "tls.test":
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
            return real_getaddrinfo(host, port, *args, **kwargs)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(certifi, "where", lambda: str(ca))
        allowed = settings(allow_private_urls=True)
        assert load_payload(f"https://tls.test:{server.port}/a.jpg", allowed).data == JPEG
        assert names == ["tls.test"]
        assert f"Host: tls.test:{server.port}\r\n".encode() in server.requests[0]
        with pytest.raises(FetchFailed, match=r"TLS|certificate"):
            load_payload(f"https://127.0.0.1:{server.port}/a.jpg", allowed)
        assert server.hits == 1


EMBEDDED_LOOPBACK = [
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::127.0.0.1",  # IPv4-compatible
    "64:ff9b::127.0.0.1",  # NAT64
    "2002:7f00:1::1",  # 6to4 of 127.0.0.1
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254 (cloud metadata)
]


@pytest.mark.parametrize("address", EMBEDDED_LOOPBACK)
def test_ipv6_forms_that_carry_a_private_ipv4_are_refused(address: str) -> None:
    with pytest.raises(InvalidInput, match="private or loopback"):
        load_payload(f"http://[{address}]:8080/a.jpg", settings())


def test_ipv6_forms_are_judged_by_the_ipv4_they_carry() -> None:
    from core.netguard import embedded_ipv4, is_public_address

    for address in EMBEDDED_LOOPBACK:
        parsed = ipaddress.IPv6Address(address)
        assert embedded_ipv4(parsed), address
        assert not is_public_address(parsed), address
    for address in ("::ffff:1.1.1.1", "64:ff9b::1.1.1.1", "2002:101:101::1", "2606:4700::1111"):
        assert is_public_address(ipaddress.IPv6Address(address)), address
    assert not is_public_address(ipaddress.IPv4Address("224.0.0.1"))  # multicast
    assert not is_public_address(ipaddress.IPv4Address("100.64.0.1"))  # carrier-grade NAT


def test_ipv6_embedded_loopback_through_the_worker(worker_env) -> None:
    call = worker_env()
    result = call(detect("http://[64:ff9b::7f00:1]/a.jpg"))
    assert result["error_code"] == "invalid_input" and "private" in result["error"], result
    assert_serves_good_request(call)


@pytest.mark.parametrize("form", ["plain", "backslash"])
def test_redirect_to_a_private_address_is_refused(
    monkeypatch: pytest.MonkeyPatch, form: str
) -> None:
    """A 'public' server answers 302 to a private address: each hop goes through the check,
    and the private server is never connected to."""
    try:
        private = RawServer(respond(b"internal secrets"), host="127.0.0.2")
    except OSError:
        pytest.skip("127.0.0.2 cannot be bound here")
    try:
        location = {
            "plain": private.url("/secret"),
            "backslash": f"http://127.0.0.2:{private.port}\\@1.1.1.1/secret",
        }[form]
        with raw_server(redirect(location)) as public:
            _treat_first_loopback_as_public(monkeypatch)
            with pytest.raises(InvalidInput, match=r"private or loopback|backslash"):
                load_payload(public.url("/start.jpg"), settings())
            assert public.hits == 1 and private.hits == 0
    finally:
        private.close()


# ----------------------------------------------------------------------------------------------
# 2. A total deadline, cancel, and streaming to disk


def test_a_trickling_server_fails_within_the_deadline(worker_env) -> None:
    """One byte every 0.2 s: each read is within FETCH_TIMEOUT_S, the whole is not."""
    call = worker_env(
        ALLOW_PRIVATE_URLS="true", FETCH_DEADLINE_S="1.5", FETCH_TIMEOUT_S="5", FETCH_RETRIES="2"
    )
    with raw_server(trickle(total=len(JPEG), every_s=0.2)) as server:
        started = time.monotonic()
        result = call(detect(server.url()))
        elapsed = time.monotonic() - started
    assert result["error_code"] == "fetch_failed", result
    assert "FETCH_DEADLINE_S" in result["error"]
    assert elapsed < 4.0, elapsed
    assert_serves_good_request(call)


def test_deadline_covers_retries_and_their_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    with raw_server(respond(b"busy", status="503 Service Unavailable")) as server:
        started = time.monotonic()
        with pytest.raises(FetchFailed, match="FETCH_DEADLINE_S"):
            load_payload(
                server.url(),
                settings(allow_private_urls=True, fetch_retries=10, fetch_deadline_s=2),
            )
        assert time.monotonic() - started < 3.5
        assert 1 <= server.hits < 11


def test_cancel_stops_a_download_under_the_local_server(worker_env, tmp_path: Path) -> None:
    import core.apps

    worker_env(ALLOW_PRIVATE_URLS="true", FETCH_DEADLINE_S="120", FETCH_TIMEOUT_S="30")
    with (
        raw_server(trickle(total=100_000, every_s=0.05)) as slow,
        local_server(core.apps.run_infer, tmp_path / "jobs.sqlite3") as server,
    ):
        client = server.client
        job_id = client.run(detect(slow.url()))
        wait_until(lambda: slow.hits == 1 and client.status(job_id)["status"] == "IN_PROGRESS")
        time.sleep(0.3)  # well into the body
        cancelled = client.call("POST", f"/cancel/{job_id}").json()
        assert cancelled["status"] == "CANCELLED"
        started = time.monotonic()
        health = client.wait_idle(timeout=3)  # the worker thread really returned
        assert time.monotonic() - started < 3
        assert health["workers"] == {"idle": 1, "running": 0, "stopping": 0}
        # The same server, the same slot: the next job runs.
        good = client.run(detect(base64.b64encode(JPEG).decode()))
        body = client.wait_final(good, timeout=60)
        assert body["status"] == "COMPLETED", body


def test_cancel_between_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from core import control

    job = control.JobControl("j", report_progress=lambda job, update: None)
    with raw_server(respond(b"busy", status="503 Service Unavailable")) as server:
        threading.Timer(0.3, lambda: job.request_stop("cancelled")).start()
        started = time.monotonic()
        with control.bind(job), pytest.raises(Cancelled):
            load_payload(
                server.url(),
                settings(allow_private_urls=True, fetch_retries=10, fetch_deadline_s=60),
            )
        assert time.monotonic() - started < 1.5


def test_load_payload_to_file_streams_to_disk(tmp_path: Path) -> None:
    from core.payload import load_payload_to_file

    big = bytes(range(256)) * (16 * 1024 * 1024 // 256)  # 16 MiB
    with raw_server(respond(big)) as server:
        tracemalloc.start()
        try:
            fetched = load_payload_to_file(
                server.url("/big.bin"),
                settings(allow_private_urls=True, max_input_bytes=len(big)),
                tmp_path / "in.bin",
            )
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert fetched.path.read_bytes() == big and fetched.bytes == len(big)
        assert fetched.source == "url"
        assert peak < 4 * 1024 * 1024, peak  # chunks, never the whole file in memory

        with pytest.raises(PayloadTooLarge):
            load_payload_to_file(
                server.url("/big.bin"),
                settings(allow_private_urls=True, max_input_bytes=len(big) - 1),
                tmp_path / "too-big.bin",
            )
    small = load_payload_to_file(base64.b64encode(JPEG).decode(), settings(), tmp_path / "b64.jpg")
    assert small.path.read_bytes() == JPEG and small.media_type == "image/jpeg"


def test_splat_download_goes_to_the_work_dir(tmp_path: Path) -> None:
    from core.splat.frames import photos_from_zip
    from core.splat.pipeline import _fetch

    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.jpg", JPEG)
        zf.writestr("b.jpg", JPEG)
    work = tmp_path / "work"
    work.mkdir()
    with raw_server(respond(archive.read_bytes())) as server:
        fetched = _fetch("zip", server.url("/p.zip"), settings(allow_private_urls=True), None, work)
    assert isinstance(fetched, Path) and fetched.parent == work
    assert fetched.read_bytes() == archive.read_bytes()
    assert len(photos_from_zip(fetched, 160)) == 2


# ----------------------------------------------------------------------------------------------
# 3. Truncated bodies and broken gzip are fetch_failed


def test_content_length_longer_than_the_body_is_fetch_failed(worker_env) -> None:
    call = worker_env(ALLOW_PRIVATE_URLS="true", FETCH_RETRIES="2", FETCH_DEADLINE_S="10")
    with raw_server(short_body(len(JPEG), JPEG[:100])) as server:
        result = call(detect(server.url()))
        assert result["error_code"] == "fetch_failed", result
        assert "after 3 tries" in result["error"] and "IncompleteRead" in result["error"]
        assert server.hits == 3  # retried as a network cut
    assert_serves_good_request(call)


def test_broken_gzip_is_fetch_failed_and_not_retried(worker_env) -> None:
    call = worker_env(ALLOW_PRIVATE_URLS="true", FETCH_RETRIES="2", FETCH_DEADLINE_S="10")
    garbage = b"\x1f\x8b\x08\x00" + bytes(range(200))
    with raw_server(respond(garbage, Content_Encoding="gzip")) as server:
        result = call(detect(server.url()))
        assert result["error_code"] == "fetch_failed", result
        assert "gzip" in result["error"]
        assert server.hits == 1
    with raw_server(respond(gzip.compress(JPEG), Content_Encoding="gzip")) as server:
        assert load_payload(server.url(), settings(allow_private_urls=True)).data == JPEG
    assert_serves_good_request(call)


# ----------------------------------------------------------------------------------------------
# 4. Signed URLs never leak


def test_signed_query_never_appears_in_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    query = f"?X-Amz-Credential=AKIA&X-Amz-Signature={SECRET}"
    strict = settings(allow_private_urls=True, fetch_retries=1)
    with (
        raw_server(respond(b"no", status="404 Not Found")) as server,
        pytest.raises(FetchFailed, match="HTTP 404") as missing,
    ):
        load_payload(server.url("/a.jpg" + query), strict)
    with pytest.raises(FetchFailed) as refused:  # connection refused: the client's own text
        load_payload(f"http://127.0.0.1:{closed_port()}/a.jpg{query}", strict)
    with pytest.raises(InvalidInput) as private:
        load_payload(f"http://user:{SECRET}@10.0.0.1/a.jpg{query}", settings())
    for exc in (missing.value, refused.value, private.value):
        assert SECRET not in str(exc) and "AKIA" not in str(exc), exc
    assert "a.jpg" in str(refused.value)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "fetch attempt 1/2 failed" in logged
    assert SECRET not in logged, logged


def test_redact_url_drops_userinfo_query_and_fragment() -> None:
    from core.netguard import redact_text, redact_url

    assert redact_url(f"https://u:{SECRET}@h.example:8443/a/b.jpg?sig={SECRET}#f") == (
        "https://h.example:8443/a/b.jpg"
    )
    text = f"Max retries exceeded with url: /a.jpg?X-Amz-Signature={SECRET} (Caused by x)"
    assert SECRET not in redact_text(text) and "/a.jpg" in redact_text(text)


def test_webhooks_to_private_addresses_are_refused_and_logs_redacted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="serve.runner")
    with raw_server(respond(b"")) as receiver:
        with local_server(
            gated_handler(Recorder(), {}),
            tmp_path / "jobs.sqlite3",
            webhook_retries=1,
            webhook_retry_delay_s=0.05,
        ) as server:
            server.client.run({"n": 3}, webhook=receiver.url(f"/hook?token={SECRET}"))

            def state() -> str | None:
                jobs = server.client.call("GET", "/jobs").json()["jobs"]
                return jobs[0].get("webhook", {}).get("state")

            wait_until(lambda: state() == "failed")
        assert receiver.hits == 0
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "SERVE_ALLOW_PRIVATE_WEBHOOKS" in logged and SECRET not in logged, logged

    # Opted in (a local receiver): delivered; a dead one's failures are logged without the token.
    caplog.clear()
    with (
        raw_server(respond(b"")) as receiver,
        local_server(
            gated_handler(Recorder(), {}),
            tmp_path / "jobs2.sqlite3",
            webhook_retries=1,
            webhook_retry_delay_s=0.05,
            allow_private_webhooks=True,
        ) as server,
    ):
        server.client.run({"n": 4}, webhook=receiver.url(f"/hook?token={SECRET}"))
        dead = f"http://127.0.0.1:{closed_port()}/hook?token={SECRET}"
        server.client.run({"n": 5}, webhook=dead)
        wait_until(lambda: receiver.hits == 1)
        wait_until(lambda: "webhook attempt 2/2 failed" in caplog.text)
    assert SECRET not in caplog.text, caplog.text
