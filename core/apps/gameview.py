"""Game View: several source videos of one production to one Gaussian splat, with a callback.

Its studio app POSTs a trigger body, `{production_id, experience_id, source_videos: [{url,
filename, size}], settings: {totalSteps, maxSplats, fps, imagePercentage, duration},
callback_url}`, and reads a callback `{success, production_id, experience_id, outputs:
{plyUrl, camerasUrl, thumbnailUrl}, error}` sent on success and on failure. Its outputs are
`scene.ply`, `cameras.json` and `thumbnail.jpg` under `<production_id>/`.

Here the trigger body is a splat job's `input`: every source video goes into one
reconstruction (our `videos`, one camera model per video), and the callback is POSTed by
`after_job` (core/callback.py: signed, guarded, retried).
"""

from __future__ import annotations

import math
from typing import Any

from core.apps.base import App, without
from core.callback import deliver
from core.config import get_settings
from core.contract import RequestAdapter
from core.errors import InvalidInput
from core.naming import safe_name
from core.netguard import parse_target

GAMEVIEW_FIELDS = ("production_id", "experience_id", "source_videos", "settings", "callback_url")

# Its settings' names -> ours. `duration` (seconds) ends each clip's time window.
SETTINGS_MAP = {
    "totalSteps": "iterations",
    "maxSplats": "max_gaussians",
    "fps": "fps",
    "duration": "end_sec",
}
IGNORED_SETTINGS = {
    "imagePercentage": (
        "settings.imagePercentage is ignored: Game View's own worker lists it but never reads "
        "it, so no meaning can be honoured (frames keep max_side)"
    ),
}
# Its file names for our formats; cameras.json and thumbnail.jpg are ours already.
ARTIFACT_NAMES = {"ply": "scene.ply"}
OUTPUT_KEYS = {"plyUrl": "scene.ply", "camerasUrl": "cameras.json", "thumbnailUrl": "thumbnail.jpg"}


def recognises(job_input: dict[str, Any]) -> bool:
    return "production_id" in job_input and "source_videos" in job_input


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{where}: must be a finite number")
    return value


def _videos(value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise InvalidInput("source_videos: a non-empty list of {url, filename, size} is required")
    urls = []
    for i, video in enumerate(value):
        url = video.get("url") if isinstance(video, dict) else None
        if not isinstance(url, str) or not url:
            raise InvalidInput(f"source_videos[{i}].url: a video URL is required")
        urls.append(url)
    return urls


def to_native(job_input: dict[str, Any]) -> dict[str, Any]:
    native = without(job_input, *GAMEVIEW_FIELDS)
    for ours in ("video", "videos", "images", "zip"):
        if ours in job_input:
            raise InvalidInput(
                f"send source_videos (the Game View app's videos) or {ours}, not both"
            )
    native["output_folder"] = safe_name(job_input.get("production_id"), "production_id")
    native["videos"] = _videos(job_input.get("source_videos"))
    settings = job_input.get("settings") or {}
    if not isinstance(settings, dict):
        raise InvalidInput("settings: must be an object {totalSteps, maxSplats, fps, ...}")
    warnings = []
    for name, value in settings.items():
        where = f"settings.{name}"
        if name in IGNORED_SETTINGS:
            warnings.append(IGNORED_SETTINGS[name])
        elif name not in SETTINGS_MAP:
            warnings.append(f"{where} is not a known Game View setting")
        elif value is not None:
            number = _number(value, where)
            if name in ("totalSteps", "maxSplats"):
                if number != int(number):
                    raise InvalidInput(f"{where}: must be a whole number")
                number = int(number)
            native[SETTINGS_MAP[name]] = number
    callback = job_input.get("callback_url")
    if callback not in (None, ""):  # none: no callback
        if not isinstance(callback, str):
            raise InvalidInput("callback_url: must be an http(s) URL")
        # The guard's own parser, now (an ambiguous URL fails the job at once); its addresses
        # are checked, and the connection pinned, when the callback is sent.
        parse_target(callback, "callback_url")
    native["formats"] = ["ply"]
    native["artifact_names"] = dict(ARTIFACT_NAMES)
    if warnings:
        native["app_warnings"] = warnings
    return native


def artifact_url(artifact: dict[str, Any] | None) -> str | None:
    """Where the app reads a file: PUBLIC_BASE_URL's `public_url`, else S3's presigned URL."""
    if artifact is None:
        return None
    return artifact.get("public_url") or artifact.get("url")


def shape_result(result: dict[str, Any], job_input: dict[str, Any]) -> dict[str, Any]:
    artifacts = {a["name"]: a for a in result.get("artifacts", [])}
    outputs = {key: artifact_url(artifacts.get(name)) for key, name in OUTPUT_KEYS.items()}
    return {
        **result,
        "success": True,
        "production_id": job_input.get("production_id"),
        "experience_id": job_input.get("experience_id"),
        "outputs": outputs,
    }  # no `error` key: RunPod would fail a job whose output has one


def callback_payload(output: Any, job_input: dict[str, Any]) -> dict[str, Any]:
    """The callback body Game View reads, from a job's final output (success or error)."""
    failed = not isinstance(output, dict) or "error" in output
    payload: dict[str, Any] = {
        "success": not failed,
        "production_id": job_input.get("production_id"),
        "experience_id": job_input.get("experience_id"),
        "outputs": None if failed else output.get("outputs"),
        "error": (output.get("error") if isinstance(output, dict) else None) if failed else None,
    }
    if failed and isinstance(output, dict) and output.get("error_code"):
        payload["error_code"] = output["error_code"]
    return payload


def after_job(output: Any, job_input: Any) -> None:
    if not isinstance(job_input, dict) or not job_input.get("callback_url"):
        return
    url = job_input["callback_url"]
    if isinstance(url, str):
        deliver(url, callback_payload(output, job_input), get_settings())


APP = App(
    name="gameview",
    title="Game View",
    worker="splat",
    recognises=recognises,
    adapter=RequestAdapter(to_native=to_native, shape_result=shape_result, after_job=after_job),
)
