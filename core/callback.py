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

from core.config import Settings
from core.errors import FetchFailed, InvalidInput
from core.netguard import NETWORK_ERRORS, check_url, describe, post_once, redact_url
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
    """The URL if the guard takes it (one parser, every address public unless
    ALLOW_PRIVATE_URLS); else InvalidInput. Checked when the job is taken, and again (and
    pinned) when the callback is sent."""
    if not isinstance(url, str) or not url:
        raise InvalidInput(f"{field}: an http(s) URL is required")
    check_url(
        url,
        allow_private=settings.allow_private_urls,
        timeout=settings.callback_timeout_s,
        field=field,
    )
    return url


def deliver(url: str, payload: dict[str, Any], settings: Settings) -> bool:
    """POST `payload` to `url`; True once the receiver answered 2xx. Retried on network
    errors and 5xx/429 (CALLBACK_RETRIES times, backed off), never on another 4xx nor on a
    URL the guard refuses."""
    body = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    msg_id = f"msg_{uuid.uuid4().hex}"
    secret = settings.callback_signing_secret
    target = redact_url(url)
    for attempt in range(settings.callback_retries + 1):
        if attempt:
            time.sleep(backoff_s(attempt))
        headers: dict[str, str] = {}
        if secret is not None:
            # Signed afresh on every attempt: receivers refuse stale timestamps.
            now = datetime.now(timezone.utc)
            headers.update(signed_headers(secret.get_secret_value(), msg_id, body, now))
        try:
            status = post_once(
                url,
                body.encode(),
                timeout_s=settings.callback_timeout_s,
                allow_private=settings.allow_private_urls,
                field="callback_url",
                opt_in="ALLOW_PRIVATE_URLS=true",
                setting="CALLBACK_TIMEOUT_S",
                headers=headers,
            )
        except InvalidInput as exc:
            log.warning("callback not sent: %s", exc.message)
            return False
        except (FetchFailed, TimeoutError, *NETWORK_ERRORS) as exc:
            log.warning(
                "callback to %s failed (attempt %d): %s", target, attempt + 1, describe(exc)
            )
            continue
        if 200 <= status < 300:
            log.info("callback to %s delivered (%d)", target, status)
            return True
        log.warning("callback to %s answered %d (attempt %d)", target, status, attempt + 1)
        if status < 500 and status != 429:
            return False
    return False
