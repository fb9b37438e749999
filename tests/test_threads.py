"""Every model shares the process's CPU threads: a YOLO job must not change torch's setting
(Ultralytics sets it to cpu_count - 1 on each predict, halving the other models on 2 cores)."""

from __future__ import annotations

import torch

from tests.conftest import jpeg_b64, scene_image


def test_a_yolo_job_keeps_torch_threads(inprocess) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    try:
        wanted = torch.get_num_threads()
        result = inprocess({"task": "object-detection", "image": jpeg_b64(scene_image())})
        assert "error" not in result, result
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)
