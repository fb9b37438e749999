"""Annotated video: what a video task found, drawn on each sampled frame and encoded as H.264
while the frames are produced.

Three pieces, used by every video task the same way:

- `draw_entries` draws one frame's results with supervision's annotators (boxes, masks,
  keypoint skeletons, labels with track ids, speeds). It reads our own per-frame entries, the
  dicts the result carries (`box`, `class_id`, `confidence`, `track_id`, `label`, `mask`,
  `keypoints`, `speed_mps`, SAM 2's `id`), built into `sv.Detections` / `sv.KeyPoints` here,
  never from a framework's result objects, so YOLO, SAM 2, SAM 3 and velocity share one path.
- `VideoWriter` encodes BGR frames one at a time with PyAV's libx264 into a temporary mp4
  (yuv420p, even size, `+faststart` so a browser `<video>` plays it while it downloads), each
  frame at its own sampled time. Nothing is kept per frame in Python; on an error the file
  is removed.
- `ClipAnnotator` is the hook a task's per-frame loop calls (`add`, or `add_frame` for a frame
  it drew itself, such as colourised depth). Off (`annotate` false) it does nothing. When its
  `with` block ends without error the video is stored as the artifact `annotated.mp4`
  (`ctx.store.put`: S3, OUTPUT_DIR, or inline base64 under the budget) and `output()` gives
  `{"annotated_video": <artifact>}`; the temporary file is removed either way. Drawing and
  encoding count as the `annotate` stage of `timings_ms`, storing it as `upload`.

supervision is imported on first use: jobs that do not annotate never load it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
from collections import deque
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from core.encode import polygons_to_mask, rle_to_mask

if TYPE_CHECKING:
    from core.contract import JobContext

ANNOTATED_NAME = "annotated.mp4"
RESULT_FIELD = "annotated_video"
CONTENT_TYPE = "video/mp4"
CRF = 23
PRESET = "veryfast"
TIME_BASE = Fraction(1, 90_000)
"""Frame times in the mp4 (MPEG's 90 kHz clock): a sampled clip keeps its real timing."""
KEYPOINT_MIN_CONFIDENCE = 0.5
"""Keypoints below this are not drawn (as Ultralytics' own plots skip them)."""
MASK_OPACITY = 0.45
BT709 = 1  # FFmpeg's AVCOL_SPC / AVCOL_PRI / AVCOL_TRC value for ITU-R BT.709
LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG: Y 16..235, what H.264 players expect


def sample_rate(source_fps: float, sample_fps: float | None) -> float:
    """The rate of the sampled frames: the source's, or `fps` when sampling is slower."""
    if sample_fps and sample_fps < source_fps:
        return float(sample_fps)
    return float(source_fps) if source_fps > 0 else 30.0


# --------------------------------------------------------------------------------------------
# Encoding


class VideoWriter:
    """H.264 mp4 of BGR frames, encoded as they come: `write(frame_bgr, time_s)`, then
    `close() -> Path`. The file is a temporary one in `work_dir` (or the system's); the caller
    owns it after `close`. Used as a context manager, an error removes it.

    Frames are padded to an even width and height (yuv420p needs both even) by repeating the
    last column or row; a frame of another size than the first is resized to it. Frame times
    (`time_s`, from the clip's first sampled frame) become the pts, so a clip sampled at
    irregular times plays at the right speed; `fps` is the stream's nominal rate."""

    def __init__(
        self,
        fps: float,
        width: int,
        height: int,
        *,
        work_dir: Path | None = None,
        crf: int = CRF,
        preset: str = PRESET,
    ) -> None:
        import av

        if width < 1 or height < 1:
            raise ValueError(f"a frame is at least 1x1, got {width}x{height}")
        self.source_size = (width, height)
        self.width, self.height = width + width % 2, height + height % 2
        self.frames = 0
        rate = Fraction(fps).limit_denominator(1001)
        self._frame_ticks = max(1, round(1 / (fps * TIME_BASE)))
        self._first_time: float | None = None
        self._last_pts = -1
        handle, name = tempfile.mkstemp(prefix="annotated-", suffix=".mp4", dir=work_dir)
        os.close(handle)
        self.path = Path(name)
        self._container: Any = None
        try:
            self._container = av.open(
                str(self.path), "w", format="mp4", options={"movflags": "+faststart"}
            )
            stream = self._container.add_stream("libx264", rate=rate)
            stream.width, stream.height = self.width, self.height
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf), "preset": preset}
            # Tagged BT.709, limited range (what the frames are converted with below), so
            # browsers and players do not guess the colours.
            codec = stream.codec_context
            codec.colorspace = codec.color_primaries = codec.color_trc = BT709
            codec.color_range = LIMITED_RANGE
            codec.time_base = TIME_BASE
            stream.time_base = TIME_BASE
            self._stream = stream
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()

    def write(self, frame_bgr: np.ndarray, time_s: float | None = None) -> None:
        """Encode one frame now (its packets go straight to the file)."""
        import av
        from av.video.reformatter import ColorRange, Colorspace

        if self._container is None:
            raise RuntimeError("the writer is closed")
        pixels = self._fit(frame_bgr)
        if time_s is None:
            pts = self._last_pts + self._frame_ticks
        else:
            if self._first_time is None:
                self._first_time = time_s
            pts = round((time_s - self._first_time) / TIME_BASE)
        pts = max(pts, self._last_pts + 1)  # strictly increasing, whatever the stamps say
        frame = av.VideoFrame.from_ndarray(pixels, format="bgr24").reformat(
            format="yuv420p",
            dst_colorspace=Colorspace.ITU709,
            dst_color_range=ColorRange.MPEG,
        )
        frame.colorspace, frame.color_range = BT709, LIMITED_RANGE
        frame.pts = pts
        frame.time_base = TIME_BASE
        frame.duration = self._frame_ticks
        self._mux(self._stream.encode(frame))
        self._last_pts = pts
        self.frames += 1

    def close(self) -> Path:
        """Flush the encoder and finish the file (the index moves to the front); its path."""
        if self._container is None:
            raise RuntimeError("the writer is closed")
        try:
            self._mux(self._stream.encode())
            container, self._container = self._container, None
            container.close()
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Stop and remove the file (safe to call more than once)."""
        container, self._container = self._container, None
        if container is not None:
            with contextlib.suppress(Exception):
                container.close()
        self.path.unlink(missing_ok=True)

    def _mux(self, packets: Sequence[Any]) -> None:
        for packet in packets:
            self._container.mux(packet)

    def _fit(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
            raise ValueError(f"a frame is HxWx3 uint8 BGR, got {pixels.shape} {pixels.dtype}")
        width, height = self.source_size
        if pixels.shape[:2] != (height, width):
            pixels = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA)
        if (self.width, self.height) != (width, height):
            pixels = cv2.copyMakeBorder(
                pixels, 0, self.height - height, 0, self.width - width, cv2.BORDER_REPLICATE
            )
        return np.ascontiguousarray(pixels)


# --------------------------------------------------------------------------------------------
# Drawing


def entry_label(entry: dict[str, Any]) -> str:
    """`#3 circle 0.93`; with a speed (velocity) `#3 circle 1.20 m/s`; SAM 2's object `dog`."""
    parts = []
    if entry.get("track_id") is not None:
        parts.append(f"#{entry['track_id']}")
    elif entry.get("id") is not None:
        parts.append(str(entry["id"]))
    if entry.get("label"):
        parts.append(str(entry["label"]))
    if "speed_mps" in entry:
        if entry["speed_mps"] is not None:
            parts.append(f"{entry['speed_mps']:.2f} m/s")
    elif entry.get("confidence") is not None:
        parts.append(f"{entry['confidence']:.2f}")
    return " ".join(parts)


def entry_mask(mask: Any, height: int, width: int) -> np.ndarray | None:
    """A result's encoded mask (`rle`, `polygon` or `png`) as a bool HxW array."""
    if not isinstance(mask, dict):
        return None
    kind = mask.get("format")
    if kind == "rle":
        decoded = rle_to_mask(mask)
    elif kind == "polygon":
        decoded = polygons_to_mask(mask.get("polygons", []), height, width)
    elif kind == "png":
        raw = np.frombuffer(base64.b64decode(mask["data"]), np.uint8)
        image = cv2.imdecode(raw, cv2.IMREAD_GRAYSCALE)
        if image is None:
            return None
        decoded = image > 127
    else:
        return None
    return _fit_mask(decoded, height, width)


def _fit_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask.astype(bool, copy=False)
    resized = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
    return np.asarray(resized) > 0


def _colour_index(entry: dict[str, Any], position: int) -> int:
    """Colour by track (stable across frames), else by class, else by position."""
    for key in ("track_id", "class_id"):
        value = entry.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return position


def to_sv_detections(
    entries: Sequence[dict[str, Any]],
    frame_size: tuple[int, int],
    *,
    masks: Sequence[np.ndarray | None] | None = None,
    source_size: tuple[int, int] | None = None,
) -> tuple[Any, list[dict[str, Any]]]:
    """`sv.Detections` of a frame's entries (those with a box), in frame pixels, and the
    entries kept. `source_size` (w, h) is the space the boxes and masks are in when the frame
    was held smaller (`max_side`); `masks` are bool arrays given in place of the entries'
    encoded ones."""
    import supervision as sv

    width, height = frame_size
    source_w, source_h = source_size or frame_size
    scale = np.array([width / source_w, height / source_h] * 2, np.float32)
    kept, boxes, colours, bitmaps = [], [], [], []
    for position, entry in enumerate(entries):
        box = entry.get("box")
        if not box:
            continue
        kept.append(entry)
        boxes.append(np.asarray(box, np.float32) * scale)
        colours.append(_colour_index(entry, position))
        given = masks[position] if masks is not None else None
        mask = given if given is not None else entry_mask(entry.get("mask"), source_h, source_w)
        bitmaps.append(None if mask is None else _fit_mask(mask, height, width))
    if not kept:
        return sv.Detections.empty(), []
    mask_stack = None
    if any(m is not None for m in bitmaps):
        empty = np.zeros((height, width), bool)
        mask_stack = np.stack([m if m is not None else empty for m in bitmaps]).astype(bool)
    confidences = [e.get("confidence") for e in kept]
    tracks = [e.get("track_id") for e in kept]
    detections = sv.Detections(
        xyxy=np.stack(boxes).reshape(-1, 4),
        mask=mask_stack,
        confidence=(np.asarray(confidences, np.float32) if None not in confidences else None),
        class_id=np.asarray(colours, int),
        tracker_id=np.asarray(tracks, int) if None not in tracks else None,
    )
    return detections, kept


def to_sv_keypoints(
    entries: Sequence[dict[str, Any]], scale: tuple[float, float] = (1.0, 1.0)
) -> Any | None:
    """`sv.KeyPoints` of the entries' `keypoints` (pose), or None; unsure points hidden."""
    import supervision as sv

    rows = [e["keypoints"] for e in entries if e.get("keypoints")]
    if not rows or len({len(row) for row in rows}) != 1:
        return None
    xy = np.array([[(p["x"], p["y"]) for p in row] for row in rows], np.float32)
    xy *= np.asarray(scale, np.float32)
    confidence = np.array([[p["confidence"] for p in row] for row in rows], np.float32)
    return sv.KeyPoints(
        xy=xy, keypoint_confidence=confidence, visible=confidence >= KEYPOINT_MIN_CONFIDENCE
    )


@lru_cache(maxsize=8)
def _annotators(width: int, height: int) -> dict[str, Any]:
    """supervision's annotators sized for a frame (line width and text grow with it)."""
    import supervision as sv
    from supervision.key_points.skeletons import SKELETONS_BY_VERTEX_COUNT

    thickness = max(2, sv.calculate_optimal_line_thickness((width, height)))
    text_scale = max(0.4, sv.calculate_optimal_text_scale((width, height)))
    lookup = sv.ColorLookup.INDEX  # ours: the custom lookup by track, class or position
    return {
        "mask": sv.MaskAnnotator(opacity=MASK_OPACITY, color_lookup=lookup),
        "box": sv.BoxAnnotator(thickness=thickness, color_lookup=lookup),
        "label": sv.LabelAnnotator(
            color_lookup=lookup,
            text_scale=text_scale,
            text_thickness=1,
            text_padding=max(3, thickness + 1),
            smart_position=True,  # labels kept inside the frame, apart from each other
        ),
        "edge": sv.EdgeAnnotator(color=sv.Color.GREEN, thickness=thickness),
        "vertex": sv.VertexAnnotator(color=sv.Color.RED, radius=thickness + 1),
        "skeletons": frozenset(SKELETONS_BY_VERTEX_COUNT),
    }


def draw_entries(
    pixels: np.ndarray,
    entries: Sequence[dict[str, Any]],
    *,
    masks: Sequence[np.ndarray | None] | None = None,
    source_size: tuple[int, int] | None = None,
) -> np.ndarray:
    """A copy of the BGR frame with the entries drawn: masks, boxes, skeletons, labels."""
    height, width = pixels.shape[:2]
    scene = pixels.copy()
    detections, kept = to_sv_detections(
        entries, (width, height), masks=masks, source_size=source_size
    )
    if not kept:
        return scene
    annotators = _annotators(width, height)
    colours = detections.class_id
    if detections.mask is not None:
        scene = annotators["mask"].annotate(scene, detections, custom_color_lookup=colours)
    scene = annotators["box"].annotate(scene, detections, custom_color_lookup=colours)
    source_w, source_h = source_size or (width, height)
    keypoints = to_sv_keypoints(kept, (width / source_w, height / source_h))
    if keypoints is not None:
        if keypoints.xy.shape[1] in annotators["skeletons"]:
            scene = annotators["edge"].annotate(scene, keypoints)
        scene = annotators["vertex"].annotate(scene, keypoints)
    labels = [entry_label(entry) for entry in kept]
    scene = annotators["label"].annotate(
        scene, detections, labels=labels, custom_color_lookup=colours
    )
    return np.asarray(scene)


# --------------------------------------------------------------------------------------------
# The hook in a task's frame loop


class ClipAnnotator:
    """Draws and encodes a clip's frames as a task produces them; a no-op when not enabled.

    `add(pixels, time_s, entries)` draws that frame's entries and encodes it now; with `lag`
    (velocity: 1) frames wait that many frames first, because their entries are completed by
    a later frame (a speed is measured towards the next frame). `add_frame(pixels, time_s)`
    encodes a frame the task drew itself. Ending the `with` block without an error stores the
    video (`output()` then gives `{"annotated_video": <artifact>}`); an error (cancel
    included) removes the temporary file and stores nothing."""

    def __init__(
        self,
        ctx: JobContext,
        enabled: bool,
        fps: float,
        *,
        lag: int = 0,
        name: str = ANNOTATED_NAME,
    ) -> None:
        self.ctx = ctx
        self.enabled = enabled
        self.fps = fps
        self.name = name
        self.lag = lag
        self.record: dict[str, Any] | None = None
        self._writer: VideoWriter | None = None
        self._held: deque[tuple[np.ndarray, float, Sequence[dict[str, Any]], Any, Any]] = deque()

    def __enter__(self) -> ClipAnnotator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None and self.enabled:
                self._store()
        finally:
            self._held.clear()
            if self._writer is not None:
                self._writer.abort()  # the temporary file, stored or not
                self._writer = None

    def add(
        self,
        pixels: np.ndarray,
        time_s: float,
        entries: Sequence[dict[str, Any]],
        *,
        masks: Sequence[np.ndarray | None] | None = None,
        source_size: tuple[int, int] | None = None,
    ) -> None:
        """One sampled frame and its entries (the dicts the result carries for it)."""
        if not self.enabled:
            return
        self._held.append((pixels, time_s, entries, masks, source_size))
        while len(self._held) > self.lag:
            self._draw(*self._held.popleft())

    def add_frame(self, pixels: np.ndarray, time_s: float) -> None:
        """A frame already drawn by the task (colourised depth), encoded as it is."""
        if self.enabled:
            with self.ctx.timings.measure("annotate"):
                self._write(pixels, time_s)

    def output(self) -> dict[str, Any]:
        """`{"annotated_video": <artifact>}` once stored; `{}` when off (or no frame came)."""
        return {RESULT_FIELD: self.record} if self.record is not None else {}

    def _draw(
        self,
        pixels: np.ndarray,
        time_s: float,
        entries: Sequence[dict[str, Any]],
        masks: Sequence[np.ndarray | None] | None,
        source_size: tuple[int, int] | None,
    ) -> None:
        with self.ctx.timings.measure("annotate"):
            drawn = draw_entries(pixels, entries, masks=masks, source_size=source_size)
            self._write(drawn, time_s)

    def _write(self, pixels: np.ndarray, time_s: float) -> None:
        if self._writer is None:
            height, width = pixels.shape[:2]
            self._writer = VideoWriter(self.fps, width, height, work_dir=self.ctx.settings.work_dir)
        self._writer.write(pixels, time_s)

    def _store(self) -> None:
        while self._held:
            self._draw(*self._held.popleft())
        if self._writer is None:
            return
        with self.ctx.timings.measure("annotate"):
            path = self._writer.close()
        with self.ctx.timings.measure("upload"):
            self.record = self.ctx.store.put(self.name, path, CONTENT_TYPE)
