"""Frames for Structure-from-Motion: the sharpest frame per time window of a video, photo sets
(loose or zipped), and writing them as numbered files for COLMAP.

Why the sharpest frame per window rather than every n-th frame: hand-held footage has motion
blur on a fraction of its frames, and a blurred frame gives SIFT few features and COLMAP a
weak registration. Decoding every frame costs more than sampling, but decoding is cheap
next to SfM, and only the current window's best frame is ever held in memory.
"""

from __future__ import annotations

import contextlib
import io
import math
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from core.errors import InvalidInput, MediaDecodeFailed, PayloadTooLarge
from core.media import (
    IMAGE_TYPES,
    VideoFrame,
    decode_image,
    fit_longest_side,
    iter_video_frames,
    sniff_media_type,
    window_error,
)
from core.naming import natural_key

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "iter_sharp_frames",
    "load_photos",
    "photos_from_zip",
    "select_sharp_frames",
    "sharpness",
    "write_frames",
]

# The same default cap as core.config's MAX_IMAGE_PIXELS; callers pass the configured value.
DEFAULT_MAX_PIXELS = 64_000_000
# Sharpness is measured on a copy this size, so a 4K frame costs what a 640 px frame does and
# scores stay comparable whatever the source resolution.
_SHARPNESS_SIDE = 640
# A frame whose time lies within this fraction of a window of the next window's start counts
# in the next window: container timestamps are rounded, and i / fps must land in window i.
_WINDOW_EPS = 1e-3


def sharpness(pixels: np.ndarray) -> float:
    """Variance of the Laplacian of a downscaled grayscale copy: higher is sharper."""
    gray = pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
    gray = fit_longest_side(gray, _SHARPNESS_SIDE)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def iter_sharp_frames(
    source: bytes | Path,
    *,
    fps: float,
    start_sec: float = 0.0,
    end_sec: float | None = None,
    max_side: int | None = 1600,
    max_frames: int | None = None,
    field: str = "video",
) -> Iterator[VideoFrame]:
    """Yield the sharpest frame of each 1/fps-second window of [start_sec, end_sec).

    Windows start at ``start_sec``; window i holds the frames with time in
    [start_sec + i / fps, start_sec + (i + 1) / fps). Each yielded frame keeps its source
    index and time and is resized to ``max_side``. Streaming, so a caller can write frames
    to disk as they come instead of holding them all.
    """
    try:
        rate = float(fps)
    except (TypeError, ValueError):
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise InvalidInput(f"fps must be a positive number, got {fps!r}")
    if max_frames is not None and max_frames < 1:
        raise InvalidInput(f"max_frames must be at least 1, got {max_frames}")
    problem = window_error(start_sec, end_sec)
    if problem:
        raise InvalidInput(problem)
    # Validated above, eagerly; the generator below only runs when iterated.
    return _sharp_frames(source, rate, start_sec, end_sec, max_side, max_frames, field)


def _sharp_frames(
    source: bytes | Path,
    rate: float,
    start_sec: float,
    end_sec: float | None,
    max_side: int | None,
    max_frames: int | None,
    field: str,
) -> Iterator[VideoFrame]:
    best: VideoFrame | None = None
    best_score = -1.0
    window = -1
    emitted = 0
    decoded = 0
    # closing(): stopping early at max_frames closes the container now, not at GC time.
    frames = iter_video_frames(source, fps=None, start_sec=start_sec, end_sec=end_sec, field=field)
    with contextlib.closing(frames):
        for frame in frames:
            decoded += 1
            index = math.floor((frame.time_s - start_sec) * rate + _WINDOW_EPS)
            if index != window:
                if best is not None:
                    yield _finish(best, max_side)
                    emitted += 1
                    if max_frames is not None and emitted >= max_frames:
                        return
                best, best_score, window = None, -1.0, index
            score = sharpness(frame.pixels)
            if score > best_score:  # ties keep the earlier frame
                best, best_score = frame, score
    if best is not None:
        yield _finish(best, max_side)
    elif decoded == 0:
        _raise_no_frames(source, start_sec, end_sec, field)


def _finish(frame: VideoFrame, max_side: int | None) -> VideoFrame:
    return VideoFrame(frame.index, frame.time_s, fit_longest_side(frame.pixels, max_side))


def _raise_no_frames(
    source: bytes | Path, start_sec: float, end_sec: float | None, field: str
) -> None:
    from core.media import probe_video

    try:
        duration = probe_video(source, field).duration_s
    except MediaDecodeFailed:
        duration = 0.0
    if duration > 0 and start_sec >= duration:
        raise InvalidInput(
            f"start_sec ({start_sec}) is past the end of the {field} ({duration:.2f} s)"
        )
    span = f"[{start_sec}, {end_sec})" if end_sec is not None else f"from {start_sec} s"
    raise MediaDecodeFailed(f"{field}: no frame could be decoded {span}; is the file complete?")


def select_sharp_frames(
    source: bytes | Path,
    *,
    fps: float,
    start_sec: float = 0.0,
    end_sec: float | None = None,
    max_side: int | None = 1600,
    max_frames: int | None = None,
    field: str = "video",
) -> list[VideoFrame]:
    """The sharpest frame of each 1/fps-second window, as a list (see `iter_sharp_frames`)."""
    return list(
        iter_sharp_frames(
            source,
            fps=fps,
            start_sec=start_sec,
            end_sec=end_sec,
            max_side=max_side,
            max_frames=max_frames,
            field=field,
        )
    )


# --------------------------------------------------------------------------------------------
# Photo sets


def load_photos(
    images: Sequence[bytes],
    max_side: int | None = 1600,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    field: str = "images",
) -> list[np.ndarray]:
    """Decode photos (BGR uint8, EXIF orientation applied) and fit them to ``max_side``."""
    return [
        fit_longest_side(
            decode_image(data, max_pixels=max_pixels, field=f"{field}[{i}]").pixels, max_side
        )
        for i, data in enumerate(images)
    ]


def photos_from_zip(
    data: bytes | Path,
    max_side: int | None = 1600,
    max_files: int = 500,
    *,
    max_total_bytes: int = 2 * 1024**3,
    max_file_bytes: int = 256 * 1024**2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    field: str = "images",
) -> list[np.ndarray]:
    """Decode the images in a zip archive, in natural name order.

    Safe by construction: nothing is written to disk (so entry names cannot traverse paths);
    directories, hidden files, macOS resource forks and anything whose bytes are not an
    image are skipped; the archive is refused before any inflation when its declared
    uncompressed total or any one entry is over the caps (a zip bomb), and entries are read
    with the declared size as a hard bound (``zipfile`` stops there and then checks the CRC,
    so a header that lies about its size fails instead of inflating further).
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError) as exc:
        raise MediaDecodeFailed(f"{field}: not a readable zip archive ({exc})") from exc
    with archive:
        entries = [
            info
            for info in archive.infolist()
            if not info.is_dir()
            and not info.filename.startswith("__MACOSX/")
            and not Path(info.filename).name.startswith(".")
        ]
        if len(entries) > 4 * max_files:
            raise PayloadTooLarge(
                f"{field}: the zip holds {len(entries)} files; send at most {max_files} images"
            )
        total = sum(info.file_size for info in entries)
        if total > max_total_bytes:
            raise PayloadTooLarge(
                f"{field}: the zip would inflate to {total / 1e6:.0f} MB; the limit is "
                f"{max_total_bytes / 1e6:.0f} MB (is it a zip bomb?)"
            )
        too_big = [info for info in entries if info.file_size > max_file_bytes]
        if too_big:
            raise PayloadTooLarge(
                f"{field}: {too_big[0].filename} inflates to {too_big[0].file_size / 1e6:.0f} MB;"
                f" the limit per file is {max_file_bytes / 1e6:.0f} MB"
            )
        photos: list[tuple[str, np.ndarray]] = []
        for info in sorted(entries, key=lambda i: natural_key(i.filename)):
            if info.flag_bits & 0x1:
                raise InvalidInput(f"{field}: {info.filename} is encrypted; send a plain zip")
            try:
                with archive.open(info) as handle:
                    if sniff_media_type(handle.read(64)) not in IMAGE_TYPES:
                        continue  # a text file, a video, anything else: not a photo
                with archive.open(info) as handle:
                    raw = handle.read(info.file_size + 1)
            except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
                raise MediaDecodeFailed(f"{field}: {info.filename} is corrupt ({exc})") from exc
            if len(photos) >= max_files:
                raise PayloadTooLarge(f"{field}: the zip holds more than {max_files} images")
            pixels = decode_image(raw, max_pixels=max_pixels, field=f"{field}:{info.filename}")
            photos.append((info.filename, fit_longest_side(pixels.pixels, max_side)))
    if not photos:
        raise InvalidInput(f"{field}: the zip holds no images (JPEG, PNG, WebP, BMP, TIFF, GIF)")
    return [pixels for _, pixels in photos]


# --------------------------------------------------------------------------------------------
# Writing frames for COLMAP


def write_frames(
    frames: Iterable[VideoFrame | np.ndarray],
    folder: str | Path,
    *,
    ext: str = "jpg",
    jpeg_quality: int = 95,
    prefix: str = "frame_",
) -> list[str]:
    """Write frames as ``frame_00000.jpg``... in order; returns the file names (not paths).

    JPEG at quality 95 keeps SIFT's features (it looks at gradients coarser than JPEG's
    8x8 blocks) at a fifth of PNG's size; pass ``ext="png"`` for lossless frames.
    """
    ext = ext.lower().lstrip(".")
    if ext not in ("jpg", "jpeg", "png"):
        raise ValueError(f"ext must be jpg or png, got {ext!r}")
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if ext in ("jpg", "jpeg") else []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, frame in enumerate(frames):
        pixels = frame.pixels if isinstance(frame, VideoFrame) else frame
        name = f"{prefix}{i:05d}.{ext}"
        ok, buffer = cv2.imencode(f".{ext}", pixels, params)
        if not ok:
            raise ValueError(f"could not encode frame {i} ({pixels.shape}, {pixels.dtype})")
        (folder / name).write_bytes(buffer.tobytes())
        names.append(name)
    return names
