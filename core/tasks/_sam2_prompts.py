"""What `sam2-segmentation` accepts: its options, the prompt objects they describe, and the
checks that need the media's size (points and boxes inside the image or frame)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ConfigDict, Field, field_validator, model_validator

from core.errors import InvalidInput
from core.schemas import MaskFormat, StrictModel, VideoOptions

MAX_OBJECTS = 32
MAX_POINTS = 64

Point = tuple[float, float]
Box = tuple[float, float, float, float]


def _points_from_dicts(value: Any) -> Any:
    """Points as `[x, y]` pairs or `{"x": .., "y": ..}` objects (the Orbit app's form)."""
    if isinstance(value, list):
        return [
            (item.get("x"), item.get("y"))
            if isinstance(item, dict) and set(item) >= {"x", "y"}
            else item
            for item in value
        ]
    return value


def _check_points(points: list[Point] | None, labels: list[int] | None) -> None:
    if labels is not None and points is None:
        raise ValueError("labels were given without points")
    if points is None:
        return
    if labels is not None and len(labels) != len(points):
        raise ValueError(f"labels has {len(labels)} items but points has {len(points)}")
    if labels is not None and any(label not in (0, 1) for label in labels):
        raise ValueError("labels must be 1 (the object) or 0 (not the object)")


def _check_box(box: Box | None) -> None:
    if box is not None and (box[2] <= box[0] or box[3] <= box[1]):
        raise ValueError(f"box {list(box)} must be [x1, y1, x2, y2] with x2 > x1 and y2 > y1")


class Sam2Object(StrictModel):
    """One object to segment: points (with labels, 1 by default) and/or a box, in pixels of
    the image (or of the video's frames), on a frame of a video."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: int | str | None = Field(default=None, description="echoed back; default: its index")
    points: list[Point] | None = Field(default=None, min_length=1, max_length=MAX_POINTS)
    labels: list[int] | None = None
    box: Box | None = None
    frame_index: int | None = Field(
        default=None, ge=0, description="video: the source frame the prompt is on"
    )

    @field_validator("points", mode="before")
    @classmethod
    def _points_dicts(cls, value: Any) -> Any:
        return _points_from_dicts(value)

    @model_validator(mode="after")
    def _consistent(self) -> Sam2Object:
        _check_points(self.points, self.labels)
        _check_box(self.box)
        if self.points is None and self.box is None:
            raise ValueError("an object needs points or a box")
        if self.box is None and self.labels is not None and 1 not in self.labels:
            raise ValueError("with no box, at least one point must be labelled 1 (the object)")
        return self


class Sam2Options(VideoOptions):
    objects: list[Sam2Object] | None = Field(default=None, min_length=1, max_length=MAX_OBJECTS)
    # Shorthands: one object (points/labels/box/frame_index) or one object per box (boxes).
    points: list[Point] | None = Field(default=None, min_length=1, max_length=MAX_POINTS)
    labels: list[int] | None = None
    box: Box | None = None
    boxes: list[Box] | None = Field(default=None, min_length=1, max_length=MAX_OBJECTS)
    frame_index: int | None = Field(default=None, ge=0)
    multimask_output: bool = Field(
        default=False, description="image: three candidate masks per object, with scores"
    )
    mask_format: MaskFormat = "rle"
    max_side: int = Field(
        default=1024, ge=64, le=4096, description="video: frames are kept at most this long"
    )

    @field_validator("points", mode="before")
    @classmethod
    def _points_dicts(cls, value: Any) -> Any:
        return _points_from_dicts(value)

    @model_validator(mode="after")
    def _one_way_to_prompt(self) -> Sam2Options:
        shorthand = [
            name for name in ("points", "labels", "box", "boxes") if getattr(self, name) is not None
        ]
        if self.objects is not None and shorthand:
            raise ValueError(
                "give either objects or the one-object shorthand, not both "
                f"({', '.join(shorthand)})"
            )
        if self.boxes is not None and {"points", "labels", "box"} & set(shorthand):
            raise ValueError("boxes makes one object per box; put points inside objects instead")
        _check_points(self.points, self.labels)
        _check_box(self.box)
        for box in self.boxes or []:
            _check_box(box)
        if self.box is None and self.labels is not None and 1 not in self.labels:
            raise ValueError("with no box, at least one point must be labelled 1 (the object)")
        return self


@dataclass(frozen=True)
class Prompt:
    """One object's prompt, resolved: numpy arrays as SAM 2 takes them, and the request
    field it came from (for error messages)."""

    id: int | str
    points: np.ndarray | None  # (N, 2) float32, pixels
    labels: np.ndarray | None  # (N,) int32
    box: np.ndarray | None  # (4,) float32, xyxy pixels
    frame_index: int | None
    field: str
    """The object's place in the request (`options.objects.2`), for error messages."""
    points_field: str
    box_field: str

    def scaled(self, sx: float, sy: float) -> Prompt:
        scale = np.array([sx, sy], np.float32)
        return Prompt(
            self.id,
            None if self.points is None else self.points * scale,
            self.labels,
            None if self.box is None else self.box * np.tile(scale, 2),
            self.frame_index,
            self.field,
            self.points_field,
            self.box_field,
        )


def make_prompt(
    object_id: int | str,
    points: list[Point] | None,
    labels: list[int] | None,
    box: Box | None,
    frame_index: int | None,
    field: str,
    points_field: str | None = None,
    box_field: str | None = None,
) -> Prompt:
    point_array = None if points is None else np.asarray(points, np.float32).reshape(-1, 2)
    label_array = None
    if point_array is not None:
        label_array = np.asarray(labels if labels is not None else [1] * len(point_array), np.int32)
    box_array = None if box is None else np.asarray(box, np.float32)
    return Prompt(
        object_id,
        point_array,
        label_array,
        box_array,
        frame_index,
        field,
        points_field or f"{field}.points",
        box_field or f"{field}.box",
    )


def prompts_from_options(options: Sam2Options) -> list[Prompt]:
    """The objects the options describe (empty when they describe none)."""
    if options.objects is not None:
        prompts = [
            make_prompt(
                obj.id if obj.id is not None else index,
                obj.points,
                obj.labels,
                obj.box,
                obj.frame_index,
                f"options.objects.{index}",
            )
            for index, obj in enumerate(options.objects)
        ]
    elif options.boxes is not None:
        prompts = [
            make_prompt(
                index,
                None,
                None,
                box,
                options.frame_index,
                f"options.boxes.{index}",
                box_field=f"options.boxes.{index}",
            )
            for index, box in enumerate(options.boxes)
        ]
    elif options.points is not None or options.box is not None:
        prompts = [
            make_prompt(
                0, options.points, options.labels, options.box, options.frame_index, "options"
            )
        ]
    else:
        return []
    seen: set[Any] = set()
    for prompt in prompts:
        if prompt.id in seen:
            raise InvalidInput(f"{prompt.field}.id: {prompt.id!r} is used by two objects")
        seen.add(prompt.id)
    return prompts


def check_inside(prompts: list[Prompt], width: int, height: int, what: str) -> None:
    """Every point and box within the image (`what` says which: "image", "frames")."""
    for prompt in prompts:
        if prompt.points is not None:
            for index, (x, y) in enumerate(prompt.points.tolist()):
                if not (0 <= x <= width and 0 <= y <= height):
                    raise InvalidInput(
                        f"{prompt.points_field}.{index}: ({x:g}, {y:g}) is outside the "
                        f"{width}x{height} {what}"
                    )
        if prompt.box is not None:
            x1, y1, x2, y2 = prompt.box.tolist()
            if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
                raise InvalidInput(
                    f"{prompt.box_field}: [{x1:g}, {y1:g}, {x2:g}, {y2:g}] is not inside the "
                    f"{width}x{height} {what}"
                )
