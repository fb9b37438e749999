"""A worker told to use a GPU that is not there stops at start, saying so (both workers).

DEVICE=cuda (or cuda:N) with no usable GPU: `core.models.require_usable_device` logs one line
naming the problem and the fix and exits with EXIT_NO_DEVICE before RunPod's loop starts, so a
misplaced endpoint fails its health instead of serving jobs on the CPU at a fraction of the
speed. CUDA_VISIBLE_DEVICES="" hides any GPU, so this holds on a GPU machine too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from core.models import EXIT_NO_DEVICE, device_problem
from tests.conftest import REPO


@pytest.mark.parametrize("handler", ["splat", "infer"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_worker_exits_at_start_without_the_gpu_it_was_told_to_use(
    handler: str, device: str, tmp_path
) -> None:
    env = {
        **os.environ,
        "DEVICE": device,
        "CUDA_VISIBLE_DEVICES": "",
        "PRELOAD_MODELS": "",
        "WEIGHTS_DIR": str(tmp_path),
        "YOLO_CONFIG_DIR": str(tmp_path / "ultralytics"),
    }
    env.pop("RESULT_PATH", None)
    run = subprocess.run(
        [sys.executable, "-u", f"handlers/{handler}.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = run.stdout + run.stderr
    assert run.returncode == EXIT_NO_DEVICE, output[-3000:]
    assert f"DEVICE={device} but no usable CUDA GPU is present" in output, output[-3000:]
    assert "the worker will not start (set DEVICE=auto or DEVICE=cpu" in output
    assert "ready in" not in output and "worker ready" not in output  # stopped before the loop


def test_device_problem_names() -> None:
    assert device_problem("cpu") is None
    assert "not a CUDA device name" in (device_problem("cuda:x") or "")


def test_gpu_check_says_what_it_skipped_without_a_gpu(tmp_path) -> None:
    import json

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "YOLO_CONFIG_DIR": str(tmp_path)}
    run = subprocess.run(
        ["bash", "scripts/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert lines[0]["check"] == "environment" and lines[0]["cuda_available"] is False
    checks = {line["check"]: line for line in lines[1:-1]}
    assert set(checks) == {
        "sift_gpu",
        "gsplat_training",
        "yolo_fp16",
        "sam2_fp16",
        "sam3_fp16",
        "orbit_job",
    }
    for line in checks.values():
        assert line["status"] == "skipped" and "no usable CUDA GPU" in line["reason"]
    assert lines[-1] == {**lines[-1], "check": "summary", "status": "ok", "failed": 0}
