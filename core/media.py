"""Media decoding: sniffing the type from the bytes, images with caps and EXIF, video frames.

Images decode with OpenCV (the fastest JPEG path here; it applies EXIF orientation), after
Pillow has read the header alone so a decompression bomb is refused before any pixel is
allocated; HEIC (pillow-heif) and AVIF (Pillow's own plugin) decode with Pillow. A request's
images are read header first, all of them, so its whole pixel budget is checked before any is
decoded; a clip sent as images (`ImageFrames`) is decoded one frame at a time as it is read.
Video decodes with PyAV, capped by the stream's frame size and turned upright by its display
matrix (phone video).
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np
import pillow_heif
from PIL import Image, ImageOps

from core.config import get_settings
from core.errors import InvalidInput, MediaDecodeFailed, PayloadTooLarge

IMAGE_TYPES = frozenset(
    {
        "image/jpeg",
        "image/png",
        "image/webp",
        "image/bmp",
        "image/tiff",
        "image/gif",
        "image/heic",
        "image/avif",
    }
)
VIDEO_TYPES = frozenset(
    {"video/mp4", "video/quicktime", "video/webm", "video/x-matroska", "video/x-msvideo"}
)
# Decoded by Pillow, not OpenCV: GIF (palette and frames), HEIC (pillow-heif), AVIF (Pillow).
_PILLOW_TYPES = frozenset({"image/gif", "image/heic", "image/avif"})
# Pillow refuses more than twice its own limit with an exception of its own; ours is the cap.
Image.MAX_IMAGE_PIXELS = None
# HEIC/HEIF stills through Image.open; the primary image only (no thumbnails, depth or
# auxiliary images decoded). libheif applies the file's own rotation and mirroring, and
# pillow-heif resets the EXIF orientation to 1 so it is not applied twice.
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

# ISO-BMFF (`ftyp`) brands of HEIF stills and image sequences (ISO/IEC 23008-12, MIAF) and of
# AVIF (AV1 in HEIF); anything else with an `ftyp` box is video.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
    | {b"mif2", b"miaf"}
)
# Major brands of video files: their compatible brands never make them images.
_VIDEO_MAJOR_PREFIXES = (b"iso", b"mp4", b"avc", b"3g", b"M4", b"qt", b"dash", b"f4v", b"mmp4")


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
        return _sniff_ftyp(data)
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm" if b"webm" in data[:4096] else "video/x-matroska"
    return None


def _sniff_ftyp(data: bytes) -> str:
    """An ISO-BMFF file by its `ftyp` box: the major brand, then the compatible brands."""
    size = int.from_bytes(data[:4], "big")
    end = min(len(data), size if 16 <= size <= 512 else 64)
    major = data[8:12]
    compatible = {data[i : i + 4] for i in range(16, end - 3, 4)}
    brands = {major}
    if not major.startswith(_VIDEO_MAJOR_PREFIXES):
        brands |= compatible
    if brands & _AVIF_BRANDS:
        return "image/avif"
    if brands & _HEIF_BRANDS:
        return "image/heic"
    if major == b"qt  ":
        return "video/quicktime"
    return "video/mp4"


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
    return (
        "the payload is not a recognised image (JPEG, PNG, WebP, BMP, TIFF, GIF, HEIC, AVIF) "
        "or video"
    )


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


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read before any pixel is decoded."""

    media_type: str
    width: int
    height: int
    """As displayed: EXIF orientation applied, as decoding applies it."""

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_image_header(data: bytes, *, max_pixels: int, field: str = "image") -> ImageHeader:
    """The type and displayed size from the header alone; refuses a video, an unknown type, an
    image over `max_pixels` and a truncated JPEG, all before any pixel is allocated."""
    media_type = sniff_media_type(data)
    if media_type in VIDEO_TYPES:
        raise InvalidInput(f"{field} holds a video ({media_type}); send it as `video`")
    if media_type is None or media_type not in IMAGE_TYPES:
        raise MediaDecodeFailed(f"{field}: {describe_unknown(data)}")

    try:
        with Image.open(io.BytesIO(data)) as header:  # reads the header only
            width, height = header.size
            turned = _turned_by_orientation(header)
    except Exception as exc:  # Ultralytics patches Image.open: any failure is ours
        raise MediaDecodeFailed(
            f"{field}: the {media_type} header is unreadable ({type(exc).__name__})"
        ) from exc
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"{field} is {width}x{height} ({megapixels(width * height)}); the limit is "
            f"{megapixels(max_pixels)} (MAX_IMAGE_PIXELS)"
        )
    if media_type == "image/jpeg" and not _jpeg_is_complete(data):
        raise MediaDecodeFailed(
            f"{field}: the JPEG is truncated (its image data ends before the end-of-image marker)"
        )
    if turned:
        width, height = height, width
    return ImageHeader(media_type=media_type, width=width, height=height)


def megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.0f} Mpx" if pixels >= 10_000_000 else f"{pixels / 1e6:.2g} Mpx"


def _turned_by_orientation(header: Image.Image) -> bool:
    """Whether the EXIF orientation swaps width and height (5-8: a quarter turn)."""
    if header.format == "TIFF":  # Pillow's TIFF reader already reports the turned size
        return False
    if "exif" not in header.info:  # (Pillow's PNG getexif() would decode the image to look)
        return False
    return header.getexif().get(0x0112) in (5, 6, 7, 8)


def decode_image(data: bytes, *, max_pixels: int, field: str = "image") -> DecodedImage:
    header = read_image_header(data, max_pixels=max_pixels, field=field)
    return decode_pixels(data, header, field)


def decode_pixels(data: bytes, header: ImageHeader, field: str = "image") -> DecodedImage:
    """The pixels of an image whose header `read_image_header` has read and checked."""
    pixels = None
    if header.media_type not in _PILLOW_TYPES:
        # IMREAD_COLOR applies EXIF orientation, drops alpha, and makes 16-bit 8-bit.
        pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if pixels is None:
        pixels = _decode_with_pillow(data, header.media_type, field)
    return DecodedImage(pixels=pixels, media_type=header.media_type)


def read_image_headers(
    items: list[tuple[str, bytes]],
    *,
    max_pixels: int,
    max_request_pixels: int,
    field: str,
    one_size: bool = False,
) -> list[ImageHeader]:
    """Every header of a request's images, in order, before any is decoded: each under
    `max_pixels`, all together under `max_request_pixels` (MAX_REQUEST_PIXELS), and with
    `one_size` (a clip sent as images) all of the first one's size."""
    headers: list[ImageHeader] = []
    for name, data in items:
        header = read_image_header(data, max_pixels=max_pixels, field=name)
        if one_size and headers:
            first = headers[0]
            if (header.width, header.height) != (first.width, first.height):
                raise InvalidInput(
                    f"{field} must all have one size: {name} is {header.width}x"
                    f"{header.height}, {items[0][0]} is {first.width}x{first.height}"
                )
        headers.append(header)
    total = sum(header.pixels for header in headers)
    if total > max_request_pixels:
        noun = "frames" if one_size else "images"
        sizes = {(header.width, header.height) for header in headers}
        of_size = f" of {headers[0].width}x{headers[0].height}" if len(sizes) == 1 else ""
        raise PayloadTooLarge(
            f"{field}: {len(headers)} {noun}{of_size} are {megapixels(total)} decoded; the limit "
            f"for one request is {megapixels(max_request_pixels)} (MAX_REQUEST_PIXELS)"
        )
    return headers


class ImageFrames:
    """A clip sent as images (`frames`), decoded one frame at a time when it is read.

    Holds the encoded bytes and the size every header gave (`read_image_headers` with
    `one_size`), so a long clip costs its payload, not its decoded pixels."""

    def __init__(self, items: list[tuple[str, bytes]], header: ImageHeader, max_pixels: int):
        self._items = items
        self.width, self.height = header.width, header.height
        self._max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> DecodedImage:
        name, data = self._items[index]
        image = decode_image(data, max_pixels=self._max_pixels, field=name)
        if (image.width, image.height) != (self.width, self.height):
            raise MediaDecodeFailed(
                f"{name} decoded to {image.width}x{image.height}, not the {self.width}x"
                f"{self.height} its header and the other frames give"
            )
        return image

    def __iter__(self) -> Iterator[DecodedImage]:
        for index in range(len(self._items)):
            yield self[index]


# After a JPEG's start-of-scan header, entropy-coded data runs to the next marker: 0xFF then
# neither a stuffed 0x00, a restart marker (0xD0-0xD7) nor a fill byte (0xFF).
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _jpeg_is_complete(data: bytes) -> bool:
    """Whether the JPEG's end-of-image marker is there, found by walking its segments (each
    marker with its length) and scans from the start: data after that marker (a Motion Photo's
    video, a camera's trailer, padding) is not the image's. False when the data ends first."""
    pos, end = 2, len(data)
    while True:
        pos = data.find(b"\xff", pos)  # stray bytes before a marker are skipped, as libjpeg does
        if pos < 0:
            return False
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= end:
            return False
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            return True
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD7:  # no length follows
            continue
        if pos + 2 > end:
            return False
        pos += int.from_bytes(data[pos : pos + 2], "big")
        if pos > end:
            return False
        if marker == 0xDA:  # SOS: skip the scan's entropy-coded data
            scan_end = _SCAN_END.search(data, pos)
            if scan_end is None:
                return False
            pos = scan_end.start()


def _decode_with_pillow(data: bytes, media_type: str, field: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                rgb = ImageOps.exif_transpose(img).convert("RGB")
    except Exception as exc:  # see read_image_header
        raise MediaDecodeFailed(f"{field}: could not decode the {media_type} ({exc})") from exc
    return np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])


# --------------------------------------------------------------------------------------------
# Video


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    """As displayed: the display matrix's rotation applied (a phone-portrait clip is tall)."""
    fps: float
    duration_s: float
    frame_count: int
    codec: str
    rotation: int = 0
    """Degrees clockwise the stored frames are turned to display them: 0, 90, 180 or 270."""


@dataclass(frozen=True)
class VideoFrame:
    index: int
    """Index of the frame in the source video (not among the sampled frames): its place in
    presentation order, unique and increasing even when the frame rate varies."""
    time_s: float
    pixels: np.ndarray  # BGR uint8, upright


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


def _check_frame_size(width: int, height: int, max_pixels: int | None, field: str) -> None:
    limit = get_settings().max_video_pixels if max_pixels is None else max_pixels
    if width * height > limit:
        raise PayloadTooLarge(
            f"{field}: its frames are {width}x{height} ({megapixels(width * height)}); the "
            f"limit is {megapixels(limit)} (MAX_VIDEO_PIXELS)"
        )


def _clockwise(frame: Any) -> int:
    """The frame's display rotation as degrees clockwise (PyAV reads the display matrix as
    degrees counter-clockwise), to the nearest quarter turn."""
    return (-round(float(frame.rotation or 0) / 90) * 90) % 360


_ROTATE = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}


def _upright(pixels: np.ndarray, clockwise: int) -> np.ndarray:
    return cv2.rotate(pixels, _ROTATE[clockwise]) if clockwise else pixels


def _first_frame(container: Any, stream: Any) -> Any | None:
    """The first decoded frame: the display rotation is on decoded frames only (PyAV)."""
    import av

    try:
        for frame in container.decode(stream):
            return frame
    except av.FFmpegError:  # a damaged start: iter_video_frames says so when it decodes
        pass
    return None


def probe_video(
    source: bytes | Path, field: str = "video", *, max_pixels: int | None = None
) -> VideoInfo:
    """The clip's displayed size, rate, length and rotation. Refuses frames over `max_pixels`
    (default MAX_VIDEO_PIXELS) from the stream's header, before any frame is decoded."""
    container = _open_container(source, field)
    try:
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width), int(stream.codec_context.height)
        _check_frame_size(width, height, max_pixels, field)
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 30.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        else:
            duration = 0.0
        frames = int(stream.frames) or round(duration * fps)
        first = _first_frame(container, stream)
        rotation = 0 if first is None else _clockwise(first)
        if first is not None and not (width and height):  # a header without the size
            width, height = int(first.width), int(first.height)
            _check_frame_size(width, height, max_pixels, field)
        if rotation in (90, 270):
            width, height = height, width
        return VideoInfo(
            width=width,
            height=height,
            fps=fps,
            duration_s=duration,
            frame_count=frames,
            codec=str(stream.codec_context.name),
            rotation=rotation,
        )
    finally:
        container.close()


def _frames_before(source: bytes | Path, field: str, presented: Fraction) -> int:
    """How many frames of the stream are presented before time `presented` (seconds, the
    stream's own clock): its packets counted without decoding, for a frame's index after a
    seek. Packets come in decode order, and a frame's decode time is never after its
    presentation time, so the count stops at the first packet decoded at or after it."""
    container = _open_container(source, field)
    try:
        stream = container.streams.video[0]
        count = 0
        for packet in container.demux(stream):
            if packet.time_base is None:
                continue
            if packet.dts is not None and packet.dts * packet.time_base >= presented:
                break
            if (
                packet.pts is not None
                and not packet.is_discard
                and packet.pts * packet.time_base < presented
            ):
                count += 1
        return count
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
    max_pixels: int | None = None,
    field: str = "video",
) -> Generator[VideoFrame, None, None]:
    """Decode frames in [start_sec, end_sec), at most one per 1/fps seconds (all when None),
    upright (the display matrix applied). Frames over `max_pixels` (default MAX_VIDEO_PIXELS)
    are refused from the stream's header before decoding, and any later frame that grows."""
    import av

    problem = window_error(start_sec, end_sec)
    if problem:
        raise InvalidInput(problem)
    container = _open_container(source, field)
    try:
        stream = container.streams.video[0]
        _check_frame_size(
            stream.codec_context.width, stream.codec_context.height, max_pixels, field
        )
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 30.0)
        # Times are measured from the stream's first frame, whatever its first timestamp.
        origin = 0.0
        if stream.start_time is not None and stream.time_base is not None:
            origin = float(stream.start_time * stream.time_base)
        seeked = start_sec > 0 and stream.time_base is not None
        if seeked:
            # Seek to the keyframe before start; frames before start are skipped below.
            target = int((start_sec + origin) / stream.time_base)
            container.seek(target, stream=stream, backward=True)

        def timed() -> Iterator[tuple[float, tuple[int, Any]]]:
            # A frame's index is its place in the stream: decoded frames come in presentation
            # order, so it counts up from the first one decoded (after a seek, the frames
            # presented before that one, counted from the packets).
            first = 0
            for sequence, frame in enumerate(container.decode(stream)):
                stamped = frame.pts is not None and frame.time_base is not None
                if sequence == 0 and seeked:
                    first = (
                        _frames_before(source, field, frame.pts * frame.time_base)
                        if stamped
                        else round(start_sec * rate)
                    )
                if stamped:
                    yield float(frame.pts * frame.time_base) - origin, (first + sequence, frame)
                else:
                    yield sequence / rate, (first + sequence, frame)

        window = FrameWindow(fps, start_sec, end_sec, max_frames)
        for time_s, (index, frame) in window.select(timed()):  # converted only when kept
            _check_frame_size(frame.width, frame.height, max_pixels, field)
            pixels = fit_longest_side(frame.to_ndarray(format="bgr24"), max_side)
            pixels = _upright(pixels, _clockwise(frame))
            yield VideoFrame(index=index, time_s=time_s, pixels=pixels)
    except av.FFmpegError as exc:
        raise MediaDecodeFailed(f"{field}: decoding failed ({exc})") from exc
    finally:
        container.close()
