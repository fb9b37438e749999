"""sam2-segmentation: a random-weight SAM 2.1 tiny (the real architecture, saved as Meta saves
its checkpoints: `torch.save({"model": state_dict})`) loaded through WEIGHTS_DIR.

What is proven: on an image, every object's masks and scores are those of the `sam2`
package's own `build_sam2` + `SAM2ImagePredictor` on the same pixels, in each mask format
decoded back; the image embedding is reused for the same pixels; on a clip, a prompt on the
middle frame gives masks for every frame and object in frame order (propagated both ways),
the prompt frame's masks being the package's own; the Orbit app's shape returns a PNG mask
per frame; bad prompts name their field; missing or unknown checkpoints get clear codes;
Meta's checkpoint download goes through a loopback server with retries.

SAM 2's video memory attention is heavy on CPU (seconds per frame and object), so the clips
here have two or three frames.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from core.encode import mask_to_polygons, polygons_to_mask, rle_to_mask
from tests.conftest import HttpServer, scene_image

# SAM2ImagePredictor scripts its transforms with torch.jit, which warns on this torch.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

MODEL = "sam2.1_hiera_tiny.pt"
CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
WIDTH, HEIGHT = 640, 480
# scene_image(640, 480): a red disc centred (213, 240), radius 96; a box (320, 120)-(470, 240).
OBJECTS: list[dict[str, Any]] = [
    {"id": "disc", "points": [[213, 240], [400, 400]], "labels": [1, 0]},
    {"id": 7, "box": [320, 120, 470, 240]},
    {"id": "both", "box": [117, 144, 309, 336], "points": [{"x": 213, "y": 240}]},
]


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
def sam2_checkpoint(weights_dir: Path) -> Path:
    from scripts.make_test_weights_sam2 import make_sam2_checkpoint

    return make_sam2_checkpoint(weights_dir, MODEL)


def png_b64(pixels: np.ndarray) -> str:
    ok, buffer = cv2.imencode(".png", pixels)  # lossless: the worker sees these exact pixels
    assert ok
    return base64.b64encode(buffer.tobytes()).decode()


def prompt_arrays(obj: dict[str, Any]) -> dict[str, Any]:
    """An object of the request as the package's predictors take it."""
    points = obj.get("points")
    if points is not None:
        points = [[p["x"], p["y"]] if isinstance(p, dict) else p for p in points]
    return {
        "points": None if points is None else np.asarray(points, np.float32),
        "labels": None
        if points is None
        else np.asarray(obj.get("labels", [1] * len(points)), np.int32),
        "box": None if obj.get("box") is None else np.asarray(obj["box"], np.float32),
    }


class ImageReference:
    """The checkpoint through the package's own image path, on the scene."""

    def __init__(self, checkpoint: Path, bgr: np.ndarray) -> None:
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        self.predictor = SAM2ImagePredictor(build_sam2(CONFIG, str(checkpoint), device="cpu"))
        self.predictor.set_image(np.ascontiguousarray(bgr[:, :, ::-1]))

    def predict(self, obj: dict[str, Any], multimask: bool) -> tuple[np.ndarray, np.ndarray]:
        arrays = prompt_arrays(obj)
        masks, scores, _ = self.predictor.predict(
            point_coords=arrays["points"],
            point_labels=arrays["labels"],
            box=arrays["box"],
            multimask_output=multimask,
        )
        return masks > 0.5, scores


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return scene_image(WIDTH, HEIGHT)


@pytest.fixture(scope="module")
def image_reference(sam2_checkpoint: Path, scene: np.ndarray) -> ImageReference:
    return ImageReference(sam2_checkpoint, scene)


def read_artifact_json(artifact: dict[str, Any]) -> Any:
    if artifact["storage"] == "inline":
        return json.loads(base64.b64decode(artifact["data"]))
    assert artifact["storage"] == "local", artifact
    return json.loads(Path(artifact["path"]).read_bytes())


def png_mask(data: str) -> np.ndarray:
    pixels = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_UNCHANGED)
    assert pixels is not None and pixels.ndim == 2
    return pixels > 127


def assert_error(result: dict[str, Any], code: str, *fragments: str) -> None:
    assert result.get("error_code") == code, result
    for fragment in fragments:
        assert fragment in result["error"], (fragment, result["error"])


# ----------------------------------------------------------------------------------------------
# Images


def test_image_objects_match_the_sam2_predictor(
    worker, sam2_checkpoint: Path, scene: np.ndarray, image_reference: ImageReference
) -> None:
    """Three objects (points with a negative label, a box, a box with a point) and three
    candidates each: masks and scores are the package's own, ids come back in order."""
    run = worker(
        {
            "task": "sam2-segmentation",
            "image": png_b64(scene),
            "options": {"objects": OBJECTS, "multimask_output": True, "mask_format": "rle"},
        }
    )
    assert run.result is not None and "error" not in run.result, run.output[-3000:]
    result = run.result
    assert result["model"] == MODEL and result["device"] == "cpu"
    (image,) = result["results"]
    assert (image["width"], image["height"]) == (WIDTH, HEIGHT)
    assert image["image_embedding"] == "computed"
    assert [obj["id"] for obj in image["objects"]] == ["disc", 7, "both"]
    best_masks = []
    for obj, asked in zip(image["objects"], OBJECTS, strict=True):
        masks, scores = image_reference.predict(asked, multimask=True)
        assert len(obj["masks"]) == 3
        for candidate, mask, score in zip(obj["masks"], masks, scores, strict=True):
            decoded = rle_to_mask(candidate["mask"])
            assert np.array_equal(decoded, mask)
            assert candidate["area"] == int(mask.sum())
            assert candidate["score"] == pytest.approx(float(score), abs=1e-3)
        assert obj["best"] == int(np.argmax(scores))
        assert np.array_equal(rle_to_mask(obj["mask"]), masks[obj["best"]])
        assert obj["score"] == pytest.approx(float(scores.max()), abs=1e-3)
        best_masks.append(masks[obj["best"]])
    # Different prompts, different masks: the prompts reached the model object by object.
    assert not np.array_equal(best_masks[0], best_masks[1])
    assert not np.array_equal(best_masks[1], best_masks[2])


def test_mask_formats_decode_back_and_the_embedding_is_reused(
    inprocess, sam2_checkpoint: Path, scene: np.ndarray, image_reference: ImageReference
) -> None:
    """Preloaded (pinned, warmed up), then one request per format on the same pixels: the
    first computes the embedding, the others reuse it; each format decodes to the model's
    single-mask output."""
    from core.tasks import get_task

    task = get_task("sam2-segmentation")
    assert task.load is not None
    description = task.load(MODEL).describe()
    assert description["preloaded"] and description["name"] == MODEL

    image = png_b64(scene)
    wanted = [image_reference.predict(obj, multimask=False) for obj in OBJECTS]
    for order, mask_format in enumerate(("rle", "png", "polygon")):
        result = inprocess(
            {
                "task": "sam2-segmentation",
                "image": image,
                "options": {"objects": OBJECTS, "mask_format": mask_format.upper()},
            }
        )
        assert "error" not in result, result
        (entry,) = result["results"]
        assert entry["image_embedding"] == ("computed" if order == 0 else "cached")
        assert "masks" not in entry["objects"][0]  # only with multimask_output
        for obj, (masks, scores) in zip(entry["objects"], wanted, strict=True):
            mask = masks[0]
            encoded = obj["mask"]
            assert encoded["format"] == mask_format
            assert obj["score"] == pytest.approx(float(scores[0]), abs=1e-3)
            assert obj["area"] == int(mask.sum())
            if mask_format == "rle":
                assert np.array_equal(rle_to_mask(encoded), mask)
            elif mask_format == "png":
                assert np.array_equal(png_mask(encoded["data"]), mask)
            else:
                assert encoded["polygons"] == mask_to_polygons(mask)
                filled = polygons_to_mask(encoded["polygons"], HEIGHT, WIDTH)
                assert (filled & mask).sum() >= 0.98 * mask.sum()
            ys, xs = np.nonzero(mask)
            assert obj["box"] == [
                int(xs.min()),
                int(ys.min()),
                int(xs.max()) + 1,
                int(ys.max()) + 1,
            ]


# ----------------------------------------------------------------------------------------------
# Video


def test_video_prompt_on_the_middle_frame_propagates_both_ways(
    worker, sam2_checkpoint: Path, tmp_path: Path
) -> None:
    """Nine frames sampled every third (0, 3, 6); two objects prompted on source frame 4,
    which was not sampled, so on frame 3, the middle one: masks for frames 0, 3, 6 and both
    objects, in order, through the frames.json artifact; frame 3's masks are the package's
    own prompt output, the other frames' were computed (they differ from them)."""
    import torch
    from sam2.build_sam import build_sam2_video_predictor

    from core.media import iter_video_frames
    from scripts.synthetic_video import moving_shapes_clip
    from tests.splat_scene import encode_mp4

    clip = moving_shapes_clip(
        3,
        width=160,
        height=120,
        frame_count=9,
        fps=10.0,
        shapes=2,
        texture=30.0,
        velocities=[(4.0, 0.0), (0.0, 3.0)],
    )
    video = encode_mp4(clip.frames, tmp_path / "clip.mp4", fps=10.0)
    first, second = (shape.boxes[4] for shape in clip.shapes)
    centre = [(first[0] + first[2]) / 2, (first[1] + first[3]) / 2]
    objects = [
        {"id": "a", "points": [centre], "frame_index": 4},
        {"id": "b", "box": [round(v, 1) for v in second], "frame_index": 4},
    ]
    out_dir = tmp_path / "out"
    run = worker(
        {
            "task": "sam2-segmentation",
            "video": base64.b64encode(video.read_bytes()).decode(),
            "options": {"objects": objects, "fps": 10 / 3},
        },
        OUTPUT_DIR=str(out_dir),
        FRAMES_INLINE_MAX_BYTES="200",
    )
    assert run.result is not None and "error" not in run.result, run.output[-3000:]
    result = run.result
    assert result["video"]["sampled_frames"] == 3 and result["frames_count"] == 3
    frames = read_artifact_json(result["frames_artifact"])
    assert [frame["frame_index"] for frame in frames] == [0, 3, 6]
    snapped = "frame 4 was not sampled; the prompt is on frame 3"
    assert sum(snapped in warning for warning in result["warnings"]) == 2
    assert [frame["time_s"] for frame in frames] == sorted(frame["time_s"] for frame in frames)
    masks = {}
    for frame in frames:
        assert [obj["id"] for obj in frame["objects"]] == ["a", "b"]
        for obj in frame["objects"]:
            mask = rle_to_mask(obj["mask"])
            assert mask.shape == (120, 160) and obj["area"] == int(mask.sum())
            masks[frame["frame_index"], obj["id"]] = mask
    assert [(o["id"], o["prompt_frame_index"]) for o in result["objects"]] == [("a", 3), ("b", 3)]

    # The package's own prompt output on frame 3, from the same decoded pixels.
    decoded = [frame.pixels for frame in iter_video_frames(video.read_bytes())]
    folder = tmp_path / "frame3"
    folder.mkdir()
    ok, png = cv2.imencode(".png", decoded[3])  # lossless; the loader reads it by content
    assert ok
    (folder / "00000.jpg").write_bytes(png.tobytes())
    predictor = build_sam2_video_predictor(CONFIG, str(sam2_checkpoint), device="cpu")
    predictor.fill_hole_area = 0  # as the worker runs without the CUDA extension
    with torch.inference_mode():
        state = predictor.init_state(str(folder))
        for obj in objects:
            arrays = prompt_arrays(obj)
            *_, logits = predictor.add_new_points_or_box(
                state, frame_idx=0, obj_id=obj["id"], **arrays
            )
    for index, obj in enumerate(objects):
        expected = (logits[index, 0] > 0).numpy()
        assert np.array_equal(masks[3, obj["id"]], expected)
        for other in (0, 6):
            assert not np.array_equal(masks[other, obj["id"]], masks[3, obj["id"]])


# ----------------------------------------------------------------------------------------------
# Bad requests, models


BAD_PROMPTS = [
    (
        {"objects": [{"points": [[10, 10], [700, 20]], "labels": [1, 1]}]},
        "options.objects.0.points.1: (700, 20) is outside the 640x480 image",
    ),
    ({"objects": [{"points": [[10, 10]], "labels": [1, 0]}]}, "options.objects.0: labels has 2"),
    ({"objects": [{"points": [[10, 10]], "labels": [2]}]}, "options.objects.0: labels must be"),
    ({"objects": [{"points": [[10, 10]], "labels": [0]}]}, "at least one point must be labelled"),
    ({"objects": [{"id": 1}]}, "options.objects.0: an object needs points or a box"),
    ({"objects": [{"point": [10, 10]}]}, "options.objects.0.point"),
    ({"objects": [{"points": [[1, 2, 3]]}]}, "options.objects.0.points.0"),
    ({"objects": [{"box": [1, 2, 3]}]}, "options.objects.0.box"),
    ({"box": [50, 50, 40, 60]}, "options: box [50.0, 50.0, 40.0, 60.0] must be"),
    ({"boxes": [[0, 0, 10, 10], [600, 400, 650, 470]]}, "options.boxes.1: [600, 400, 650, 470]"),
    ({"objects": [{"box": [0, 0, 9, 9]}], "points": [[5, 5]]}, "not both (points)"),
    ({"objects": [{"id": 3, "box": [0, 0, 9, 9]}, {"id": 3, "box": [1, 1, 9, 9]}]}, ".1.id: 3"),
    ({"mask_format": "bmp", "box": [0, 0, 9, 9]}, "options.mask_format"),
    ({}, "needs a prompt"),
]


@pytest.mark.parametrize(("options", "message"), BAD_PROMPTS)
def test_bad_prompts_name_the_field(
    inprocess, scene: np.ndarray, options: dict[str, Any], message: str
) -> None:
    result = inprocess({"task": "sam2-segmentation", "image": png_b64(scene), "options": options})
    assert_error(result, "invalid_input", message)


def test_bad_video_and_orbit_prompts(inprocess, tmp_path: Path) -> None:
    """Checked before any model is loaded: a frame past the clip, clicks without y."""
    from tests.test_media import make_video

    video = base64.b64encode(make_video(tmp_path / "v.mp4", frames=5).read_bytes()).decode()
    result = inprocess(
        {
            "task": "sam2-segmentation",
            "video": video,
            "options": {"objects": [{"box": [1, 1, 20, 20], "frame_index": 9}]},
        }
    )
    assert_error(result, "invalid_input", "options.objects.0.frame_index", "5 frames")
    frame = png_b64(np.zeros((48, 64, 3), np.uint8))
    result = inprocess({"frames": [frame, frame], "prompt_points": [{"x": 3}]})
    assert_error(result, "invalid_input", "prompt_points.0")
    result = inprocess({"frames": [frame], "prompt_points": [{"x": 99, "y": 3}]})
    assert_error(result, "invalid_input", "prompt_points.0: (99, 3) is outside the 64x48")


def test_missing_and_unknown_checkpoints(inprocess, scene: np.ndarray, weights_dir: Path) -> None:
    job = {"task": "sam2-segmentation", "image": png_b64(scene), "options": {"box": [1, 1, 9, 9]}}
    result = inprocess({**job, "model": "sam2.1_hiera_small.pt"})
    assert_error(
        result, "model_unavailable", str(weights_dir / "sam2.1_hiera_small.pt"), "downloads are off"
    )
    result = inprocess({**job, "model": "large"})  # an alias, same lookup
    assert_error(result, "model_unavailable", "sam2.1_hiera_large.pt")
    result = inprocess({**job, "model": "my-segmenter.pt"})
    assert_error(result, "invalid_input", "not a SAM 2 checkpoint name", "sam2.1_hiera_tiny.pt")


def test_checkpoint_download_retries_then_loads(
    inprocess,
    sam2_checkpoint: Path,
    http_server: HttpServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ALLOW_MODEL_DOWNLOADS: Meta's URL (here a loopback server that fails twice with 503)
    is fetched into WEIGHTS_DIR, then built like any checkpoint."""
    import core.tasks._sam2_model as sam2_model

    served = http_server.root / MODEL
    if not served.exists():
        os.link(sam2_checkpoint, served)
    fresh = tmp_path / "fresh-weights"
    monkeypatch.setenv("WEIGHTS_DIR", str(fresh))
    monkeypatch.setenv("ALLOW_MODEL_DOWNLOADS", "true")
    monkeypatch.setattr(
        sam2_model, "DOWNLOAD_BASES", {"sam2.1_": f"{http_server.base_url}/flaky/2/"}
    )
    inprocess.reset()
    loaded = sam2_model.load_sam2(MODEL)
    assert loaded.path == fresh / MODEL
    assert (fresh / MODEL).read_bytes() == sam2_checkpoint.read_bytes()
    assert not list(fresh.glob("*.part*"))  # no partial download left
    assert http_server.hits[f"/flaky/2/{MODEL}"] == 3
    assert loaded.model.predictor.image_size == 1024
