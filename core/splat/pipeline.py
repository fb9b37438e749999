"""The splat job: input -> frames -> SfM (pycolmap) -> train -> export -> upload, with progress.

Stages, in order, as progress `stage`s: downloading_video (downloading_images for photo
sets), extracting_frames, running_colmap, training, exporting, uploading. Job files live in
one temporary folder that is removed whatever happens.
"""

from __future__ import annotations

import contextvars
import json
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from core.config import Settings
from core.contract import RequestAdapter
from core.control import cancel_requested
from core.encode import image_to_jpeg
from core.errors import Cancelled, InvalidInput, SfmFailed, UploadFailed
from core.media import fit_longest_side
from core.models import worker_device
from core.payload import load_payload, load_payload_to_file
from core.progress import ProgressReporter, ProgressSink
from core.splat import export
from core.splat.export import to_cameras_json, to_transforms_json
from core.splat.frames import iter_sharp_frames, load_photos, photos_from_zip, write_frames
from core.splat.schema import Preset, SplatRequest
from core.splat.sfm import FEATURE_LEVELS, SfmResult, run_sfm, undistort_to_pinhole
from core.storage import ArtifactStore, BucketTarget
from core.system import cuda_facts, python_version, versions
from core.worker import JobRun, run_job

log = logging.getLogger("worker.splat")

ShouldStop = Callable[[], bool]


def run_splat_job(
    job: dict[str, Any],
    sink: ProgressSink | None = None,
    should_stop: ShouldStop | None = None,
    adapter: RequestAdapter | None = None,
) -> Any:
    """Run one splat job; never raises. Errors come back as `error`/`error_code` results.

    Without `should_stop`, training stops when whatever runs the job asks it to stop
    (`core/control.py`: the local endpoint server's cancel or execution timeout); the job
    then ends as `cancelled` at the next stage."""

    def body(run: JobRun) -> dict[str, Any]:
        work = Path(tempfile.mkdtemp(prefix="splat-", dir=run.settings.work_dir))
        try:
            return _run(run, work, should_stop or cancel_requested, adapter)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    return run_job(job, body, sink, adapter.shape_result if adapter else None)


def _run(
    run: JobRun, work: Path, should_stop: ShouldStop, adapter: RequestAdapter | None
) -> dict[str, Any]:
    settings, progress, timings = run.settings, run.progress, run.timings
    app_input = run.job.get("input")
    if not isinstance(app_input, dict):
        raise InvalidInput("the job's input must be a JSON object with `video`, `images` or `zip`")
    request = SplatRequest.model_validate(adapter.to_native(app_input) if adapter else app_input)
    if request.task == "health":
        return health(settings)
    warnings = [f"{name} is not a known input field" for name in request.unknown_fields()]
    warnings += request.app_warnings
    kind, source = request.source()
    params = request.resolved()
    bucket = run.bucket()
    store = ArtifactStore(settings, request.output_folder or run.job_id, bucket)
    if store.mode == "inline" and request.task == "splat":
        _check_inline_room(request, params, settings)

    frames_dir = work / "frames"
    with timings.measure("download"):
        progress.update(
            "downloading_images" if kind in ("images", "zip") else "downloading_video", 0
        )
        fetched = _fetch(kind, source, settings, bucket, work)
    _stop_if_cancelled()
    with timings.measure("frames"):
        progress.update("extracting_frames", 0)
        if kind == "videos":
            groups = _extract_video_frames(fetched, request, params, frames_dir, progress)
            names = [name for group in groups for name in group]
        else:
            groups = None
            names = _extract_frames(kind, fetched, request, params, frames_dir, progress)
        _require_frames(names)
    with timings.measure("sfm"):
        progress.update("running_colmap", 0, f"{len(names)} frames")
        sfm = run_sfm(
            frames_dir,
            work / "sfm",
            matching=request.matching,
            progress=progress,
            max_image_side=request.max_side,
            single_camera=kind == "video",
            camera_groups=groups,
            max_features=FEATURE_LEVELS[request.features],
            mapper=request.mapper,
            orient=request.orient,
        )
    _stop_if_cancelled()
    result: dict[str, Any] = {
        "task": request.task,
        "frames": {"selected": len(names), **_fps(kind, params)},
    }
    if groups is not None:
        result["frames"]["per_video"] = [len(group) for group in groups]
    result["sfm"] = sfm.stats()

    files: list[tuple[str, Path]] = []
    out = work / "out"
    out.mkdir()
    if request.task == "sfm":
        with timings.measure("export"):
            progress.update("exporting", 0)
            files = _export_cameras(sfm, out) + _export_sfm(sfm, out)
    else:
        device = worker_device()
        with timings.measure("undistort"):
            pinhole = undistort_to_pinhole(sfm, frames_dir, work / "undistorted")
        with timings.measure("training"):
            trained, training = _train(
                pinhole,
                work / "undistorted" / "images",
                request,
                params,
                device,
                progress,
                should_stop,
                settings,
                warnings,
            )
        _stop_if_cancelled()
        result["training"] = training
        with timings.measure("export"):
            progress.update("exporting", 0)
            files = _export_cameras(pinhole, out) + _export_splat(
                trained, pinhole, request, out, device
            )
    with timings.measure("upload"):
        artifacts = []
        for i, (name, path) in enumerate(files):
            progress.update("uploading", 100 * i / len(files), name)
            artifacts.append(store.put(name, path))
    result["artifacts"] = artifacts
    result["timings_ms"] = timings.as_dict()
    if warnings:
        result["warnings"] = warnings
    return result


def _stop_if_cancelled() -> None:
    # A cancelled job's files would never be read: stop before the next stage's work.
    if cancel_requested():
        raise Cancelled("the job was cancelled (or ran past its execution timeout)")


def bytes_per_gaussian(fmt: str, sh_degree: int) -> int:
    """File bytes per Gaussian of each export (PLY: 17 floats plus the SH rest)."""
    rest = 3 * ((sh_degree + 1) ** 2 - 1)
    sizes = {"ply": (17 + rest) * 4, "ply_sh0": 17 * 4, "splat": 32, "ply_compressed": 62}
    return {**sizes, "rgb_ply": 15}[fmt]


def _check_inline_room(request: SplatRequest, params: Preset, settings: Settings) -> None:
    """Fail before the work, not after: the splat must fit the inline budget when there is
    no bucket and no OUTPUT_DIR, at the most Gaussians this job may make."""
    count = params.max_gaussians
    if not worker_device().startswith("cuda"):
        count = min(count, settings.cpu_max_gaussians)
    per = sum(bytes_per_gaussian(f, request.sh_degree) for f in set(request.formats))
    needed = 4 * (count * per) // 3  # as base64
    if needed > settings.inline_max_bytes:
        raise UploadFailed(
            f"this job may make up to {needed / 2**20:.0f} MB of artifacts ({count} Gaussians), "
            f"over the {settings.inline_max_bytes / 2**20:.0f} MB that can come back inline "
            "(INLINE_MAX_BYTES); set BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, "
            "BUCKET_SECRET_ACCESS_KEY and BUCKET_NAME (or send s3Config), or lower max_gaussians"
        )


def _fps(kind: str, params: Preset) -> dict[str, Any]:
    return {"fps": params.fps} if kind in ("video", "videos") else {}


def _fetch(
    kind: str, source: Any, settings: Settings, bucket: BucketTarget | None, work: Path
) -> Any:
    """The video(s) or zip as files in the job's work dir (up to SPLAT_MAX_INPUT_BYTES each,
    never all in memory); photos as bytes. Fetches are bounded by SPLAT_FETCH_DEADLINE_S."""
    limits = settings.model_copy(
        update={
            "max_input_bytes": settings.splat_max_input_bytes,
            "fetch_deadline_s": settings.splat_fetch_deadline_s,
        }
    )
    if kind == "images":

        def one(index: int, ref: Any) -> bytes:
            return load_payload(ref, limits, field=f"images[{index}]", bucket=bucket).data

        with ThreadPoolExecutor(max_workers=4) as pool:
            # Each fetch in a copy of this context: the job's cancel signal reaches it.
            futures = [
                pool.submit(contextvars.copy_context().run, one, i, ref)
                for i, ref in enumerate(source)
            ]
            return [future.result() for future in futures]
    if kind == "videos":  # one file each, fetched side by side, each in the job's context
        with ThreadPoolExecutor(max_workers=4) as pool:
            downloads = [
                pool.submit(
                    contextvars.copy_context().run,
                    load_payload_to_file,
                    ref,
                    limits,
                    work / f"input-video-{i}",
                    field=f"videos[{i}]",
                    bucket=bucket,
                )
                for i, ref in enumerate(source)
            ]
            return [download.result().path for download in downloads]
    path = work / ("input.zip" if kind == "zip" else "input-video")
    return load_payload_to_file(source, limits, path, field=kind, bucket=bucket).path


def _extract_frames(
    kind: str,
    fetched: Any,
    request: SplatRequest,
    params: Preset,
    frames_dir: Path,
    progress: ProgressReporter,
) -> list[str]:
    if kind == "video":
        (names,) = _extract_video_frames([fetched], request, params, frames_dir, progress)
    else:
        photos = (
            load_photos(fetched, request.max_side)
            if kind == "images"
            else photos_from_zip(fetched, request.max_side)
        )
        names = write_frames(photos, frames_dir)
    return names


def _extract_video_frames(
    videos: list[Path],
    request: SplatRequest,
    params: Preset,
    frames_dir: Path,
    progress: ProgressReporter,
) -> list[list[str]]:
    """Frames from each clip (`v00_frame_00000.jpg`, ...), `max_frames` shared among them;
    the names per clip, which SfM gives one camera each."""
    groups = []
    share = request.max_frames if len(videos) == 1 else max(2, request.max_frames // len(videos))
    for index, video in enumerate(videos):
        frames = iter_sharp_frames(
            video,
            fps=params.fps,
            start_sec=request.start_sec,
            end_sec=request.end_sec,
            max_side=request.max_side,
            max_frames=share,
        )

        def counted(frames: Any = frames, index: int = index) -> Any:
            for i, frame in enumerate(frames):
                done = (index + min(0.99, i / share)) / len(videos)
                which = f"video {index + 1}: " if len(videos) > 1 else ""
                progress.update("extracting_frames", 100 * done, f"{which}frame {i + 1}")
                yield frame

        # One clip keeps the plain names (`frame_00000.jpg`) its users know.
        prefix = "frame_" if len(videos) == 1 else f"v{index:02d}_frame_"
        groups.append(write_frames(counted(), frames_dir, prefix=prefix))
    return groups


def _require_frames(names: list[str]) -> None:
    if len(names) < 2:
        raise SfmFailed(
            f"only {len(names)} frame(s) to work with; send a longer clip, a higher fps "
            "or more photos"
        )


SPLAT_PACKAGES = ("runpod", "torch", "pycolmap", "gsplat", "numpy", "av", "pydantic", "boto3")


def health(settings: Settings) -> dict[str, Any]:
    """`{"task": "health"}`: versions, the device and its GPU, the storage and limits."""
    cuda = cuda_facts()
    return {
        "status": "ok",
        "worker": "splat",
        "python": python_version(),
        "versions": versions(SPLAT_PACKAGES),
        "device": worker_device(),
        "cuda": cuda,
        "gpu": {"name": cuda.get("name"), "memory_total": cuda.get("memory_total")},
        "storage": ArtifactStore(settings, "health", BucketTarget.from_settings(settings)).mode,
        "limits": {
            "splat_max_input_bytes": settings.splat_max_input_bytes,
            "cpu_max_gaussians": settings.cpu_max_gaussians,
            "inline_max_bytes": settings.inline_max_bytes,
        },
    }


def _train(
    sfm: SfmResult,
    image_dir: Path,
    request: SplatRequest,
    params: Preset,
    device: str,
    progress: ProgressReporter,
    should_stop: ShouldStop | None,
    settings: Settings,
    warnings: list[str],
) -> tuple[Any, dict[str, Any]]:
    from core.splat import train

    max_side = request.train_max_side or (request.max_side if device.startswith("cuda") else 320)
    views = train.load_training_views(sfm, image_dir, max_side)
    gaussians = train.Gaussians.init_from_points(
        sfm.points_xyz, sfm.points_rgb, request.sh_degree, device=device
    )
    total = params.iterations
    if not device.startswith("cuda") and params.max_gaussians > settings.cpu_max_gaussians:
        warnings.append(
            f"max_gaussians {params.max_gaussians} capped at {settings.cpu_max_gaussians} on "
            "CPU (CPU_MAX_GAUSSIANS)"
        )
        params = replace(params, max_gaussians=settings.cpu_max_gaussians)
    options: dict[str, Any] = {
        "max_gaussians": params.max_gaussians,
        "sh_degree": request.sh_degree,
        "device": device,
    }
    # The schedule fields left unset scale with iterations (gsplat's is made for 30k steps).
    config = train.TrainConfig(iterations=total, **options)

    def on_step(step: int, _total: int, loss: float) -> None:
        progress.update(
            "training", 100 * step / total, f"step {step}/{total}", step=step, loss=round(loss, 5)
        )

    outcome = train.train(gaussians, views, config, on_step=on_step, should_stop=should_stop)
    progress.update(
        "training",
        100,
        f"held-out PSNR {outcome.psnr_start:.2f} -> {outcome.psnr_end:.2f} dB",
        force=True,
        step=outcome.steps,
        loss=round(outcome.final_loss, 5),
        psnr=round(outcome.psnr_end, 3),
    )
    stats = {
        "iterations": outcome.steps,
        "stopped": outcome.stopped,
        "gaussians": outcome.num_gaussians,
        "psnr_start": round(outcome.psnr_start, 3),
        "psnr": round(outcome.psnr_end, 3),
        "ssim_start": round(outcome.ssim_start, 4),
        "ssim": round(outcome.ssim_end, 4),
        "evaluated_on": outcome.eval_on,
        "train_views": outcome.num_train_views,
        "eval_views": outcome.num_eval_views,
        "densification": outcome.densification,
        "final_loss": round(outcome.final_loss, 5),
        "resolution_max_side": max_side,
    }
    return outcome, stats


def _export_cameras(sfm: SfmResult, out: Path) -> list[tuple[str, Path]]:
    files = []
    for name, content in (
        ("cameras.json", to_cameras_json(sfm)),
        ("transforms.json", to_transforms_json(sfm)),
    ):
        path = out / name
        path.write_text(json.dumps(content, indent=1))
        files.append((name, path))
    return files


def _export_sfm(sfm: SfmResult, out: Path) -> list[tuple[str, Path]]:
    points = out / "points.ply"
    export.write_rgb_ply(
        points, sfm.points_xyz, sfm.points_rgb, comments=export.frame_comments(sfm)
    )
    files = [("points.ply", points)]
    if sfm.model_dir is not None:
        archive = out / "colmap_sparse.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
            for path in sorted(Path(sfm.model_dir).iterdir()):
                bundle.write(path, f"sparse/0/{path.name}")
        files.append(("colmap_sparse.zip", archive))
    return files


def _export_splat(
    trained: Any, sfm: SfmResult, request: SplatRequest, out: Path, device: str
) -> list[tuple[str, Path]]:
    from core.splat import train

    g = trained.gaussians.to_numpy()
    base = (g["means"], g["scales_log"], g["quats"], g["opacity_logit"], g["sh_dc"])
    frame = export.frame_comments(sfm)  # the Gaussians were trained in the SfM result's frame
    writers: dict[str, Callable[[Path], object]] = {
        "ply": lambda p: export.write_ply(p, *base, g["sh_rest"], comments=frame),
        "ply_sh0": lambda p: export.write_ply(p, *base, None, comments=frame),
        "splat": lambda p: export.write_splat(p, *base),
        "ply_compressed": lambda p: export.write_compressed_ply(
            p, *base, g["sh_rest"], comments=frame
        ),
        "rgb_ply": lambda p: export.write_rgb_ply(
            p, g["means"], _dc_to_rgb(g["sh_dc"]), comments=frame
        ),
    }
    chosen = [(request.file_name(fmt), writers[fmt]) for fmt in dict.fromkeys(request.formats)]
    first = sfm.images[0]
    camera = (
        first.world_to_camera,
        first.intrinsics.K,
        first.intrinsics.width,
        first.intrinsics.height,
    )
    thumbnail = train.render_view(trained.gaussians, camera, device)
    chosen.append(
        ("thumbnail.jpg", lambda p: p.write_bytes(image_to_jpeg(fit_longest_side(thumbnail, 512))))
    )
    files = []
    for name, write in chosen:
        write(out / name)
        files.append((name, out / name))
    return files


def _dc_to_rgb(sh_dc: Any) -> Any:
    rgb = 0.5 + export.SH_C0 * np.asarray(sh_dc).reshape(-1, 3)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)
