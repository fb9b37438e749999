"""`annotate: true` on a clip: an H.264 mp4 (yuv420p, even size, `moov` before `mdat`) with
what the task found drawn on each sampled frame, at the sampled frames' times.

What is proven, on real files (synthetic clips with known boxes, the committed shapes
detector, random-weight SAM 2, SAM 3 and depth checkpoints): the writer's file decodes with
PyAV to the frames written, at their times, and is a faststart mp4; an error removes it; the
Python heap stays flat over 100 annotated frames; a detection's box is drawn where the result
says (the outline differs strongly from the source frame, the inside and far outside do not);
the other result fields are those of the same job without `annotate`; velocity draws each
frame's speeds; segmentation, pose, SAM 2, SAM 3 and depth clips each give a decodable video
with one frame per sampled frame; the artifact goes inline under the budget, to OUTPUT_DIR
when set, and fails clearly over the budget; a cancelled job leaves no temporary file."""

from __future__ import annotations

import base64
import tracemalloc
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from core.annotate import ClipAnnotator, VideoWriter, draw_entries
from core.media import iter_video_frames
from tests.conftest import SHAPES_MODEL
from tests.test_depth import depth_weights  # noqa: F401 - the fixture, reused
from tests.test_sam2 import sam2_checkpoint  # noqa: F401 - the fixture, reused
from tests.test_sam3 import sam3_checkpoint  # noqa: F401 - the fixture, reused
from tests.test_video_tasks import (
    CLIP_FPS,
    confident_weights,  # noqa: F401 - the fixture, reused
    mp4_b64,
    needs_shapes,
    synthetic_clip,
)

SHAPES = SHAPES_MODEL.name


# ----------------------------------------------------------------------------------------------
# Helpers


def top_level_atoms(path: Path) -> list[str]:
    """The mp4's top-level boxes in file order (`ftyp`, `moov`, `mdat`, ...)."""
    data = path.read_bytes()
    atoms, at = [], 0
    while at + 8 <= len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        kind = data[at + 4 : at + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[at + 8 : at + 16], "big")
        elif size == 0:
            size = len(data) - at
        atoms.append(kind)
        at += size
    return atoms


class Decoded:
    """An mp4 decoded with PyAV: stream facts, frame times and BGR pixels."""

    def __init__(self, path: Path) -> None:
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            self.codec = stream.codec_context.name
            self.pix_fmt = stream.codec_context.pix_fmt
            self.width, self.height = stream.width, stream.height
            self.rate = float(stream.average_rate or 0)
            self.colorspace = stream.codec_context.colorspace
            self.times: list[float] = []
            self.frames: list[np.ndarray] = []
            for frame in container.decode(stream):
                self.times.append(float(frame.pts * frame.time_base))
                self.frames.append(frame.to_ndarray(format="bgr24"))


def assert_browser_mp4(path: Path, frames: int, width: int, height: int) -> Decoded:
    decoded = Decoded(path)
    assert (decoded.codec, decoded.pix_fmt) == ("h264", "yuv420p")
    assert (decoded.width, decoded.height) == (width + width % 2, height + height % 2)
    assert len(decoded.frames) == frames
    atoms = top_level_atoms(path)
    assert "moov" in atoms and "mdat" in atoms
    assert atoms.index("moov") < atoms.index("mdat"), atoms  # +faststart
    return decoded


def smooth(pixels: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(pixels, (0, 0), 3)


def artifact_file(record: dict[str, Any], tmp_path: Path) -> Path:
    assert record["name"] == "annotated.mp4" and record["content_type"] == "video/mp4"
    if record["storage"] == "local":
        path = Path(record["path"])
    else:
        assert record["storage"] == "inline"
        path = tmp_path / f"{record['sha256'][:12]}.mp4"
        path.write_bytes(base64.b64decode(record["data"]))
    assert path.stat().st_size == record["bytes"]
    return path


def pixel_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pixel, the largest difference over B, G, R."""
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2)


def annotated(result: dict[str, Any], tmp_path: Path) -> Path:
    assert "error" not in result, result
    assert "annotated_video" in result, sorted(result)
    assert result["timings_ms"]["annotate"] > 0
    return artifact_file(result["annotated_video"], tmp_path)


def source_frames(video_b64: str, **sampling: Any) -> list[np.ndarray]:
    """The clip's sampled frames exactly as the worker decodes them."""
    return [f.pixels for f in iter_video_frames(base64.b64decode(video_b64), **sampling)]


def job_context(**settings: Any) -> Any:
    from core.config import Settings
    from core.contract import JobContext
    from core.progress import ProgressReporter
    from core.storage import ArtifactStore

    config = Settings(**settings)
    job = {"id": "annotate-test"}
    return JobContext(
        job=job,
        settings=config,
        store=ArtifactStore(config, "annotate-test", None),
        progress=ProgressReporter(job, sink=lambda job, update: None),
        device="cpu",
    )


# ----------------------------------------------------------------------------------------------
# The writer


def test_writer_is_a_faststart_h264_at_the_frames_times(tmp_path: Path) -> None:
    """Odd-sized frames at irregular times: padded to even, each frame at its own time."""
    times = [0.0, 0.1, 0.2, 0.35, 0.5, 0.9, 1.0]
    ramp = np.linspace(0, 150, 161, dtype=np.float32)[None, :]
    frames = []
    for n in range(len(times)):
        bgr = (ramp + 10 * n, 60 + 0 * ramp + 20 * n, 200 - ramp)  # smooth colours
        frames.append(np.stack([np.broadcast_to(c, (121, 161)) for c in bgr], -1).astype(np.uint8))
    with VideoWriter(10.0, 161, 121, work_dir=tmp_path) as writer:
        for pixels, time_s in zip(frames, times, strict=True):
            writer.write(pixels, time_s)
        path = writer.close()
    assert path.parent == tmp_path and path.suffix == ".mp4"
    decoded = assert_browser_mp4(path, len(times), 161, 121)
    assert decoded.times == pytest.approx(times, abs=1e-4)
    assert decoded.colorspace == 1  # tagged BT.709, as the frames were converted
    # The picture itself is kept; the padding repeats its last column and row.
    for drawn, written in zip(decoded.frames, frames, strict=True):
        assert pixel_diff(drawn[:121, :161], written).mean() < 4
        assert pixel_diff(drawn[:, 161:], drawn[:, 160:161]).mean() < 3
        assert pixel_diff(drawn[121:], drawn[120:121]).mean() < 3


def test_writer_removes_its_file_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="stop"), VideoWriter(10.0, 64, 48) as writer:
        writer.write(np.zeros((48, 64, 3), np.uint8), 0.0)
        path = writer.path
        assert path.exists()
        raise RuntimeError("stop")
    assert not path.exists()


def test_annotator_stores_nothing_and_leaves_no_file_on_error(tmp_path: Path) -> None:
    ctx = job_context(work_dir=tmp_path)
    entries = [{"box": [10, 10, 40, 30], "class_id": 0, "label": "x", "confidence": 0.9}]
    with pytest.raises(ValueError, match="cancelled here"), ClipAnnotator(ctx, True, 10.0) as ann:
        for n in range(3):
            ann.add(np.zeros((48, 64, 3), np.uint8), n / 10, entries)
        assert len(list(tmp_path.iterdir())) == 1  # the video being written
        raise ValueError("cancelled here")
    assert ann.output() == {} and list(tmp_path.iterdir()) == []


def test_annotating_100_frames_keeps_no_frames_in_memory(tmp_path: Path) -> None:
    """The Python heap's peak over 100 drawn and encoded 640x360 frames stays below what 4
    frames take (one frame is 691 kB; 100 would be 69 MB), and less than a frame is still
    held after them: frames go to the encoder as they come. Masks and labels are drawn too
    (the heaviest drawing path)."""
    width, height, count = 640, 360, 100
    frame_bytes = width * height * 3
    ctx = job_context(work_dir=tmp_path)
    rng = np.random.default_rng(1)
    background = rng.integers(0, 255, (height, width, 3), np.uint8)

    def frame_at(n: int) -> tuple[np.ndarray, list[dict[str, Any]], list[np.ndarray]]:
        pixels = np.roll(background, 3 * n, axis=1)
        x = 40 + 4 * n
        mask = np.zeros((height, width), bool)
        mask[100:200, x : x + 80] = True
        entry = {
            "box": [x, 100, x + 80, 200],
            "class_id": 1,
            "label": "square",
            "confidence": 0.9,
            "track_id": 1,
        }
        return pixels, [entry], [mask]

    with ClipAnnotator(ctx, True, 30.0) as warm:  # imports and first-use costs, outside
        pixels, entries, masks = frame_at(0)
        warm.add(pixels, 0.0, entries, masks=masks)
    with ClipAnnotator(ctx, True, 30.0) as annotator:
        tracemalloc.start()
        try:
            for n in range(count):
                pixels, entries, masks = frame_at(n)
                annotator.add(pixels, n / 30, entries, masks=masks)
                del pixels, entries, masks
            held, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # (storing the video, at the end of the block, reads the file once: not per frame)
    assert peak < 4 * frame_bytes, f"peak {peak / 1e6:.1f} MB"
    assert held < frame_bytes, f"{held / 1e6:.1f} MB still held after the frames"
    record = annotator.output()["annotated_video"]
    assert record["storage"] == "inline"
    assert_browser_mp4(artifact_file(record, tmp_path), count, width, height)


# ----------------------------------------------------------------------------------------------
# Detection: boxes where the result says, other fields unchanged


@needs_shapes
def test_detection_draws_each_box_where_the_result_says(inprocess, tmp_path: Path) -> None:
    """Sampled at 6 fps from 12: 12 frames at their times; on every frame each detection's
    outline (left, right and bottom edges; the label sits on the top one) differs strongly
    from the source frame, its inside and the frame far from any box barely."""
    clip = synthetic_clip()
    video = mp4_b64(clip, tmp_path / "clip.mp4")
    job = {
        "task": "object-detection",
        "model": SHAPES,
        "video": video,
        "options": {"threshold": 0.5, "imgsz": 320, "fps": 6},
    }
    plain = inprocess(job)
    result = inprocess({**job, "annotate": True})
    assert "error" not in plain, plain

    # Every other field is that of the job without annotate.
    assert set(result) - set(plain) == {"annotated_video"}
    for key in ("video", "tracker", "tracks", "frames"):
        assert result[key] == plain[key]
    assert set(result["timings_ms"]) - set(plain["timings_ms"]) == {"annotate", "upload"}
    assert result["annotated_video"]["storage"] == "inline"

    frames = result["frames"]
    assert len(frames) == result["video"]["sampled_frames"] == 12
    decoded = assert_browser_mp4(annotated(result, tmp_path), 12, 320, 240)
    assert decoded.times == pytest.approx([f["time_s"] for f in frames], abs=1e-3)
    assert decoded.rate == pytest.approx(6.0, rel=0.05)
    sources = source_frames(video, fps=6)
    assert len(sources) == 12

    checked = 0
    for entry, drawn, source in zip(frames, decoded.frames, sources, strict=True):
        diff = pixel_diff(drawn, source)
        far = np.ones(diff.shape, bool)
        for detection in entry["detections"]:
            x1, y1, x2, y2 = (int(v) for v in detection["box"])
            w, h = x2 - x1, y2 - y1
            rows = slice(y1 + h // 4, y2 - h // 4)
            cols = slice(x1 + w // 4, x2 - w // 4)
            outline = np.concatenate([diff[rows, x1], diff[rows, x2], diff[y2, cols]])
            assert np.median(outline) > 40, (entry["frame_index"], detection, outline)
            inside = diff[y1 + h // 3 : y2 - h // 3, x1 + w // 3 : x2 - w // 3]
            assert np.median(inside) < 10, (entry["frame_index"], detection)
            # Away from the box and its label (above it) by a margin.
            far[max(0, y1 - 40) : y2 + 12, max(0, x1 - 100) : x2 + 120] = False
            checked += 1
        assert diff[far].mean() < 6, entry["frame_index"]
    assert checked >= 20  # both shapes on nearly every frame


@needs_shapes
def test_frames_list_and_output_dir_and_the_inline_budget(inprocess, tmp_path: Path) -> None:
    """A clip sent as `frames` (the Orbit shape) is annotated too; with OUTPUT_DIR the video
    is a file there; over INLINE_MAX_BYTES without a bucket the job fails saying so."""
    from tests.conftest import jpeg_b64

    clip = synthetic_clip(frame_count=8)
    job = {
        "task": "object-detection",
        "model": SHAPES,
        "annotate": True,
        "fps": CLIP_FPS,
        "frames": [jpeg_b64(f) for f in clip.frames],
        "options": {"imgsz": 320},
    }

    out_dir = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OUTPUT_DIR", str(out_dir))
        inprocess.reset()
        result = inprocess(job, job_id="annotate-local")
    record = result["annotated_video"]
    assert record["storage"] == "local"
    path = Path(record["path"])
    assert path == (out_dir / "annotate-local" / "annotated.mp4").resolve()
    assert_browser_mp4(artifact_file(record, tmp_path), 8, 320, 240)
    assert result["video"]["source"] == "frames"

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INLINE_MAX_BYTES", "1000")
        inprocess.reset()
        failed = inprocess(job)
    assert failed["error_code"] == "upload_failed"
    assert "annotated.mp4" in failed["error"] and "BUCKET_" in failed["error_message"]
    inprocess.reset()


@needs_shapes
def test_cancel_leaves_no_temporary_video(
    inprocess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local server's cancel stops the clip between frames; the annotated video being
    written is removed with the job's other temporary files."""
    import core.video

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("WORK_DIR", str(work))
    inprocess.reset()
    calls = iter(range(1000))
    monkeypatch.setattr(core.video, "cancel_requested", lambda: next(calls) >= 4)
    clip = synthetic_clip()
    result = inprocess(
        {
            "task": "object-detection",
            "model": SHAPES,
            "annotate": True,
            "video": mp4_b64(clip, tmp_path / "clip.mp4"),
            "options": {"imgsz": 320},
        }
    )
    assert result["error_code"] == "cancelled", result
    assert list(work.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Velocity: speeds on each frame


@needs_shapes
def test_velocity_draws_each_frames_speeds(inprocess, tmp_path: Path) -> None:
    """One annotated frame per sampled frame; each is our drawing of that frame's tracks with
    their speeds (up to the codec's loss: where the drawing is, far closer to it than to the
    source), and where the speeds' text is, it is closer to the drawing with speeds than to
    one without them."""
    clip = synthetic_clip()
    video = mp4_b64(clip, tmp_path / "clip.mp4")
    result = inprocess(
        {
            "task": "velocity-estimation",
            "model": SHAPES,
            "annotate": True,
            "video": video,
            "options": {"imgsz": 320, "flow": "dis"},
        }
    )
    frames = result["frames"]
    assert "warnings" not in result or not any("annotate" in w for w in result["warnings"])
    decoded = assert_browser_mp4(annotated(result, tmp_path), len(frames), 320, 240)
    assert len(frames) == result["video"]["sampled_frames"] == 24
    sources = source_frames(video)
    with_speed = 0
    for entry, drawn, source in zip(frames, decoded.frames, sources, strict=True):
        tracks = entry["tracks"]
        expected = draw_entries(source, tracks)
        assert pixel_diff(drawn, expected).mean() < 8, entry["frame_index"]  # the codec's loss
        drawing = pixel_diff(expected, source) > 60  # boxes and labels
        assert drawing.sum() > 200
        near = pixel_diff(drawn, expected)[drawing].mean()
        assert near < pixel_diff(drawn, source)[drawing].mean() / 3, entry["frame_index"]
        if not any(t["speed_mps"] is not None for t in tracks):
            continue
        unspeeded = draw_entries(source, [{**t, "speed_mps": None} for t in tracks])
        text = pixel_diff(expected, unspeeded) > 60  # where the speeds' labels differ
        assert text.sum() > 20
        closer = (
            pixel_diff(drawn, expected)[text].mean() < pixel_diff(drawn, unspeeded)[text].mean()
        )
        assert closer, entry["frame_index"]
        with_speed += 1
    assert with_speed == len(frames) - 1  # the last sampled frame has no speed


# ----------------------------------------------------------------------------------------------
# The other video tasks: a decodable video, one frame per sampled frame


@pytest.mark.parametrize("kind", ["segment", "pose"])
def test_segmentation_and_pose_clips(
    inprocess,
    confident_weights: dict[str, str],  # noqa: F811
    tmp_path: Path,
    kind: str,
) -> None:
    """Random-weight checkpoints that find confident boxes: masks and skeletons are drawn
    (frames differ from the source inside the detections)."""
    task = {"segment": "image-segmentation", "pose": "pose-estimation"}[kind]
    clip = synthetic_clip(frame_count=6)
    video = mp4_b64(clip, tmp_path / "clip.mp4")
    result = inprocess(
        {
            "task": task,
            "model": confident_weights[kind],
            "annotate": True,
            "video": video,
            "options": {"imgsz": 160, "threshold": 0.3},
        }
    )
    decoded = assert_browser_mp4(annotated(result, tmp_path), 6, 320, 240)
    detections = [d for f in result["frames"] for d in f["detections"]]
    assert detections and all(
        ("mask" if kind == "segment" else "keypoints") in d for d in detections
    )
    changed = [
        pixel_diff(d, s).mean() for d, s in zip(decoded.frames, source_frames(video), strict=True)
    ]
    assert min(changed) > 2


def test_sam2_clip(inprocess, sam2_checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    """Three sampled frames, two objects; drawn at the frames' size with the objects' ids."""
    from scripts.synthetic_video import moving_shapes_clip
    from tests.splat_scene import encode_mp4

    clip = moving_shapes_clip(
        3,
        width=160,
        height=120,
        frame_count=6,
        fps=10.0,
        shapes=2,
        texture=30.0,
        velocities=[(4.0, 0.0), (0.0, 3.0)],
    )
    video = encode_mp4(clip.frames, tmp_path / "clip.mp4", fps=10.0)
    boxes = [[round(v, 1) for v in shape.boxes[0]] for shape in clip.shapes]
    result = inprocess(
        {
            "task": "sam2-segmentation",
            "annotate": True,
            "video": base64.b64encode(video.read_bytes()).decode(),
            "options": {
                "fps": 5,
                "objects": [{"id": "a", "box": boxes[0]}, {"id": "b", "box": boxes[1]}],
            },
        }
    )
    assert result["video"]["sampled_frames"] == 3
    decoded = assert_browser_mp4(annotated(result, tmp_path), 3, 160, 120)
    assert decoded.times == pytest.approx([f["time_s"] for f in result["frames"]], abs=1e-3)


def test_sam3_clip(inprocess, sam3_checkpoint: Path, tmp_path: Path) -> None:  # noqa: F811
    from scripts.synthetic_video import moving_shapes_clip
    from tests.splat_scene import encode_mp4

    clip = moving_shapes_clip(0, width=160, height=128, frame_count=6, fps=6.0)
    video = encode_mp4(clip.frames, tmp_path / "clip.mp4", fps=6.0)
    options = {
        "text_prompt": "circle, square",
        "imgsz": 112,
        "fps": 3.0,
        "threshold": 0.0,
        "new_object_threshold": 0.0,
        "max_objects": 2,
    }
    result = inprocess(
        {
            "task": "sam3-concept-segmentation",
            "annotate": True,
            "video": base64.b64encode(video.read_bytes()).decode(),
            "options": options,
        }
    )
    assert result["video"]["sampled_frames"] == 3
    assert_browser_mp4(annotated(result, tmp_path), 3, 160, 128)
    assert all(f["detections"] for f in result["frames"])


def test_depth_clip_is_a_colourised_depth_video(
    inprocess,
    depth_weights: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Each frame is the clip's colourised depth: the same picture as the frame's preview
    JPEG in the zip (annotate implies the previews, as before), at the sampled times."""
    import zipfile

    from tests.splat_scene import encode_mp4
    from tests.test_depth import artifact_bytes

    clip = synthetic_clip(frame_count=4, width=160, height=120)
    video = encode_mp4(clip.frames, tmp_path / "clip.mp4", fps=CLIP_FPS)
    result = inprocess(
        {
            "task": "depth-estimation",
            "annotate": True,
            "video": base64.b64encode(video.read_bytes()).decode(),
            "options": {"input_size": 70, "colormap": "turbo"},
        }
    )
    assert "error" not in result, result
    assert result["archive"]["name"] == "depth_frames.zip"
    decoded = assert_browser_mp4(annotated(result, tmp_path), 4, 160, 120)
    assert decoded.times == pytest.approx([f["time_s"] for f in result["frames"]], abs=1e-3)
    archive = tmp_path / "depth.zip"
    archive.write_bytes(artifact_bytes(result["archive"]))
    with zipfile.ZipFile(archive) as zipped:
        for entry, drawn in zip(result["frames"], decoded.frames, strict=True):
            jpeg = np.frombuffer(zipped.read(entry["preview"]), np.uint8)
            preview = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
            # Random weights give a noisy map: compared smoothed (the JPEG and H.264 losses
            # on noise differ), it is the same picture.
            assert pixel_diff(smooth(drawn), smooth(preview)).mean() < 8


def test_drawing_follows_a_frame_held_smaller() -> None:
    """Boxes and masks in the source's pixels (SAM 2's masks) drawn on a frame held at half
    the size (`max_side`): the outline and the tint land at half the coordinates."""
    frame = np.full((60, 80, 3), 90, np.uint8)
    mask = np.zeros((120, 160), bool)
    mask[40:100, 40:120] = True
    entries = [{"id": "dog", "box": [40, 40, 120, 100], "area": int(mask.sum())}]
    drawn = draw_entries(frame, entries, masks=[mask], source_size=(160, 120))
    diff = pixel_diff(drawn, frame)
    assert np.median(diff[25:45, 20]) > 40 and np.median(diff[25:45, 60]) > 40  # the sides
    assert diff[30:45, 25:55].min() > 10  # the tint, inside
    assert diff[:, 70:].max() == 0 and diff[55:, :].max() == 0  # nothing far outside
    assert (frame == 90).all()  # the task's frame is not drawn on
