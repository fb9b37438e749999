"""Splatt: video to Gaussian splat through a job API (`task_id`, `filebin_url`, `filename`).

Its backend downloads `filebin_url` as given and saves it under `filename`; it names its
outputs `transforms.json`, `baked_splat.ply` (colours baked to RGB, SH degree 0) and
`baked_splat_sh.ply` (the full spherical harmonics), kept under the task's id.

Its old backend's routes (`POST /jobs`, `GET /jobs/{id}/status`, `GET /jobs`,
`GET /jobs/{id}/results/{filename}`, `DELETE /jobs/{id}`, `GET /health`) are served by the
local server with `--app splatt`, behind `X-API-Key` (SPLATT_API_KEY, else SERVE_API_KEY).
"""

from __future__ import annotations

import mimetypes
import re
import secrets
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.apps.base import App, JobGateway, JobView, without
from core.config import get_settings
from core.contract import RequestAdapter
from core.errors import InvalidInput
from core.naming import safe_name, safe_name_error
from core.system import cuda_facts

SPLATT_FIELDS = ("task_id", "filebin_url", "filename")
RESULT_FILES = ("transforms.json", "baked_splat.ply", "baked_splat_sh.ply")

STATUSES = (
    "queued",
    "downloading_video",
    "extracting_frames",
    "running_colmap",
    "training",
    "exporting",
    "completed",
    "failed",
)
# Our progress stages -> (Splatt's status, the stage's span of the whole job, 0-100), in the
# proportions Splatt's own backend reported (training 30 -> 85).
STAGES: dict[str, tuple[str, float, float]] = {
    "downloading_video": ("downloading_video", 0, 5),
    "extracting_frames": ("extracting_frames", 5, 15),
    "running_colmap": ("running_colmap", 15, 30),
    "training": ("training", 30, 85),
    "exporting": ("exporting", 85, 95),
    "uploading": ("exporting", 95, 99),
}
MESSAGES = {
    "queued": "Job queued, waiting to start...",
    "downloading_video": "Downloading video...",
    "extracting_frames": "Extracting frames from video...",
    "running_colmap": "Running COLMAP pose estimation...",
    "training": "Training Gaussian Splat...",
    "exporting": "Exporting PLY files...",
    "completed": "Pipeline completed successfully!",
}
_STEP = re.compile(r"step (\d+)/(\d+)")


class SplattSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SPLATT_", case_sensitive=False, extra="ignore")

    api_key: SecretStr | None = None
    """`X-API-Key` for Splatt's routes on the local server; unset: SERVE_API_KEY's value."""


def recognises(job_input: dict[str, Any]) -> bool:
    return "filebin_url" in job_input


def to_native(job_input: dict[str, Any]) -> dict[str, Any]:
    native = without(job_input, *SPLATT_FIELDS)
    if "video" in job_input:
        raise InvalidInput("send filebin_url (the Splatt app's video) or video, not both")
    # Downloaded as given, as Splatt's backend does; `filename` only names the file (it is
    # never a path here, so any name goes, and it comes back in the result).
    url = job_input.get("filebin_url")
    if not isinstance(url, str) or not url:
        raise InvalidInput("filebin_url: the video's URL is required")
    native["video"] = url
    filename = job_input.get("filename")
    if filename is not None and (not isinstance(filename, str) or len(filename) > 255):
        raise InvalidInput("filename: a file name (a string of at most 255 characters)")
    native["formats"] = ["ply_sh0", "ply"]
    native["artifact_names"] = {"ply_sh0": "baked_splat.ply", "ply": "baked_splat_sh.ply"}
    if job_input.get("task_id") is not None:
        # Its folder and key prefix: a safe name, checked under the app's own field name.
        native["output_folder"] = safe_name(job_input["task_id"], "task_id")
    return native


def shape_result(result: dict[str, Any], job_input: dict[str, Any]) -> dict[str, Any]:
    for field in ("task_id", "filename"):
        if job_input.get(field) is not None:
            result[field] = job_input[field]
    return result


# --------------------------------------------------------------------------------------------
# The old backend's HTTP contract, on the local server


def splatt_status(job: JobView) -> str:
    if job.status == "IN_QUEUE":
        return "queued"
    if job.status == "COMPLETED":
        return "completed"
    if job.status != "IN_PROGRESS":
        return "failed"  # FAILED, CANCELLED, TIMED_OUT
    stage = (job.progress or {}).get("stage")
    return STAGES[stage][0] if stage in STAGES else "downloading_video"


def overall_progress(job: JobView) -> int:
    """0-100 across the whole job, from the stage's own 0-100 and its span."""
    if job.status == "COMPLETED":
        return 100
    progress = job.progress or {}
    span = STAGES.get(str(progress.get("stage")))
    if job.status == "IN_QUEUE" or span is None:
        return 0
    within = float(progress.get("progress") or 0.0)
    return int(span[1] + (span[2] - span[1]) * max(0.0, min(100.0, within)) / 100)


def status_message(job: JobView, status: str) -> str:
    if status == "failed":
        return f"Pipeline failed: {job.error or job.status}"
    progress = job.progress or {}
    message = str(progress.get("message") or "")
    if status == "training":
        step = _STEP.search(message)
        if step:
            return f"Training Gaussian Splat... Step {step[1]}/{step[2]}"
    base = MESSAGES[status]
    return f"{base} ({message})" if message and status not in ("queued", "completed") else base


def _iso(timestamp: float) -> str:
    # As Splatt's backend (datetime.utcnow()): naive UTC.
    return datetime.fromtimestamp(timestamp, timezone.utc).replace(tzinfo=None).isoformat()


def _artifacts(job: JobView) -> dict[str, dict[str, Any]]:
    output = job.output if isinstance(job.output, dict) else {}
    return {a["name"]: a for a in output.get("artifacts", []) if isinstance(a, dict)}


def _results(job: JobView) -> dict[str, Any] | None:
    if job.status != "COMPLETED":
        return None
    artifacts = _artifacts(job)
    base = f"/jobs/{job.id}/results"
    results: dict[str, Any] = {
        "transforms_json": None,
        "transforms_json_url": None,
        "ply_rgb_url": None,
        "ply_sh_url": None,
    }
    transforms = artifacts.get("transforms.json")
    if transforms is not None:
        results["transforms_json_url"] = f"{base}/transforms.json"
        local = _local_file(transforms)
        if local is not None:
            import json

            results["transforms_json"] = json.loads(local.read_text())
    for key, name in (("ply_rgb_url", "baked_splat.ply"), ("ply_sh_url", "baked_splat_sh.ply")):
        if name in artifacts:
            results[key] = f"{base}/{name}"
    return results


def status_body(job: JobView) -> dict[str, Any]:
    status = splatt_status(job)
    job_input = job.input if isinstance(job.input, dict) else {}
    return {
        "job_id": job.id,
        "task_id": job_input.get("task_id"),
        "status": status,
        "progress": overall_progress(job),
        "message": status_message(job, status),
        "error": (job.error or job.status) if status == "failed" else None,
        "created_at": _iso(job.created_at),
        "updated_at": _iso(job.updated_at),
        "results": _results(job),
    }


def _local_file(artifact: dict[str, Any]) -> Path | None:
    """The artifact's file under OUTPUT_DIR, or None: no path, or one that leaves it."""
    output_dir = get_settings().output_dir
    if artifact.get("storage") != "local" or not artifact.get("path") or output_dir is None:
        return None
    path = Path(artifact["path"]).resolve()
    if not path.is_relative_to(Path(output_dir).resolve()) or not path.is_file():
        return None
    return path


def _s3_object(artifact: dict[str, Any]) -> tuple[Any, str, str] | None:
    """(client, bucket, key) of an artifact in the BUCKET_* bucket, or None."""
    from core.storage import BucketTarget, s3_client

    settings = get_settings()
    target = BucketTarget.from_settings(settings)
    if artifact.get("storage") != "s3" or target is None or artifact.get("bucket") != target.bucket:
        return None
    return s3_client(target, settings), target.bucket, str(artifact["key"])


def remove_files(job: JobView) -> int:
    """Delete the job's stored artifacts (OUTPUT_DIR files, BUCKET_* objects); how many."""
    removed = 0
    folders = set()
    for artifact in _artifacts(job).values():
        local = _local_file(artifact)
        if local is not None:
            local.unlink(missing_ok=True)
            folders.add(local.parent)
            removed += 1
            continue
        s3 = _s3_object(artifact)
        if s3 is not None:
            client, bucket, key = s3
            client.delete_object(Bucket=bucket, Key=key)
            removed += 1
    for folder in folders:  # shared with other jobs of the same task_id: only once empty
        if not any(folder.iterdir()):
            folder.rmdir()
    return removed


def routes(gateway: JobGateway) -> APIRouter:
    def expected_key() -> str | None:
        own = SplattSettings().api_key
        return own.get_secret_value() if own else gateway.api_key()

    async def check_key(request: Request) -> None:
        expected = expected_key()
        given = request.headers.get("x-api-key", "")
        if expected is None:
            raise refused(401, "Splatt's routes need a key: set SPLATT_API_KEY or SERVE_API_KEY")
        if not given or not secrets.compare_digest(given.encode(), expected.encode()):
            raise refused(401, "Invalid or missing API key")

    router = APIRouter(tags=["Splatt"])
    keyed = APIRouter(dependencies=[Depends(check_key)])

    def find(job_id: str) -> JobView:
        job = gateway.job(job_id)
        if job is None or not _is_splatt(job):
            raise refused(404, f"Job {job_id} not found")
        return job

    @router.get("/health")
    async def health() -> dict[str, Any]:
        facts = cuda_facts()
        counts = gateway.counts()
        return {
            "status": "healthy",
            "active_jobs": counts.get("IN_PROGRESS", 0),
            "queued_jobs": counts.get("IN_QUEUE", 0),
            "gpu_available": bool(facts["available"]),
            "gpu_info": (
                {"name": facts.get("name"), "memory_total": facts.get("memory_total")}
                if facts["available"]
                else None
            ),
        }

    @keyed.post("/jobs")
    async def create_job(request: Request) -> Any:
        import json

        try:
            body = json.loads(await request.body())
        except ValueError:
            raise refused(
                422, "the body must be JSON: {task_id, filebin_url, filename, ...}"
            ) from None
        if not isinstance(body, dict) or not isinstance(body.get("filebin_url"), str):
            raise refused(422, "filebin_url: a video URL is required")
        problem = safe_name_error(body.get("task_id"))
        if problem:
            raise refused(422, f"task_id: {problem}")
        if not isinstance(body.get("filename"), str) or not body["filename"]:
            raise refused(422, "filename: the video's file name is required")
        job_id = gateway.submit(body)
        return {
            "job_id": job_id,
            "status": "queued",
            "message": "Job created and queued for processing",
        }

    @keyed.get("/jobs/{job_id}/status")
    async def job_status(job_id: str) -> dict[str, Any]:
        return status_body(find(job_id))

    @keyed.get("/jobs")
    async def list_jobs(
        status: str | None = None, limit: int = Query(default=100, ge=1, le=1000)
    ) -> dict[str, Any]:
        if status is not None and status not in STATUSES:
            raise refused(422, f"status: one of {', '.join(STATUSES)}")
        views, _total = gateway.list_jobs(limit=10_000)
        bodies = [status_body(v) for v in views if _is_splatt(v)]
        if status is not None:
            bodies = [b for b in bodies if b["status"] == status]
        return {"jobs": bodies[:limit], "total": len(bodies)}

    @keyed.get("/jobs/{job_id}/results/{filename}")
    async def result_file(job_id: str, filename: str) -> Any:
        job = find(job_id)
        if filename not in RESULT_FILES:
            raise refused(404, f"Result file {filename} not found")
        artifact = _artifacts(job).get(filename)
        if artifact is None:
            raise refused(404, f"Result file {filename} not found (job {splatt_status(job)})")
        media = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        local = _local_file(artifact)
        if local is not None:
            return FileResponse(local, media_type=media, filename=filename)
        s3 = _s3_object(artifact)
        if s3 is None:
            raise refused(404, f"Result file {filename} is not stored where this server reads")
        client, bucket, key = s3
        body = client.get_object(Bucket=bucket, Key=key)["Body"]

        def chunks() -> Iterator[bytes]:
            with body:
                yield from body.iter_chunks(1024 * 1024)

        return StreamingResponse(
            chunks(),
            media_type=media,
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    @keyed.delete("/jobs/{job_id}")
    async def delete_job(job_id: str) -> dict[str, Any]:
        job = find(job_id)
        removed = gateway.delete(job_id)
        remove_files(removed or job)
        return {"message": "Job deleted successfully"}

    router.include_router(keyed)
    return router


def refused(status_code: int, detail: str) -> Exception:
    """An HTTP error in FastAPI's shape, `{"detail": ...}` (with `error` too, as our routes):
    a dict detail is answered as it is by the local server."""
    return HTTPException(status_code, detail={"detail": detail, "error": detail})


def _is_splatt(job: JobView) -> bool:
    return isinstance(job.input, dict) and recognises(job.input)


APP = App(
    name="splatt",
    title="Splatt",
    worker="splat",
    recognises=recognises,
    adapter=RequestAdapter(to_native=to_native, shape_result=shape_result),
    routes=routes,
)
