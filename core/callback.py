"""A job's own callback (an app's `callback_url`): one JSON POST, signed by the Standard
Webhooks scheme, through the private-address guard, with a timeout and bounded retries.

RunPod's `webhook` is RunPod's and untouched by this; this is for apps whose backend called
them back itself (Game View). Delivery never raises: the job's result is final already.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from core.config import Settings
from core.errors import FetchFailed, InvalidInput
from core.netguard import check_public_host, redact_url
from core.retry import backoff_s

log = logging.getLogger("worker.callback")


def signed_headers(secret: str, msg_id: str, body: str, now: datetime) -> dict[str, str]:
    """webhook-id, webhook-timestamp, webhook-signature as Standard Webhooks defines them."""
    from standardwebhooks import Webhook

    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body),
    }


def check_callback_url(url: Any, settings: Settings, field: str = "callback_url") -> str:
    """The URL if it is http(s) on a public host (or ALLOW_PRIVATE_URLS); else InvalidInput."""
    if not isinstance(url, str) or not url:
        raise InvalidInput(f"{field}: an http(s) URL is required")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(f"{field}: must be an http(s) URL")
    check_public_host(parts.hostname, parts.port, settings, field)
    return url


def deliver(url: str, payload: dict[str, Any], settings: Settings) -> bool:
    """POST `payload` to `url`; True once the receiver answered 2xx. Retried on connection
    errors and 5xx/429 (CALLBACK_RETRIES times, backed off), never on another 4xx."""
    import requests

    try:
        check_callback_url(url, settings)
    except (InvalidInput, FetchFailed) as exc:
        log.warning("callback not sent: %s", exc)
        return False
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    msg_id = f"msg_{uuid.uuid4().hex}"
    secret = settings.callback_signing_secret
    target = redact_url(url)
    for attempt in range(settings.callback_retries + 1):
        if attempt:
            time.sleep(backoff_s(attempt))
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            # Signed afresh on every attempt: receivers refuse stale timestamps.
            now = datetime.now(timezone.utc)
            headers.update(signed_headers(secret.get_secret_value(), msg_id, body, now))
        try:
            response = requests.post(
                url,
                data=body.encode(),
                headers=headers,
                timeout=settings.callback_timeout_s,
                allow_redirects=False,  # a redirect could point past the address guard
            )
        except requests.RequestException as exc:
            log.warning("callback to %s failed (attempt %d): %s", target, attempt + 1, exc)
            continue
        if 200 <= response.status_code < 300:
            log.info("callback to %s delivered (%d)", target, response.status_code)
            return True
        log.warning(
            "callback to %s answered %d (attempt %d)", target, response.status_code, attempt + 1
        )
        if response.status_code < 500 and response.status_code != 429:
            return False
    return False
