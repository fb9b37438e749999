"""Image and video decoding: sniffing, EXIF, caps, corrupt files, frame sampling, real footage."""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from core.errors import InvalidInput, MediaDecodeFailed, PayloadTooLarge
from core.media import decode_image, iter_video_frames, probe_video, sniff_media_type
from tests.conftest import require_shared_media

LIMIT = 64_000_000


def encode(pixels: np.ndarray, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **params)
    return buffer.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1-bit PNG of width x height zeros: ~100 KB on disk, 900 Mpx decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def test_sniffs_types_from_bytes_not_names() -> None:
    pixels = np.zeros((8, 8, 3), np.uint8)
    assert sniff_media_type(encode(pixels, "JPEG")) == "image/jpeg"
    assert sniff_media_type(encode(pixels, "PNG")) == "image/png"
    assert sniff_media_type(encode(pixels, "WEBP")) == "image/webp"
    assert sniff_media_type(encode(pixels, "GIF")) == "image/gif"
    assert sniff_media_type(encode(pixels, "BMP")) == "image/bmp"
    assert sniff_media_type(encode(pixels, "TIFF")) == "image/tiff"
    assert sniff_media_type(b"hello, world") is None


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_decodes_every_format_to_bgr(fmt: str) -> None:
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :, 0] = 250  # red in RGB
    decoded = decode_image(encode(pixels, fmt), max_pixels=LIMIT)
    assert decoded.pixels.shape == (40, 60, 3)
    assert decoded.pixels.dtype == np.uint8
    # BGR order: red lands in the last channel.
    assert decoded.pixels[20, 30, 2] > 200 and decoded.pixels[20, 30, 0] < 50


def test_exif_orientation_is_applied() -> None:
    pixels = np.zeros((100, 200, 3), np.uint8)
    pixels[:, :50] = 255  # a white strip on the left, as stored
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    decoded = decode_image(buffer.getvalue(), max_pixels=LIMIT)
    assert decoded.pixels.shape[:2] == (200, 100)
    assert decoded.pixels[:40].mean() > 240  # the strip is now on top
    assert decoded.pixels[-40:].mean() < 15


def test_grayscale_and_alpha_become_three_channels() -> None:
    gray = decode_image(encode(np.full((10, 10), 7, np.uint8), "PNG"), max_pixels=LIMIT)
    rgba = decode_image(encode(np.full((10, 10, 4), 9, np.uint8), "PNG"), max_pixels=LIMIT)
    assert gray.pixels.shape == (10, 10, 3) and rgba.pixels.shape == (10, 10, 3)


def test_png_bomb_is_refused_before_decoding() -> None:
    bomb = png_bomb()
    assert len(bomb) < 2_000_000
    with pytest.raises(PayloadTooLarge, match="30000x30000"):
        decode_image(bomb, max_pixels=LIMIT)


def test_pixel_cap_is_a_setting() -> None:
    data = encode(np.zeros((100, 100, 3), np.uint8), "PNG")
    decode_image(data, max_pixels=10_000)
    with pytest.raises(PayloadTooLarge, match="MAX_IMAGE_PIXELS"):
        decode_image(data, max_pixels=9_999)


def test_truncated_and_corrupt_images_fail_clearly() -> None:
    jpeg = encode((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8), "JPEG")
    with pytest.raises(MediaDecodeFailed, match="truncated"):
        decode_image(jpeg[: len(jpeg) // 2], max_pixels=LIMIT)
    png = encode((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8), "PNG")
    with pytest.raises(MediaDecodeFailed):
        decode_image(png[: len(png) // 2], max_pixels=LIMIT)
    with pytest.raises(MediaDecodeFailed, match="header"):
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, max_pixels=LIMIT)


def test_text_empty_and_video_are_not_images(tmp_path: Path) -> None:
    with pytest.raises(MediaDecodeFailed, match="text"):
        decode_image(b"name,score\nalice,3\n", max_pixels=LIMIT)
    with pytest.raises(MediaDecodeFailed, match="empty"):
        decode_image(b"", max_pixels=LIMIT)
    video = make_video(tmp_path / "v.mp4", frames=3)
    with pytest.raises(InvalidInput, match="video"):
        decode_image(video.read_bytes(), max_pixels=LIMIT)


def make_video(
    path: Path,
    frames: int = 30,
    fps: int = 10,
    size: tuple[int, int] = (64, 48),
    first_pts: int = 0,
) -> Path:
    """An mp4 whose frame i shows the value i*8 everywhere (frame identity is checkable)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "g": "5"}
        stream.time_base = Fraction(1, fps)
        for i in range(frames):
            pixels = np.full((size[1], size[0], 3), i * 8 % 256, np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = first_pts + i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_video_sampling_by_fps_and_trim(tmp_path: Path) -> None:
    video = make_video(tmp_path / "v.mp4", frames=30, fps=10)
    info = probe_video(video)
    assert (info.width, info.height) == (64, 48)
    assert info.fps == pytest.approx(10)
    assert info.duration_s == pytest.approx(3.0, abs=0.11)

    every = list(iter_video_frames(video))
    assert [f.index for f in every] == list(range(30))
    values = [int(np.median(f.pixels)) for f in every]
    assert all(abs(v - i * 8) <= 3 for i, v in enumerate(values))

    sampled = list(iter_video_frames(video.read_bytes(), fps=2.5, start_sec=1.0, end_sec=2.5))
    assert [f.index for f in sampled] == [10, 14, 18, 22]
    assert [round(f.time_s, 2) for f in sampled] == [1.0, 1.4, 1.8, 2.2]
    # Frames carry the pixels of their own index (seek landed where it should).
    assert all(abs(int(np.median(f.pixels)) - f.index * 8) <= 3 for f in sampled)

    capped = list(iter_video_frames(video, max_frames=4, max_side=32))
    assert len(capped) == 4 and capped[0].pixels.shape == (24, 32, 3)


def test_bad_videos(tmp_path: Path) -> None:
    video = make_video(tmp_path / "v.mp4", frames=10).read_bytes()
    with pytest.raises(MediaDecodeFailed):
        list(iter_video_frames(video[:200]))
    with pytest.raises(MediaDecodeFailed):
        probe_video(b"")
    with pytest.raises(InvalidInput, match="after start_sec"):
        list(iter_video_frames(video, start_sec=2, end_sec=1))


@pytest.mark.parametrize(
    ("name", "size", "frames"),
    [
        ("sam2_01_dog_walk.mp4", (1280, 720), 289),
        ("street_pedestrians_cyclist_1080p.mp4", (1920, 1080), 302),
    ],
)
def test_real_footage_decodes(name: str, size: tuple[int, int], frames: int) -> None:
    path = require_shared_media(name)
    info = probe_video(path)
    assert (info.width, info.height) == size
    assert abs(info.frame_count - frames) <= 1
    sampled = list(iter_video_frames(path, fps=2, max_side=640))
    assert len(sampled) == pytest.approx(info.duration_s * 2, abs=2)
    assert sampled[0].pixels.shape[1] == 640
    assert all(
        b.time_s - a.time_s == pytest.approx(0.5, abs=0.05) for a, b in itertools.pairwise(sampled)
    )
    # Real content, not blank frames.
    assert all(cv2.Laplacian(f.pixels, cv2.CV_64F).var() > 10 for f in sampled)


def test_times_count_from_the_first_frame(tmp_path: Path) -> None:
    """Some files start at a non-zero timestamp; start_sec/end_sec are from the first frame."""
    video = make_video(tmp_path / "late.mp4", frames=20, fps=10, first_pts=15)
    frames = list(iter_video_frames(video, start_sec=0.5, end_sec=1.0))
    assert [f.index for f in frames] == [5, 6, 7, 8, 9]
    assert all(abs(int(np.median(f.pixels)) - f.index * 8) <= 3 for f in frames)
