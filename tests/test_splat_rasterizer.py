"""CPU 3DGS rasterizer (core/splat/rasterize.py) against gsplat's conventions.

The reference is gsplat's pure-PyTorch implementation (``gsplat/cuda/_torch_impl.py``) for
projection, tile intersection and SH; its ``_rasterize_to_pixels`` needs CUDA and nerfacc,
so full renders are compared with a literal Python port of gsplat's CUDA forward kernel
(RasterizeToPixels3DGSFwd.cu) fed by gsplat's own projection / tile lists.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from core.splat.rasterize import (
    eval_sh_bases,
    project_gaussians,
    quat_scale_to_covar,
    rasterization,
    rasterization_batched,
    spherical_harmonics,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Small tensors: intra-op threads only add overhead (and stall badly on a busy box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ref() -> ModuleType:
    """gsplat's pure-PyTorch reference module, imported without building CUDA kernels."""
    spec = importlib.util.find_spec("gsplat")
    if spec is None or spec.origin is None:
        pytest.skip("gsplat is not installed (pip install 'gsplat>=1.5,<1.6'): no reference")
    try:
        from gsplat.cuda import _torch_impl  # lazy: no CUDA build happens at import

        return _torch_impl
    except Exception:
        # The package __init__ failed (optional deps, CUDA probing): the reference file
        # itself only needs torch, so load it alone.
        path = Path(spec.origin).parent / "cuda" / "_torch_impl.py"
        mspec = importlib.util.spec_from_file_location("_gsplat_torch_impl_ref", path)
        assert mspec is not None and mspec.loader is not None
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
        return mod


def _rot(axis: list[float], angle: float, dtype: torch.dtype) -> torch.Tensor:
    a = torch.tensor(axis, dtype=dtype)
    a = a / a.norm()
    k = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=dtype)
    return torch.eye(3, dtype=dtype) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _camera(dtype: torch.dtype, w: int, h: int, f: float = 1.0) -> tuple[torch.Tensor, ...]:
    """A rotated, translated world-to-camera matrix, its camera centre and intrinsics."""
    rot = _rot([0.3, -1.0, 0.2], 0.4, dtype)
    centre = torch.tensor([0.5, -0.3, -4.0], dtype=dtype)
    viewmat = torch.eye(4, dtype=dtype)
    viewmat[:3, :3] = rot
    viewmat[:3, 3] = -rot @ centre
    K = torch.tensor(
        [[f * 1.1 * w, 0, 0.47 * w], [0, f * 1.0 * w, 0.53 * h], [0, 0, 1]], dtype=dtype
    )
    return viewmat, centre, K


def _scene(n: int, dtype: torch.dtype, seed: int, viewmat: torch.Tensor) -> dict:
    """Gaussians mostly in front of the camera (some behind / off-screen) plus a stack of
    nearly opaque ones so that pixels hit gsplat's early-termination rule."""
    g = torch.Generator().manual_seed(seed)
    cam = torch.randn(n, 3, generator=g, dtype=dtype) * torch.tensor([1.2, 1.0, 1.5], dtype=dtype)
    cam[:, 2] += 4.0
    cam[: n // 8, 2] = -torch.rand(n // 8, generator=g, dtype=dtype)  # behind the camera
    stack = slice(n // 8, n // 8 + 6)
    cam[stack] = torch.tensor([0.1, 0.05, 3.0], dtype=dtype) + 0.02 * torch.randn(
        6, 3, generator=g, dtype=dtype
    )
    rot, t = viewmat[:3, :3], viewmat[:3, 3]
    opac = torch.rand(n, generator=g, dtype=dtype) * 0.9 + 0.05
    opac[stack] = 0.998
    return {
        "means": (cam - t) @ rot,  # camera -> world
        "quats": torch.randn(n, 4, generator=g, dtype=dtype),
        "scales": torch.rand(n, 3, generator=g, dtype=dtype) * 0.25 + 0.02,
        "opacities": opac,
        "rgb": torch.rand(n, 3, generator=g, dtype=dtype),
        "sh": torch.randn(n, 9, 3, generator=g, dtype=dtype) * 0.4,
    }


def _reference_render(ref, s, colors, viewmat, K, w, h, bg=None, tile=16):
    """gsplat's torch projection + tile lists, then its CUDA forward loop ported literally."""
    covars, _ = ref._quat_scale_to_covar_preci(s["quats"], s["scales"], True, False)
    radii, m2d, depths, conics, _ = ref._fully_fused_projection(
        s["means"], covars, viewmat[None], K[None], w, h, eps2d=0.3
    )
    tw, th = math.ceil(w / tile), math.ceil(h / tile)
    tiles_per_gauss, isect_ids, flat = ref._isect_tiles(m2d, radii, depths, tile, tw, th)
    offsets = [*ref._isect_offset_encode(isect_ids, 1, tw, th).flatten().tolist(), len(flat)]
    m2d, conics = m2d[0].double().numpy(), conics[0].double().numpy()
    op, col = s["opacities"].double().numpy(), colors.double().numpy()
    img = np.zeros((h, w, col.shape[1]))
    alpha_img = np.zeros((h, w, 1))
    terminated = 0
    for i in range(h):
        for j in range(w):
            tid = (i // tile) * tw + j // tile
            px, py, T = j + 0.5, i + 0.5, 1.0
            out = np.zeros(col.shape[1])
            for k in range(offsets[tid], offsets[tid + 1]):
                gi = int(flat[k])
                dx, dy = m2d[gi, 0] - px, m2d[gi, 1] - py
                c = conics[gi]
                sigma = 0.5 * (c[0] * dx * dx + c[2] * dy * dy) + c[1] * dx * dy
                alpha = min(0.999, op[gi] * math.exp(-sigma))
                if sigma < 0 or alpha < 1.0 / 255.0:
                    continue
                next_t = T * (1.0 - alpha)
                if next_t <= 1e-4:
                    terminated += 1
                    break
                out += col[gi] * alpha * T
                T = next_t
            img[i, j] = out + (T * bg if bg is not None else 0.0)
            alpha_img[i, j] = 1.0 - T
    return img, alpha_img, radii[0], terminated, tiles_per_gauss[0]


# ------------------------------------------------------------------ projection / SH


def test_covariance_matches_gsplat(ref):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(50, 4, generator=g, dtype=torch.float64)
    s = torch.rand(50, 3, generator=g, dtype=torch.float64) + 0.01
    expected, _ = ref._quat_scale_to_covar_preci(q, s, True, False)
    torch.testing.assert_close(quat_scale_to_covar(q, s), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projection_matches_gsplat(ref, dtype):
    w, h = 64, 48
    viewmat, _, K = _camera(dtype, w, h)
    s = _scene(400, dtype, 1, viewmat)
    covars, _ = ref._quat_scale_to_covar_preci(s["quats"], s["scales"], True, False)
    radii, m2d, depths, conics, comp = ref._fully_fused_projection(
        s["means"], covars, viewmat[None], K[None], w, h, eps2d=0.3, calc_compensations=True
    )
    out = project_gaussians(
        s["means"], s["quats"], s["scales"], viewmat, K, w, h, eps2d=0.3, calc_compensations=True
    )
    radii = radii[0]
    vis = (radii > 0).all(-1)
    assert 100 < int(vis.sum()) < 400 - 50  # both visible and culled Gaussians are exercised
    if dtype == torch.float64:
        assert torch.equal(out["radii"], radii)
        tol = {"rtol": 1e-10, "atol": 1e-10}
    else:  # ceil() may flip on float32 rounding at an integer boundary
        assert (out["radii"] - radii).abs().max() <= 1
        assert (out["radii"] != radii).any(-1).sum() <= 2
        tol = {"rtol": 1e-4, "atol": 1e-3}
    torch.testing.assert_close(out["means2d"][vis], m2d[0][vis], **tol)
    torch.testing.assert_close(out["depths"][vis], depths[0][vis], **tol)
    torch.testing.assert_close(out["conics"][vis], conics[0][vis], **tol)
    torch.testing.assert_close(out["compensations"][vis], comp[0][vis], **tol)


def test_opacity_aware_radius_follows_gsplat_cuda_rule():
    w, h = 64, 48
    viewmat, _, K = _camera(torch.float64, w, h)
    s = _scene(300, torch.float64, 2, viewmat)
    s["opacities"][-20:] = 0.003  # below 1/255: culled by gsplat's rasterization()
    plain = project_gaussians(s["means"], s["quats"], s["scales"], viewmat, K, w, h)
    tight = project_gaussians(
        s["means"], s["quats"], s["scales"], viewmat, K, w, h, opacities=s["opacities"]
    )
    extend = torch.clamp(torch.sqrt(2 * torch.log(s["opacities"] * 255)), max=3.33)
    var = torch.stack([tight["covars2d"][:, 0, 0], tight["covars2d"][:, 1, 1]], -1)
    expected = torch.ceil(extend[:, None] * var.sqrt()).int()
    keep = (tight["radii"] > 0).all(-1)
    assert keep.sum() > 100
    assert torch.equal(tight["radii"][keep], expected[keep])
    assert not keep[-20:].any()
    assert ((plain["radii"] > 0).all(-1) | ~keep).all()  # tight box culls a subset
    assert (tight["radii"] <= plain["radii"]).all()


def test_radius_clip_culls_small_gaussians():
    w, h = 64, 48
    viewmat, _, K = _camera(torch.float64, w, h)
    s = _scene(200, torch.float64, 3, viewmat)
    base = project_gaussians(s["means"], s["quats"], s["scales"], viewmat, K, w, h)["radii"]
    clip = project_gaussians(
        s["means"], s["quats"], s["scales"], viewmat, K, w, h, radius_clip=4.0
    )["radii"]
    small = (base <= 4).all(-1) & (base > 0).all(-1)
    assert small.any()
    assert (clip[small] == 0).all()
    assert torch.equal(clip[~small], base[~small])


@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4])
def test_spherical_harmonics_match_gsplat(ref, degree):
    g = torch.Generator().manual_seed(degree)
    dirs = torch.randn(200, 3, generator=g, dtype=torch.float64) * 3.0  # not normalised
    coeffs = torch.randn(200, 25, 3, generator=g, dtype=torch.float64)
    expected = ref._spherical_harmonics(degree, dirs, coeffs)
    torch.testing.assert_close(
        spherical_harmonics(degree, dirs, coeffs), expected, rtol=1e-12, atol=1e-12
    )
    bases = eval_sh_bases((degree + 1) ** 2, torch.nn.functional.normalize(dirs, dim=-1))
    torch.testing.assert_close(
        bases,
        ref._eval_sh_bases_fast((degree + 1) ** 2, torch.nn.functional.normalize(dirs, dim=-1)),
    )


# ------------------------------------------------------------------ full renders


@pytest.mark.parametrize(
    ("color_mode", "background", "max_elements", "max_chunk"),
    [
        ("rgb", False, 1 << 22, 64),
        ("sh", True, 1 << 22, 64),
        ("rgb", True, 4 * 256, 3),  # many small depth chunks: T / termination carried over
    ],
)
def test_render_matches_gsplat_kernel(ref, color_mode, background, max_elements, max_chunk):
    w, h = 45, 37  # not multiples of the 16 px tile
    dt = torch.float64
    viewmat, centre, K = _camera(dt, w, h, f=0.8)
    s = _scene(90, dt, 4, viewmat)
    bg = torch.tensor([0.2, 0.3, 0.4], dtype=dt) if background else None
    if color_mode == "sh":
        dirs = s["means"] - centre
        ref_colors = torch.clamp_min(ref._spherical_harmonics(2, dirs, s["sh"]) + 0.5, 0.0)
        colors, sh_degree = s["sh"], 2
    else:
        ref_colors, colors, sh_degree = s["rgb"], s["rgb"], None
    exp_img, exp_alpha, exp_radii, terminated, exp_tiles = _reference_render(
        ref, s, ref_colors, viewmat, K, w, h, bg=None if bg is None else bg.numpy()
    )
    assert terminated > 0, "scene must exercise gsplat's transmittance termination"
    img, alpha, meta = rasterization(
        s["means"],
        s["quats"],
        s["scales"],
        s["opacities"],
        colors,
        viewmat,
        K,
        w,
        h,
        sh_degree=sh_degree,
        backgrounds=bg,
        opacity_aware_radius=False,
        max_elements=max_elements,
        max_chunk=max_chunk,
    )
    assert img.shape == (h, w, 3) and alpha.shape == (h, w, 1)
    assert torch.equal(meta["radii"], exp_radii)
    assert torch.equal(meta["tiles_per_gauss"], exp_tiles)  # same tile intersection rule
    assert meta["n_isects"] == int(exp_tiles.sum())
    np.testing.assert_allclose(img.numpy(), exp_img, atol=1e-10)
    np.testing.assert_allclose(alpha.numpy(), exp_alpha, atol=1e-10)
    assert exp_alpha.max() > 0.999 and exp_alpha.min() < 0.5  # not a trivial image


def test_render_float32_and_tight_radius_match_reference(ref):
    w, h = 45, 37
    viewmat, _, K = _camera(torch.float64, w, h, f=0.8)
    s = _scene(90, torch.float64, 5, viewmat)
    exp_img, exp_alpha, _, _, _ = _reference_render(ref, s, s["rgb"], viewmat, K, w, h)
    s32 = {k: v.float() for k, v in s.items()}
    # opacity-aware boxes (gsplat's rasterization default) only drop alpha < 1/255 work
    img, alpha, meta = rasterization(
        s32["means"],
        s32["quats"],
        s32["scales"],
        s32["opacities"],
        s32["rgb"],
        viewmat.float(),
        K.float(),
        w,
        h,
    )
    _, _, meta_plain = rasterization(
        s32["means"],
        s32["quats"],
        s32["scales"],
        s32["opacities"],
        s32["rgb"],
        viewmat.float(),
        K.float(),
        w,
        h,
        opacity_aware_radius=False,
    )
    assert meta["n_isects"] < meta_plain["n_isects"]
    np.testing.assert_allclose(img.numpy(), exp_img, atol=2e-5)
    np.testing.assert_allclose(alpha.numpy(), exp_alpha, atol=2e-5)


def test_single_gaussian_lands_where_K_R_t_predicts():
    w, h = 64, 48
    dt = torch.float64
    viewmat, _, K = _camera(dt, w, h)
    p_cam = torch.tensor([0.31, -0.22, 3.7], dtype=dt)  # x right, y up (negative = up)
    p_world = viewmat[:3, :3].T @ (p_cam - viewmat[:3, 3])
    uvw = K @ (viewmat[:3, :3] @ p_world + viewmat[:3, 3])
    u, v = (uvw[:2] / uvw[2]).tolist()
    assert v < 0.53 * h  # y < 0 in camera space is above the principal point (y down)
    img, alpha, meta = rasterization(
        p_world[None],
        torch.tensor([[1.0, 0, 0, 0]], dtype=dt),
        torch.full((1, 3), 0.08, dtype=dt),
        torch.tensor([0.9], dtype=dt),
        torch.ones(1, 3, dtype=dt),
        viewmat,
        K,
        w,
        h,
    )
    a = alpha[..., 0]
    row, col = divmod(int(a.argmax()), w)
    assert (row, col) == (math.floor(v), math.floor(u))
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=dt) + 0.5, torch.arange(w, dtype=dt) + 0.5, indexing="ij"
    )
    cu, cv = float((a * xs).sum() / a.sum()), float((a * ys).sum() / a.sum())
    assert abs(cu - u) < 0.05 and abs(cv - v) < 0.05
    torch.testing.assert_close(meta["means2d"][0], torch.tensor([u, v], dtype=dt))
    torch.testing.assert_close(img[..., 0], a)  # white Gaussian, no background


def test_culled_gaussians_leave_only_background():
    w, h = 32, 32
    dt = torch.float32
    K = torch.tensor([[32.0, 0, 16], [0, 32, 16], [0, 0, 1]])
    means = torch.tensor([[0.0, 0, -1.0], [0.0, 0, 0.005], [50.0, 0, 2.0], [0, -40.0, 2.0]])
    bg = torch.tensor([0.1, 0.2, 0.3])
    img, alpha, meta = rasterization(
        means,
        torch.tensor([[1.0, 0, 0, 0]]).repeat(4, 1),
        torch.full((4, 3), 0.1),
        torch.full((4,), 0.9),
        torch.ones(4, 3, dtype=dt),
        torch.eye(4),
        K,
        w,
        h,
        backgrounds=bg,
    )
    assert (meta["radii"] == 0).all()
    assert meta["n_isects"] == 0
    assert torch.equal(alpha, torch.zeros(h, w, 1))
    assert torch.equal(img, bg.expand(h, w, 3))


# ------------------------------------------------------------------ gradients


@pytest.mark.parametrize("opaque", [False, True])
def test_gradcheck_against_finite_differences(opaque):
    """Analytic (custom backward + autograd) vs numerical gradients, float64, all inputs;
    ``opaque`` adds a Gaussian whose alpha is clamped at 0.999 near its centre."""
    dt = torch.float64
    w, h = 20, 18
    g = torch.Generator().manual_seed(7)
    n = 6
    means = torch.randn(n, 3, generator=g, dtype=dt) * 0.3 + torch.tensor([0, 0, 3.0], dtype=dt)
    quats = torch.randn(n, 4, generator=g, dtype=dt)
    log_scales = (torch.rand(n, 3, generator=g, dtype=dt) * 0.2 + 0.1).log()
    logit_op = torch.logit(torch.rand(n, generator=g, dtype=dt) * 0.7 + 0.25)
    if opaque:
        logit_op[0] = 8.5  # sigmoid = 0.9998, projected exactly onto pixel centre (10.5, 8.5)
        means[0] = torch.tensor([0.0625, -0.0625, 2.5], dtype=dt)
    sh = torch.randn(n, 4, 3, generator=g, dtype=dt) * 0.3
    K = torch.tensor([[20.0, 0, 10], [0, 20, 9], [0, 0, 1]], dtype=dt)
    wc, wa = (
        torch.randn(h, w, 3, generator=g, dtype=dt),
        torch.randn(h, w, 1, generator=g, dtype=dt),
    )
    bg = torch.tensor([0.2, 0.3, 0.4], dtype=dt)

    def loss(m, q, ls, lo, c):
        img, alpha, _ = rasterization(
            m,
            q,
            ls.exp(),
            torch.sigmoid(lo),
            c,
            torch.eye(4, dtype=dt),
            K,
            w,
            h,
            sh_degree=1,
            backgrounds=bg,
            max_elements=256 * 4,
            max_chunk=2,
        )
        return (img * wc).sum() + (alpha * wa).sum()

    if opaque:
        *_, meta = rasterization(
            means, quats, log_scales.exp(), torch.sigmoid(logit_op), sh, torch.eye(4, dtype=dt),
            K, w, h, sh_degree=1,
        )  # fmt: skip
        assert torch.allclose(meta["means2d"][0], torch.tensor([10.5, 8.5], dtype=dt))
    inputs = tuple(x.requires_grad_() for x in (means, quats, log_scales, logit_op, sh))
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradients_reach_every_parameter_and_means2d():
    w, h = 40, 32
    viewmat, _, K = _camera(torch.float32, w, h)
    s = _scene(60, torch.float32, 8, viewmat)
    params = {
        "means": s["means"].clone().requires_grad_(),
        "quats": s["quats"].clone().requires_grad_(),
        "log_scales": s["scales"].log().requires_grad_(),
        "logit_op": torch.logit(s["opacities"]).requires_grad_(),
        "sh": s["sh"].clone().requires_grad_(),
    }
    img, _, meta = rasterization(
        params["means"],
        params["quats"],
        params["log_scales"].exp(),
        torch.sigmoid(params["logit_op"]),
        params["sh"],
        viewmat,
        K,
        w,
        h,
        sh_degree=2,
    )
    meta["means2d"].retain_grad()  # what densification strategies read
    img.mean().backward()
    vis = (meta["radii"] > 0).all(-1)
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad[vis].abs().sum() > 0, name
        assert (p.grad[~vis] == 0).all(), name  # culled Gaussians get exactly nothing
    assert meta["means2d"].grad[vis].abs().sum() > 0


def test_optimisation_recovers_target_render():
    """A few hundred Adam steps on colours and positions reduce the L1 loss to a target
    render (same camera) substantially."""
    w, h = 48, 40
    viewmat, _, K = _camera(torch.float32, w, h)
    s = _scene(50, torch.float32, 9, viewmat)
    s["opacities"] = s["opacities"].clamp(max=0.8)
    with torch.no_grad():
        target, _, _ = rasterization(
            s["means"], s["quats"], s["scales"], s["opacities"], s["rgb"], viewmat, K, w, h
        )
    g = torch.Generator().manual_seed(10)
    means = (s["means"] + 0.08 * torch.randn(s["means"].shape, generator=g)).requires_grad_()
    color_logits = torch.zeros(50, 3, requires_grad=True)  # grey start
    opt = torch.optim.Adam(
        [{"params": [means], "lr": 0.005}, {"params": [color_logits], "lr": 0.05}]
    )
    losses = []
    for _ in range(250):
        img, _, _ = rasterization(
            means,
            s["quats"],
            s["scales"],
            s["opacities"],
            torch.sigmoid(color_logits),
            viewmat,
            K,
            w,
            h,
        )
        loss = (img - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.02
    assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])
    print(f"L1 {losses[0]:.4f} -> {losses[-1]:.4f}")


def test_empty_scene_and_batched_helper():
    K = torch.tensor([[32.0, 0, 16], [0, 32, 16], [0, 0, 1]])
    img, alpha, meta = rasterization(
        torch.zeros(0, 3),
        torch.zeros(0, 4),
        torch.zeros(0, 3),
        torch.zeros(0),
        torch.zeros(0, 3),
        torch.eye(4),
        K,
        20,
        10,
    )
    assert img.shape == (10, 20, 3) and (img == 0).all() and (alpha == 0).all()
    assert meta["n_isects"] == 0

    viewmat, _, K = _camera(torch.float32, 40, 30)
    s = _scene(40, torch.float32, 11, viewmat)
    viewmats = torch.stack([viewmat, torch.eye(4)])
    args = (s["means"], s["quats"], s["scales"], s["opacities"], s["rgb"])
    imgs, alphas, metas = rasterization_batched(*args, viewmats, torch.stack([K, K]), 40, 30)
    assert imgs.shape == (2, 30, 40, 3) and alphas.shape == (2, 30, 40, 1) and len(metas) == 2
    for c in range(2):
        single, _, _ = rasterization(*args, viewmats[c], K, 40, 30)
        torch.testing.assert_close(imgs[c], single)


def test_antialiased_mode_scales_opacity_by_gsplat_compensation(ref):
    w, h = 40, 30
    dt = torch.float64
    viewmat, _, K = _camera(dt, w, h, f=0.8)
    s = _scene(60, dt, 12, viewmat)
    s["scales"] = s["scales"] * 0.2  # small footprints, where eps2d matters
    covars, _ = ref._quat_scale_to_covar_preci(s["quats"], s["scales"], True, False)
    *_, comp = ref._fully_fused_projection(
        s["means"], covars, viewmat[None], K[None], w, h, eps2d=0.3, calc_compensations=True
    )
    assert comp[0].min() < 0.5  # compensation is far from 1 for some Gaussians
    exp_img, exp_alpha, *_ = _reference_render(
        ref, {**s, "opacities": s["opacities"] * comp[0]}, s["rgb"], viewmat, K, w, h
    )
    img, alpha, _ = rasterization(
        s["means"], s["quats"], s["scales"], s["opacities"], s["rgb"], viewmat, K, w, h,
        rasterize_mode="antialiased", opacity_aware_radius=False,
    )  # fmt: skip
    np.testing.assert_allclose(img.numpy(), exp_img, atol=1e-10)
    np.testing.assert_allclose(alpha.numpy(), exp_alpha, atol=1e-10)
