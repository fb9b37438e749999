"""Orbit: one creator clip to a bounded-parallax orbit preview.

Its client submits `{"frames": [...], "fps", "width", "height", "prompt_points": [{"x", "y"}]}`
with no task: the clip as images and the clicks on the subject in the app's own width x height
space (the frames may be sent smaller). Today the job is the subject's masks through the clip
(SAM 2), one PNG data URI per frame.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from pydantic import ConfigDict, Field

from core.apps.base import App, without
from core.contract import JobContext, RequestAdapter, TaskRequest
from core.encode import mask_to_png
from core.errors import InvalidInput
from core.schemas import StrictModel
from core.tasks._sam2_prompts import MAX_POINTS, Prompt, Sam2Options, check_inside, make_prompt
from core.video import clip_info, frame_stamp

ORBIT_FIELDS = ("prompt_points", "width", "height")


class OrbitSubmit(StrictModel):
    """The fields only Orbit sends; the rest (`frames`, `fps`, `options`) are ours."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    width: int | None = Field(default=None, ge=1)
    height: int | None = Field(default=None, ge=1)
    prompt_points: list[dict[str, Any]]


def recognises(job_input: dict[str, Any]) -> bool:
    return "task" not in job_input and "frames" in job_input and "prompt_points" in job_input


def to_native(job_input: dict[str, Any]) -> dict[str, Any]:
    submit = OrbitSubmit.model_validate(job_input)  # a ValidationError names the field
    prompts_from_clicks(submit.prompt_points)  # bad clicks fail before anything is decoded
    return {**without(job_input, *ORBIT_FIELDS), "task": "sam2-segmentation"}


def prompts_from_clicks(prompt_points: list[dict[str, Any]]) -> list[Prompt]:
    """The app's clicks: `[{"x", "y"}, ...]`, all on the object (a `label` of 0 marks a
    background click), on the clip's first frame; one object, id 1."""
    if not prompt_points:
        raise InvalidInput("prompt_points: give at least one {x, y} point on the object")
    points, labels = [], []
    for index, item in enumerate(prompt_points):
        where = f"prompt_points.{index}"
        try:
            x, y = float(item["x"]), float(item["y"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"{where}: must be an object with numbers x and y") from exc
        label = item.get("label", 1)
        if label not in (0, 1):
            raise InvalidInput(f"{where}.label: must be 1 (the object) or 0 (background)")
        points.append((x, y))
        labels.append(int(label))
    if 1 not in labels:
        raise InvalidInput("prompt_points: at least one point must be on the object")
    if len(points) > MAX_POINTS:
        raise InvalidInput(f"prompt_points: at most {MAX_POINTS} points")
    return [make_prompt(1, points, labels, None, 0, "prompt_points", points_field="prompt_points")]


def run_masks(job_input: dict[str, Any], request: TaskRequest, ctx: JobContext) -> dict[str, Any]:
    """One object clicked on the first frame -> a PNG mask (data URI) per frame."""
    # SAM 2's task module, here and not at the top: the splat worker imports the app
    # registry too, and has no infer models.
    from core.tasks.sam2 import load_model, mask_box, read_clip, track_objects

    assert request.frames is not None
    submit = OrbitSubmit.model_validate(job_input)
    info = clip_info(request)
    prompts = prompts_from_clicks(submit.prompt_points)
    # The app's clicks are in its own width x height space; the frames may be sent smaller.
    space_w, space_h = submit.width or info.width, submit.height or info.height
    if (space_w, space_h) != (info.width, info.height):
        prompts = [p.scaled(info.width / space_w, info.height / space_h) for p in prompts]
        ctx.warnings.append(
            f"prompt_points scaled from {space_w}x{space_h} to the frames' "
            f"{info.width}x{info.height}"
        )
    check_inside(prompts, info.width, info.height, "frames")
    frames = read_clip(request, ctx)
    if len(frames) < len(request.frames):
        ctx.warnings.append(
            f"masks cover {len(frames)} of the {len(request.frames)} frames (options "
            "max_frames, fps, start_sec, end_sec)"
        )
    loaded = load_model(request, ctx)
    masks = track_objects(loaded, frames, info.width, info.height, prompts, {1: 0}, ctx)

    data_uris, details = [], []
    with ctx.timings.measure("encode"):
        for frame, per_object in zip(frames, masks, strict=True):
            mask = per_object[1]
            png = base64.b64encode(mask_to_png(mask)).decode("ascii")
            data_uris.append(f"data:image/png;base64,{png}")
            details.append({**frame_stamp(frame), "area": int(mask.sum()), "box": mask_box(mask)})
    output: dict[str, Any] = {
        "width": info.width,
        "height": info.height,
        "fps": round(info.fps, 3),
        "frame_count": len(frames),
        "video": info.describe(request.options_as(Sam2Options), len(frames)),
    }
    encoded = sum(len(uri) for uri in data_uris)
    if encoded > ctx.settings.inline_max_bytes:
        with ctx.timings.measure("upload"):
            body = json.dumps({"masks": data_uris, "frames": details}, separators=(",", ":"))
            output["masks_artifact"] = ctx.store.put(
                "masks.json", body.encode(), "application/json"
            )
        ctx.warnings.append(
            f"the masks are {encoded} bytes, over INLINE_MAX_BYTES; they are in masks_artifact"
        )
        output["frames"] = details
    else:
        output["masks"] = data_uris
        output["frames"] = details
    return output


APP = App(
    name="orbit",
    title="Orbit",
    worker="infer",
    recognises=recognises,
    adapter=RequestAdapter(to_native=to_native, run_task=run_masks),
)
