"""depth-estimation: Depth Anything V2 through transformers, as 16-bit PNGs with their scale.

The model gives relative inverse depth (affine-invariant disparity): larger values are nearer,
and there is no unit. Each map is returned at the input's resolution as a single-channel
16-bit PNG quantised linearly over a `[min, max]` the result carries:

    value = min + png / 65535 * (max - min)

For an image, `min`/`max` are that image's. For a clip, every frame's PNG uses the clip's
`min`/`max` (one scale across the clip, so frames are comparable): a first pass runs the
model on every sampled frame and keeps the small raw maps on disk (bounded memory), a second
pass resizes them to the frame size and encodes them over the clip's range. A clip's PNGs
(and previews) go out as one zip artifact with a `manifest.json`, not one artifact per frame:
one upload, one URL, and the per-frame JSON stays small.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field, field_validator

from core.annotate import ClipAnnotator, sample_rate
from core.config import get_settings
from core.contract import JobContext, TaskRequest
from core.encode import DEPTH_PNG_LEVELS, depth_to_png16, depth_to_uint16, image_to_jpeg
from core.errors import InvalidInput, ModelUnavailable
from core.media import VideoFrame
from core.models import HubFile, LoadedModel, download_whole, get_registry, worker_device
from core.schemas import VideoOptions
from core.tasks import Task, register
from core.video import clip_info, frame_stamp, is_clip, iter_clip_frames, per_frame_output

log = logging.getLogger("worker.depth")

MODEL_KIND = "transformers-depth"
DEFAULT_MODEL = "depth-anything-v2-small"
# The folder in WEIGHTS_DIR -> the hub repository it is fetched from (and found in RunPod's
# model cache under). V2: only Small is Apache-2.0; Base and Large are CC-BY-NC-4.0, so they are
# not fetched for you (put their save_pretrained folders in WEIGHTS_DIR to use them). V1 (the
# Perception Concept Studio's `LiheYoung/depth-anything-small-hf`) is Apache-2.0 in every size.
HUB_REPOS = {
    DEFAULT_MODEL: "depth-anything/Depth-Anything-V2-Small-hf",
    "depth-anything-small-hf": "LiheYoung/depth-anything-small-hf",
    "depth-anything-base-hf": "LiheYoung/depth-anything-base-hf",
    "depth-anything-large-hf": "LiheYoung/depth-anything-large-hf",
}
# Other spellings (hub ids, case-insensitive) -> the folder name.
ALIASES = {
    "depth-anything/depth-anything-v2-small-hf": DEFAULT_MODEL,
    "depth-anything-v2-small-hf": DEFAULT_MODEL,
    "depth_anything_v2_small": DEFAULT_MODEL,
    "depth-anything/depth-anything-v2-base-hf": "depth-anything-v2-base",
    "depth-anything-v2-base-hf": "depth-anything-v2-base",
    "depth-anything/depth-anything-v2-large-hf": "depth-anything-v2-large",
    "depth-anything-v2-large-hf": "depth-anything-v2-large",
    **{repo.lower(): folder for folder, repo in HUB_REPOS.items() if repo.startswith("LiheYoung/")},
}
DOWNLOAD_FILES = ["config.json", "model.safetensors", "preprocessor_config.json"]
NOT_FOLDERS = (".pt", ".pth", ".onnx", ".bin", ".safetensors", ".engine", ".torchscript")

COLORMAPS: dict[str, int | None] = {
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "turbo": cv2.COLORMAP_TURBO,
    "jet": cv2.COLORMAP_JET,
    "bone": cv2.COLORMAP_BONE,
    "gray": None,
}
DEFAULT_COLORMAP = "inferno"
ARCHIVE_NAME = "depth_frames.zip"
CUDA_FRAME_BATCH = 8
"""Frames per forward pass on CUDA; on CPU one at a time (batching gains nothing there)."""

ENCODING = {
    "format": "png16",
    "levels": DEPTH_PNG_LEVELS,
    "value": "min + png / 65535 * (max - min)",
    "meaning": "relative inverse depth (disparity-like): larger is nearer; no unit",
}


class DepthOptions(VideoOptions):
    input_size: int | None = Field(
        default=None,
        ge=14,
        le=2044,
        description="the model input's short side in pixels (a multiple of 14 is used); "
        "default the processor's (518 for Depth Anything V2)",
    )
    preview: bool = Field(default=False, description="also return a colourised JPEG")
    annotate: bool = Field(
        default=False, description="same as preview; on video also a colourised depth mp4"
    )
    colormap: (
        Literal["inferno", "magma", "plasma", "viridis", "turbo", "jet", "bone", "gray"] | None
    ) = Field(default=None, description="preview colours (implies preview); default inferno")
    max_side: int | None = Field(
        default=None, ge=16, le=8192, description="video: resize frames to this longest side"
    )

    @field_validator("colormap", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            return "gray" if value == "grey" else value
        return value


@dataclass
class DepthModel:
    model: Any
    processor: Any
    device: str
    dtype: Any
    """torch dtype of the weights (fp16 on CUDA with HALF_PRECISION)."""


# --------------------------------------------------------------------------------------------
# Loading


def canonical_name(name: str) -> str:
    """A folder name in WEIGHTS_DIR; hub ids of Depth Anything V1 and V2 map to their folders
    (`LiheYoung/depth-anything-small-hf` -> `depth-anything-small-hf`)."""
    name = name.strip().rstrip("/")
    alias = ALIASES.get(name.lower())
    if alias:
        return alias
    if PurePosixPath(name).suffix.lower() in NOT_FOLDERS:
        raise InvalidInput(
            f"model {name!r}: depth-estimation loads a transformers save_pretrained folder "
            f"(config.json, weights, preprocessor_config.json) such as {DEFAULT_MODEL!r}, "
            "not a single weights file"
        )
    return name


def _load(path: Path) -> DepthModel:
    import torch
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation
    from transformers.utils import logging as hf_logging

    missing = [f for f in ("config.json", "preprocessor_config.json") if not (path / f).is_file()]
    if not path.is_dir() or missing:
        raise ModelUnavailable(
            f"{path} is not a transformers save_pretrained folder (missing "
            f"{', '.join(missing) or 'the folder'}); save the model and its image processor "
            "there with save_pretrained"
        )
    hf_logging.disable_progress_bar()
    device = worker_device()
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForDepthEstimation.from_pretrained(path, local_files_only=True)
    dtype = torch.float32
    if device.startswith("cuda") and get_settings().half_precision:
        dtype = torch.float16
    model = model.to(device=device, dtype=dtype).eval()
    return DepthModel(model=model, processor=processor, device=device, dtype=dtype)


def _download(target: Path) -> None:
    """Fetch the hub's save_pretrained files into `target`, whole or not at all."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = HUB_REPOS[target.name]
    timeout = get_settings().fetch_timeout_s

    def fetch(partial: Path) -> None:
        snapshot_download(
            repo, local_dir=partial, allow_patterns=DOWNLOAD_FILES, etag_timeout=timeout
        )
        shutil.rmtree(partial / ".cache", ignore_errors=True)

    # Permanent: retrying cannot help.
    permanent = (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, EntryNotFoundError)
    download_whole(target, fetch, what=repo, permanent=permanent)


def load_depth(name: str, *, pin: bool = False) -> LoadedModel:
    name = canonical_name(name)
    download = _download if name in HUB_REPOS else None
    hub = HubFile(HUB_REPOS[name]) if name in HUB_REPOS else None  # RunPod's cached models
    return get_registry().get(MODEL_KIND, name, _load, download, pin=pin, hub=hub)


def load(name: str) -> LoadedModel:
    """PRELOAD_MODELS: load, pin, and run once so the first job pays for nothing."""
    loaded = load_depth(name, pin=True)
    infer_raw(loaded, [np.zeros((64, 64, 3), np.uint8)], None)
    return loaded


# --------------------------------------------------------------------------------------------
# Inference


def infer_raw(loaded: LoadedModel, images_rgb: list[np.ndarray], input_size: int | None) -> Any:
    """The model's maps at its own resolution: a float32 tensor (B, h, w) on its device.
    The images of one call must share a size (the processor stacks them)."""
    import torch

    depth_model: DepthModel = loaded.model
    size = {"size": {"height": input_size, "width": input_size}} if input_size else {}
    # Height x width x channels, said outright: transformers otherwise guesses the channel axis
    # from the shape, and takes an image 1 or 3 pixels high for channels first.
    inputs = depth_model.processor(
        images=images_rgb,
        return_tensors="pt",
        device=depth_model.device,
        input_data_format="channels_last",
        **size,
    )
    pixel_values = inputs["pixel_values"].to(depth_model.device, depth_model.dtype)
    with loaded.lock, torch.inference_mode():
        predicted = depth_model.model(pixel_values=pixel_values).predicted_depth
    return predicted.float()


def model_input_size(
    depth_model: DepthModel, width: int, height: int, input_size: int | None
) -> tuple[int, int] | None:
    """(width, height) the processor resizes a width x height image to, by its own rule
    (Depth Anything: the side that scales least reaches the input size, the shape is kept,
    each side rounded to a multiple of 14); None when it does not resize to a fixed size."""
    import torch
    from transformers.models.dpt.image_processing_dpt import get_resize_output_image_size

    processor = depth_model.processor
    size = getattr(processor, "size", None)
    if not getattr(processor, "do_resize", False) or size is None:
        return None
    target = (input_size, input_size) if input_size else (size.height, size.width)
    if not all(target):
        return None
    resized = get_resize_output_image_size(
        torch.empty((height, width), device="meta"),  # only its shape is read
        output_size=target,
        keep_aspect_ratio=bool(processor.keep_aspect_ratio),
        multiple=int(processor.ensure_multiple_of or 1),
    )
    return int(resized.width or 0), int(resized.height or 0)


def check_fits_model(
    depth_model: DepthModel, width: int, height: int, input_size: int | None, what: str
) -> None:
    """`invalid_input` for an image too thin for the model: one the processor would resize to
    a side of 0 pixels. Named with its size and the shortest other side its long side needs."""
    resized = model_input_size(depth_model, width, height, input_size)
    if resized is None or min(resized) >= 1:
        return
    long_side, short_side = max(width, height), min(width, height)

    def fits(short: int) -> bool:
        size = (long_side, short) if width >= height else (short, long_side)
        turned = model_input_size(depth_model, *size, input_size)
        return turned is not None and min(turned) >= 1

    low, high = short_side, long_side  # fits(low) is False; a square always fits
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    target = input_size or depth_model.processor.size.height
    raise InvalidInput(
        f"{what} is {width}x{height}, too thin for depth-estimation: the model takes an image "
        f"resized with its shape kept and sides in multiples of "
        f"{depth_model.processor.ensure_multiple_of}, and at input size {target} this one "
        f"would be {resized[0]}x{resized[1]}; next to a {long_side} px side the other must be "
        f"at least {high} px (a larger options.input_size takes thinner images)"
    )


def resize_depth(depth_model: DepthModel, raw: Any, height: int, width: int) -> np.ndarray:
    """One raw map (h, w) to (height, width) float32, with the processor's own resize."""
    from transformers.modeling_outputs import DepthEstimatorOutput

    outputs = DepthEstimatorOutput(predicted_depth=raw.reshape(1, *raw.shape[-2:]))
    processed = depth_model.processor.post_process_depth_estimation(
        outputs, target_sizes=[(height, width)]
    )
    full = processed[0]["predicted_depth"].float().cpu().numpy()
    return full.reshape(height, width)


def value_range(depth: np.ndarray, ctx: JobContext, what: str) -> tuple[float, float]:
    finite = np.isfinite(depth)
    if finite.all():
        return float(depth.min()), float(depth.max())
    count = int((~finite).sum())
    ctx.warnings.append(f"{what}: {count} non-finite depth values clipped to min/max")
    if not finite.any():
        return 0.0, 0.0
    values = depth[finite]
    return float(values.min()), float(values.max())


def preview_colormap(request: TaskRequest, options: DepthOptions) -> str | None:
    if options.colormap:
        return options.colormap
    if options.preview or request.annotate:
        return DEFAULT_COLORMAP
    return None


def colorize(depth: np.ndarray, lo: float, hi: float, colormap: str) -> np.ndarray:
    """BGR uint8 preview over [lo, hi]: with inferno, near is bright and far is dark."""
    levels = (depth_to_uint16(depth, lo, hi) >> 8).astype(np.uint8)
    code = COLORMAPS[colormap]
    if code is None:
        return cv2.cvtColor(levels, cv2.COLOR_GRAY2BGR)
    return cv2.applyColorMap(levels, code)


def run_images(
    request: TaskRequest, ctx: JobContext, loaded: LoadedModel, options: DepthOptions
) -> dict[str, Any]:
    depth_model: DepthModel = loaded.model
    colormap = preview_colormap(request, options)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(request.images):
        what = "the image" if len(request.images) == 1 else f"images[{index}]"
        check_fits_model(depth_model, image.width, image.height, options.input_size, what)
        groups.setdefault(image.pixels.shape, []).append(index)
    results: list[dict[str, Any] | None] = [None] * len(request.images)
    for indices in groups.values():  # one forward pass per image size
        with ctx.timings.measure("preprocess"):
            rgb = [cv2.cvtColor(request.images[i].pixels, cv2.COLOR_BGR2RGB) for i in indices]
        with ctx.timings.measure("inference"):
            raw = infer_raw(loaded, rgb, options.input_size)
        for k, index in enumerate(indices):
            image = request.images[index]
            with ctx.timings.measure("resize"):
                full = resize_depth(depth_model, raw[k], image.height, image.width)
            with ctx.timings.measure("encode"):
                lo, hi = value_range(full, ctx, f"images[{index}]")
                png = depth_to_png16(full, lo, hi)
                jpeg = image_to_jpeg(colorize(full, lo, hi, colormap)) if colormap else None
            entry: dict[str, Any] = {
                "index": index,
                "width": image.width,
                "height": image.height,
                "min": lo,
                "max": hi,
            }
            with ctx.timings.measure("upload"):
                entry["depth"] = ctx.store.put(f"depth_{index}.png", png, "image/png")
                if jpeg is not None:
                    entry["preview"] = ctx.store.put(
                        f"depth_{index}_preview.jpg", jpeg, "image/jpeg"
                    )
            results[index] = entry
    return {"encoding": ENCODING, "results": results}


def expected_frames(duration_s: float, fps: float, options: DepthOptions) -> int:
    """About how many frames the sampling gives (for progress only)."""
    end = min(options.end_sec or duration_s, duration_s)
    rate = min(options.fps or fps, fps)
    return max(1, min(options.max_frames, round(max(end - options.start_sec, 0.0) * rate)))


def _batches(
    frames: Iterator[VideoFrame], size: int, ctx: JobContext
) -> Iterator[list[VideoFrame]]:
    batch: list[VideoFrame] = []
    while True:
        with ctx.timings.measure("decode"):
            frame = next(frames, None)
        if frame is None:
            break
        batch.append(frame)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def run_clip(
    request: TaskRequest, ctx: JobContext, loaded: LoadedModel, options: DepthOptions
) -> dict[str, Any]:
    import torch

    depth_model: DepthModel = loaded.model
    info = clip_info(request)
    colormap = preview_colormap(request, options)
    batch_size = CUDA_FRAME_BATCH if depth_model.device.startswith("cuda") else 1
    expected = expected_frames(info.duration_s, info.fps, options)
    frames: list[dict[str, Any]] = []
    sizes: list[tuple[int, int]] = []
    with tempfile.TemporaryDirectory(prefix="depth-", dir=ctx.settings.work_dir) as tmp:
        work = Path(tmp)
        # Pass 1: the model on every frame; raw maps (model resolution) wait on disk.
        clip = iter_clip_frames(request, options, max_side=options.max_side, warnings=ctx.warnings)
        for batch in _batches(clip, batch_size, ctx):
            height, width = batch[0].pixels.shape[:2]
            check_fits_model(depth_model, width, height, options.input_size, "each frame")
            with ctx.timings.measure("preprocess"):
                rgb = [cv2.cvtColor(f.pixels, cv2.COLOR_BGR2RGB) for f in batch]
            with ctx.timings.measure("inference"):
                raw = infer_raw(loaded, rgb, options.input_size)
            for k, frame in enumerate(batch):
                height, width = frame.pixels.shape[:2]
                with ctx.timings.measure("resize"):
                    full = resize_depth(depth_model, raw[k], height, width)
                lo, hi = value_range(full, ctx, f"frame {frame.index}")
                np.save(work / f"{len(frames)}.npy", raw[k].cpu().numpy())
                frames.append({**frame_stamp(frame), "min": lo, "max": hi})
                sizes.append((height, width))
            ctx.progress.update(
                "inference",
                90 * len(frames) / expected,
                f"frame {len(frames)} (source {batch[-1].index})",
            )
        clip_lo = min(f["min"] for f in frames)
        clip_hi = max(f["max"] for f in frames)

        # Pass 2: every frame at its size, quantised over the clip's range; with annotate,
        # the colourised frames are also an mp4 (annotate implies a colormap).
        archive = work / ARCHIVE_NAME
        used: set[str] = set()
        annotator = ClipAnnotator(ctx, request.annotate, sample_rate(info.fps, options.fps))
        with annotator, zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zipped:
            for n, (entry, (height, width)) in enumerate(zip(frames, sizes, strict=True)):
                raw_map = torch.from_numpy(np.load(work / f"{n}.npy")).to(depth_model.device)
                with ctx.timings.measure("resize"):
                    full = resize_depth(depth_model, raw_map, height, width)
                stem = f"frame_{entry['frame_index']:06d}"
                if stem in used:  # two samples on one source index (variable frame rate)
                    stem = f"{stem}_{n}"
                used.add(stem)
                with ctx.timings.measure("encode"):
                    entry["png"] = f"{stem}.png"
                    zipped.writestr(entry["png"], depth_to_png16(full, clip_lo, clip_hi))
                    coloured = colorize(full, clip_lo, clip_hi, colormap) if colormap else None
                    if coloured is not None:
                        entry["preview"] = f"{stem}_preview.jpg"
                        zipped.writestr(entry["preview"], image_to_jpeg(coloured))
                if coloured is not None:
                    annotator.add_frame(coloured, entry["time_s"])
                ctx.progress.update("encoding", 100 * (n + 1) / len(frames), f"frame {n + 1}")
            manifest = {
                "encoding": ENCODING,
                "min": clip_lo,
                "max": clip_hi,
                "width": sizes[0][1],
                "height": sizes[0][0],
                "frames": frames,
            }
            zipped.writestr("manifest.json", json.dumps(manifest, indent=1))
        with ctx.timings.measure("upload"):
            artifact = ctx.store.put(ARCHIVE_NAME, archive, "application/zip")
    output: dict[str, Any] = {
        "video": info.describe(options, len(frames)),
        "encoding": ENCODING,
        "min": clip_lo,
        "max": clip_hi,
        "width": sizes[0][1],
        "height": sizes[0][0],
        "archive": artifact,
    }
    output.update(per_frame_output(ctx, frames))
    output.update(annotator.output())
    return output


def run(request: TaskRequest, ctx: JobContext) -> dict[str, Any]:
    options = request.options_as(DepthOptions)
    assert request.model is not None
    with ctx.timings.measure("load_model"):
        loaded = load_depth(request.model)
    if is_clip(request):
        return run_clip(request, ctx, loaded, options)
    if options.max_side is not None:
        ctx.warnings.append("options.max_side applies to video only; images keep their size")
    return run_images(request, ctx, loaded, options)


TASK = register(
    Task(
        name="depth-estimation",
        options=DepthOptions,
        run=run,
        media=frozenset({"image", "video"}),
        default_model=DEFAULT_MODEL,
        load=load,
        description="relative depth (Depth Anything V2) as 16-bit PNGs, per image or per frame",
    )
)
