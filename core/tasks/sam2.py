"""sam2-segmentation: SAM 2 masks from point and box prompts, on images or through a clip.

- Image (`image`, `images`, or `media` holding an image): every object's prompt (points with
  labels, a box, or both) gives its mask (or three candidates with `multimask_output`).
  The image's embedding is kept for the next few requests on the same pixels, so clicking
  again on one image costs only the mask decoder.
- Video (`video`, `frames`): prompts on any frame (`frame_index`, the source frame's index as
  the result reports it) are propagated forward to the end and backward to the start; masks
  per object per sampled frame, in frame order; a long clip's masks go out as an artifact.
  `read_clip`, `load_model`, `track_objects` and `mask_box` are the pieces other jobs build
  on (the Orbit app's masks, `core/apps/orbit.py`).
"""

from __future__ import annotations

import bisect
from typing import Any, cast

import numpy as np

from core.annotate import ClipAnnotator, sample_rate
from core.contract import JobContext, TaskRequest
from core.control import cancel_requested
from core.encode import encode_mask
from core.errors import Cancelled, InvalidInput
from core.media import VideoFrame
from core.models import LoadedModel
from core.tasks import Task, register
from core.tasks._sam2_model import (
    DEFAULT_MODEL,
    Sam2Model,
    checkpoint_name,
    config_for,
    inference_mode,
    load_sam2,
    preload_sam2,
)
from core.tasks._sam2_prompts import (
    Prompt,
    Sam2Options,
    check_inside,
    prompts_from_options,
)
from core.tasks._sam2_video import ClipFrames, install_clip_loader, propagate
from core.video import clip_info, frame_stamp, is_clip, iter_clip_frames, per_frame_output

NO_PROMPT = (
    "sam2-segmentation needs a prompt: options.objects ([{id, points, labels, box}]), "
    "or options.points (with labels), options.box or options.boxes"
)


def run(request: TaskRequest, ctx: JobContext) -> dict[str, Any]:
    options = request.options_as(Sam2Options)
    assert request.model is not None
    config_for(checkpoint_name(request.model))  # an unknown name fails before any decoding
    prompts = prompts_from_options(options)
    if not prompts:
        raise InvalidInput(NO_PROMPT)
    if is_clip(request):
        return run_video(request, ctx, prompts)
    return run_images(request, ctx, prompts)


def load_model(request: TaskRequest, ctx: JobContext) -> LoadedModel:
    assert request.model is not None
    with ctx.timings.measure("load_model"):
        return load_sam2(request.model)


def mask_box(mask: np.ndarray) -> list[int] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def _mask_entry(mask: np.ndarray, mask_format: str) -> dict[str, Any]:
    return {"area": int(mask.sum()), "box": mask_box(mask), "mask": encode_mask(mask, mask_format)}


# --------------------------------------------------------------------------------------------
# Images


def run_images(request: TaskRequest, ctx: JobContext, prompts: list[Prompt]) -> dict[str, Any]:
    options = request.options_as(Sam2Options)
    for index, image in enumerate(request.images):
        what = "image" if len(request.images) == 1 else f"image (images.{index})"
        check_inside(prompts, image.width, image.height, what)
    if any(prompt.frame_index is not None for prompt in prompts):
        ctx.warnings.append("frame_index is for video prompts; ignored on an image")
    loaded = load_model(request, ctx)
    model: Sam2Model = loaded.model
    results = []
    for index, image in enumerate(request.images):
        rgb = np.ascontiguousarray(image.pixels[:, :, ::-1])
        outputs = []
        with loaded.lock, inference_mode(ctx.device, ctx.settings.half_precision):
            with ctx.timings.measure("image_encoder"):
                predictor, cached = model.image_predictor(rgb)
            with ctx.timings.measure("inference"):
                for prompt in prompts:
                    masks, scores, _ = predictor.predict(
                        point_coords=prompt.points,
                        point_labels=prompt.labels,
                        box=prompt.box,
                        multimask_output=options.multimask_output,
                    )
                    outputs.append((prompt, masks > 0.5, np.asarray(scores, np.float64)))
        with ctx.timings.measure("encode"):
            objects = [
                _image_object(prompt, masks, scores, options) for prompt, masks, scores in outputs
            ]
        results.append(
            {
                "index": index,
                "width": image.width,
                "height": image.height,
                "image_embedding": "cached" if cached else "computed",
                "objects": objects,
            }
        )
    return {"results": results}


def _image_object(
    prompt: Prompt, masks: np.ndarray, scores: np.ndarray, options: Sam2Options
) -> dict[str, Any]:
    best = int(np.argmax(scores))
    entry: dict[str, Any] = {"id": prompt.id, "score": round(float(scores[best]), 4)}
    entry.update(_mask_entry(masks[best], options.mask_format))
    if options.multimask_output:
        entry["best"] = best
        entry["masks"] = [
            {"score": round(float(score), 4), **_mask_entry(mask, options.mask_format)}
            for mask, score in zip(masks, scores, strict=True)
        ]
    return entry


# --------------------------------------------------------------------------------------------
# Video


def read_clip(request: TaskRequest, ctx: JobContext) -> list[VideoFrame]:
    options = request.options_as(Sam2Options)
    frames: list[VideoFrame] = []
    clip = iter_clip_frames(request, options, max_side=options.max_side, warnings=ctx.warnings)
    while True:
        with ctx.timings.measure("decode"):
            frame = next(clip, None)
        if frame is None:
            return frames
        frames.append(frame)


def _prompt_positions(
    prompts: list[Prompt], frames: list[VideoFrame], ctx: JobContext
) -> dict[int | str, int]:
    """Each prompt's place among the sampled frames: its `frame_index` (a source index), or
    the nearest sampled frame when sampling skipped it; the first frame by default."""
    sources = [frame.index for frame in frames]
    positions: dict[int | str, int] = {}
    for prompt in prompts:
        wanted = prompt.frame_index
        if wanted is None:
            positions[prompt.id] = 0
            continue
        if not sources[0] <= wanted <= sources[-1]:
            raise InvalidInput(
                f"{prompt.field}.frame_index: frame {wanted} is not among the sampled frames "
                f"(source frames {sources[0]} to {sources[-1]}); check start_sec, end_sec, "
                "max_frames"
            )
        at = bisect.bisect_left(sources, wanted)
        if sources[at] != wanted:
            at = min((at - 1, at), key=lambda i: abs(sources[i] - wanted))
            ctx.warnings.append(
                f"{prompt.field}.frame_index: frame {wanted} was not sampled; the prompt is on "
                f"frame {sources[at]}, the nearest sampled one"
            )
        positions[prompt.id] = at
    return positions


def track_objects(
    loaded: LoadedModel,
    frames: list[VideoFrame],
    width: int,
    height: int,
    prompts: list[Prompt],
    positions: dict[int | str, int],
    ctx: JobContext,
) -> list[dict[int | str, np.ndarray]]:
    """Every sampled frame's mask per object id (bool, source size), in frame order."""
    model: Sam2Model = loaded.model
    predictor = model.predictor
    install_clip_loader()
    clip = ClipFrames([frame.pixels for frame in frames], height, width, predictor.image_size)
    masks: list[dict[int | str, np.ndarray] | None] = [None] * len(frames)
    # Forward from the earliest prompt to the end, then back from it (again) to frame 0.
    first_prompt = min(positions.values())
    total = len(frames) + (1 if first_prompt > 0 else 0)
    done = 0
    precision = ctx.settings.half_precision
    with inference_mode(ctx.device, precision):
        with ctx.timings.measure("inference"), loaded.lock:
            state = predictor.init_state(clip)
            for prompt in prompts:
                predictor.add_new_points_or_box(
                    state,
                    frame_idx=positions[prompt.id],
                    obj_id=prompt.id,
                    points=prompt.points,
                    labels=prompt.labels,
                    box=prompt.box,
                )
        steps = propagate(predictor, state, set(positions.values()))
        while True:
            # The lock is held per frame, not per clip: the state is this job's own, so other
            # jobs on this model interleave instead of waiting for a whole clip.
            with ctx.timings.measure("inference"), loaded.lock:
                step = next(steps, None)
                if step is not None:
                    frame_idx, obj_ids, logits = step
                    binary = (logits[:, 0] > 0).cpu().numpy()
            if step is None:
                break
            if cancel_requested():  # between frames: a clip's propagation is the long part
                raise Cancelled("the job was cancelled (or ran past its execution timeout)")
            if masks[frame_idx] is None:
                masks[frame_idx] = dict(zip(obj_ids, binary, strict=True))
            done += 1
            ctx.progress.update(
                "propagating", 100 * done / total, f"frame {done} of {total} (both directions)"
            )
    del state
    missing = [i for i, entry in enumerate(masks) if entry is None]
    if missing:  # SAM 2 visits every frame between the ends; this would be a bug here
        raise RuntimeError(f"propagation left frames {missing} without masks")
    return cast("list[dict[int | str, np.ndarray]]", masks)  # no None left (checked above)


def run_video(request: TaskRequest, ctx: JobContext, prompts: list[Prompt]) -> dict[str, Any]:
    options = request.options_as(Sam2Options)
    info = clip_info(request)
    check_inside(prompts, info.width, info.height, "frames")
    for prompt in prompts:
        if prompt.frame_index is not None and 0 < info.frame_count <= prompt.frame_index:
            raise InvalidInput(
                f"{prompt.field}.frame_index: the clip has {info.frame_count} frames "
                f"(0 to {info.frame_count - 1})"
            )
    if options.multimask_output:
        ctx.warnings.append("multimask_output is for images; SAM 2 picks the mask on video")
    frames = read_clip(request, ctx)
    positions = _prompt_positions(prompts, frames, ctx)
    loaded = load_model(request, ctx)
    masks = track_objects(loaded, frames, info.width, info.height, prompts, positions, ctx)

    entries = []
    seen: dict[int | str, list[int]] = {prompt.id: [] for prompt in prompts}
    annotator = ClipAnnotator(ctx, request.annotate, sample_rate(info.fps, options.fps))
    with annotator:
        for frame, per_object in zip(frames, masks, strict=True):
            with ctx.timings.measure("encode"):
                objects = []
                for prompt in prompts:
                    mask = per_object[prompt.id]
                    entry = {"id": prompt.id, **_mask_entry(mask, options.mask_format)}
                    if entry["area"]:
                        seen[prompt.id].append(frame.index)
                    objects.append(entry)
                entries.append({**frame_stamp(frame), "objects": objects})
            # Masks are at the source's size; the frames held at most max_side long.
            object_masks = [per_object[prompt.id] for prompt in prompts]
            size = (info.width, info.height)
            annotator.add(frame.pixels, frame.time_s, objects, masks=object_masks, source_size=size)
    summary = [
        {
            "id": prompt.id,
            "prompt_frame_index": frames[positions[prompt.id]].index,
            "frames_with_mask": len(seen[prompt.id]),
            "first_frame": seen[prompt.id][0] if seen[prompt.id] else None,
            "last_frame": seen[prompt.id][-1] if seen[prompt.id] else None,
        }
        for prompt in prompts
    ]
    output: dict[str, Any] = {"video": info.describe(options, len(frames)), "objects": summary}
    output.update(per_frame_output(ctx, entries))
    output.update(annotator.output())
    return output


def load(name: str) -> LoadedModel:
    return preload_sam2(name)


TASK = register(
    Task(
        name="sam2-segmentation",
        options=Sam2Options,
        run=run,
        media=frozenset({"image", "video"}),
        default_model=DEFAULT_MODEL,
        load=load,
        description="SAM 2 masks from points and boxes, on an image or propagated through a clip",
    )
)
