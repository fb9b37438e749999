"""Writes examples/splat/test_input.json: a synthetic orbit video (rendered with known cameras
by tests/splat_scene.py) and a small CPU-sized training job, so `make run-splat` works offline.

    python scripts/make_splat_test_input.py
"""

from __future__ import annotations

import base64
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.splat_scene import encode_mp4, render_views  # noqa: E402

VIEWS, FPS = 28, 7.0


def main() -> None:
    images, _k, _poses, _scene = render_views(VIEWS, seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        video = encode_mp4(images, Path(tmp) / "orbit.mp4", fps=FPS, crf=18).read_bytes()
    job = {
        "input": {
            "video": base64.b64encode(video).decode(),
            "fps": FPS,
            "iterations": 400,
            "train_max_side": 160,
            "formats": ["ply", "splat"],
        }
    }
    target = REPO / "examples" / "splat" / "test_input.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(job) + "\n")
    print(f"{target}: {len(video)} bytes of video, {VIEWS} views")


if __name__ == "__main__":
    main()
