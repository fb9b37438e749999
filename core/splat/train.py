"""Train 3D Gaussians on posed images: one readable loop in the style of gsplat's
``examples/simple_trainer.py``.

Data: the undistorted pinhole images of an SfM result (``undistort_to_pinhole``), resized to
``max_side``; every ``holdout_every``-th image (index 0, 8, 16, ... like gsplat's
``test_every``) is held out for evaluation and never trained on.

Per step: a random training view -> render -> loss ``(1 - λ) L1 + λ (1 - SSIM)`` -> Adam
(one optimiser per parameter group, gsplat's learning rates; the means' rate scales with the
scene extent and decays to 1 % over the run) -> densification. PSNR and SSIM on the held-out
views are measured before (untrained) and after training.

Devices:

* CUDA: ``gsplat.rasterization`` (``packed=False``) and ``gsplat.strategy.DefaultStrategy``
  (clone / split / prune from image-plane gradients), with growth limited to
  ``max_gaussians``.
* CPU: the pure-PyTorch rasterizer of ``core.splat.rasterize`` (gsplat's conventions, same
  call shape for one camera). Densification on CPU is the *same* ``DefaultStrategy``: it is
  plain tensor code, fed the CPU rasterizer's ``means2d`` gradients and ``radii`` in the
  ``[C, N, ...]`` layout it expects. gsplat's schedule (tuned for 30k steps) is scaled to
  the run's length (``TrainConfig.resolved``), so a few hundred CPU steps densify too.

Conventions (gsplat's): ``quats`` wxyz, ``scales_log`` = log of the std-devs, opacity logits,
SH coefficients coefficient-major ``[N, K, 3]`` with RGB = SH + 0.5; cameras are OpenCV
world-to-camera ``viewmat`` and pinhole ``K`` with pixel centres at +0.5.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from core.media import fit_longest_side, longest_side_size

__all__ = [
    "SH_C0",
    "Gaussians",
    "TrainConfig",
    "TrainResult",
    "View",
    "evaluate",
    "knn_mean_distance",
    "load_training_views",
    "psnr",
    "render",
    "render_view",
    "scene_scale",
    "split_views",
    "ssim",
    "train",
]

log = logging.getLogger("worker.train")

SH_C0 = 0.28209479177387814  # Y_0^0: rgb = 0.5 + SH_C0 * sh_dc


# --------------------------------------------------------------------------------------------
# Configuration and data


@dataclass
class TrainConfig:
    """Training options. Learning rates and densification thresholds are gsplat's
    (``simple_trainer.py`` / ``DefaultStrategy``).

    gsplat's schedule is tuned for 30k steps (SH band every 1000, refine every 100 from
    step 500 to 15k); a schedule field left at None is that schedule scaled to
    ``iterations`` (see :meth:`resolved`), so a 500-step CPU run still densifies and gets
    all its SH bands.
    """

    iterations: int = 30_000
    max_gaussians: int = 1_000_000
    sh_degree: int = 3
    sh_degree_interval: int | None = None  # one more SH band every this many steps
    # Learning rates (gsplat simple_trainer); means_lr is multiplied by the scene extent.
    means_lr: float = 1.6e-4
    means_lr_final_factor: float = 0.01  # exponential decay of means_lr over the run
    scales_lr: float = 5e-3
    quats_lr: float = 1e-3
    opacities_lr: float = 5e-2
    sh0_lr: float = 2.5e-3
    shN_lr: float = 2.5e-3 / 20
    ssim_lambda: float = 0.2
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)  # RGB behind the Gaussians
    holdout_every: int = 8  # views 0, 8, 16, ... are held out for evaluation (0: none)
    max_side: int | None = None  # downscale views to this longer side for training
    eval_max_side: int | None = None  # ... and held-out views to this one (None: max_side)
    # Densification (gsplat DefaultStrategy, on CPU and CUDA); step numbers are train steps.
    densify: bool = True
    refine_start_iter: int | None = None
    refine_stop_iter: int | None = None
    refine_every: int | None = None
    reset_every: int = 3000  # NB: gsplat 1.5.3 never resets opacities (see _capped_strategy)
    grow_grad2d: float = 0.0002
    prune_opa: float = 0.005
    seed: int = 0
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    # torch intra-op threads while training on the CPU (None: leave torch's setting). The
    # CPU rasterizer works on many small tensors: on a 2-core box shared with other work,
    # one thread ran 8x faster per step than two (85 vs 684 ms at 160x119, 1.3k Gaussians).
    threads: int | None = 1

    def resolved(self) -> TrainConfig:
        """A copy with every None schedule field filled in: gsplat's values at 30k steps and
        the same fractions of shorter runs (an SH band every 1/30 of the run; refinement
        from 10 % of it, at most step 500, to 50 %, at most 15k, every 5 % of it clamped to
        25..100 steps, so each refinement still averages gradients over several views)."""
        n = self.iterations

        def pick(value: int | None, default: int) -> int:
            return default if value is None else value

        return replace(
            self,
            sh_degree_interval=pick(self.sh_degree_interval, max(1, min(1000, n // 30))),
            refine_start_iter=pick(self.refine_start_iter, min(500, n // 10)),
            refine_stop_iter=pick(self.refine_stop_iter, min(15_000, n // 2)),
            refine_every=pick(self.refine_every, min(100, max(25, n // 20))),
        )


@dataclass
class View:
    """One posed image: ``image`` float RGB [H, W, 3] in 0..1, world-to-camera ``viewmat``
    [4, 4] (OpenCV axes) and pinhole ``K`` [3, 3] for this image's size."""

    image: Tensor
    viewmat: Tensor
    K: Tensor
    name: str = ""

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    def resized(self, max_side: int | None) -> View:
        """A copy downscaled (never upscaled) to ``max_side``, K scaled to match."""
        if not max_side or max(self.width, self.height) <= max_side:
            return self
        image, K = _resize(self.image.cpu().numpy(), self.K.cpu().numpy(), max_side)
        return View(image=image, viewmat=self.viewmat, K=K, name=self.name)


def _resize(pixels: np.ndarray, K: np.ndarray, max_side: int | None) -> tuple[Tensor, Tensor]:
    """Image [H, W, 3] and K resized so the longer side is at most ``max_side``.

    With pixel centres at +0.5, a resize by (sx, sy) maps image point (u, v) to (sx u, sy v)
    exactly, so K's rows scale by the same factors (fx, cx by sx; fy, cy by sy).
    """
    h, w = pixels.shape[:2]
    K = np.asarray(K, dtype=np.float64).copy()
    nw, nh = longest_side_size(w, h, max_side)
    if (nw, nh) != (w, h):
        pixels = fit_longest_side(pixels, max_side)
        K[0] *= nw / w
        K[1] *= nh / h
    return (
        torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)),
        torch.from_numpy(K.astype(np.float32)),
    )


def load_training_views(sfm_result: Any, image_dir: str | Path, max_side: int | None) -> list[View]:
    """Views for every registered image of ``sfm_result``, read from ``image_dir``.

    ``sfm_result`` must be the *undistorted* (PINHOLE) result of ``undistort_to_pinhole`` and
    ``image_dir`` its ``out_dir/images``: the rasterizer models a pinhole camera only.
    Images are resized to ``max_side`` (INTER_AREA) with K scaled to match.
    """
    image_dir = Path(image_dir)
    views = []
    for im in sfm_result.images:
        cam = im.intrinsics
        if cam.model not in ("PINHOLE", "SIMPLE_PINHOLE"):
            raise ValueError(
                f"{im.name}: camera model {cam.model}; undistort to pinhole first "
                "(core.splat.sfm.undistort_to_pinhole)"
            )
        bgr = cv2.imread(str(image_dir / im.name), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot read training image {image_dir / im.name}")
        if bgr.shape[:2] != (cam.height, cam.width):
            raise ValueError(
                f"{im.name} is {bgr.shape[1]}x{bgr.shape[0]} but its camera says "
                f"{cam.width}x{cam.height}: not the undistorted image of this model?"
            )
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        image, K = _resize(rgb, cam.K, max_side)
        viewmat = torch.from_numpy(im.world_to_camera.astype(np.float32))
        views.append(View(image=image, viewmat=viewmat, K=K, name=im.name))
    return views


def split_views(views: Sequence[View], holdout_every: int) -> tuple[list[View], list[View]]:
    """(train, held out): views with index % holdout_every == 0 are held out (gsplat's
    ``test_every``). With fewer than two views, or holdout_every <= 0, nothing is held out."""
    if holdout_every <= 0 or len(views) < 2:
        return list(views), []
    held = [v for i, v in enumerate(views) if i % holdout_every == 0]
    return [v for i, v in enumerate(views) if i % holdout_every != 0], held


def scene_scale(views: Sequence[View]) -> float:
    """gsplat's scene extent: 1.1 x the largest distance of a camera centre from their mean
    (1.0 for a single camera). Scales the means' learning rate and the 3D size thresholds."""
    centres = torch.stack([-v.viewmat[:3, :3].T @ v.viewmat[:3, 3] for v in views])
    extent = float((centres - centres.mean(0)).norm(dim=-1).max())
    return 1.1 * extent if extent > 0 else 1.0


# --------------------------------------------------------------------------------------------
# Gaussians


def knn_mean_distance(points: Tensor, k: int = 3, max_block: int = 1 << 26) -> Tensor:
    """sqrt of the mean squared distance [N] of each point to its k nearest other points
    (gsplat's init). Brute force in row blocks of at most ``max_block`` distances: O(N^2)
    work (seconds for tens of thousands of points on a CPU core; use the GPU for big clouds),
    bounded memory."""
    n = points.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return torch.ones(n, dtype=points.dtype, device=points.device)
    rows = max(1, min(n, max_block // n))
    out = []
    for start in range(0, n, rows):
        # The matmul form |a|^2 + |b|^2 - 2ab loses neighbours 0.01 apart in coordinates
        # ~30 to float32 rounding (measured: 19x relative error); the direct form is exact.
        d = torch.cdist(
            points[start : start + rows], points, compute_mode="donot_use_mm_for_euclid_dist"
        )
        # Smallest k + 1 distances; the first is the point itself (0).
        nearest = torch.topk(d, k + 1, dim=1, largest=False).values[:, 1:]
        out.append(nearest.square().mean(dim=1).sqrt())
    return torch.cat(out)


@dataclass
class Gaussians:
    """Raw (pre-activation) parameters, gsplat's layout: ``means`` [N, 3], ``scales_log``
    [N, 3], ``quats`` [N, 4] wxyz, ``opacity_logit`` [N], ``sh_dc`` [N, 1, 3], ``sh_rest``
    [N, K-1, 3] with K = (sh_degree + 1)^2."""

    means: Tensor
    scales_log: Tensor
    quats: Tensor
    opacity_logit: Tensor
    sh_dc: Tensor
    sh_rest: Tensor

    @property
    def num(self) -> int:
        return int(self.means.shape[0])

    @property
    def sh_degree(self) -> int:
        return math.isqrt(self.sh_rest.shape[1] + 1) - 1

    @classmethod
    def init_from_points(
        cls,
        xyz: Any,
        rgb: Any,
        sh_degree: int = 3,
        *,
        init_opacity: float = 0.1,
        init_scale: float = 1.0,
        max_points: int | None = None,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> Gaussians:
        """One isotropic Gaussian per point (gsplat's SfM init): std-dev = mean distance to
        the 3 nearest neighbours x ``init_scale``, opacity ``init_opacity``, identity
        rotation, DC colour from ``rgb`` (uint8 0..255), higher SH bands zero.

        ``max_points``: keep a random subset first (before the neighbour distances, so the
        sizes fit the kept density).
        """
        points = torch.as_tensor(np.asarray(xyz, dtype=np.float32), device=device).reshape(-1, 3)
        colours = torch.as_tensor(np.asarray(rgb, dtype=np.float32), device=device).reshape(-1, 3)
        if points.shape != colours.shape:
            raise ValueError(f"xyz {tuple(points.shape)} and rgb {tuple(colours.shape)} differ")
        if points.shape[0] == 0:
            raise ValueError("no points to initialise Gaussians from")
        if max_points is not None and points.shape[0] > max_points:
            g = torch.Generator().manual_seed(seed)
            keep = torch.randperm(points.shape[0], generator=g)[:max_points].to(points.device)
            points, colours = points[keep], colours[keep]
        n = points.shape[0]
        # Coincident points would give log(0): floor at a millionth of the cloud's extent.
        extent = float((points.max(0).values - points.min(0).values).max().clamp_min(1e-6))
        dist = knn_mean_distance(points).clamp_min(1e-6 * extent)
        sh_dc = ((colours / 255.0 - 0.5) / SH_C0)[:, None, :]
        quats = torch.zeros(n, 4, device=points.device)
        quats[:, 0] = 1.0
        return cls(
            means=points,
            scales_log=torch.log(dist * init_scale)[:, None].repeat(1, 3),
            quats=quats,
            opacity_logit=torch.full((n,), math.log(init_opacity / (1 - init_opacity))).to(
                points.device
            ),
            sh_dc=sh_dc,
            sh_rest=torch.zeros(n, (sh_degree + 1) ** 2 - 1, 3, device=points.device),
        )

    def to(self, device: str | torch.device) -> Gaussians:
        return Gaussians(*(getattr(self, f).detach().to(device) for f in _FIELDS))

    def to_numpy(self) -> dict[str, np.ndarray]:
        """float32 arrays named like ``core.splat.export.write_ply``'s arguments, so
        ``write_ply(path, **g.to_numpy())`` works (``sh_rest`` is [N, 0, 3] at degree 0)."""
        return {f: getattr(self, f).detach().float().cpu().numpy() for f in _FIELDS}


_FIELDS = ("means", "scales_log", "quats", "opacity_logit", "sh_dc", "sh_rest")
# gsplat's parameter names (what DefaultStrategy and its ops expect) for each field.
_GSPLAT_NAMES = dict(
    zip(_FIELDS, ("means", "scales", "quats", "opacities", "sh0", "shN"), strict=True)
)


# --------------------------------------------------------------------------------------------
# Rendering and metrics


def render(
    params: Any,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int,
    background: Tensor,
    absgrad: bool = False,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Render raw parameters (a :class:`Gaussians` or gsplat-named dict/ParameterDict) into one
    camera on their device: gsplat's CUDA rasterizer on a GPU, the CPU rasterizer otherwise.

    Returns colours [H, W, 3] (unclamped), alphas [H, W, 1] and an ``info`` dict in gsplat's
    ``[C, N, ...]`` layout (C = 1) for ``DefaultStrategy``.
    """
    p = _as_gsplat_dict(params)
    means = p["means"]
    quats = p["quats"]  # both rasterizers normalise
    scales = torch.exp(p["scales"])
    opacities = torch.sigmoid(p["opacities"])
    colors = torch.cat([p["sh0"], p["shN"]], dim=1)  # [N, K, 3]
    viewmat, K = viewmat.to(means), K.to(means)
    if means.is_cuda:
        from gsplat import rasterization

        img, alpha, info = rasterization(
            means,
            quats,
            scales,
            opacities,
            colors,
            viewmat[None],
            K[None],
            width,
            height,
            sh_degree=sh_degree,
            packed=False,
            absgrad=absgrad,
            backgrounds=background.to(means)[None],
        )
        return img[0], alpha[0], info

    from core.splat.rasterize import rasterization as cpu_rasterization

    img, alpha, meta = cpu_rasterization(
        means,
        quats,
        scales,
        opacities,
        colors,
        viewmat,
        K,
        width,
        height,
        sh_degree=sh_degree,
        backgrounds=background.to(means),
    )
    info = {
        "means2d": _OneCamera(meta["means2d"]),
        "radii": meta["radii"][None],
        "width": width,
        "height": height,
        "n_cameras": 1,
        "gaussian_ids": None,  # unpacked layout
    }
    return img, alpha, info


class _OneCamera:
    """The CPU rasterizer's ``means2d`` [N, 2] seen as gsplat's [C=1, N, 2]: DefaultStrategy
    only calls ``retain_grad()`` before backward and reads ``.grad`` after."""

    def __init__(self, means2d: Tensor) -> None:
        self.means2d = means2d

    def retain_grad(self) -> None:
        self.means2d.retain_grad()

    @property
    def grad(self) -> Tensor:
        g = self.means2d.grad  # None when no Gaussian reached the image
        return (torch.zeros_like(self.means2d) if g is None else g)[None]


def _as_gsplat_dict(params: Any) -> Any:
    if isinstance(params, Gaussians):
        return {_GSPLAT_NAMES[f]: getattr(params, f) for f in _FIELDS}
    return params


def _gaussian_window(size: int, sigma: float, channels: int, like: Tensor) -> Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(a: Tensor, b: Tensor, window_size: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM of two images [H, W, C] (or [B, H, W, C]) with values in 0..1.

    Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), C1 = 0.01^2, C2 = 0.03^2 and
    'valid' windows only (no padding), like ``fused_ssim(..., padding="valid")`` that gsplat
    trains with. Differentiable.
    """
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    x = (a if a.dim() == 4 else a[None]).permute(0, 3, 1, 2)
    y = (b if b.dim() == 4 else b[None]).permute(0, 3, 1, 2)
    # Odd window no larger than the image, so tiny images still give a value.
    size = min(window_size, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2
    c = x.shape[1]
    w = _gaussian_window(size, sigma, c, x)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (num / den).mean()


def psnr(a: Tensor, b: Tensor) -> float:
    """PSNR in dB of two images in 0..1 (``a`` is clamped first)."""
    mse = float(torch.mean((a.clamp(0, 1) - b) ** 2))
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def evaluate(
    params: Any, views: Sequence[View], sh_degree: int, background: Tensor
) -> tuple[float, float]:
    """Mean PSNR and SSIM over ``views`` (each render clamped to 0..1, gsplat's eval)."""
    p = _as_gsplat_dict(params)
    device = p["means"].device
    scores = []
    for v in views:
        img, _, _ = render(
            p,
            v.viewmat,
            v.K,
            v.width,
            v.height,
            sh_degree=sh_degree,
            background=background,
        )
        gt = v.image.to(device)
        img = img.clamp(0, 1)
        scores.append((psnr(img, gt), float(ssim(img, gt))))
    return (
        float(np.mean([s[0] for s in scores])),
        float(np.mean([s[1] for s in scores])),
    )


def render_view(
    gaussians: Gaussians,
    view: View | tuple[Any, Any, int, int],
    device: str = "cpu",
    *,
    sh_degree: int | None = None,
    background: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """A BGR uint8 image [H, W, 3] of the Gaussians seen from ``view`` or from
    ``(world_to_camera [4, 4], K [3, 3], width, height)`` (numpy or torch), for thumbnails."""
    if isinstance(view, View):
        viewmat, K, width, height = view.viewmat, view.K, view.width, view.height
    else:
        viewmat, K, width, height = view
    dev = torch.device(device)
    g = gaussians.to(dev)
    with torch.no_grad():
        img, _, _ = render(
            g,
            torch.as_tensor(np.asarray(viewmat, dtype=np.float32)),
            torch.as_tensor(np.asarray(K, dtype=np.float32)),
            int(width),
            int(height),
            sh_degree=g.sh_degree if sh_degree is None else sh_degree,
            background=torch.tensor(background, dtype=torch.float32),
        )
    rgb = (img.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.ascontiguousarray(rgb[..., ::-1])


# --------------------------------------------------------------------------------------------
# Densification (gsplat's DefaultStrategy with a cap)


def _capped_strategy(config: TrainConfig) -> Any:
    """gsplat's DefaultStrategy limited to ``config.max_gaussians``, or None when gsplat is not
    installed (it is required for CUDA; on CPU training then runs without densification)."""
    try:
        from gsplat.strategy import DefaultStrategy
    except ImportError:
        log.warning("gsplat is not installed: training without densification")
        return None

    @dataclass
    class _CappedStrategy(DefaultStrategy):
        """DefaultStrategy whose growth never takes the count past ``max_gaussians``.

        Clone and split each add one Gaussian per selected one, so at a refinement with room
        for R more, only the R largest mean image-plane gradients above ``grow_grad2d`` may
        grow (the bar is raised for that call). This overrides gsplat 1.5.x's private
        ``_grow_gs(params, optimizers, state, step)``; ``_trim_to_cap`` in the loop enforces
        the cap even if a later gsplat renames it.

        Note: gsplat 1.5.3's opacity reset never runs (``step % self.reset_every == 0 &
        step > 0`` parses as a chained comparison ending in ``0 > 0``); we keep its
        behaviour rather than patch it.
        """

        max_gaussians: int = 1_000_000

        @torch.no_grad()
        def _grow_gs(self, params: Any, optimizers: Any, state: Any, step: int) -> Any:
            room = self.max_gaussians - len(params["means"])
            if room <= 0:
                return 0, 0
            grads = state["grad2d"] / state["count"].clamp_min(1)
            bar = self.grow_grad2d
            if int((grads > bar).sum()) > room:
                bar = max(bar, float(torch.topk(grads, room + 1).values[-1]))
            saved = self.grow_grad2d
            self.grow_grad2d: float = bar  # declared here: gsplat's fields have no types
            try:
                return super()._grow_gs(params, optimizers, state, step)
            finally:
                self.grow_grad2d = saved

    return _CappedStrategy(
        prune_opa=config.prune_opa,
        grow_grad2d=config.grow_grad2d,
        refine_start_iter=config.refine_start_iter,
        refine_stop_iter=config.refine_stop_iter,
        refine_every=config.refine_every,
        reset_every=config.reset_every,
        max_gaussians=config.max_gaussians,
    )


@torch.no_grad()
def _trim_to_cap(params: Any, optimizers: Any, state: Any, cap: int) -> None:
    """Remove the least opaque Gaussians beyond ``cap`` (a safety net: normally a no-op)."""
    n = len(params["means"])
    if n <= cap:
        return
    from gsplat.strategy.ops import remove

    drop = torch.zeros(n, dtype=torch.bool, device=params["means"].device)
    drop[torch.argsort(params["opacities"].flatten())[: n - cap]] = True
    remove(params=params, optimizers=optimizers, state=state, mask=drop)


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    gaussians: Gaussians  # trained, on the CPU
    psnr_start: float  # mean PSNR (dB) of the eval views before training
    psnr_end: float
    ssim_start: float
    ssim_end: float
    steps: int  # steps run (fewer than iterations when stopped)
    iterations: int  # steps asked for
    num_gaussians: int
    stopped: bool  # should_stop ended the run early
    device: str
    num_train_views: int
    num_eval_views: int
    eval_on: str  # "held_out", or "train" when no view could be held out
    densification: str  # "gsplat DefaultStrategy (cap N)" or "off"
    final_loss: float
    scene_scale: float
    timings_ms: dict[str, float] = field(default_factory=dict)


def _resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TrainConfig.device is cuda but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {name!r}")
    return device


def train(
    gaussians: Gaussians,
    views: Sequence[View],
    config: TrainConfig,
    *,
    on_step: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Optimise ``gaussians`` on ``views`` (see the module docstring); the input is not
    modified. ``on_step(step, total, loss)`` runs after each step (step counts from 1);
    ``should_stop()`` runs before each step and ends the run (the result says ``stopped``)."""
    started = time.perf_counter()
    config = config.resolved()
    device = _resolve_device(config.device)
    if not views:
        raise ValueError("no views to train on")
    saved_threads = torch.get_num_threads()
    if config.threads and device.type == "cpu":
        torch.set_num_threads(config.threads)
    try:
        return _train(gaussians, views, config, device, started, on_step, should_stop)
    finally:
        torch.set_num_threads(saved_threads)


def _train(
    gaussians: Gaussians,
    views: Sequence[View],
    config: TrainConfig,
    device: torch.device,
    started: float,
    on_step: Callable[[int, int, float], None] | None,
    should_stop: Callable[[], bool] | None,
) -> TrainResult:
    torch.manual_seed(config.seed)  # gsplat's split samples with the global generator
    pick = random.Random(config.seed)
    train_views, eval_views = split_views(views, config.holdout_every)
    eval_on = "held_out"
    if not eval_views:
        eval_views, eval_on = train_views, "train"
    train_views = [v.resized(config.max_side) for v in train_views]
    eval_views = [v.resized(config.eval_max_side or config.max_side) for v in eval_views]
    # Move the (small) images to the device once; every step reads one.
    train_views = [
        View(v.image.to(device), v.viewmat.to(device), v.K.to(device), v.name) for v in train_views
    ]
    background = torch.tensor(config.background, dtype=torch.float32, device=device)
    extent = scene_scale(list(views))
    sh_degree = min(config.sh_degree, gaussians.sh_degree)
    if gaussians.num > config.max_gaussians:
        # More SfM points than the cap: a random subset (init_from_points(max_points=...)
        # does this before sizing the Gaussians, which fits their sizes better).
        g = torch.Generator().manual_seed(config.seed)
        keep = torch.randperm(gaussians.num, generator=g)[: config.max_gaussians]
        gaussians = Gaussians(
            *(getattr(gaussians, f)[keep.to(gaussians.means.device)] for f in _FIELDS)
        )

    # Parameters under gsplat's names, one Adam per group (what DefaultStrategy expects).
    params = torch.nn.ParameterDict(
        {
            _GSPLAT_NAMES[f]: torch.nn.Parameter(getattr(gaussians, f).detach().to(device).clone())
            for f in _FIELDS
        }
    )
    lrs = {
        "means": config.means_lr * extent,
        "scales": config.scales_lr,
        "quats": config.quats_lr,
        "opacities": config.opacities_lr,
        "sh0": config.sh0_lr,
        "shN": config.shN_lr,
    }
    optimizers = {
        name: torch.optim.Adam(
            [{"params": params[name], "lr": lr, "name": name}],
            eps=1e-15,
            fused=device.type == "cuda",
        )
        for name, lr in lrs.items()
    }
    means_decay = torch.optim.lr_scheduler.ExponentialLR(
        optimizers["means"],
        gamma=config.means_lr_final_factor ** (1.0 / max(1, config.iterations)),
    )
    strategy = _capped_strategy(config) if config.densify else None
    state: dict[str, Any] = {}
    if strategy is not None:
        strategy.check_sanity(params, optimizers)
        state = strategy.initialize_state(scene_scale=extent)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    psnr_start, ssim_start = evaluate(params, eval_views, sh_degree, background)
    timings["eval_start"] = (time.perf_counter() - t0) * 1000

    sh_interval = config.sh_degree_interval
    assert sh_interval is not None  # train() passes a resolved() config
    t0 = time.perf_counter()
    steps, stopped, loss_value = 0, False, float("nan")
    for step in range(config.iterations):
        if should_stop is not None and should_stop():
            stopped = True
            break
        view = train_views[pick.randrange(len(train_views))]
        degree = min(step // max(1, sh_interval), sh_degree)  # progressive SH

        img, _alpha, info = render(
            params,
            view.viewmat,
            view.K,
            view.width,
            view.height,
            sh_degree=degree,
            background=background,
            absgrad=strategy.absgrad if strategy is not None else False,
        )
        if strategy is not None:
            strategy.step_pre_backward(params, optimizers, state, step, info)
        l1 = (img - view.image).abs().mean()
        loss = torch.lerp(l1, 1.0 - ssim(img, view.image), config.ssim_lambda)
        loss.backward()

        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        means_decay.step()
        # After the optimiser step, as simple_trainer does: densification replaces the
        # parameter tensors and their Adam state.
        if strategy is not None:
            strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
            _trim_to_cap(params, optimizers, state, config.max_gaussians)

        steps = step + 1
        loss_value = float(loss.detach())
        if on_step is not None:
            on_step(steps, config.iterations, loss_value)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings["train"] = (time.perf_counter() - t0) * 1000
    timings["step_mean"] = timings["train"] / max(1, steps)

    t0 = time.perf_counter()
    psnr_end, ssim_end = evaluate(params, eval_views, sh_degree, background)
    timings["eval_end"] = (time.perf_counter() - t0) * 1000
    timings["total"] = (time.perf_counter() - started) * 1000

    trained = Gaussians(*(params[_GSPLAT_NAMES[f]].detach().cpu().clone() for f in _FIELDS))
    log.info(
        "trained %d steps on %s: PSNR %.2f -> %.2f dB, %d Gaussians",
        steps,
        device,
        psnr_start,
        psnr_end,
        trained.num,
    )
    return TrainResult(
        gaussians=trained,
        psnr_start=psnr_start,
        psnr_end=psnr_end,
        ssim_start=ssim_start,
        ssim_end=ssim_end,
        steps=steps,
        iterations=config.iterations,
        num_gaussians=trained.num,
        stopped=stopped,
        device=str(device),
        num_train_views=len(train_views),
        num_eval_views=len(eval_views),
        eval_on=eval_on,
        densification=(
            f"gsplat DefaultStrategy (cap {config.max_gaussians})"
            if strategy is not None
            else "off"
        ),
        final_loss=loss_value,
        scene_scale=extent,
        timings_ms={k: round(v, 1) for k, v in timings.items()},
    )
