"""The private-address guard (SSRF): every URL a job names is checked here before a connection.

One module below both input fetching (`payload.py`) and storage (a job's own `s3Config`
endpoint), so neither imports the other for it.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from core.config import Settings
from core.errors import FetchFailed, InvalidInput


def check_public_host(host: str, port: int | None, settings: Settings, field: str) -> None:
    """Refuse hosts that resolve to anything but public addresses (SSRF guard)."""
    if settings.allow_private_urls:
        return
    try:
        infos = socket.getaddrinfo(host, port or 443, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise FetchFailed(f"{field}: cannot resolve host {host!r} ({exc})") from exc
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if not address.is_global:
            raise InvalidInput(
                f"{field}: {host} resolves to a private or loopback address ({address}); "
                "such URLs are refused unless ALLOW_PRIVATE_URLS=true"
            )


def redact_url(url: str) -> str:
    """The URL without its query string, which often carries signatures."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"
