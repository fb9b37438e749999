"""The infer worker end to end through the RunPod SDK's own local mode, as a subprocess:
`python handlers/infer.py --test_input ...`, on checkpoints made by the tests and loaded
through WEIGHTS_DIR. Results are compared with bare Ultralytics on the same pixels."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from core.encode import polygons_to_mask, rle_to_mask
from tests.conftest import HttpServer, S3Server, jpeg_b64, scene_image

LOW = {"threshold": 0.0, "max_det": 5}  # random weights score low; keep a few boxes


def bare_predict(weights_dir: Path, name: str, images_b64: list[str], **kwargs: Any) -> list[Any]:
    from ultralytics import YOLO

    pixels = [
        cv2.imdecode(np.frombuffer(base64.b64decode(b), np.uint8), cv2.IMREAD_COLOR)
        for b in images_b64
    ]
    return YOLO(str(weights_dir / name)).predict(pixels, device="cpu", verbose=False, **kwargs)


def assert_boxes_match(ours: dict[str, Any], bare: Any) -> None:
    expected = bare.boxes.xyxy.numpy()
    assert len(ours["detections"]) == len(expected) > 0
    got = np.array([d["box"] for d in ours["detections"]])
    np.testing.assert_allclose(got, expected, atol=0.02)
    np.testing.assert_allclose(
        [d["confidence"] for d in ours["detections"]], bare.boxes.conf.numpy(), atol=1e-4
    )
    assert [d["class_id"] for d in ours["detections"]] == bare.boxes.cls.numpy().astype(
        int
    ).tolist()


def test_detection_single_through_sdk(worker, weights_dir: Path) -> None:
    image = jpeg_b64(scene_image(seed=1))
    run = worker({"task": "object-detection", "image": image, "options": LOW})
    assert run.returncode == 0, run.output
    assert "completed successfully" in run.output
    result = run.result
    assert result["task"] == "object-detection" and result["model"] == "yolo11n.pt"
    assert result["device"] == "cpu"
    assert {"decode", "inference", "total"} <= set(result["timings_ms"])
    (item,) = result["results"]
    assert (item["width"], item["height"]) == (640, 480)
    (bare,) = bare_predict(weights_dir, "yolo11n.pt", [image], conf=0.0, max_det=5)
    assert_boxes_match(item, bare)
    # The checkpoint carries only indices as names; COCO names are used, never "0".."79".
    coco = coco_names()
    assert coco[0] == "person"
    assert all(d["label"] == coco[d["class_id"]] for d in item["detections"])


def coco_names() -> dict[int, str]:
    from ultralytics.utils import ROOT, YAML

    return YAML.load(ROOT / "cfg/datasets/coco.yaml")["names"]


def test_detection_batch_is_one_batched_predict(worker, weights_dir: Path) -> None:
    images = [jpeg_b64(scene_image(seed=s)) for s in (2, 3, 4)]
    run = worker(
        {"task": "object-detection", "images": images, "options": {**LOW, "classes": "person, car"}}
    )
    assert run.returncode == 0, run.output
    results = run.result["results"]
    assert [r["index"] for r in results] == [0, 1, 2]
    bare = bare_predict(weights_dir, "yolo11n.pt", images, conf=0.0, max_det=5, classes=[0, 2])
    for ours, theirs in zip(results, bare, strict=True):
        assert_boxes_match(ours, theirs)
        assert {d["label"] for d in ours["detections"]} <= {"person", "car"}


@pytest.fixture(scope="module")
def seg_image() -> str:
    return jpeg_b64(scene_image(seed=5))


@pytest.fixture(scope="module")
def bare_seg(weights_dir: Path, seg_image: str) -> Any:
    (result,) = bare_predict(
        weights_dir, "yolo11n-seg.pt", [seg_image], conf=0.0, max_det=5, retina_masks=True
    )
    return result


def test_segmentation_rle_decodes_to_the_models_masks(
    worker, seg_image: str, bare_seg: Any
) -> None:
    run = worker(
        {"task": "image-segmentation", "image": seg_image, "options": {**LOW, "mask_format": "rle"}}
    )
    assert run.returncode == 0, run.output
    (item,) = run.result["results"]
    assert_boxes_match(item, bare_seg)
    expected = bare_seg.masks.data.numpy() > 0.5
    assert expected.shape[1:] == (480, 640)
    for detection, truth in zip(item["detections"], expected, strict=True):
        mask = detection["mask"]
        assert mask["format"] == "rle" and mask["size"] == [480, 640]
        decoded = rle_to_mask(mask)
        assert np.array_equal(decoded, truth)


def test_segmentation_polygon_and_png_agree_with_rle(worker, seg_image: str, bare_seg: Any) -> None:
    expected = bare_seg.masks.data.numpy() > 0.5
    polygon_run = worker({"task": "image-segmentation", "image": seg_image, "options": LOW})
    png_run = worker(
        {"task": "image-segmentation", "image": seg_image, "options": {**LOW, "mask_format": "PNG"}}
    )
    assert polygon_run.returncode == 0 and png_run.returncode == 0, (
        polygon_run.output + png_run.output
    )
    polygons = [d["mask"] for d in polygon_run.result["results"][0]["detections"]]
    pngs = [d["mask"] for d in png_run.result["results"][0]["detections"]]
    assert len(polygons) == len(pngs) == len(expected)
    checked = 0
    for polygon, png, truth in zip(polygons, pngs, expected, strict=True):
        assert polygon["format"] == "polygon" and png["format"] == "png"
        decoded = (
            cv2.imdecode(
                np.frombuffer(base64.b64decode(png["data"]), np.uint8), cv2.IMREAD_GRAYSCALE
            )
            > 0
        )
        assert np.array_equal(decoded, truth)
        if truth.sum() > 500:  # polygons of large regions trace the mask closely
            drawn = polygons_to_mask(polygon["polygons"], 480, 640)
            iou = (drawn & truth).sum() / (drawn | truth).sum()
            assert iou > 0.9
            checked += 1
    assert checked > 0


def test_pose_has_17_named_keypoints(worker, weights_dir: Path) -> None:
    image = jpeg_b64(scene_image(seed=6))
    run = worker({"task": "pose-estimation", "image": image, "options": {**LOW, "annotate": True}})
    assert run.returncode == 0, run.output
    (item,) = run.result["results"]
    (bare,) = bare_predict(weights_dir, "yolo11n-pose.pt", [image], conf=0.0, max_det=5)
    assert_boxes_match(item, bare)
    expected = bare.keypoints.data.numpy()
    for detection, truth in zip(item["detections"], expected, strict=True):
        names = [k["name"] for k in detection["keypoints"]]
        assert len(names) == 17 and names[0] == "nose" and names[-1] == "right_ankle"
        got = np.array([[k["x"], k["y"], k["confidence"]] for k in detection["keypoints"]])
        np.testing.assert_allclose(got, truth, atol=0.01)
    preview = item["preview"]
    jpeg = base64.b64decode(preview["data"])
    assert preview["storage"] == "inline" and hashlib.sha256(jpeg).hexdigest() == preview["sha256"]
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (480, 640, 3)


def test_studio_shape_unchanged(worker) -> None:
    image = jpeg_b64(scene_image(seed=7))
    studio = {
        "task": "object-detection",
        "model": "yolo11n.pt",
        "payloadBase64": image,
        "mimeType": "image/jpeg",
        "options": {**LOW, "text_prompt": "unused here"},
        "response_format": "native",  # ours, for the same pixels; tests/test_studio.py: theirs
    }
    run = worker(studio)
    assert run.returncode == 0, run.output
    plain = worker({"task": "object-detection", "image": image, "options": LOW})
    assert run.result["results"] == plain.result["results"]
    assert run.result["warnings"] == ["options.text_prompt is not used by object-detection"]


def test_health_reports_versions_and_device(worker) -> None:
    run = worker({"task": "health"})
    assert run.returncode == 0, run.output
    result = run.result
    assert result["status"] == "ok" and result["device"] == "cpu"
    assert result["versions"]["runpod"] and result["versions"]["ultralytics"]
    assert "object-detection" in result["tasks"] and result["cuda"]["available"] is False


def test_url_input_from_loopback_server(worker, http_server: HttpServer, weights_dir: Path) -> None:
    pixels = scene_image(seed=8)
    _, buffer = cv2.imencode(".png", pixels)
    (http_server.root / "scene.png").write_bytes(buffer.tobytes())
    url = f"{http_server.base_url}/scene.png"
    refused = worker({"task": "object-detection", "image": url, "options": LOW})
    assert refused.returncode == 1 and refused.result["error_code"] == "invalid_input"
    assert "ALLOW_PRIVATE_URLS" in refused.result["error"]

    run = worker(
        {"task": "object-detection", "image": url, "options": LOW}, ALLOW_PRIVATE_URLS="true"
    )
    assert run.returncode == 0, run.output
    (bare,) = bare_predict(
        weights_dir,
        "yolo11n.pt",
        [base64.b64encode(buffer.tobytes()).decode()],
        conf=0.0,
        max_det=5,
    )
    assert_boxes_match(run.result["results"][0], bare)


def test_s3_input_and_preview_upload(worker, s3_server: S3Server) -> None:
    client = s3_server.client()
    pixels = scene_image(seed=9)
    client.put_object(
        Bucket=s3_server.bucket, Key="inputs/scene.jpg", Body=base64.b64decode(jpeg_b64(pixels))
    )
    run = worker(
        {
            "task": "image-segmentation",
            "image": f"s3://{s3_server.bucket}/inputs/scene.jpg",
            "annotate": True,
            "options": LOW,
        },
        **s3_server.env(),
    )
    assert run.returncode == 0, run.output
    preview = run.result["results"][0]["preview"]
    assert preview["storage"] == "s3" and preview["key"] == "local_test/preview_0.jpg"
    body = client.get_object(Bucket=s3_server.bucket, Key=preview["key"])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == preview["sha256"] and len(body) == preview["bytes"]
    assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR).shape == pixels.shape


def test_errors_come_through_the_sdk(worker) -> None:
    run = worker({"task": "detect-everything", "image": "x"})
    assert run.returncode == 1
    assert "unsupported_task: unknown task 'detect-everything'" in run.output
    assert run.result["error_code"] == "unsupported_task"


def test_missing_model_names_where_it_looked(worker, weights_dir: Path) -> None:
    run = worker(
        {"task": "object-detection", "model": "yolo11x.pt", "image": jpeg_b64(scene_image())}
    )
    assert run.result["error_code"] == "model_unavailable"
    assert str(weights_dir / "yolo11x.pt") in run.result["error"]
    assert "ALLOW_MODEL_DOWNLOADS=false" in run.result["error"]


def test_preload_failure_stops_the_worker(worker) -> None:
    run = worker({"task": "health"}, PRELOAD_MODELS="object-detection, pose-estimation=nope.pt")
    assert run.returncode == 3
    assert "PRELOAD_MODELS" in run.output and "nope.pt" in run.output
    assert run.result is None  # no job ran


def test_preload_then_serve(worker) -> None:
    run = worker({"task": "health"}, PRELOAD_MODELS="object-detection,image-segmentation")
    assert run.returncode == 0, run.output
    assert "2 preloaded model(s): yolo11n.pt, yolo11n-seg.pt" in run.output
    loaded = {m["name"]: m for m in run.result["loaded_models"]}
    assert loaded["yolo11n.pt"]["preloaded"] and loaded["yolo11n-seg.pt"]["preloaded"]


@pytest.mark.parametrize(
    ("task", "weights", "extra"),
    [
        ("image-segmentation", "yolo11n-seg.pt", {"retina_masks": True}),
        ("pose-estimation", "yolo11n-pose.pt", {}),
    ],
)
def test_segmentation_and_pose_batches(
    worker, weights_dir: Path, task: str, weights: str, extra: dict
) -> None:
    images = [jpeg_b64(scene_image(seed=s)) for s in (12, 13)]
    run = worker({"task": task, "images": images, "options": {**LOW, "mask_format": "rle"}})
    assert run.returncode == 0, run.output
    bare = bare_predict(weights_dir, weights, images, conf=0.0, max_det=5, **extra)
    for ours, theirs in zip(run.result["results"], bare, strict=True):
        assert_boxes_match(ours, theirs)
        if task == "image-segmentation":
            truth = theirs.masks.data.numpy() > 0.5
            assert all(
                np.array_equal(rle_to_mask(d["mask"]), t)
                for d, t in zip(ours["detections"], truth, strict=True)
            )
        else:
            assert all(len(d["keypoints"]) == 17 for d in ours["detections"])
    if task == "pose-estimation":
        assert run.result["warnings"] == ["options.mask_format is not used by pose-estimation"]
