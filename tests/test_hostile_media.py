"""Hostile and unusual media, each on real files: a request's decoded pixels budgeted from the
headers before any decoding (and `frames` decoded one at a time), a video's pixel cap, phone
video's display rotation, JPEGs with data after their end, variable-frame-rate clips, HEIC and
AVIF photos, and images too thin for the depth model."""

from __future__ import annotations

import base64
import io
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest
from PIL import Image

from core.errors import MediaDecodeFailed, PayloadTooLarge
from core.media import decode_image, iter_video_frames, probe_video, sniff_media_type
from tests.conftest import jpeg_b64, scene_image, worker_env
from tests.test_media import make_video
from tests.test_video_tasks import run_worker_measured

LIMIT = 64_000_000


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def bilevel_png(width: int, height: int) -> bytes:
    """A 1-bit PNG of zeros: a couple of KB on the wire, width x height x 3 bytes decoded."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", pixels)
    assert ok
    return buffer.tobytes()


def detect_frames(frames: list[str], **options: Any) -> dict[str, Any]:
    return {
        "task": "object-detection",
        "model": "yolo11n.pt",
        "frames": frames,
        "fps": 10,
        "options": {"imgsz": 160, "max_det": 1, **options},
    }


# ----------------------------------------------------------------------------------------------
# 1. Memory: the request's pixels are budgeted from the headers; frames stream


# The worker with torch, Ultralytics and OpenCV loaded sits near 0.7 GiB. 48 frames of
# 4000x4000 held decoded at once are 2.2 GiB more; one at a time, 46 MiB each.
FRAMES_PEAK_LIMIT_MIB = 1300


def test_frames_are_decoded_one_at_a_time(weights_dir: Path, tmp_path: Path) -> None:
    frame = b64(bilevel_png(4000, 4000))
    assert len(frame) < 4000
    run, peak_mib = run_worker_measured(
        detect_frames([frame] * 48), worker_env(weights_dir, tmp_path)
    )
    assert run.returncode == 0, run.output
    assert run.result is not None and "error" not in run.result, run.result
    assert len(run.result["frames"]) == 48
    assert run.result["video"]["width"] == 4000 and run.result["video"]["frame_count"] == 48
    print(f"frames case: peak RSS {peak_mib:.0f} MiB")
    assert peak_mib < FRAMES_PEAK_LIMIT_MIB


def test_a_request_over_the_pixel_budget_is_refused_before_decoding(inprocess) -> None:
    # 30 frames of 6000x6000: each under MAX_IMAGE_PIXELS, 1080 Mpx together (3 GB decoded).
    frames = [b64(bilevel_png(6000, 6000))] * 30
    started = time.perf_counter()
    result = inprocess(detect_frames(frames))
    elapsed = time.perf_counter() - started
    assert result.get("error_code") == "payload_too_large", result
    assert "1080 Mpx" in result["error"] and "MAX_REQUEST_PIXELS" in result["error"]
    assert "decode" not in result["timings_ms"]
    assert elapsed < 5, elapsed
    # The same budget holds for a batch of images, and it is a setting.
    images = {"task": "object-detection", "images": [jpeg_b64(scene_image(320, 240))] * 3}
    assert "results" in inprocess(images)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAX_REQUEST_PIXELS", str(2 * 320 * 240))
        inprocess.reset()
        refused = inprocess(images)
    inprocess.reset()
    assert refused.get("error_code") == "payload_too_large", refused
    assert "3 images" in refused["error"] and "MAX_REQUEST_PIXELS" in refused["error"]
    assert "results" in inprocess(images)


def test_frames_of_two_sizes_are_refused_from_their_headers(inprocess) -> None:
    good = png(scene_image(64, 48))
    # A frame whose header is fine and whose pixel data is not: decoding it would fail.
    broken = bytearray(good)
    idat = broken.index(b"IDAT")
    broken[idat + 8 : idat + 40] = bytes(32)
    with pytest.raises(MediaDecodeFailed):
        decode_image(bytes(broken), max_pixels=LIMIT)
    small = png(scene_image(32, 24))
    result = inprocess(detect_frames([b64(good), b64(bytes(broken)), b64(small)]))
    assert result.get("error_code") == "invalid_input", result
    assert "one size" in result["error"] and "frames[2]" in result["error"], result["error"]
    assert "32x24" in result["error"] and "64x48" in result["error"]


def test_video_pixel_cap(inprocess, tmp_path: Path) -> None:
    video = make_video(tmp_path / "v.mp4", frames=3, size=(64, 48))
    with pytest.raises(PayloadTooLarge, match="64x48"):
        probe_video(video, max_pixels=64 * 48 - 1)
    with pytest.raises(PayloadTooLarge, match="MAX_VIDEO_PIXELS"):
        next(iter_video_frames(video, max_pixels=64 * 48 - 1))
    assert probe_video(video, max_pixels=64 * 48).width == 64
    job = {"task": "object-detection", "video": b64(video.read_bytes()), "options": {"imgsz": 64}}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MAX_VIDEO_PIXELS", "3000")
        inprocess.reset()
        refused = inprocess(job)
    inprocess.reset()
    assert refused.get("error_code") == "payload_too_large", refused
    assert "64x48" in refused["error"] and "MAX_VIDEO_PIXELS" in refused["error"]
    assert "frames" in inprocess(job)


def test_an_8k_plus_clip_is_refused_by_default(tmp_path: Path) -> None:
    path = tmp_path / "huge.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=1)
        stream.width, stream.height = 8192, 4608  # 37.7 Mpx
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast"}
        frame = av.VideoFrame(8192, 4608, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with pytest.raises(PayloadTooLarge, match="8192x4608"):
        probe_video(path)
    with pytest.raises(PayloadTooLarge, match="MAX_VIDEO_PIXELS"):
        next(iter_video_frames(path))


# ----------------------------------------------------------------------------------------------
# 2. Phone-portrait video: the display matrix is applied and reported


def rotated_mp4(path: Path, degrees_ccw: int, size: tuple[int, int] = (64, 32)) -> Path:
    """Frames stored `size` with a white strip down their left edge, tagged with a display
    matrix that turns them `degrees_ccw` counter-clockwise (PyAV's and FFmpeg's sign; a phone
    held upright records -90: turn clockwise to display)."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}
        stream.set_display_rotation(degrees_ccw)
        for _ in range(5):
            pixels = np.zeros((height, width, 3), np.uint8)
            pixels[:, : width // 4] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as check:  # the tag is in the file: PyAV reads it back
        assert next(check.decode(video=0)).rotation % 360 == degrees_ccw % 360
    return path


def test_phone_video_is_turned_upright(tmp_path: Path) -> None:
    # (display matrix, clockwise turn, where the stored left edge is seen)
    for degrees_ccw, clockwise, edge in [
        (-90, 90, "top"),
        (90, 270, "bottom"),
        (180, 180, "right"),
    ]:
        video = rotated_mp4(tmp_path / f"phone{clockwise}.mp4", degrees_ccw)
        info = probe_video(video)
        expected = (64, 32) if clockwise == 180 else (32, 64)
        assert (info.width, info.height, info.rotation) == (*expected, clockwise)
        frames = list(iter_video_frames(video))
        assert len(frames) == 5
        pixels = frames[0].pixels
        assert pixels.shape[:2] == (expected[1], expected[0])
        seen, opposite = {
            "top": (pixels[:8], pixels[-8:]),
            "bottom": (pixels[-8:], pixels[:8]),
            "right": (pixels[:, -8:], pixels[:, :8]),
        }[edge]
        assert seen.mean() > 240 and opposite.mean() < 15, (clockwise, edge)


def test_rotation_is_reported_and_coordinates_are_upright(inprocess, tmp_path: Path) -> None:
    video = rotated_mp4(tmp_path / "phone.mp4", -90, size=(96, 64))
    result = inprocess(
        {"task": "object-detection", "video": b64(video.read_bytes()), "options": {"imgsz": 96}}
    )
    assert "error" not in result, result
    assert result["video"]["rotation"] == 90
    assert (result["video"]["width"], result["video"]["height"]) == (64, 96)
    plain = inprocess(
        {
            "task": "object-detection",
            "video": b64(make_video(tmp_path / "plain.mp4", frames=3).read_bytes()),
        }
    )
    assert plain["video"]["rotation"] == 0


# ----------------------------------------------------------------------------------------------
# 3. JPEGs with data after the end-of-image marker


def noisy_jpeg() -> bytes:
    pixels = (np.random.default_rng(3).random((120, 160, 3)) * 255).astype(np.uint8)
    ok, buffer = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buffer.tobytes()


def motion_photo_trailer(tmp_path: Path) -> bytes:
    """An mp4 as a Motion Photo appends it: 200 KB or more of noise frames."""
    path = tmp_path / "motion.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height = 160, 120
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "0"}
        rng = np.random.default_rng(5)
        for _ in range(10):
            pixels = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    assert len(data) >= 200_000, len(data)
    return data


def test_a_jpeg_with_a_trailer_decodes_and_a_cut_one_is_truncated(
    inprocess, tmp_path: Path
) -> None:
    jpeg = noisy_jpeg()
    photo = jpeg + motion_photo_trailer(tmp_path)
    expected = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    decoded = decode_image(photo, max_pixels=LIMIT)
    assert np.array_equal(decoded.pixels, expected)
    # Progressive JPEGs have several scans with tables between them.
    progressive = io.BytesIO()
    Image.fromarray(expected[:, :, ::-1]).save(progressive, "JPEG", progressive=True)
    decoded = decode_image(progressive.getvalue() + b"\x00" * 4096, max_pixels=LIMIT)
    assert decoded.pixels.shape == expected.shape
    result = inprocess({"task": "object-detection", "image": b64(photo)})
    assert "error" not in result, result
    # Real truncation is still refused, wherever the cut is.
    for data in (jpeg[: len(jpeg) // 2], jpeg[: int(len(jpeg) * 0.9)], jpeg[:-2]):
        with pytest.raises(MediaDecodeFailed, match="truncated"):
            decode_image(data, max_pixels=LIMIT)
    cut = inprocess({"task": "object-detection", "image": b64(jpeg[: len(jpeg) // 2])})
    assert cut.get("error_code") == "media_decode_failed" and "truncated" in cut["error"]


# ----------------------------------------------------------------------------------------------
# 4. Variable frame rate: frame indices are the frames' places in the stream

VFR_MS = [0, 10, 20, 400, 410, 800, 1200, 1210, 1220, 1600, 1610, 2000]


def vfr_mp4(path: Path) -> Path:
    """Frame i shows i*16 everywhere, at the irregular times VFR_MS (milliseconds)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "g": "4"}
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, pts in enumerate(VFR_MS):
            frame = av.VideoFrame.from_ndarray(
                np.full((48, 64, 3), i * 16, np.uint8), format="rgb24"
            )
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as check:  # the irregular times are in the file
        times = [round(float(f.time) * 1000) for f in check.decode(video=0)]
    assert times == VFR_MS
    return path


def test_variable_frame_rate_indices_are_unique_and_in_order(inprocess, tmp_path: Path) -> None:
    video = vfr_mp4(tmp_path / "vfr.mp4")
    frames = list(iter_video_frames(video))
    assert [f.index for f in frames] == list(range(len(VFR_MS)))
    assert [round(f.time_s * 1000) for f in frames] == VFR_MS
    assert all(abs(int(np.median(f.pixels)) - f.index * 16) <= 4 for f in frames)
    # After a seek too: the index is the frame's place in the stream, not time x mean rate.
    late = list(iter_video_frames(video.read_bytes(), start_sec=1.2))
    assert [f.index for f in late] == list(range(6, len(VFR_MS)))
    assert all(abs(int(np.median(f.pixels)) - f.index * 16) <= 4 for f in late)
    result = inprocess(
        {"task": "object-detection", "video": b64(video.read_bytes()), "options": {"imgsz": 64}}
    )
    assert [f["frame_index"] for f in result["frames"]] == list(range(len(VFR_MS)))


# ----------------------------------------------------------------------------------------------
# 5. HEIC and AVIF photos


def heif_bytes(pixels_rgb: np.ndarray, fmt: str, orientation: int | None = None) -> bytes:
    """HEIC written by pillow-heif; AVIF by Pillow's own plugin (the installed pillow-heif's
    libheif has no AV1 encoder)."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    image = Image.fromarray(pixels_rgb)
    params: dict[str, Any] = {"quality": 95}
    if orientation is not None:
        exif = image.getexif()
        exif[0x0112] = orientation
        params["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def blocks_rgb() -> np.ndarray:
    pixels = np.zeros((96, 128, 3), np.uint8)
    pixels[:, :32] = (250, 250, 250)  # a white strip down the left edge
    pixels[:48, 64:] = (230, 30, 30)  # a red block top right
    return pixels


@pytest.mark.parametrize(("fmt", "media_type"), [("HEIF", "image/heic"), ("AVIF", "image/avif")])
def test_heic_and_avif_photos_decode(inprocess, fmt: str, media_type: str) -> None:
    data = heif_bytes(blocks_rgb(), fmt)
    assert sniff_media_type(data) == media_type
    decoded = decode_image(data, max_pixels=LIMIT)
    assert decoded.media_type == media_type
    assert decoded.pixels.shape == (96, 128, 3)
    expected_bgr = blocks_rgb()[:, :, ::-1].astype(int)
    assert np.abs(decoded.pixels.astype(int) - expected_bgr).mean() < 8
    # The photo's orientation is applied: turned clockwise, the strip is on top.
    turned = decode_image(heif_bytes(blocks_rgb(), fmt, orientation=6), max_pixels=LIMIT)
    assert turned.pixels.shape == (128, 96, 3)
    assert turned.pixels[:24].mean() > 200 and turned.pixels[-24:, :40].mean() < 60
    # The pixel cap is read from the header.
    with pytest.raises(PayloadTooLarge, match="128x96"):
        decode_image(data, max_pixels=128 * 96 - 1)
    with pytest.raises(MediaDecodeFailed):
        decode_image(data[: len(data) // 2], max_pixels=LIMIT)
    result = inprocess({"task": "object-detection", "image": b64(data)})
    assert "error" not in result, result
    assert (result["results"][0]["width"], result["results"][0]["height"]) == (128, 96)


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = b"ftyp" + major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (len(body) + 4).to_bytes(4, "big") + body + b"\x00\x00\x00\x08free"


def test_heif_brands_are_images_and_mp4_brands_are_video() -> None:
    # The major brand and the compatible brands are read.
    cases = [
        (ftyp(b"heic", b"mif1", b"heic"), "image/heic"),
        (ftyp(b"mif1", b"heic"), "image/heic"),
        (ftyp(b"msf1", b"hevc"), "image/heic"),
        (ftyp(b"heim", b"mif1"), "image/heic"),
        (ftyp(b"heis", b"mif1"), "image/heic"),
        (ftyp(b"hevx", b"msf1"), "image/heic"),
        (ftyp(b"avif", b"mif1", b"miaf"), "image/avif"),
        (ftyp(b"avis", b"msf1", b"avif"), "image/avif"),
        (ftyp(b"mif1", b"avif", b"miaf"), "image/avif"),
        (ftyp(b"isom", b"iso2", b"avc1", b"mp41"), "video/mp4"),
        (ftyp(b"mp42", b"isom"), "video/mp4"),
        (ftyp(b"qt  ", b"qt  "), "video/quicktime"),
    ]
    assert [sniff_media_type(head) for head, _ in cases] == [kind for _, kind in cases]


# ----------------------------------------------------------------------------------------------
# 6. Images too small or too thin for the depth model


@pytest.fixture(scope="module")
def depth_weights(weights_dir: Path) -> Path:
    from scripts.make_test_weights_depth import make_depth_checkpoint

    return make_depth_checkpoint(weights_dir)


def depth_reference(folder: Path, bgr: np.ndarray, input_size: int) -> np.ndarray:
    """The checkpoint run with transformers, told the images are height x width x channels."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True).eval()
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    size = {"height": input_size, "width": input_size}
    inputs = processor(
        images=[rgb], return_tensors="pt", size=size, input_data_format="channels_last"
    )
    with torch.no_grad():
        outputs = model(**inputs)
    post = processor.post_process_depth_estimation(outputs, target_sizes=[bgr.shape[:2]])
    return post[0]["predicted_depth"].numpy()


def depth_of(inprocess, pixels: np.ndarray) -> dict[str, Any]:
    return inprocess(
        {"task": "depth-estimation", "image": b64(png(pixels)), "options": {"input_size": 140}}
    )


def decoded_depth(entry: dict[str, Any]) -> np.ndarray:
    from core.encode import png16_to_depth

    data = base64.b64decode(entry["depth"]["data"])
    return png16_to_depth(data, entry["min"], entry["max"])


@pytest.mark.parametrize(
    ("width", "height", "minimum"), [(20000, 1, "71"), (320, 3, "17"), (3, 320, "17")]
)
def test_depth_refuses_images_too_thin_for_the_model(
    inprocess, depth_weights: Path, width: int, height: int, minimum: str
) -> None:
    pixels = np.full((height, width, 3), 120, np.uint8)
    result = depth_of(inprocess, pixels)
    assert result.get("error_code") == "invalid_input", result
    assert f"{width}x{height}" in result["error"] and f"at least {minimum} px" in result["error"]
    good = depth_of(inprocess, scene_image(64, 48))
    assert "error" not in good, good


def test_depth_reads_tiny_images_as_height_width_channels(inprocess, depth_weights: Path) -> None:
    # transformers guesses the channel axis from the shape: an image 1 or 3 pixels high looked
    # like channels first to it (a 1x1 image failed, a 40x3 one came out as the wrong picture).
    for width, height in [(1, 1), (40, 3)]:
        pixels = scene_image(64, 48)[:height, :width].copy()
        pixels[:, : max(1, width // 2)] = (30, 200, 90)
        result = depth_of(inprocess, pixels)
        assert "error" not in result, result
        entry = result["results"][0]
        assert (entry["width"], entry["height"]) == (width, height)
        expected = depth_reference(depth_weights, pixels, 140)
        span = max(float(expected.max() - expected.min()), 1e-6)
        assert np.abs(decoded_depth(entry) - expected).max() <= span / 1000 + 1e-4, (width, height)
