"""Media decoding: sniffing the type from the bytes, images with caps and EXIF, video frames.

Images decode with OpenCV (the fastest JPEG path here; it applies EXIF orientation), after
Pillow has read the header alone so a decompression bomb is refused before any pixel is
allocated. Video decodes with PyAV.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
from PIL import Image, ImageOps

from core.errors import InvalidInput, MediaDecodeFailed, PayloadTooLarge

IMAGE_TYPES = frozenset(
    {"image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff", "image/gif"}
)
VIDEO_TYPES = frozenset(
    {"video/mp4", "video/quicktime", "video/webm", "video/x-matroska", "video/x-msvideo"}
)
# Pillow refuses more than twice its own limit with an exception of its own; ours is the cap.
Image.MAX_IMAGE_PIXELS = None


def sniff_media_type(data: bytes) -> str | None:
    """The media type from magic bytes; None when unknown. Headers and names are not trusted."""
    head = data[:64]
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video/x-msvideo"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head.startswith(b"BM") and len(data) > 26:
        return "image/bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"hevc", b"avif"):
            return "image/heic"
        if brand == b"qt  ":
            return "video/quicktime"
        return "video/mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm" if b"webm" in data[:4096] else "video/x-matroska"
    return None


def _looks_like_text(data: bytes) -> bool:
    sample = data[:2048]
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def describe_unknown(data: bytes) -> str:
    if not data:
        return "the payload is empty (0 bytes)"
    if _looks_like_text(data):
        return "the payload is text, not an image or video (was it base64-encoded twice?)"
    return "the payload is not a recognised image (JPEG, PNG, WebP, BMP, TIFF, GIF) or video"


@dataclass(frozen=True)
class DecodedImage:
    """An image as the models take it: BGR uint8, EXIF orientation applied."""

    pixels: np.ndarray
    media_type: str

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def decode_image(data: bytes, *, max_pixels: int, field: str = "image") -> DecodedImage:
    media_type = sniff_media_type(data)
    if media_type in VIDEO_TYPES:
        raise InvalidInput(f"{field} holds a video ({media_type}); send it as `video`")
    if media_type == "image/heic":
        raise MediaDecodeFailed(f"{field} is HEIC/AVIF, which this worker does not decode")
    if media_type not in IMAGE_TYPES:
        raise MediaDecodeFailed(f"{field}: {describe_unknown(data)}")

    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            width, height = header.size
    except Exception as exc:  # Ultralytics patches Image.open: any failure is ours
        raise MediaDecodeFailed(
            f"{field}: the {media_type} header is unreadable ({type(exc).__name__})"
        ) from exc
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"{field} is {width}x{height} ({width * height / 1e6:.0f} Mpx); the limit is "
            f"{max_pixels / 1e6:.0f} Mpx (MAX_IMAGE_PIXELS)"
        )
    if media_type == "image/jpeg" and not _jpeg_is_complete(data):
        raise MediaDecodeFailed(f"{field}: the JPEG is truncated (no end-of-image marker)")

    pixels = None
    if media_type != "image/gif":
        # IMREAD_COLOR applies EXIF orientation, drops alpha, and makes 16-bit 8-bit.
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if pixels is None:
        pixels = _decode_with_pillow(data, media_type, field)
    return DecodedImage(pixels=pixels, media_type=media_type)


def _jpeg_is_complete(data: bytes) -> bool:
    # Encoders may pad after the EOI marker; look near the end only.
    return b"\xff\xd9" in data[-1024:]


def _decode_with_pillow(data: bytes, media_type: str, field: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                rgb = ImageOps.exif_transpose(img).convert("RGB")
    except Exception as exc:  # see decode_image
        raise MediaDecodeFailed(f"{field}: could not decode the {media_type} ({exc})") from exc
    return np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])


# --------------------------------------------------------------------------------------------
# Video


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    fps: float
    duration_s: float
    frame_count: int
    codec: str


@dataclass(frozen=True)
class VideoFrame:
    index: int
    """Index of the frame in the source video (not among the sampled frames)."""
    time_s: float
    pixels: np.ndarray  # BGR uint8


def _open_container(source: bytes | Path, field: str):
    import av

    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
        container = av.open(handle, mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise MediaDecodeFailed(f"{field}: not a readable video ({exc})") from exc
    if not container.streams.video:
        container.close()
        raise MediaDecodeFailed(f"{field}: the file has no video stream")
    return container


def probe_video(source: bytes | Path, field: str = "video") -> VideoInfo:
    container = _open_container(source, field)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 30.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        else:
            duration = 0.0
        frames = int(stream.frames) or round(duration * fps)
        return VideoInfo(
            width=int(stream.codec_context.width),
            height=int(stream.codec_context.height),
            fps=fps,
            duration_s=duration,
            frame_count=frames,
            codec=str(stream.codec_context.name),
        )
    finally:
        container.close()


def longest_side_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(w, h) scaled so the longer side is at most `max_side`; never enlarged, never 0."""
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def fit_longest_side(pixels: np.ndarray, max_side: int | None) -> np.ndarray:
    """Downscale (INTER_AREA, never upscale) so the longer side is at most `max_side`."""
    height, width = pixels.shape[:2]
    size = longest_side_size(width, height, max_side)
    if size == (width, height):
        return pixels
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


MAX_TIME_S = 7 * 24 * 3600.0
"""The latest time a request may name in a clip (a week): past it, a time is a mistake."""


def window_error(start_sec: float, end_sec: float | None) -> str | None:
    """Why [start_sec, end_sec) is not a time window, or None when it is."""
    if end_sec is not None and end_sec <= start_sec:
        return f"end_sec ({end_sec}) must be after start_sec ({start_sec})"
    return None


FrameT = TypeVar("FrameT")


class FrameWindow:
    """Which frames of a clip to keep, by their times: those in [start_sec, end_sec), at most
    one per 1/fps seconds (every one when fps is None), at most `max_frames` of them."""

    def __init__(
        self,
        fps: float | None,
        start_sec: float = 0.0,
        end_sec: float | None = None,
        max_frames: int | None = None,
    ) -> None:
        self.step = 1.0 / fps if fps else 0.0
        self.start_sec, self.end_sec, self.max_frames = start_sec, end_sec, max_frames
        self.next_time = start_sec
        self.kept = 0

    def admit(self, time_s: float) -> bool | None:
        """True: keep this frame; False: skip it; None: the window is over, stop reading."""
        if time_s + 1e-6 < self.start_sec:
            return False
        if self.end_sec is not None and time_s >= self.end_sec:
            return None
        if self.step and time_s + 1e-6 < self.next_time:
            return False
        self.kept += 1
        if self.step:  # the next slot after this frame, skipping any the clip jumped over
            self.next_time += self.step * max(
                1, int((time_s + 1e-6 - self.next_time) / self.step) + 1
            )
        return True

    @property
    def full(self) -> bool:
        return self.max_frames is not None and self.kept >= self.max_frames

    def select(self, timed: Iterable[tuple[float, FrameT]]) -> Iterator[tuple[float, FrameT]]:
        """The (time, frame) pairs kept, reading `timed` no further than the window needs."""
        for time_s, frame in timed:
            keep = self.admit(time_s)
            if keep is None:
                return
            if keep:
                yield time_s, frame
                if self.full:
                    return


def iter_video_frames(
    source: bytes | Path,
    *,
    fps: float | None = None,
    start_sec: float = 0.0,
    end_sec: float | None = None,
    max_frames: int | None = None,
    max_side: int | None = None,
    field: str = "video",
) -> Generator[VideoFrame, None, None]:
    """Decode frames in [start_sec, end_sec), at most one per 1/fps seconds (all when None)."""
    import av

    problem = window_error(start_sec, end_sec)
    if problem:
        raise InvalidInput(problem)
    container = _open_container(source, field)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 30.0)
        # Times are measured from the stream's first frame, whatever its first timestamp.
        origin = 0.0
        if stream.start_time is not None and stream.time_base is not None:
            origin = float(stream.start_time * stream.time_base)
        if start_sec > 0 and stream.time_base is not None:
            # Seek to the keyframe before start; frames before start are skipped below.
            target = int((start_sec + origin) / stream.time_base)
            container.seek(target, stream=stream, backward=True)

        def timed() -> Iterator[tuple[float, Any]]:
            for sequential_index, frame in enumerate(container.decode(stream)):
                if frame.pts is not None and frame.time_base is not None:
                    yield float(frame.pts * frame.time_base) - origin, frame
                else:
                    yield sequential_index / rate, frame

        window = FrameWindow(fps, start_sec, end_sec, max_frames)
        for time_s, frame in window.select(timed()):  # frames are converted only when kept
            pixels = fit_longest_side(frame.to_ndarray(format="bgr24"), max_side)
            yield VideoFrame(index=round(time_s * rate), time_s=time_s, pixels=pixels)
    except av.FFmpegError as exc:
        raise MediaDecodeFailed(f"{field}: decoding failed ({exc})") from exc
    finally:
        container.close()
