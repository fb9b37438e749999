"""sam3-concept-segmentation: SAM 3 through Ultralytics' predictors, on a random-weight SAM 3
of the real architecture (848M parameters) saved as Meta lays out `sam3.pt`
(`scripts/make_test_weights_sam3.py`) and loaded through WEIGHTS_DIR by the worker's own code.

What is proven: the concepts the Studio sends ("person, bicycle") are parsed and validated;
the `clip` module from PyPI (clip-anytorch) tokenises them as SAM 3's text encoder calls it;
an image job through the RunPod SDK's local mode returns instances whose boxes, scores and
masks are those of Ultralytics' `SAM3SemanticPredictor` on the same pixels, in every mask
format; a clip (our sampling) returns per-frame instances whose object ids persist across
frames; without `sam3.pt` the job fails with `model_unavailable` saying how to provide it; a
file that is not SAM 3 is refused. Random weights prove wiring, not accuracy.

SAM 3 is large for a CPU: the checkpoint takes about 30 s to make and each load about 25 s,
so the model runs at a 224 px input (1008 is its native size; see bench/bench_sam3.py).
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from core.encode import polygons_to_mask, rle_to_mask
from tests.conftest import REPO, scene_image, worker_env

TASK = "sam3-concept-segmentation"
IMGSZ = 224  # a multiple of 14; small enough for a CPU
CONCEPTS = ["person", "bicycle"]


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="session")
def sam3_checkpoint(weights_dir: Path) -> Iterator[Path]:
    """Made in a child process, so its 5 GB peak is not kept by the test process; removed at
    the end (1.7 GB that pytest would otherwise keep in its last three temporary folders)."""
    path = weights_dir / "sam3.pt"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_test_weights_sam3.py"), str(weights_dir)],
        check=True,
        timeout=900,
        capture_output=True,
    )
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def sam3_jobs(
    weights_dir: Path, sam3_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """The job runner in this process with one SAM 3 loaded for the whole module (the stock
    `inprocess` fixture reloads per test, 25 s each)."""
    import core.apps
    import core.models
    from core.config import get_settings

    env = worker_env(weights_dir, tmp_path_factory.mktemp("sam3-jobs"))

    def reset() -> None:
        get_settings.cache_clear()
        core.models._registry = None
        core.models.worker_device.cache_clear()

    with pytest.MonkeyPatch.context() as patch:
        for key in ("WEIGHTS_DIR", "VOLUME_WEIGHTS_DIR", "ALLOW_MODEL_DOWNLOADS"):
            patch.setenv(key, env[key])
        for key in list(os.environ):
            if key.startswith("BUCKET_") or key in ("OUTPUT_DIR", "RESULT_PATH"):
                patch.delenv(key)
        reset()

        def call(job_input: dict[str, Any]) -> dict[str, Any]:
            return core.apps.run_infer({"id": "sam3-test", "input": job_input})

        yield call
        reset()


def png_b64(pixels: np.ndarray) -> str:
    ok, buffer = cv2.imencode(".png", pixels)  # lossless: the worker sees these exact pixels
    assert ok
    return base64.b64encode(buffer.tobytes()).decode()


def png_mask(data: str) -> np.ndarray:
    pixels = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_UNCHANGED)
    assert pixels is not None and pixels.ndim == 2
    return pixels > 127


def decode_mask(mask: dict[str, Any], height: int, width: int) -> np.ndarray:
    if mask["format"] == "rle":
        decoded = rle_to_mask(mask)
    elif mask["format"] == "png":
        decoded = png_mask(mask["data"])
    else:
        decoded = polygons_to_mask(mask["polygons"], height, width)
    assert decoded.shape == (height, width)
    return decoded


def assert_error(result: dict[str, Any], code: str, *fragments: str) -> None:
    assert result.get("error_code") == code, result
    for fragment in fragments:
        assert fragment in result["error"], (fragment, result["error"])


def make_results(boxes: list[list[float]], masks: np.ndarray | None, names: list[str]) -> Any:
    """Ultralytics `Results` shaped as the SAM 3 predictors build them (no instances: no
    masks and a (0, 6) box tensor)."""
    import torch
    from ultralytics.engine.results import Results

    return Results(
        np.zeros((40, 60, 3), np.uint8),
        path="frame",
        names=dict(enumerate(names)),
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, len(boxes[0]) if boxes else 6),
        masks=None if masks is None else torch.from_numpy(masks),
    )


# ----------------------------------------------------------------------------------------------
# Concepts, options and the tokenizer (no model)


def test_concepts_are_parsed_as_the_studio_sends_them() -> None:
    from core.errors import InvalidInput
    from core.tasks.sam3 import Sam3Options

    options, warnings = Sam3Options.parse({"text_prompt": " person,  bicycle ,, Person"}, TASK)
    assert options.text_prompt == ["person", "bicycle"]  # trimmed, empties and repeats dropped
    assert options.threshold == 0.25 and options.mask_format == "rle" and warnings == []
    options, _ = Sam3Options.parse({"text_prompt": ["red  car", "dog"], "imgsz": 1000}, TASK)
    assert options.text_prompt == ["red car", "dog"]
    assert options.imgsz == 1008  # rounded up to SAM 3's patch size, 14

    for bad, field in [
        ({}, "options.text_prompt"),
        ({"text_prompt": " , ;"}, "options.text_prompt: give at least one concept"),
        ({"text_prompt": ",".join(f"c{i}" for i in range(40))}, "at most 32"),
        ({"text_prompt": ["dog", 3]}, "options.text_prompt.1"),
        ({"text_prompt": "dog", "threshold": 1.5}, "options.threshold"),
        ({"text_prompt": "dog", "mask_format": "bmp"}, "options.mask_format"),
        ({"text_prompt": "dog", "start_sec": 3, "end_sec": 2}, "end_sec (2.0) must be after"),
    ]:
        with pytest.raises(InvalidInput) as caught:
            Sam3Options.parse(bad, TASK)
        assert field in caught.value.message, (bad, caught.value.message)
    _, warnings = Sam3Options.parse({"text_prompt": "dog", "max_pairs": 120}, TASK)
    assert warnings == [f"options.max_pairs is not used by {TASK}"]


def test_clip_from_pypi_tokenises_as_the_text_encoder_calls_it() -> None:
    """clip-anytorch's SimpleTokenizer is not callable (Ultralytics 8.4 calls it: only its
    GitHub fork of CLIP added `__call__`), so the worker hands the encoder `clip_tokenize`."""
    import torch
    from ultralytics.models.sam.sam3.text_encoder_ve import VETextEncoder

    from core.tasks.sam3 import clip_tokenize, clip_tokenizer, import_clip

    clip = import_clip()
    pypi_tokenizer = clip.simple_tokenizer.SimpleTokenizer()
    assert not callable(pypi_tokenizer)
    assert clip_tokenizer(pypi_tokenizer) is clip_tokenize
    assert clip_tokenizer(clip_tokenize) is clip_tokenize  # a callable one (the fork) is kept

    tokens = clip_tokenize(["person", "bicycle"], context_length=32)
    assert tokens.shape == (2, 32) and tokens.dtype == torch.long
    start, end = pypi_tokenizer.encoder["<|startoftext|>"], pypi_tokenizer.encoder["<|endoftext|>"]
    for row, concept in zip(tokens.tolist(), CONCEPTS, strict=True):
        words = row[1 : row.index(end)]
        assert row[0] == start and pypi_tokenizer.decode(words).strip() == concept
        assert set(row[row.index(end) + 1 :]) == {0}  # padding
    long = clip_tokenize(["a very long concept " * 10], context_length=32)[0].tolist()
    assert long[-1] == end and 0 not in long  # cut to 32 tokens, still closed

    # SAM 3's own text encoder (a small one) calling it: padding is masked after <end>.
    encoder = VETextEncoder(d_model=32, tokenizer=clip_tokenize, width=64, heads=2, layers=1)
    with torch.no_grad():
        padding, memory, embeds = encoder(["person", "bicycle"])
    assert memory.shape == (32, 2, 32) and embeds.shape == (32, 2, 64)
    assert padding[:, :3].logical_not().all() and padding[:, 3:].all()


def test_predictor_results_become_instances() -> None:
    """Rows `x1 y1 x2 y2 [id] score class` (the video predictor adds ids), best first, boxes
    kept inside the image, masks decoding back in every format."""
    from core.tasks.sam3 import count_by_concept, to_instances

    masks = np.zeros((3, 40, 60), bool)
    masks[0, 5:15, 5:20] = True
    masks[1, 20:35, 30:58] = True
    masks[2, 0:10, 40:60] = True
    image_rows = [
        [5.0, 5.0, 20.0, 15.0, 0.40, 0],
        [30.0, 20.0, 58.0, 35.0, 0.90, 1],
        [40.0, -3.0, 61.5, 10.0, 0.60, 1],
    ]
    for fmt in ("rle", "polygon", "png"):
        instances = to_instances(make_results(image_rows, masks, CONCEPTS), CONCEPTS, fmt)
        assert [i["confidence"] for i in instances] == [0.9, 0.6, 0.4]
        assert [i["label"] for i in instances] == ["bicycle", "bicycle", "person"]
        assert [i["class_id"] for i in instances] == [1, 1, 0]
        assert instances[1]["box"] == [40.0, 0.0, 60.0, 10.0]  # clipped to the image
        assert all("track_id" not in i for i in instances)
        for instance, index in zip(instances, (1, 2, 0), strict=True):
            assert instance["mask"]["format"] == fmt
            np.testing.assert_array_equal(decode_mask(instance["mask"], 40, 60), masks[index])
    assert count_by_concept(instances, CONCEPTS) == {"person": 1, "bicycle": 2}
    top = to_instances(make_results(image_rows, masks, CONCEPTS), CONCEPTS, "rle", max_det=1)
    assert [i["confidence"] for i in top] == [0.9]

    video_rows = [[5.0, 5.0, 20.0, 15.0, 7, 0.40, 0], [30.0, 20.0, 58.0, 35.0, 3, 0.90, 1]]
    instances = to_instances(make_results(video_rows, masks[:2], CONCEPTS), CONCEPTS, "rle")
    assert [(i["track_id"], i["label"]) for i in instances] == [(3, "bicycle"), (7, "person")]
    empty = make_results([], None, CONCEPTS)
    assert to_instances(empty, CONCEPTS, "rle") == []


# ----------------------------------------------------------------------------------------------
# Missing or wrong weights, bad requests (no SAM 3 is built)


def test_without_sam3_pt_the_job_says_how_to_provide_it(
    inprocess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = png_b64(scene_image(96, 64))
    empty = tmp_path / "empty-weights"
    empty.mkdir()
    monkeypatch.setenv("WEIGHTS_DIR", str(empty))
    inprocess.reset()
    result = inprocess({"task": TASK, "image": image, "options": {"text_prompt": "dog"}})
    assert_error(
        result,
        "model_unavailable",
        f"looked in {empty / 'sam3.pt'}",
        "https://huggingface.co/facebook/sam3",
        "put it in WEIGHTS_DIR",
        "network volume",
        "secret `hf_token`",
        "HF_TOKEN and ALLOW_MODEL_DOWNLOADS=true",
    )
    assert result["error_details"]["looked_in"][0] == str(empty / "sam3.pt")


def test_download_without_access_fails_clearly_through_the_worker(worker, tmp_path: Path) -> None:
    """Downloads on but no way to reach the gated repo (offline here): one clear failure, no
    partial file left, and the same instructions."""
    empty = tmp_path / "download-weights"
    empty.mkdir()
    run = worker(
        {
            "task": TASK,
            "payloadBase64": png_b64(scene_image(96, 64)),
            "mimeType": "image/png",
            "options": {"text_prompt": "person, bicycle"},
        },
        WEIGHTS_DIR=str(empty),
        ALLOW_MODEL_DOWNLOADS="true",
        HF_HUB_OFFLINE="1",
    )
    assert run.returncode == 1 and "failed with error: model_unavailable" in run.output
    assert_error(run.result, "model_unavailable", "download failed", "huggingface.co/facebook/sam3")
    assert run.result["error"].count("WEIGHTS_DIR") == 1  # one set of instructions
    assert not (empty / "sam3.pt").exists()


def test_wrong_files_and_names_are_refused(inprocess, weights_dir: Path) -> None:
    image = png_b64(scene_image(96, 64))
    job = {"task": TASK, "image": image, "options": {"text_prompt": "dog"}}
    # A YOLO checkpoint is a .pt too: refused before SAM 3 is built.
    assert_error(
        inprocess({**job, "model": "yolo11n.pt"}),
        "invalid_input",
        "not a SAM 3 checkpoint",
    )
    assert_error(inprocess({**job, "model": "sam3.onnx"}), "invalid_input", ".pt file")
    assert_error(inprocess({**job, "model": "../sam3.pt"}), "invalid_input", "WEIGHTS_DIR")
    assert_error(inprocess({**job, "options": {}}), "invalid_input", "options.text_prompt")
    assert_error(
        inprocess({"task": TASK, "options": {"text_prompt": "dog"}}),
        "invalid_input",
        "needs `image` or `video`",
    )


# ----------------------------------------------------------------------------------------------
# A random-weight SAM 3 through the worker


def test_studio_image_through_the_worker(worker, sam3_checkpoint: Path) -> None:
    """The Studio's own request shape through `python handlers/infer.py --test_input`."""
    pixels = scene_image(160, 120)
    options = {"text_prompt": "person, bicycle", "imgsz": IMGSZ, "max_det": 4, "max_pairs": 1}
    run = worker(
        {
            "task": TASK,
            "payloadBase64": png_b64(pixels),
            "mimeType": "image/png",
            "options": options,
            "response_format": "native",  # ours; tests/test_studio.py reads the Studio's
        }
    )
    assert run.returncode == 0, run.output
    assert "completed successfully" in run.output
    result = run.result
    assert result["task"] == TASK and result["model"] == "sam3.pt", result
    assert result["concepts"] == CONCEPTS and result["imgsz"] == IMGSZ
    assert result["warnings"] == [f"options.max_pairs is not used by {TASK}"]
    assert {"load_model", "inference", "encode", "total"} <= set(result["timings_ms"])
    (item,) = result["results"]
    assert (item["index"], item["width"], item["height"]) == (0, 160, 120)
    instances = item["detections"]
    # Untrained scores sit near 0.5 x 0.5: above the default threshold, so max_det applies.
    assert len(instances) == 4
    confidences = [i["confidence"] for i in instances]
    assert confidences == sorted(confidences, reverse=True) and min(confidences) > 0.25
    assert item["counts"] == {c: sum(i["label"] == c for i in instances) for c in CONCEPTS}
    for instance in instances:
        assert instance["label"] == CONCEPTS[instance["class_id"]]
        x1, y1, x2, y2 = instance["box"]
        assert 0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 120
        assert decode_mask(instance["mask"], 120, 160).any()


def test_images_match_ultralytics_predictor(sam3_jobs, sam3_checkpoint: Path) -> None:
    """Our instances are the predictor's own boxes, scores and masks, in every format; the
    file's weights are the ones in use; the text encoder has the PyPI tokenizer."""
    import torch
    from ultralytics.models.sam import SAM3SemanticPredictor

    from core.tasks.sam3 import clip_tokenize, load_sam3

    pixels = scene_image(160, 120, seed=3)
    options = {"text_prompt": CONCEPTS, "imgsz": IMGSZ, "threshold": 0.0, "max_det": 1000}
    result = sam3_jobs({"task": TASK, "image": png_b64(pixels), "options": options})
    assert "error" not in result, result
    ours = result["results"][0]["detections"]

    model = load_sam3("sam3.pt").model  # the one the job used (cached by the registry)
    detector = model.detector
    assert detector.backbone.language_backbone.tokenizer is clip_tokenize
    checkpoint = torch.load(sam3_checkpoint, mmap=True, weights_only=True)
    name = "backbone.language_backbone.encoder.positional_embedding"  # never initialised
    torch.testing.assert_close(detector.state_dict()[name], checkpoint[f"detector.{name}"].float())

    bare = SAM3SemanticPredictor(
        overrides=dict(conf=0.0, imgsz=IMGSZ, device="cpu", save=False, verbose=False)
    )
    bare.setup_model(model=detector, verbose=False)
    bare.set_image(pixels)
    (expected,) = bare(text=CONCEPTS)
    order = np.argsort(-expected.boxes.conf.numpy(), kind="stable")
    assert len(ours) == len(order) > 4
    np.testing.assert_allclose(
        [i["confidence"] for i in ours], expected.boxes.conf.numpy()[order], atol=1e-4
    )
    expected_boxes = expected.boxes.xyxy.numpy()[order]
    expected_boxes[:, 0::2] = expected_boxes[:, 0::2].clip(0, 160)
    expected_boxes[:, 1::2] = expected_boxes[:, 1::2].clip(0, 120)
    np.testing.assert_allclose([i["box"] for i in ours], expected_boxes, atol=0.01)
    assert [i["label"] for i in ours] == [
        CONCEPTS[c] for c in expected.boxes.cls.numpy().astype(int)[order]
    ]
    expected_masks = expected.masks.data.numpy()[order]
    for instance, mask in zip(ours, expected_masks, strict=True):
        np.testing.assert_array_equal(decode_mask(instance["mask"], 120, 160), mask)

    # A higher threshold keeps the best of them, the same instances (greedy NMS decides the
    # high scorers first); PNG masks and a preview.
    middle = float(np.median([i["confidence"] for i in ours]))
    options = {**options, "threshold": middle, "mask_format": "png", "annotate": True}
    result = sam3_jobs({"task": TASK, "image": png_b64(pixels), "options": options})
    item = result["results"][0]
    kept = len(item["detections"])
    assert 0 < kept < len(ours)
    assert all(i["confidence"] >= middle - 1e-4 for i in ours[:kept])
    assert all(i["confidence"] <= middle + 1e-4 for i in ours[kept:])
    for instance, reference in zip(item["detections"], ours[:kept], strict=True):
        assert instance["confidence"] == pytest.approx(reference["confidence"], abs=1e-4)
        assert instance["box"] == reference["box"]
        np.testing.assert_array_equal(
            decode_mask(instance["mask"], 120, 160), decode_mask(reference["mask"], 120, 160)
        )
    assert item["preview"]["content_type"] == "image/jpeg"


def test_clip_objects_keep_their_ids_across_sampled_frames(sam3_jobs, tmp_path: Path) -> None:
    """An mp4 through our sampling (every other frame), fed to SAM 3's video predictor: every
    sampled frame in order, each with the same objects under the same ids."""
    from scripts.synthetic_video import moving_shapes_clip
    from tests.splat_scene import encode_mp4

    clip = moving_shapes_clip(0, width=160, height=128, frame_count=6, fps=6.0)
    video = encode_mp4(clip.frames, tmp_path / "clip.mp4", fps=6.0)
    options = {
        "text_prompt": "circle, square",
        "imgsz": IMGSZ,
        "fps": 3.0,
        "threshold": 0.0,
        "new_object_threshold": 0.0,  # untrained scores are near 0.5
        "max_objects": 2,
        "mask_format": "polygon",
    }
    video_b64 = base64.b64encode(video.read_bytes()).decode()
    result = sam3_jobs({"task": TASK, "video": video_b64, "options": options})
    assert "error" not in result, result
    assert result["concepts"] == ["circle", "square"]
    assert result["video"]["sampled_frames"] == 3 and result["video"]["frame_count"] == 6
    frames = result["frames"]
    assert [f["frame_index"] for f in frames] == [0, 2, 4]
    assert [f["time_s"] for f in frames] == pytest.approx([0.0, 1 / 3, 2 / 3], abs=1e-3)
    ids = [sorted(i["track_id"] for i in f["detections"]) for f in frames]
    assert ids == [ids[0]] * 3 and len(ids[0]) == 2  # max_objects, held on every frame
    for frame in frames:
        for instance in frame["detections"]:
            assert instance["label"] in ("circle", "square")
            decode_mask(instance["mask"], 128, 160)
    tracks = {t["track_id"]: t for t in result["tracks"]}
    assert sorted(tracks) == ids[0]
    assert all(t["frames_seen"] == 3 and t["last_frame"] == 4 for t in tracks.values())
