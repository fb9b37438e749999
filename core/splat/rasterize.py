"""Pure-PyTorch, differentiable 3D Gaussian splatting rasterizer for CPU.

It follows gsplat's (1.5.x) conventions so a model trained or rendered here matches what
``gsplat.rasterization`` produces on CUDA:

* camera: ``viewmat`` is world-to-camera (OpenCV: x right, y down, z forward), ``K`` is a
  pinhole intrinsic matrix, pixel ``(i, j)`` has its centre at ``(j + 0.5, i + 0.5)``;
* Gaussians: ``quats`` are wxyz (normalised here), ``scales`` and ``opacities`` are already
  activated (exp / sigmoid applied by the caller);
* projection: EWA with the clamped-Jacobian of gsplat's ``persp_proj``, ``eps2d`` added to
  the 2D covariance, radius ``ceil(3.33 sigma)`` (optionally opacity-aware like gsplat's
  ``rasterization()``), culling of Gaussians before the near plane / beyond the far plane /
  outside the image / with a radius ``<= radius_clip``;
* colour: SH evaluated for the direction camera-centre -> mean with gsplat's constants, then
  ``clamp_min(sh + 0.5, 0)``;
* compositing: 16x16 tiles, a Gaussian is visited in every tile its radius box touches, front
  to back by depth, ``alpha = min(0.999, opacity * exp(-sigma))``, Gaussians with
  ``alpha < 1/255`` are skipped, a pixel stops *before* the Gaussian that would take its
  transmittance to ``<= 1e-4``; ``render_alphas = 1 - T``.

Gradients: autograd for the projection and SH; the compositing is done per (tile group x
depth chunk) block of at most ``max_elements`` pixel x Gaussian pairs by a custom autograd
function whose backward recomputes the block's alphas (like gsplat's CUDA backward), so
memory stays bounded by the block size whatever the number of Gaussians.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "ALPHA_THRESHOLD",
    "MAX_ALPHA",
    "RADIUS_SIGMAS",
    "TRANSMITTANCE_EPS",
    "eval_sh_bases",
    "project_gaussians",
    "quat_scale_to_covar",
    "quat_to_rotmat",
    "rasterization",
    "rasterization_batched",
    "rasterize_to_pixels",
    "spherical_harmonics",
]

# Constants of gsplat's CUDA kernels (include/Common.h, Rasterize*.cu, Projection*.cu).
ALPHA_THRESHOLD = 1.0 / 255.0
MAX_ALPHA = 0.999
TRANSMITTANCE_EPS = 1e-4
RADIUS_SIGMAS = 3.33
_LOG_ALPHA_FLOOR = -12.0  # exp(-12) = 6e-6 < 1/255: such pairs are skipped either way


# --------------------------------------------------------------------------- geometry


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Rotation matrices [..., 3, 3] from (unnormalised) wxyz quaternions [..., 4]."""
    w, x, y, z = F.normalize(quats, p=2, dim=-1).unbind(-1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return rot.reshape(*quats.shape[:-1], 3, 3)


def quat_scale_to_covar(quats: Tensor, scales: Tensor) -> Tensor:
    """World-space covariances [..., 3, 3] = (R S)(R S)^T from quats [..., 4], scales [..., 3]."""
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return m @ m.transpose(-1, -2)


def project_gaussians(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    *,
    opacities: Tensor | None = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    radius_clip: float = 0.0,
    calc_compensations: bool = False,
) -> dict[str, Tensor]:
    """EWA projection of 3D Gaussians to the image plane (gsplat ``fully_fused_projection``).

    Args:
        means [N, 3], quats [N, 4] (wxyz), scales [N, 3] (activated), viewmat [4, 4]
        (world-to-camera), K [3, 3].
        opacities: if given, the radius uses gsplat's opacity-aware extent
            ``min(3.33, sqrt(2 ln(255 * opacity)))`` and Gaussians with opacity < 1/255 are
            culled, exactly what ``gsplat.rasterization`` does; if None the extent is 3.33
            (gsplat ``fully_fused_projection`` without opacities and its ``_torch_impl``).
        calc_compensations: also return ``sqrt(det(cov2d) / det(cov2d + eps2d I))`` (the
            "antialiased" mode's opacity factor).

    Returns:
        dict with ``means2d`` [N, 2], ``conics`` [N, 3] (inverse blurred 2D covariance:
        xx, xy, yy), ``covars2d`` [N, 2, 2] (blurred), ``depths`` [N] (camera z),
        ``means_cam`` [N, 3], ``radii`` [N, 2] int32 (0 = culled; other outputs of culled
        Gaussians are meaningless but finite) and ``compensations`` [N] when asked for.
    """
    dtype = means.dtype
    viewmat = viewmat.to(means)
    K = K.to(means)
    rot_v, t_v = viewmat[:3, :3], viewmat[:3, 3]

    covars = quat_scale_to_covar(quats, scales)
    means_c = means @ rot_v.T + t_v
    covars_c = rot_v @ covars @ rot_v.T

    x, y, z = means_c.unbind(-1)
    # CUDA culls z < near or z > far (so z == near is kept); a safe z avoids inf/nan that
    # would poison gradients of culled Gaussians through the divisions below.
    depth_ok = (z >= near_plane) & (z <= far_plane)
    zs = torch.where(depth_ok, z, torch.ones_like(z))

    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    # gsplat clamps the Jacobian's x/z, y/z to 1.3x the field of view so Gaussians far
    # outside the frustum do not get huge 2D footprints (the mean itself is not clamped).
    tan_fovx = 0.5 * width / fx
    tan_fovy = 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + 0.3 * tan_fovx
    lim_x_neg = cx / fx + 0.3 * tan_fovx
    lim_y_pos = (height - cy) / fy + 0.3 * tan_fovy
    lim_y_neg = cy / fy + 0.3 * tan_fovy
    tx = zs * torch.clamp(x / zs, min=-lim_x_neg, max=lim_x_pos)
    ty = zs * torch.clamp(y / zs, min=-lim_y_neg, max=lim_y_pos)
    zero = torch.zeros_like(zs)
    jac = torch.stack(
        [fx / zs, zero, -fx * tx / (zs * zs), zero, fy / zs, -fy * ty / (zs * zs)], dim=-1
    ).reshape(-1, 2, 3)
    cov2d = jac @ covars_c @ jac.transpose(-1, -2)
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], dim=-1)

    det_orig = cov2d[:, 0, 0] * cov2d[:, 1, 1] - cov2d[:, 0, 1] * cov2d[:, 1, 0]
    cov2d = cov2d + eps2d * torch.eye(2, dtype=dtype, device=means.device)
    det = cov2d[:, 0, 0] * cov2d[:, 1, 1] - cov2d[:, 0, 1] * cov2d[:, 1, 0]
    det_ok = det > 0
    dets = torch.where(det_ok, det, torch.ones_like(det))
    conics = torch.stack(
        [
            cov2d[:, 1, 1] / dets,
            -(cov2d[:, 0, 1] + cov2d[:, 1, 0]) / 2.0 / dets,
            cov2d[:, 0, 0] / dets,
        ],
        dim=-1,
    )
    compensations = None
    if calc_compensations:
        compensations = torch.sqrt(torch.clamp(det_orig / dets, min=0.0))

    with torch.no_grad():  # radii and culling are not differentiable (as in gsplat)
        valid = depth_ok & det_ok
        extend = torch.full_like(z, RADIUS_SIGMAS)
        if opacities is not None:
            op = opacities.detach().to(dtype)
            if compensations is not None:
                op = op * compensations.detach()
            op_ok = op >= ALPHA_THRESHOLD
            valid &= op_ok
            # Opacity-aware box (gsplat, arXiv 2402.00525 B.2): beyond this the alpha is
            # below 1/255 anyway.
            op_safe = torch.where(op_ok, op, torch.ones_like(op))
            extend = torch.minimum(extend, torch.sqrt(2.0 * torch.log(op_safe / ALPHA_THRESHOLD)))
        var = torch.stack([cov2d[:, 0, 0], cov2d[:, 1, 1]], dim=-1).detach()
        radius = torch.ceil(extend[:, None] * torch.sqrt(var.clamp_min(0)))
        valid &= ~((radius[:, 0] <= radius_clip) & (radius[:, 1] <= radius_clip))
        m2 = means2d.detach()
        inside = (
            (m2[:, 0] + radius[:, 0] > 0)
            & (m2[:, 0] - radius[:, 0] < width)
            & (m2[:, 1] + radius[:, 1] > 0)
            & (m2[:, 1] - radius[:, 1] < height)
        )
        valid &= inside
        radii = torch.where(valid[:, None], radius, torch.zeros_like(radius)).to(torch.int32)

    out = {
        "means2d": means2d,
        "conics": conics,
        "covars2d": cov2d,
        "depths": z,
        "means_cam": means_c,
        "radii": radii,
    }
    if compensations is not None:
        out["compensations"] = compensations
    return out


# --------------------------------------------------------------------------- colour


def eval_sh_bases(num_bases: int, dirs: Tensor) -> Tensor:
    """Real SH basis [..., num_bases] at unit directions [..., 3] (Sloan 2013 layout, as gsplat).

    Supports degrees 0..4 (1, 4, 9, 16 or 25 bases).
    """
    if num_bases not in (1, 4, 9, 16, 25):
        raise ValueError(f"num_bases must be (degree+1)^2 with degree <= 4, got {num_bases}")
    x, y, z = dirs.unbind(-1)
    b: list[Tensor] = [torch.full_like(x, 0.2820947917738781)]
    if num_bases > 1:
        a = -0.48860251190292
        b += [a * y, -a * z, a * x]
    if num_bases > 4:
        z2 = z * z
        tb = -1.092548430592079 * z
        ta = 0.5462742152960395
        c1 = x * x - y * y
        s1 = 2 * x * y
        b += [ta * s1, tb * y, 0.9461746957575601 * z2 - 0.3153915652525201, tb * x, ta * c1]
    if num_bases > 9:
        tc = -2.285228997322329 * z2 + 0.4570457994644658
        tb = 1.445305721320277 * z
        ta = -0.5900435899266435
        c2 = x * c1 - y * s1
        s2 = x * s1 + y * c1
        b += [
            ta * s2,
            tb * s1,
            tc * y,
            z * (1.865881662950577 * z2 - 1.119528997770346),
            tc * x,
            tb * c1,
            ta * c2,
        ]
    if num_bases > 16:
        td = z * (-4.683325804901025 * z2 + 2.007139630671868)
        tc = 3.31161143515146 * z2 - 0.47308734787878
        tb = -1.770130769779931 * z
        ta = 0.6258357354491763
        c3 = x * c2 - y * s2
        s3 = x * s2 + y * c2
        b += [
            ta * s3,
            tb * s2,
            tc * s1,
            td * y,
            1.984313483298443 * z2 * (1.865881662950577 * z2 - 1.119528997770346)
            - 1.006230589874905 * (0.9461746957575601 * z2 - 0.3153915652525201),
            td * x,
            tc * c1,
            tb * c2,
            ta * c3,
        ]
    return torch.stack(b, dim=-1)


def spherical_harmonics(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """SH colour [..., 3] of ``coeffs`` [..., K, 3] using the first (degree+1)^2 bands.

    ``dirs`` [..., 3] need not be normalised. Raw value: no +0.5 offset, no clamp.
    """
    n = (degree + 1) ** 2
    if coeffs.shape[-2] < n:
        raise ValueError(f"sh_degree {degree} needs {n} coefficients, got {coeffs.shape[-2]}")
    bases = eval_sh_bases(n, F.normalize(dirs, p=2, dim=-1))
    return (bases[..., None] * coeffs[..., :n, :]).sum(dim=-2)


# --------------------------------------------------------------------------- compositing


class _Workspace:
    """Scratch buffers reused by every compositing block of one rasterization call.

    Fresh multi-MB tensors per block are dominated by page faults once the allocator returns
    them to the OS (measured 2x slower on a 2-core VM), so the hot loop writes into these
    with ``out=`` / in-place ops. Backward runs after forward, block by block, so sharing one
    workspace per call (kept alive by the autograd graph) is safe.
    """

    n_buffers = 6

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self._flat: Tensor | None = None

    def views(self, shape: tuple[int, ...]) -> list[Tensor]:
        numel = math.prod(shape)
        if self._flat is None or self._flat.shape[1] < numel:
            self._flat = torch.empty(self.n_buffers, numel, dtype=self.dtype, device=self.device)
        return [self._flat[i, :numel].view(shape) for i in range(self.n_buffers)]


def _chunk_alpha(
    feat: Tensor, origin: Tensor, lin: Tensor, out: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per pixel x Gaussian alpha of one block, returns (dx, dy, alpha).

    feat [G, M, 6 + D] rows are (x, y, conic xx, xy, yy, log opacity, colour...); pixels are
    the ts x ts grid of each tile (origin [G, 2]); alpha is written to ``out`` ([G, P, M], P =
    ts*ts), clamped to 0.999 and zeroed below 1/255.
    """
    g, m = feat.shape[0], feat.shape[1]
    ts = lin.shape[0]
    # The quadratic form is separable on the tile grid: x terms depend on the column, y terms
    # on the row, only the cross term needs the full [G, rows, cols, M] product.
    dx = (feat[..., 0] - origin[:, :1])[:, None, :] - lin[None, :, None]  # [G, cols, M]
    dy = (feat[..., 1] - origin[:, 1:])[:, None, :] - lin[None, :, None]  # [G, rows, M]
    qx = feat[:, None, :, 5] - 0.5 * feat[:, None, :, 2] * dx * dx  # log(opac) - a dx^2 / 2
    qy = 0.5 * feat[:, None, :, 4] * dy * dy
    bdx = feat[:, None, :, 3] * dx
    # log alpha = log(opac) - sigma with sigma = a dx^2/2 + c dy^2/2 + b dx dy >= 0 (the conic
    # is positive definite, so gsplat's `sigma < 0` skip only matters at rounding level).
    power = torch.sub(qx[:, None], qy[:, :, None], out=out.view(g, ts, ts, m))
    power.addcmul_(bdx[:, None], dy[:, :, None], value=-1)
    # Anything below log(1/255) is skipped anyway; flooring the exponent first avoids the
    # (16x slower) underflow path of the vectorised exp for the many far-away pairs.
    alpha = power.clamp_min_(_LOG_ALPHA_FLOOR).exp_().view(g, ts * ts, m)
    # gsplat skips Gaussians with alpha < 1/255 (they do not attenuate either) and clamps
    # alpha to 0.999 (threshold keeps x > t; the x == t tie differs only on exact equality).
    F.threshold(alpha, ALPHA_THRESHOLD, 0.0, inplace=True)
    return dx, dy, alpha.clamp_max_(MAX_ALPHA)


def _chunk_blend(
    alpha: Tensor, trans_in: Tensor, done_in: Tensor, bufs: list[Tensor]
) -> tuple[Tensor, ...]:
    """Front-to-back blending terms of one block (alpha [G, P, M], trans_in / done_in [G, P]).

    Returns one_minus (1 - alpha, in bufs[0]), keep (1.0 where the Gaussian contributes,
    else 0.0, in bufs[2]), prod_excl (product of 1 - alpha over the Gaussians in front within
    the block, in bufs[3]), prod_out [G, P] (over all kept ones) and done_out [G, P].
    bufs[1] (the inclusive product) is free again on return.
    """
    one_minus = torch.neg(alpha, out=bufs[0]).add_(1.0)
    prod_incl = torch.cumprod(one_minus, dim=-1, out=bufs[1])
    # gsplat stops a pixel *before* the Gaussian that takes T to <= 1e-4 (T_in * prod_incl);
    # T is monotone, so the kept Gaussians are a prefix whose length is a binary search, and
    # their exclusive products need no masking. Finished pixels get an infinite threshold.
    # (Float masks throughout: boolean tensor ops are several times slower on CPU.)
    thresh = torch.where(done_in, math.inf, TRANSMITTANCE_EPS / trans_in)
    n_keep = torch.searchsorted(torch.neg(prod_incl, out=bufs[2]), thresh.neg()[..., None])
    steps = torch.arange(alpha.shape[-1], dtype=alpha.dtype, device=alpha.device)
    keep = torch.sub(n_keep.to(alpha.dtype), steps, out=bufs[2]).clamp_(0.0, 1.0)  # 0 / 1
    prod_excl = bufs[3]
    prod_excl[..., 0] = 1.0
    prod_excl[..., 1:] = prod_incl[..., :-1]
    last = prod_incl.gather(-1, (n_keep - 1).clamp_min(0))
    prod_out = torch.where(n_keep > 0, last, 1.0).squeeze(-1)
    done_out = done_in | ((prod_incl[..., -1] * trans_in) <= TRANSMITTANCE_EPS)
    return one_minus, keep, prod_excl, prod_out, done_out


class _CompositeChunk(torch.autograd.Function):
    """Composite M depth-sorted Gaussians into G tiles; hand-written backward.

    Only the block inputs are saved and the alphas are recomputed in backward (as gsplat's
    CUDA backward does), so memory does not grow with the number of pixel x Gaussian pairs.
    """

    @staticmethod
    def forward(
        ctx: Any,
        trans_in: Tensor,
        done_in: Tensor,
        feat: Tensor,
        origin: Tensor,
        lin: Tensor,
        ws: _Workspace,
    ) -> tuple[Tensor, Tensor, Tensor]:
        g, m, p = feat.shape[0], feat.shape[1], lin.shape[0] ** 2
        bufs = ws.views((g, p, m))
        _, _, alpha = _chunk_alpha(feat, origin, lin, bufs[5])
        _, keep, prod_excl, prod_out, done_out = _chunk_blend(alpha, trans_in, done_in, bufs)
        weights = alpha.mul_(keep).mul_(prod_excl)  # / T_in
        color = torch.bmm(weights, feat[..., 6:]).mul_(trans_in[..., None])  # [G, P, D]
        ctx.save_for_backward(trans_in, done_in, feat, origin, lin)
        ctx.ws = ws
        ctx.mark_non_differentiable(done_out)
        return color, trans_in * prod_out, done_out

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, g_color: Tensor, g_trans_out: Tensor, _g_done: Tensor
    ) -> tuple[Tensor | None, ...]:
        trans_in, done_in, feat, origin, lin = ctx.saved_tensors
        g, m = feat.shape[0], feat.shape[1]
        ts = lin.shape[0]
        bufs = ctx.ws.views((g, ts * ts, m))
        dx, dy, alpha = _chunk_alpha(feat, origin, lin, bufs[5])
        one_minus, keep, prod_excl, prod_out, _ = _chunk_blend(alpha, trans_in, done_in, bufs)
        # With W_k = a_k prod_excl_k over kept Gaussians, C = T_in sum_k W_k c_k and
        # T_out = T_in prod_out:
        #   dL/dc_k = T_in W_k gC
        #   dL/dT_in = sum_k W_k c_k.gC + prod_out gT
        #   dL/da_k = T_in [prod_excl_k c_k.gC - (sum_{j>k} W_j c_j.gC + prod_out gT) / (1-a_k)]
        alpha_k = alpha.mul_(keep)
        wn = torch.mul(alpha_k, prod_excl, out=bufs[1])
        g_color_t = g_color * trans_in[..., None]
        g_colors = torch.bmm(wn.transpose(1, 2), g_color_t)  # [G, M, D]
        # [G, P, M]: T_in c_k . gC  (keep, in bufs[2], is no longer needed)
        g_cdot = torch.bmm(g_color_t, feat[..., 6:].transpose(1, 2), out=bufs[2])
        wc = wn.mul_(g_cdot)
        tail_out = (trans_in * prod_out * g_trans_out)[..., None]
        total = wc.sum(-1, keepdim=True)
        g_trans_in = (total / trans_in[..., None] + (prod_out * g_trans_out)[..., None]).squeeze(-1)
        # suffix sums over j > k, then the alpha gradient, all in place
        tail = torch.cumsum(wc, dim=-1, out=bufs[4]).neg_().add_(total).add_(tail_out)
        tail.div_(one_minus)
        g_alpha = prod_excl.mul_(g_cdot).sub_(tail)
        # d alpha / d power = alpha where alpha = exp(power) is neither clamped nor skipped
        # (skipped and non-kept entries are already 0 in alpha_k): -threshold(-a, -0.999, 0)
        # zeroes the clamped ones without a boolean mask.
        g_pow = g_alpha.mul_(F.threshold(alpha_k.neg_(), -MAX_ALPHA, 0.0, inplace=True)).neg_()
        g_pow = g_pow.view(g, ts, ts, m)
        # power = log(opac) - a dx^2/2 - c dy^2/2 - b dx dy; sums over the tile's pixels use
        # the separable structure (row / column marginals) except for the cross term.
        g_cols = g_pow.sum(1)  # [G, cols, M]
        g_rows = g_pow.sum(2)  # [G, rows, M]
        s_dx = (g_cols * dx).sum(1)
        s_dy = (g_rows * dy).sum(1)
        gy = torch.mul(g_pow, dy[:, :, None, :], out=bufs[0].view(g, ts, ts, m))
        s_dxy = (gy.sum(1) * dx).sum(1)
        ca, cb, cc = feat[..., 2], feat[..., 3], feat[..., 4]
        g_geom = torch.stack(
            [
                -(ca * s_dx + cb * s_dy),  # d power / d mean_x = -(a dx + b dy)
                -(cc * s_dy + cb * s_dx),
                -0.5 * (g_cols * dx * dx).sum(1),
                -s_dxy,
                -0.5 * (g_rows * dy * dy).sum(1),
                g_cols.sum(1),  # d power / d log opacity = 1
            ],
            dim=-1,
        )
        g_feat = torch.cat([g_geom, g_colors], dim=-1)
        return g_trans_in, None, g_feat, None, None, None


def _tile_intersections(
    means2d: Tensor, radii: Tensor, tile_size: int, tile_w: int, tile_h: int
) -> tuple[Tensor, Tensor]:
    """Tiles touched by each Gaussian's radius box, with gsplat's ``isect_tiles`` rule.

    Returns (row into ``means2d``, tile id) for every intersection, Gaussian-major.
    """
    m = means2d.detach() / tile_size
    r = radii.to(m.dtype) / tile_size
    lim = torch.tensor([tile_w, tile_h], device=m.device)
    tmin = torch.minimum(torch.floor(m - r).clamp_min(0).long(), lim)
    tmax = torch.minimum(torch.ceil(m + r).clamp_min(0).long(), lim)
    ext = tmax - tmin
    counts = ext[:, 0] * ext[:, 1]
    rows = torch.repeat_interleave(torch.arange(len(counts), device=m.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(len(rows), device=m.device) - starts[rows]
    w = ext[rows, 0]
    tiles = (tmin[rows, 1] + local // w) * tile_w + tmin[rows, 0] + local % w
    return rows, tiles


def rasterize_to_pixels(
    means2d: Tensor,
    conics: Tensor,
    colors: Tensor,
    opacities: Tensor,
    radii: Tensor,
    depths: Tensor,
    width: int,
    height: int,
    *,
    tile_size: int = 16,
    backgrounds: Tensor | None = None,
    max_elements: int = 1 << 22,
    max_chunk: int = 64,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Tile-based front-to-back alpha compositing of projected Gaussians.

    Args:
        means2d [N, 2], conics [N, 3], colors [N, D], opacities [N], radii [N, 2] (int, 0 =
        culled), depths [N] as produced by :func:`project_gaussians`.
        backgrounds: [D] colour added with the final transmittance.
        max_elements: largest pixel x Gaussian block evaluated at once; the scratch
            workspace holds 6 such blocks (96 MB in float32 at the default), reused by every
            block in forward and backward.
        max_chunk: most Gaussians per tile composited in one block; a tile whose pixels are
            all finished is dropped between blocks, so smaller wastes less work past
            saturation but costs more Python iterations.

    Returns:
        render_colors [H, W, D], render_alphas [H, W, 1], info dict (``tiles_per_gauss``,
        ``n_isects``).
    """
    device, dtype = means2d.device, means2d.dtype
    n, d = colors.shape
    ts = tile_size
    tile_w, tile_h = math.ceil(width / ts), math.ceil(height / ts)
    n_tiles, npix = tile_w * tile_h, ts * ts

    with torch.no_grad():
        vis = torch.nonzero((radii > 0).all(dim=-1)).squeeze(1)
        rows, tiles = _tile_intersections(means2d[vis], radii[vis], ts, tile_w, tile_h)
        nv = len(vis)
        tiles_per_gauss = torch.zeros(n, dtype=torch.int32, device=device)
        tiles_per_gauss[vis] = torch.bincount(rows, minlength=nv).to(torch.int32)
        # Depth order within each tile; a stable sort breaks ties by Gaussian index like
        # gsplat's radix sort of (tile | depth) keys.
        order = torch.argsort(depths.detach()[vis], stable=True)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(nv, device=device)
        key, _ = torch.sort(tiles * max(nv, 1) + rank[rows])
        isect_rank = key % max(nv, 1)  # row into the depth-sorted feature table
        tile_counts = torch.bincount(tiles, minlength=n_tiles)
        tile_start = torch.cumsum(tile_counts, 0) - tile_counts
        n_isects = len(key)

    # Per-Gaussian features in depth order, plus one inert padding row for ragged blocks
    # (log opacity -inf: alpha 0, zero gradient, no NaN).
    vis_o = vis[order]
    log_op = torch.log(opacities[vis_o].clamp_min(1e-30))
    feat = torch.cat([means2d[vis_o], conics[vis_o], log_op[:, None], colors[vis_o]], dim=1)
    pad = torch.zeros(1, feat.shape[1], dtype=dtype, device=device)
    pad[0, 5] = -math.inf
    feat = torch.cat([feat, pad], dim=0)

    lin = torch.arange(ts, dtype=dtype, device=device) + 0.5
    workspace = _Workspace(dtype, device)
    tile_ids = torch.arange(n_tiles, device=device)
    origins = torch.stack([tile_ids % tile_w, tile_ids // tile_w], dim=-1).to(dtype) * ts
    # Padding pixels of the right/bottom edge tiles start "done" so they never keep a tile
    # alive; they are cropped at the end.
    py, px = torch.meshgrid(lin.long(), lin.long(), indexing="ij")
    gx = origins[:, :1].long() + px.reshape(1, -1)
    gy = origins[:, 1:].long() + py.reshape(1, -1)
    done = (gx >= width) | (gy >= height)  # [n_tiles, P]
    trans = torch.ones(n_tiles, npix, dtype=dtype, device=device)
    accum = torch.zeros(n_tiles, npix, d, dtype=dtype, device=device)
    pos = torch.zeros(n_tiles, dtype=torch.long, device=device)

    while True:
        active = torch.nonzero((pos < tile_counts) & ~done.all(dim=1)).squeeze(1)
        if len(active) == 0:
            break
        # Tiles sorted by remaining list length and grouped so each group's depth chunk is
        # about as long as its lists (little padding) and a group fills the element budget.
        remaining, by_len = torch.sort(tile_counts[active] - pos[active], descending=True)
        active = active[by_len]
        rem_list = remaining.tolist()
        s = 0
        while s < len(active):
            chunk = min(rem_list[s], max_chunk)
            group = max(1, max_elements // (npix * chunk))
            ids, rem = active[s : s + group], remaining[s : s + group]
            j = torch.arange(chunk, device=device)
            idx = (tile_start[ids] + pos[ids])[:, None] + j
            rank_ids = torch.where(j < rem[:, None], isect_rank[idx.clamp_max(n_isects - 1)], nv)
            col, t_out, d_out = _CompositeChunk.apply(
                trans[ids], done[ids], feat[rank_ids], origins[ids], lin, workspace
            )
            accum = accum.index_add(0, ids, col)
            trans = trans.index_copy(0, ids, t_out)
            done[ids] = d_out
            pos[ids] += chunk
            s += group

    if backgrounds is not None:
        accum = accum + trans[..., None] * backgrounds.to(accum).reshape(1, 1, d)
    hp, wp = tile_h * ts, tile_w * ts

    def to_image(x: Tensor) -> Tensor:  # [n_tiles, P, C] -> [H, W, C]
        c = x.shape[-1]
        img = x.reshape(tile_h, tile_w, ts, ts, c).permute(0, 2, 1, 3, 4).reshape(hp, wp, c)
        return img[:height, :width]

    render_colors = to_image(accum)
    render_alphas = to_image(1.0 - trans[..., None])
    info = {"tiles_per_gauss": tiles_per_gauss, "n_isects": n_isects}
    return render_colors, render_alphas, info


# --------------------------------------------------------------------------- entry points


def rasterization(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmat: Tensor,
    K: Tensor,
    width: int,
    height: int,
    *,
    sh_degree: int | None = None,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    radius_clip: float = 0.0,
    backgrounds: Tensor | None = None,
    rasterize_mode: Literal["classic", "antialiased"] = "classic",
    opacity_aware_radius: bool = True,
    tile_size: int = 16,
    max_elements: int = 1 << 22,
    max_chunk: int = 64,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Render N Gaussians into one pinhole camera, like ``gsplat.rasterization`` (C = 1).

    Args:
        means [N, 3]; quats [N, 4] wxyz, any norm; scales [N, 3] positive (exp applied);
        opacities [N] in (0, 1) (sigmoid applied); colors either SH coefficients [N, K, 3]
        with ``sh_degree`` set, or post-activation features [N, D] with ``sh_degree=None``
        (D may be anything, e.g. RGB plus depth); viewmat [4, 4] world-to-camera (OpenCV);
        K [3, 3]; backgrounds [D] optional.
        opacity_aware_radius: tighter per-Gaussian box as gsplat's ``rasterization`` uses
            (same pixels, fewer tile visits); False gives the plain 3.33-sigma box.
        rasterize_mode: "antialiased" multiplies opacities by the eps2d compensation.
        max_elements, max_chunk: memory / speed knobs of :func:`rasterize_to_pixels`.

    Returns:
        render_colors [H, W, D], render_alphas [H, W, 1], meta with ``radii`` [N, 2] int32,
        ``means2d`` [N, 2] (the tensor used by the compositor: call ``retain_grad()`` on it
        for densification statistics), ``depths``, ``conics``, ``covars2d``, ``opacities``
        (effective), ``colors`` (per-Gaussian view-dependent colour), ``means_cam``,
        ``tiles_per_gauss``, ``n_isects``, ``width``, ``height``, ``tile_size``,
        ``n_cameras``.
    """
    n = means.shape[0]
    if means.shape != (n, 3) or quats.shape != (n, 4) or scales.shape != (n, 3):
        raise ValueError("means [N,3], quats [N,4], scales [N,3] expected")
    if opacities.shape != (n,):
        raise ValueError(f"opacities must be [N], got {tuple(opacities.shape)}")
    viewmat = viewmat.to(means)
    K = K.to(means)
    proj = project_gaussians(
        means,
        quats,
        scales,
        viewmat,
        K,
        width,
        height,
        opacities=opacities if opacity_aware_radius else None,
        near_plane=near_plane,
        far_plane=far_plane,
        eps2d=eps2d,
        radius_clip=radius_clip,
        calc_compensations=rasterize_mode == "antialiased",
    )
    radii = proj["radii"]
    opac = opacities * proj["compensations"] if "compensations" in proj else opacities

    if sh_degree is None:
        if colors.dim() != 2 or colors.shape[0] != n:
            raise ValueError("without sh_degree, colors must be [N, D]")
        feats = colors
    else:
        if colors.dim() != 3 or colors.shape[0] != n or colors.shape[2] != 3:
            raise ValueError("with sh_degree, colors must be SH coefficients [N, K, 3]")
        # Only visible Gaussians need their SH evaluated; the rest stay 0 (gsplat's mask).
        vis = torch.nonzero((radii > 0).all(dim=-1)).squeeze(1)
        campos = torch.linalg.inv(viewmat)[:3, 3]
        sh = spherical_harmonics(sh_degree, means[vis] - campos, colors[vis])
        rgb = torch.clamp_min(sh + 0.5, 0.0)  # +0.5 and clamp: INRIA / gsplat convention
        feats = torch.zeros(n, 3, dtype=rgb.dtype, device=rgb.device).index_copy(0, vis, rgb)

    render_colors, render_alphas, info = rasterize_to_pixels(
        proj["means2d"],
        proj["conics"],
        feats,
        opac,
        radii,
        proj["depths"],
        width,
        height,
        tile_size=tile_size,
        backgrounds=backgrounds,
        max_elements=max_elements,
        max_chunk=max_chunk,
    )
    meta: dict[str, Any] = {
        **proj,
        "opacities": opac,
        "colors": feats,
        **info,
        "width": width,
        "height": height,
        "tile_size": tile_size,
        "n_cameras": 1,
    }
    return render_colors, render_alphas, meta


def rasterization_batched(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    **kwargs: Any,
) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """Render C cameras (viewmats [C, 4, 4], Ks [C, 3, 3]) by looping :func:`rasterization`.

    Returns [C, H, W, D], [C, H, W, 1] and one meta dict per camera.
    """
    outs = [
        rasterization(means, quats, scales, opacities, colors, vm, k, width, height, **kwargs)
        for vm, k in zip(viewmats, Ks, strict=True)
    ]
    return (
        torch.stack([o[0] for o in outs]),
        torch.stack([o[1] for o in outs]),
        [o[2] for o in outs],
    )
