"""Perception Concept Studio (repository `Mayakshanesht/perception-playground`).

Its proxy sends `{"task", "model", "payloadBase64", "mimeType", "options"}`: the media is raw
base64 of an image or a video, and `mimeType` is often `application/octet-stream`, so the type
is read from the bytes (our `media` field) and `mimeType` is not trusted.
"""

from __future__ import annotations

from typing import Any

from core.apps.base import App, without
from core.contract import RequestAdapter


def recognises(job_input: dict[str, Any]) -> bool:
    return "payloadBase64" in job_input


def to_native(job_input: dict[str, Any]) -> dict[str, Any]:
    native = without(job_input, "payloadBase64", "mimeType")
    native["media"] = job_input["payloadBase64"]
    return native


APP = App(
    name="studio",
    title="Perception Concept Studio",
    worker="infer",
    recognises=recognises,
    adapter=RequestAdapter(to_native=to_native),
)
