"""A corpus of bad requests against one long-lived worker: each gets its stable error code and
a message naming the problem, and the worker answers the next good request correctly."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from PIL import Image

from tests.conftest import jpeg_b64, scene_image
from tests.test_hostile_media import bilevel_png, blocks_rgb, heif_bytes
from tests.test_hostile_media import png as png_bytes
from tests.test_media import make_video, png_bomb


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD_IMAGE = jpeg_b64(scene_image(320, 240, seed=11))
JPEG = base64.b64decode(GOOD_IMAGE)


def detect(image: Any = GOOD_IMAGE, **options: Any) -> dict[str, Any]:
    return {
        "task": "object-detection",
        "image": image,
        "options": {"threshold": 0.0, "max_det": 3, **options},
    }


def clip(frames: list[bytes]) -> dict[str, Any]:
    return {"task": "object-detection", "frames": [b64(frame) for frame in frames], "fps": 10}


def huge_video(tmp: Path) -> bytes:
    """One 8192x4608 frame (37.7 Mpx, over MAX_VIDEO_PIXELS): 110 KB of mp4."""
    path = tmp / "huge.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=1)
        stream.width, stream.height = 8192, 4608
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast"}
        frame = av.VideoFrame(8192, 4608, "yuv420p")
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path.read_bytes()


def corpus(tmp: Path) -> list[tuple[str, Any, str, str]]:
    """(case, job input, expected error_code, a word the message must contain)."""
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png, "PNG")
    heic = b"\x00\x00\x00\x18ftypheic" + b"\x00" * 100
    video = make_video(tmp / "clip.mp4", frames=3).read_bytes()
    broken_png = bytearray(png_bytes(scene_image(64, 48)))  # a good header, bad pixel data
    idat = broken_png.index(b"IDAT")
    broken_png[idat + 8 : idat + 40] = bytes(32)
    real_heic = heif_bytes(blocks_rgb(), "HEIF")
    return [
        ("bad base64", detect("!!!not*base64###"), "invalid_input", "base64"),
        ("truncated jpeg", detect(b64(JPEG[: len(JPEG) // 2])), "media_decode_failed", "truncated"),
        ("text file", detect(b64(b"id,name\n1,alice\n")), "media_decode_failed", "text"),
        ("zero-byte payload", detect("data:image/jpeg;base64,"), "media_decode_failed", "0 bytes"),
        ("png bomb 30000x30000", detect(b64(png_bomb())), "payload_too_large", "30000x30000"),
        # Ultralytics patches PIL.Image.open in the worker's process; still a clean code.
        (
            "corrupt png",
            detect(b64(b"\x89PNG\r\n\x1a\n" + bytes(40))),
            "media_decode_failed",
            "header",
        ),
        (
            "random bytes",
            detect(b64(bytes(range(256)) * 8)),
            "media_decode_failed",
            "not a recognised",
        ),
        ("broken heic", detect(b64(heic)), "media_decode_failed", "heic"),
        ("video as image", detect(b64(video)), "invalid_input", "video"),
        ("private url", detect("http://10.0.0.7/cat.jpg"), "invalid_input", "private"),
        (
            "loopback url",
            detect("http://127.0.0.1:9/cat.jpg"),
            "invalid_input",
            "ALLOW_PRIVATE_URLS",
        ),
        ("metadata url", detect("http://169.254.169.254/latest"), "invalid_input", "private"),
        (
            "unresolvable host",
            detect("http://no-such-host.invalid/a.jpg"),
            "fetch_failed",
            "resolve",
        ),
        ("file url", detect("file:///etc/passwd"), "invalid_input", "scheme"),
        (
            "unknown task",
            {"task": "telepathy", "image": GOOD_IMAGE},
            "unsupported_task",
            "available",
        ),
        ("missing task", {"image": GOOD_IMAGE}, "invalid_input", "task"),
        ("task not a string", {"task": 42, "image": GOOD_IMAGE}, "invalid_input", "task"),
        ("input not an object", ["object-detection"], "invalid_input", "JSON object"),
        ("options not an object", {**detect(), "options": "fast"}, "invalid_input", "options"),
        ("threshold wrong type", detect(threshold="high"), "invalid_input", "options.threshold"),
        ("threshold negative", detect(threshold=-0.1), "invalid_input", "options.threshold"),
        ("threshold huge", detect(threshold=5), "invalid_input", "options.threshold"),
        ("max_det negative", detect(max_det=-1), "invalid_input", "options.max_det"),
        ("max_det huge", detect(max_det=10**9), "invalid_input", "options.max_det"),
        ("imgsz zero", detect(imgsz=0), "invalid_input", "options.imgsz"),
        ("imgsz huge", detect(imgsz=10**6), "invalid_input", "options.imgsz"),
        ("iou wrong type", detect(iou=[0.5]), "invalid_input", "options.iou"),
        # JSON booleans are not numbers; times are finite and bounded (issue 11).
        ("threshold true", detect(threshold=True), "invalid_input", "options.threshold"),
        ("max_det true", detect(max_det=True), "invalid_input", "options.max_det"),
        ("classes [true]", detect(classes=[True]), "invalid_input", "options.classes"),
        ("threshold NaN", detect(threshold=float("nan")), "invalid_input", "options.threshold"),
        (
            "start_sec infinite",
            {"task": "object-detection", "video": b64(video), "options": {"start_sec": 1e308}},
            "invalid_input",
            "options.start_sec",
        ),
        ("model dot-dot path", {**detect(), "model": "./../x.pt"}, "invalid_input", "WEIGHTS_DIR"),
        ("unknown class name", detect(classes=["unicorn"]), "invalid_input", "unicorn"),
        ("negative class id", detect(classes=[-1]), "invalid_input", "options.classes"),
        ("class id out of range", detect(classes=[999]), "invalid_input", "999"),
        (
            "bad mask format",
            {"task": "image-segmentation", "image": GOOD_IMAGE, "options": {"mask_format": "gif"}},
            "invalid_input",
            "mask_format",
        ),
        ("annotate wrong type", {**detect(), "annotate": "sure"}, "invalid_input", "annotate"),
        ("missing image", {"task": "object-detection"}, "invalid_input", "needs `image`"),
        ("image and images", {**detect(), "images": [GOOD_IMAGE]}, "invalid_input", "only one"),
        ("empty images", {"task": "object-detection", "images": []}, "invalid_input", "images"),
        (
            "too many images",
            {"task": "object-detection", "images": [GOOD_IMAGE] * 17},
            "invalid_input",
            "MAX_BATCH_IMAGES",
        ),
        (
            "one bad image in a batch",
            {"task": "object-detection", "images": [GOOD_IMAGE, b64(b"nope")]},
            "media_decode_failed",
            "images[1]",
        ),
        ("empty image string", detect(""), "invalid_input", "empty"),
        ("image not a string", detect(12345), "invalid_input", "image"),
        (
            "model path traversal",
            {**detect(), "model": "../../etc/passwd"},
            "invalid_input",
            "WEIGHTS_DIR",
        ),
        (
            "model absolute path",
            {**detect(), "model": "/etc/passwd"},
            "invalid_input",
            "WEIGHTS_DIR",
        ),
        ("model bad suffix", {**detect(), "model": "yolo11n.yaml"}, "invalid_input", ".pt"),
        ("model not found", {**detect(), "model": "yolo99z.pt"}, "model_unavailable", "looked in"),
        (
            "pose model for detection",
            {**detect(), "model": "yolo11n-pose.pt"},
            "invalid_input",
            "pose model",
        ),
        ("s3Config without bucket", "S3CONFIG", "invalid_input", "bucketName"),
        # Hostile media (tests/test_hostile_media.py has each in full).
        (
            "frames of two sizes, read from their headers",
            clip([png_bytes(scene_image(64, 48)), broken_png, png_bytes(scene_image(32, 24))]),
            "invalid_input",
            "one size",
        ),
        (
            "frames over the request's pixel budget",
            clip([bilevel_png(6000, 6000)] * 30),
            "payload_too_large",
            "MAX_REQUEST_PIXELS",
        ),
        (
            "video frames over the pixel cap",
            {"task": "object-detection", "video": b64(huge_video(tmp))},
            "payload_too_large",
            "MAX_VIDEO_PIXELS",
        ),
        ("cut heic", detect(b64(real_heic[: len(real_heic) // 2])), "media_decode_failed", "heic"),
        (
            "jpeg cut before its end marker",
            detect(b64(JPEG[:-2])),
            "media_decode_failed",
            "truncated",
        ),
        # Hostile URLs (tests/test_hostile_network.py has each in full).
        (
            "backslash in the url's authority",
            detect("http://127.0.0.1:9\\@1.1.1.1/cat.jpg"),
            "invalid_input",
            "backslash",
        ),
        (
            "userinfo in the url",
            detect("http://user@10.0.0.7/cat.jpg"),
            "invalid_input",
            "userinfo",
        ),
        (
            "ipv4-mapped loopback url",
            detect("http://[::ffff:127.0.0.1]/cat.jpg"),
            "invalid_input",
            "private",
        ),
        (
            "nat64 metadata url",
            detect("http://[64:ff9b::a9fe:a9fe]/latest"),
            "invalid_input",
            "private",
        ),
        ("6to4 private url", detect("http://[2002:a00:1::1]/cat.jpg"), "invalid_input", "private"),
        (
            "url port out of range",
            detect("http://example.com:99999/a.jpg"),
            "invalid_input",
            "port",
        ),
        ("url with a space", detect("http://example.com/a cat.jpg"), "invalid_input", "whitespace"),
        # Upload ids (the local server's upload routes) and the apps' own request shapes.
        (
            "upload id that is a path",
            detect("upload://../serve-jobs.sqlite3"),
            "invalid_input",
            "upload id",
        ),
        (
            "upload id never uploaded",
            detect("upload://vid_000000000000"),
            "invalid_input",
            "no upload",
        ),
        (
            "orbit video_id that is a path",
            {"video_id": "../../etc/passwd", "prompt_points": [{"x": 5, "y": 5}]},
            "invalid_input",
            "video_id",
        ),
        (
            "orbit clip sent two ways",
            {
                "frames": [GOOD_IMAGE] * 3,
                "video_url": "https://example.com/a.mp4",
                "prompt_points": [{"x": 5, "y": 5}],
            },
            "invalid_input",
            "one way",
        ),
        (
            "orbit without a clip",
            {"frames": None, "prompt_points": [{"x": 5, "y": 5}]},
            "invalid_input",
            "got none",
        ),
        (
            "orbit clip of two frames",
            {"frames": [GOOD_IMAGE] * 2, "prompt_points": [{"x": 5, "y": 5}]},
            "invalid_input",
            "at least 3",
        ),
        (
            "orbit click outside the frames",
            {"frames": [GOOD_IMAGE] * 3, "prompt_points": [{"x": 999, "y": 5}]},
            "invalid_input",
            "outside",
        ),
        (
            "vfx project name that is a path",
            {"project_name": "../x", "stages": ["ingest"]},
            "invalid_input",
            "project_name",
        ),
        (
            "vfx unknown stage",
            {"project_name": "Shot", "stages": ["ingest", "paint"]},
            "invalid_input",
            "paint",
        ),
    ]


def test_bad_request_corpus(inprocess, tmp_path: Path) -> None:
    cases = corpus(tmp_path)
    assert len(cases) >= 30
    good = inprocess(detect())
    assert "error" not in good, good
    expected_boxes = [d["box"] for d in good["results"][0]["detections"]]
    assert expected_boxes

    failures = []
    for name, job_input, code, word in cases:
        extra = {}
        if job_input == "S3CONFIG":
            job_input, extra = detect(), {"s3Config": {"accessId": "x"}}
        result = inprocess(job_input, **extra)
        if result.get("error_code") != code or word.lower() not in result.get("error", "").lower():
            failures.append(f"{name}: expected {code} mentioning {word!r}, got {result}")
            continue
        assert result["error"].startswith(f"{code}: ")
        assert "Traceback" not in result["error"]
        assert "timings_ms" in result and result["device"] == "cpu"
        # The worker is still up and still right.
        after = inprocess(detect())
        assert [d["box"] for d in after["results"][0]["detections"]] == expected_boxes, name
    assert not failures, "\n".join(failures)


def test_unexpected_errors_become_internal(inprocess, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.tasks import get_task

    task = get_task("object-detection")

    def explode(request: Any, ctx: Any) -> dict[str, Any]:
        raise RuntimeError("secret internals at /srv/app.py line 3")

    import core.tasks

    broken = type(task)(**{**task.__dict__, "run": explode})
    monkeypatch.setitem(core.tasks._TASKS, "object-detection", broken)
    result = inprocess(detect())
    assert result["error_code"] == "internal"
    assert "RuntimeError" in result["error"] and "secret internals" not in result["error"]
    monkeypatch.setitem(core.tasks._TASKS, "object-detection", task)
    assert "results" in inprocess(detect())


def test_unknown_fields_are_warnings_not_errors(inprocess) -> None:
    result = inprocess(
        {**detect(), "imgae": "typo", "options": {"threshold": 0.0, "colour": "red"}}
    )
    assert "results" in result
    assert result["warnings"] == [
        "options.colour is not used by object-detection",
        "imgae is not a known input field",
    ]
