"""The private-address guard (SSRF), and the one way a job's URL is read and connected to.

A URL is parsed once, with urllib3's parser (the one requests uses), into a `Target`, and
whatever two parsers could read differently is refused: a backslash, whitespace or control
characters, userinfo (`@`) in the authority, an empty host, a scheme other than http(s), a
port out of range. The host is resolved once (`check_url`), every address it resolves to is
checked, and `send` connects to one of those addresses while the Host header, TLS SNI and
the certificate check keep the hostname, so a second DNS answer can never be the one used.
IPv6 forms that carry an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo) are judged
by that IPv4. `Deadline` bounds one exchange in total and ends it when the job is stopped;
`redact_url` is the one way a URL is echoed (no userinfo, query or fragment).

One module below input fetching (`payload.py`), storage (a job's own `s3Config` endpoint)
and the local server's webhooks, so none imports another for it.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import closing, suppress
from dataclasses import dataclass
from types import TracebackType

from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    LocationParseError,
    NewConnectionError,
)
from urllib3.response import BaseHTTPResponse
from urllib3.util import parse_url
from urllib3.util.ssl_match_hostname import CertificateError

from core.control import JobControl
from core.errors import FetchFailed, InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CERTIFICATE_ERRORS = (ssl.SSLCertVerificationError, CertificateError)
"""The server's certificate is not valid for the host: permanent, never retried."""
NETWORK_ERRORS = (HTTPError, http.client.HTTPException, OSError)
"""What `send` and reading a response raise when the network or the server fails."""

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
    r"(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$"
)
_AUTHORITY = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.\-]*://([^/?#]*)")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="netguard-dns")


@dataclass(frozen=True)
class Target:
    """One http(s) URL as urllib3 reads it; the only reading any code here acts on."""

    scheme: str
    host: str
    """Lower case, IDNA-encoded; an IPv6 literal without brackets."""
    port: int
    explicit_port: bool
    request_target: str
    """What goes on the request line: the path and the query."""
    url: str
    """The whole URL, normalised (what boto3 gets for an endpoint)."""

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.explicit_port else host


@dataclass(frozen=True)
class CheckedTarget:
    target: Target
    addresses: tuple[str, ...]
    """What the host resolved to, once, in order; every one was checked."""


def parse_target(url: str, field: str) -> Target:
    """Parse an http(s) URL the way the HTTP client reads it, refusing ambiguous forms."""
    if not isinstance(url, str) or not url:
        raise InvalidInput(f"{field}: the URL is empty")
    bad = next((c for c in url if _is_blank_or_control(c)), None)
    if bad is not None:
        raise InvalidInput(
            f"{field}: the URL holds a whitespace or control character ({bad!r}); percent-encode it"
        )
    if "\\" in url:
        raise InvalidInput(
            f"{field}: the URL holds a backslash, which HTTP clients and URL parsers read "
            "differently; percent-encode it (%5C)"
        )
    authority = _AUTHORITY.match(url)
    if authority is None:
        raise InvalidInput(f"{field}: not an http(s) URL")
    if "@" in authority.group(1):
        raise InvalidInput(
            f"{field}: the URL holds userinfo (`user@`) before its host; send it without"
        )
    try:
        parsed = parse_url(url)
    except LocationParseError as exc:
        raise InvalidInput(f"{field}: not a valid URL (is its port 1-65535?)") from exc
    scheme = parsed.scheme or ""
    if scheme not in _DEFAULT_PORTS:
        raise InvalidInput(f"{field}: not an http(s) URL")
    host = (parsed.host or "").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if _ip_or_none(host) is None or "%" in host:
            raise InvalidInput(f"{field}: the URL has an IPv6 host that is not a plain address")
    elif not host or not _HOSTNAME.match(host):
        raise InvalidInput(f"{field}: the URL has no valid host name")
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise InvalidInput(f"{field}: the URL has port {parsed.port}; ports are 1-65535")
    return Target(
        scheme=scheme,
        host=host,
        port=parsed.port or _DEFAULT_PORTS[scheme],
        explicit_port=parsed.port is not None,
        request_target=parsed.request_uri,
        url=parsed.url,
    )


def check_url(
    url: str,
    *,
    allow_private: bool,
    timeout: float,
    field: str,
    opt_in: str = "ALLOW_PRIVATE_URLS=true",
) -> CheckedTarget:
    """Parse, resolve once and check every address: `InvalidInput` for a refused URL,
    `FetchFailed` when DNS gives no address within `timeout` seconds."""
    target = parse_target(url, field)
    addresses = resolve(target.host, target.port, timeout, field)
    if not allow_private:
        for address in addresses:
            if not is_public_address(ipaddress.ip_address(address)):
                raise InvalidInput(
                    f"{field}: {target.host} resolves to a private or loopback address "
                    f"({address}); such URLs are refused unless {opt_in}"
                )
    return CheckedTarget(target, addresses)


def resolve(host: str, port: int, timeout: float, field: str) -> tuple[str, ...]:
    """The host's addresses, from one DNS lookup bounded by `timeout` seconds."""
    literal = _ip_or_none(host)
    if literal is not None:
        return (str(literal),)
    lookup = _resolver.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
    try:
        infos = lookup.result(timeout=max(0.01, timeout))
    except FutureTimeout as exc:
        raise FetchFailed(
            f"{field}: cannot resolve host {host!r} (no answer in {timeout:.0f} s)"
        ) from exc
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchFailed(f"{field}: cannot resolve host {host!r} ({exc})") from exc
    addresses: list[str] = []
    for info in infos:
        address = str(info[4][0]).split("%")[0]
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise FetchFailed(f"{field}: cannot resolve host {host!r} (no address)")
    return tuple(addresses)


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (and a host may reach it by)."""
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d
        found.append(address.ipv4_mapped)
    if address in _IPV4_COMPATIBLE or address in _NAT64:  # ::a.b.c.d, 64:ff9b::a.b.c.d
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address.sixtofour is not None:  # 2002:AABB:CCDD::/48
        found.append(address.sixtofour)
    if address.teredo is not None:  # 2001::/32: (server, client)
        found.extend(address.teredo)
    return found


def is_public_address(address: IPAddress) -> bool:
    """Global unicast; an IPv6 form that carries an IPv4 address is judged by that IPv4."""
    candidates: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        candidates = [*embedded_ipv4(address)] or candidates
    return all(a.is_global and not a.is_multicast for a in candidates)


# --------------------------------------------------------------------------------------------
# Connecting to the checked address


def send(
    checked: CheckedTarget,
    method: str,
    *,
    timeout: float,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    deadline: Deadline | None = None,
) -> tuple[HTTPConnection, BaseHTTPResponse]:
    """One request to the first checked address that accepts a connection; the response's
    body is not read yet. The caller closes the connection. urllib3's errors propagate."""
    target = checked.target
    last: Exception | None = None
    for address in checked.addresses:
        connection = _connection(target, address, timeout)
        if deadline is not None:
            deadline.attach(functools.partial(_shutdown, connection))
        try:
            connection.request(
                method,
                target.request_target,
                body=body,
                headers={"Host": target.host_header, **(headers or {})},
                preload_content=False,
                decode_content=True,
                enforce_content_length=True,
            )
            return connection, connection.getresponse()
        except (NewConnectionError, ConnectTimeoutError) as exc:  # nothing sent: the next one
            connection.close()
            last = exc
        except BaseException:
            connection.close()
            raise
    assert last is not None  # addresses is never empty
    raise last


def post_once(
    url: str,
    body: bytes,
    *,
    timeout_s: float,
    allow_private: bool,
    field: str,
    opt_in: str,
    setting: str,
    headers: dict[str, str] | None = None,
) -> int:
    """POST a JSON body once through the guard, connected to the checked address, within
    `timeout_s` in total; redirects are not followed (one could point past the guard). The
    status code. `InvalidInput` for a refused URL (never worth a retry), `FetchFailed` for no
    address, NETWORK_ERRORS / TimeoutError for the network: webhooks and app callbacks."""
    with Deadline(timeout_s) as deadline:
        checked = check_url(
            url, allow_private=allow_private, timeout=timeout_s, field=field, opt_in=opt_in
        )
        try:
            connection, response = send(
                checked,
                "POST",
                timeout=max(0.01, deadline.remaining()),
                headers={"Content-Type": "application/json", **(headers or {})},
                body=body,
                deadline=deadline,
            )
            with closing(connection), closing(response):
                response.read(64 * 1024)  # the answer is not used; read, bounded, all the same
        except NETWORK_ERRORS:
            if deadline.reason() is None:
                raise
        if deadline.reason() is not None:
            raise TimeoutError(f"no complete answer within {timeout_s:g} s ({setting})")
        return response.status


def _connection(target: Target, address: str, timeout: float) -> HTTPConnection:
    if target.scheme == "https":
        import certifi  # requests' CA bundle

        # Connected to the checked address; SNI and the certificate are checked for the host.
        return HTTPSConnection(
            address,
            target.port,
            timeout=timeout,
            server_hostname=target.host,
            assert_hostname=target.host.rstrip("."),
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
        )
    return HTTPConnection(address, target.port, timeout=timeout)


def _shutdown(connection: HTTPConnection) -> None:
    """End whatever blocks on the connection's socket, from another thread."""
    sock = connection.sock
    if sock is not None:
        with suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, even for TLS


class Deadline:
    """A total time limit for one exchange (every try, redirect and the body), which also
    ends when the job is asked to stop (`core/control.py`). While it is entered, a watcher
    thread calls the attached stopper (a socket shutdown) once time is up or the job stops,
    so a read blocked on a server that sends a byte now and then ends at once."""

    POLL_S = 0.05

    def __init__(self, seconds: float, control: JobControl | None = None) -> None:
        self.seconds = seconds
        self.ends = time.monotonic() + seconds
        self.control = control
        self._reason: str | None = None
        self._stopper: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Deadline:
        self._thread = threading.Thread(target=self._watch, name="netguard-deadline", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def remaining(self) -> float:
        return max(0.0, self.ends - time.monotonic())

    def reason(self) -> str | None:
        """`cancelled` or `deadline` once either happened, else None."""
        if self._reason is None:
            if self.control is not None and self.control.stop.is_set():
                self._reason = "cancelled"
            elif time.monotonic() >= self.ends:
                self._reason = "deadline"
        return self._reason

    def attach(self, stopper: Callable[[], None]) -> None:
        with self._lock:
            self._stopper = stopper
            fired = self._reason is not None
        if fired:
            stopper()

    def sleep(self, seconds: float) -> None:
        """Wait, but no longer than the deadline nor past a stop."""
        until = min(self.ends, time.monotonic() + seconds)
        while self.reason() is None and time.monotonic() < until:
            time.sleep(min(self.POLL_S, max(0.0, until - time.monotonic())))

    def _watch(self) -> None:
        while not self._done.wait(self.POLL_S):
            if self.reason() is not None:
                with self._lock:
                    stopper = self._stopper
                if stopper is not None:
                    stopper()
                return


# --------------------------------------------------------------------------------------------
# Echoing URLs


def redact_url(url: str) -> str:
    """scheme://host[:port]/path: without userinfo, query or fragment (signatures, tokens)."""
    try:
        parts = parse_url(url)
    except (LocationParseError, ValueError):
        return "<an unparseable URL>"
    if not parts.scheme:
        return parts.path or ""
    host = parts.host or ""
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}{parts.path or ''}"


_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>()]+")
_QUERY_IN_TEXT = re.compile(r"(/[^\s?#'\"<>()]*)\?[^\s'\"<>()]*")


def redact_text(text: str) -> str:
    """Free text (an exception's message, a log line) with every URL in it redacted, and the
    query of any bare path too (`url: /a.jpg?X-Amz-Signature=...`)."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    return _QUERY_IN_TEXT.sub(r"\1", text)


class _RedactUrls(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message or "://" in message:
            record.msg, record.args = redact_text(message), ()
        return True


# urllib3 logs request paths with their query (a failed header parse, every request at DEBUG).
for _name in ("urllib3.connection", "urllib3.connectionpool", "urllib3.response"):
    logging.getLogger(_name).addFilter(_RedactUrls())


def _is_blank_or_control(char: str) -> bool:
    return char.isspace() or unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Zs")


def _ip_or_none(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def describe(exc: BaseException) -> str:
    """An exception as one redacted line, for messages and logs."""
    # urllib3 wraps the cause in its args: ('Connection broken: ...', IncompleteRead(...)).
    first = exc.args[0] if exc.args else None
    text = first if isinstance(first, str) and len(exc.args) > 1 else str(exc)
    text = text or type(exc).__name__
    return redact_text(f"{type(exc).__name__}: {text}")
