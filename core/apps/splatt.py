"""Splatt: video to Gaussian splat through a job API (`task_id`, `filebin_url`, `filename`).

Its backend names its outputs `transforms.json`, `baked_splat.ply` (colours baked to RGB, SH
degree 0) and `baked_splat_sh.ply` (the full spherical harmonics), kept under the task's id.
"""

from __future__ import annotations

from typing import Any

from core.apps.base import App, without
from core.contract import RequestAdapter
from core.errors import InvalidInput
from core.naming import safe_name

SPLATT_FIELDS = ("task_id", "filebin_url", "filename")


def recognises(job_input: dict[str, Any]) -> bool:
    return "filebin_url" in job_input


def video_url(filebin_url: str, filename: str | None) -> str:
    """Where the video is: the bin's URL, with the file's name appended unless it ends so."""
    if filename and not filebin_url.rstrip("/").endswith(filename):
        return f"{filebin_url.rstrip('/')}/{filename}"
    return filebin_url


def to_native(job_input: dict[str, Any]) -> dict[str, Any]:
    native = without(job_input, *SPLATT_FIELDS)
    if "video" in job_input:
        raise InvalidInput("send filebin_url (the Splatt app's video) or video, not both")
    url, filename = job_input.get("filebin_url"), job_input.get("filename")
    if isinstance(url, str) and url:
        native["video"] = video_url(url, filename if isinstance(filename, str) else None)
    elif url is not None:
        native["video"] = url  # not a string: our schema names the field in its error
    native["formats"] = ["ply_sh0", "ply"]
    native["artifact_names"] = {"ply_sh0": "baked_splat.ply", "ply": "baked_splat_sh.ply"}
    if job_input.get("task_id") is not None:
        # Its folder and key prefix: a safe name, checked under the app's own field name.
        native["output_folder"] = safe_name(job_input["task_id"], "task_id")
    return native


def shape_result(result: dict[str, Any], job_input: dict[str, Any]) -> dict[str, Any]:
    if job_input.get("task_id") is not None:
        result["task_id"] = job_input["task_id"]
    return result


APP = App(
    name="splatt",
    title="Splatt",
    worker="splat",
    recognises=recognises,
    adapter=RequestAdapter(to_native=to_native, shape_result=shape_result),
)
