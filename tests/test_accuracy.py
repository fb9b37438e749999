"""Accuracy on known truth: synthetic shapes scenes and the tiny detector trained on them
(`scripts/train_shapes_detector.py` -> `weights/shapes-yolo11.pt`), through the full request
path of the worker (SDK local mode, base64 and batch inputs)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scripts.synthetic_shapes import Shape, render_scene
from tests.conftest import REPO, SHAPES_MODEL, jpeg_b64, run_worker, worker_env

pytestmark = pytest.mark.skipif(
    not SHAPES_MODEL.exists(),
    reason="weights/shapes-yolo11.pt missing: run scripts/train_shapes_detector.py",
)


def iou(a: list[float], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def best_match(shape: Shape, detections: list[dict]) -> float:
    same_class = [d for d in detections if d["label"] == shape.class_name]
    return max((iou(d["box"], shape.box) for d in same_class), default=0.0)


def test_shapes_found_where_they_are(weights_dir: Path, tmp_path: Path) -> None:
    # Held-out seeds (training used others), two sizes, one batched request.
    scenes = [render_scene(90_000 + i, width=640, height=480) for i in range(5)]
    scenes += [render_scene(91_000 + i, width=320, height=240) for i in range(3)]
    job = {
        "task": "object-detection",
        "model": "shapes-yolo11.pt",
        "images": [jpeg_b64(image) for image, _ in scenes],
        "options": {"threshold": 0.5},
    }
    run = run_worker(job, worker_env(weights_dir, tmp_path))
    assert run.returncode == 0, run.output
    results = run.result["results"]
    assert len(results) == len(scenes)
    ious = []
    for (image, shapes), result in zip(scenes, results, strict=True):
        assert (result["height"], result["width"]) == image.shape[:2]
        for shape in shapes:
            ious.append(best_match(shape, result["detections"]))
        # No phantom shapes either.
        assert len(result["detections"]) == len(shapes)
    assert len(ious) >= 12
    assert min(ious) >= 0.7, ious
    print(
        json.dumps(
            {
                "shapes": len(ious),
                "min_iou": round(min(ious), 3),
                "mean_iou": round(sum(ious) / len(ious), 3),
            }
        )
    )


def test_make_run_finds_the_shapes_in_test_input(tmp_path: Path) -> None:
    """`make run`'s job: test_input.json from the working directory, default WEIGHTS_DIR."""
    env = {k: v for k, v in os.environ.items() if k not in ("WEIGHTS_DIR", "RESULT_PATH")}
    env.update(RESULT_PATH=str(tmp_path / "result.json"), ALLOW_MODEL_DOWNLOADS="false")
    run = run_worker(None, env)
    assert run.returncode == 0, run.output
    assert "Using test_input.json as job input" in run.output
    from scripts.make_test_input import SEED

    _, shapes = render_scene(SEED, width=320, height=240)
    (result,) = run.result["results"]
    assert len(result["detections"]) == len(shapes)
    assert all(best_match(shape, result["detections"]) >= 0.7 for shape in shapes)
    assert (
        json.loads((REPO / "test_input.json").read_text())["input"]["model"] == "shapes-yolo11.pt"
    )
