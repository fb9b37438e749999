"""The subject's masks through a clip (SAM 2 from clicks on one frame) and their sanity metrics.

The metrics are the segmentation gate's inputs of Orbit's engineering PRD ("B1: mask sanity"):
per frame the subject's area ratio, the boundary's jitter over time, and a leak score (mask
fragments outside the main component). Its old backend named them `subject_area_ratios`,
`edge_jitter`, `leak_score`, `high_coverage_frame_count`, `total_frames` and `score`; the
definitions here are ours (theirs measured a centroid's whole motion as jitter, so a subject
walking steadily read as jittery): see `mask_quality`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from core.contract import JobContext
from core.media import VideoFrame
from core.models import LoadedModel
from core.tasks._sam2_prompts import Prompt
from core.tasks.sam2 import track_objects

SUBJECT_ID = 1
HIGH_COVERAGE = 0.65
"""PRD B1: a subject over 65 % of the frame ..."""
HIGH_COVERAGE_SHARE = 0.30
"""... in over 30 % of the frames marks a pose risk (too little background to solve on)."""
SEVERE_JITTER = 0.01
"""Edge jitter (see `mask_quality`) above 1 % of the frame diagonal per frame is severe."""


def segment_subject(
    loaded: LoadedModel,
    frames: list[VideoFrame],
    width: int,
    height: int,
    prompts: list[Prompt],
    prompt_frame: int,
    ctx: JobContext,
) -> list[np.ndarray]:
    """The subject's mask (bool, frame size) in every frame; SAM 2 propagates from the prompt
    frame both ways and stops between frames when the job is cancelled."""
    per_frame = track_objects(
        loaded, frames, width, height, prompts, {SUBJECT_ID: prompt_frame}, ctx
    )
    return [masks[SUBJECT_ID] for masks in per_frame]


def _centroid(mask: np.ndarray) -> np.ndarray | None:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return np.array([cols.mean(), rows.mean()])


def leak_ratio(mask: np.ndarray) -> float:
    """Share of the mask's pixels outside its largest connected component."""
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return 0.0
    areas = stats[1:, cv2.CC_STAT_AREA]
    return float(1.0 - areas.max() / areas.sum())


def mask_quality(masks: Sequence[np.ndarray]) -> dict[str, Any]:
    """The segmentation gate's metrics.

    * `subject_area_ratios`: the mask's share of each frame;
    * `edge_jitter`: how much the mask shakes rather than moves: the RMS over frames of the
      second difference of its centroid plus that of its equivalent radius (sqrt of area), in
      frame diagonals. A subject moving smoothly scores ~0; a boundary flickering between
      frames does not;
    * `leak_score`: the mean share of mask pixels outside the largest component;
    * `empty_frames`: frames where the mask is empty (the subject was lost);
    * `score` in 0-1: present share x (1 - leak) x (1 - jitter / severe), clamped;
    * `pose_risk`: the PRD's "subject covers > 65 % of the frame for > 30 % of frames";
    * `severe_jitter`: edge_jitter over 1 % of the diagonal per frame.
    """
    total = len(masks)
    if total == 0:
        raise ValueError("no masks")
    height, width = masks[0].shape
    diagonal = float(np.hypot(width, height))
    ratios = [float(m.mean()) for m in masks]
    leaks = [leak_ratio(m) for m in masks]
    empty = sum(1 for r in ratios if r == 0.0)
    shape = []  # (cx, cy, radius) per frame with a subject
    for mask in masks:
        centre = _centroid(mask)
        if centre is not None:
            shape.append([*centre, np.sqrt(mask.sum() / np.pi)])
    jitter = 0.0
    if len(shape) >= 3:
        second = np.diff(np.asarray(shape), n=2, axis=0) / diagonal
        jitter = float(np.sqrt((second**2).sum(axis=1).mean()))
    high = sum(1 for r in ratios if r > HIGH_COVERAGE)
    present = (total - empty) / total
    leak = float(np.mean(leaks))
    score = present * (1.0 - leak) * max(0.0, 1.0 - jitter / SEVERE_JITTER / 2)
    return {
        "score": round(float(np.clip(score, 0.0, 1.0)), 4),
        "subject_area_ratios": [round(r, 5) for r in ratios],
        "mean_area_ratio": round(float(np.mean(ratios)), 5),
        "edge_jitter": round(jitter, 6),
        "leak_score": round(leak, 5),
        "high_coverage_frame_count": high,
        "empty_frames": empty,
        "total_frames": total,
        "pose_risk": high > HIGH_COVERAGE_SHARE * total,
        "severe_jitter": jitter > SEVERE_JITTER,
    }
