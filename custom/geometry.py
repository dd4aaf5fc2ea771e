"""Physical space: affines, world-space displacements, and displacements moved between grids.

A displacement ``ddf`` ``(3, *S)`` on a grid with affine ``A`` (voxel -> world mm) maps fixed voxel ``x`` to the moving
point at voxel ``x + ddf(x)`` of the *same* grid, i.e. to world ``A (x + ddf(x))``; its world (mm) vector is
``A[:3, :3] ddf(x)``. Registration may run on a preprocessed grid (reoriented, resampled, cropped); the files users get
are on the fixed image's *original* grid: :func:`displacement_to_grid` carries a field over, in the Learn2Reg sense
``disp(i) = (moving voxel coordinate of the point fixed voxel i maps to) - i``, so
``map_coordinates(moving_array, identity + disp)`` warps the original moving file onto the original fixed grid
(the usual fixed-grid voxel displacement when both images share a grid).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def as_affine(affine) -> np.ndarray:
    """A ``(4, 4)`` float64 numpy affine from a tensor/array (a batched ``(1, 4, 4)`` one is squeezed)."""
    a = np.asarray(torch.as_tensor(affine).detach().cpu().double().numpy() if torch.is_tensor(affine) else affine)
    a = a[0] if a.ndim == 3 else a
    if a.shape != (4, 4):
        raise ValueError(f"expected a 4x4 affine, got shape {a.shape}")
    return a.astype(np.float64)


def voxel_spacing(affine) -> np.ndarray:
    """Voxel size in mm per array axis (column norms of the affine's linear part)."""
    return np.linalg.norm(as_affine(affine)[:3, :3], axis=0)


# thick-slice data (cine MR: 1.8 x 1.8 x 10 mm) registers in-plane by default from this spacing ratio on
THICK_SLICE_RATIO = 2.5


def through_plane_axis(spacing, ratio: float = 2.0) -> int | None:
    """The slice axis of thick-slice data (spacing over ``ratio`` times every other axis's), else ``None``."""
    sp = np.asarray(spacing, dtype=float)
    k = int(np.argmax(sp))
    others = np.delete(sp, k)
    return k if others.size and sp[k] > ratio * others.max() else None


def in_plane_components(in_plane, spacing, name: str = "the fixed image") -> tuple[tuple[int, ...], str | None]:
    """Displacement components to hold at 0 for ``in_plane`` ("auto", True or False) on a grid of ``spacing`` (mm).

    "auto": the slice axis where one axis' spacing is at least :data:`THICK_SLICE_RATIO` times every other's (thick-
    slice cine MR, whose through-plane motion the slices cannot resolve), else none. True: the slice axis (over twice
    the others' spacing), refused on data that has none. False: none. Returns ``(components, message)``; the message
    (for one log line) says what "auto" chose, ``None`` otherwise.
    """
    from custom.flags import auto_or_bool
    from custom.validation import InputError

    sp = np.round(np.asarray(spacing, dtype=float), 3).tolist()
    in_plane = auto_or_bool(in_plane, "in_plane")
    if in_plane == "auto":
        axis = through_plane_axis(spacing, ratio=THICK_SLICE_RATIO * (1 - 1e-6))
        if axis is None:
            return (), None
        return (axis,), (
            f"thick-slice data ({name}: spacing {sp} mm): the through-plane displacement (axis {axis}) is held at 0; "
            "pass --in_plane false to register it"
        )
    if not in_plane:
        return (), None
    axis = through_plane_axis(spacing)
    if axis is None:
        raise InputError(
            f"{name} is not thick-slice data (spacing {sp} mm: no axis with over twice the others' spacing); "
            "drop --in_plane or pass --in_plane false"
        )
    return (axis,), None


def world_box(affine, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) world corners (mm) of a grid's voxel centres."""
    a = as_affine(affine)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    world = a[:3, :3] @ corners + a[:3, 3:4]
    return world.min(1), world.max(1)


def overlap_fraction(fixed_affine, fixed_shape, moving_affine, moving_shape) -> float:
    """Fraction of the fixed grid's world box covered by the moving grid's world box (0 = disjoint)."""
    (f0, f1), (m0, m1) = world_box(fixed_affine, fixed_shape), world_box(moving_affine, moving_shape)
    inter = np.clip(np.minimum(f1, m1) - np.maximum(f0, m0), 0, None)
    size = np.maximum(f1 - f0, 1e-6)
    return float(np.prod(np.where(f1 - f0 > 1e-6, inter / size, (inter >= 0).astype(float))))


def same_grid(affine_a, shape_a, affine_b, shape_b, atol: float = 1e-3) -> bool:
    """Whether two grids have the same shape and affine (within ``atol`` mm)."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(as_affine(affine_a), as_affine(affine_b), atol=atol)


def _sample(field: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Samples ``(C, N)`` of ``field`` ``(C, X, Y, Z)`` at voxel coordinates ``coords`` ``(3, N)`` (border clamp)."""
    shape = field.shape[1:]
    norm = torch.stack([coords[d] * 2 / max(shape[d] - 1, 1) - 1 for d in range(3)], -1).flip(-1)
    out = F.grid_sample(field[None], norm.view(1, -1, 1, 1, 3), mode=mode, padding_mode="border", align_corners=True)
    return out.view(field.shape[0], -1)


def _apply(affine: np.ndarray, points: torch.Tensor) -> torch.Tensor:
    """A ``(4, 4)`` affine applied to points ``(3, N)`` (float64)."""
    a = torch.as_tensor(affine, dtype=torch.float64, device=points.device)
    return a[:3, :3] @ points.double() + a[:3, 3:4]


def _moved(ddf: torch.Tensor, src: np.ndarray, world: torch.Tensor) -> torch.Tensor:
    """World points ``(3, N)`` moved by ``ddf`` ``(3, *S)`` of the grid with affine ``src`` (linear, border clamp)."""
    lin = torch.as_tensor(src[:3, :3], dtype=torch.float64, device=world.device)
    return world + lin @ _sample(ddf.float(), _apply(np.linalg.inv(src), world).float()).double()


def _grid_points(shape: Sequence[int], device, flat: torch.Tensor | None = None) -> torch.Tensor:
    """Voxel indices ``(3, N)`` of a grid (all of them, or the flat indices ``flat``), float64."""
    shape = tuple(int(n) for n in shape)
    flat = torch.arange(int(np.prod(shape)), device=device) if flat is None else flat
    return torch.stack(torch.unravel_index(flat, shape)).double()


def labels_to_grid(label: torch.Tensor, src_affine, dst_affine, dst_shape: Sequence[int]) -> torch.Tensor:
    """A label map ``(*S)`` on a grid with ``src_affine`` resampled (nearest, through world space) onto another grid
    ``(*dst_shape)`` (e.g. back onto the fixed image's original grid)."""
    label = label.float()
    if same_grid(src_affine, label.shape, dst_affine, dst_shape, atol=1e-6):
        return label.clone()
    to_src = np.linalg.inv(as_affine(src_affine)) @ as_affine(dst_affine)
    coords = _apply(to_src, _grid_points(dst_shape, label.device)).float()
    return _sample(label[None], coords, "nearest").view(tuple(int(n) for n in dst_shape))


def displacement_to_grid(
    ddf: torch.Tensor,
    src_affine,
    dst_affine,
    dst_shape: Sequence[int],
    moving_affine=None,
    chunk: int = 2**21,
) -> torch.Tensor:
    """Carry a fixed-grid displacement from the registration grid to another grid of the fixed image.

    Args:
        ddf: ``(3, *S)`` voxels of the source grid (registration grid, affine ``src_affine``).
        dst_affine, dst_shape: the destination grid (e.g. the fixed image's original grid).
        moving_affine: the affine of the moving image the result indexes (default ``dst_affine``, as in Learn2Reg
            where fixed and moving share a grid).
        chunk: voxels processed at once (bounds memory).

    Returns:
        ``(3, *dst_shape)`` float32: moving voxel coordinate of each destination voxel's image point, minus its index.
    """
    src, dst = as_affine(src_affine), as_affine(dst_affine)
    mov_inv = np.linalg.inv(dst if moving_affine is None else as_affine(moving_affine))
    ddf = ddf.float()
    if same_grid(src, ddf.shape[1:], dst, dst_shape, atol=1e-6) and np.allclose(mov_inv, np.linalg.inv(dst), atol=1e-6):
        return ddf.clone()
    n_total = int(np.prod(dst_shape))
    out = torch.empty((3, n_total), dtype=torch.float32, device=ddf.device)
    for start in range(0, n_total, chunk):
        idx = _grid_points(dst_shape, ddf.device, torch.arange(start, min(start + chunk, n_total), device=ddf.device))
        out[:, start : start + idx.shape[1]] = (_apply(mov_inv, _moved(ddf, src, _apply(dst, idx))) - idx).float()
    return out.view((3,) + tuple(int(s) for s in dst_shape))


def map_points(ddf: torch.Tensor, src_affine, points, points_affine) -> torch.Tensor:
    """World positions (mm) ``(K, 3)`` that points (voxel coordinates ``(K, 3)`` of a grid with ``points_affine``) map
    to under ``ddf`` ``(3, *S)`` on the source grid (linear sampling, border clamp)."""
    pts = torch.as_tensor(points, dtype=torch.float64, device=ddf.device).T
    return _moved(ddf, as_affine(src_affine), _apply(as_affine(points_affine), pts)).T


def tre_world(ddf: torch.Tensor, src_affine, fixed_points, fixed_affine, moving_points, moving_affine) -> torch.Tensor:
    """Target registration error in mm per keypoint ``(K,)``, in world space.

    The fixed keypoints (voxel coordinates of the fixed file, ``fixed_affine``) are mapped by ``ddf`` (on the
    registration grid ``src_affine``) and compared with the moving keypoints (voxel coordinates of the moving file,
    ``moving_affine``). With one shared diagonal grid this is Learn2Reg's TRE.
    """
    moved = map_points(ddf, src_affine, fixed_points, fixed_affine)
    mp = torch.as_tensor(moving_points, dtype=torch.float64, device=moved.device).T
    return torch.linalg.norm(moved - _apply(as_affine(moving_affine), mp).T, dim=1).float()


def warp_volume(volume: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``volume`` ``(*S_m)`` sampled at ``identity + disp`` (``disp`` ``(3, *S_f)``, voxel coordinates of the volume)
    -> ``(*S_f)``: ``map_coordinates(volume, identity + disp)`` with the border clamped. ``mode``: "bilinear" (images)
    or "nearest" (label maps)."""
    shape_f, shape_m = disp.shape[1:], volume.shape
    idx = torch.stack(
        torch.meshgrid(*[torch.arange(n, device=disp.device, dtype=torch.float32) for n in shape_f], indexing="ij")
    )
    coords = (idx + disp.float()).reshape(3, -1)
    norm = torch.stack([coords[d] * 2 / max(shape_m[d] - 1, 1) - 1 for d in range(3)], -1).flip(-1)
    out = F.grid_sample(
        volume.float()[None, None], norm.view(1, -1, 1, 1, 3), mode=mode, padding_mode="border", align_corners=True
    )
    return out.view(tuple(shape_f))


def original_geometry(x) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """(current affine, original affine, original spatial shape) of a loaded ``MetaTensor`` ``(C, *S)``."""
    meta = getattr(x, "meta", None) or {}
    current = as_affine(x.affine) if getattr(x, "affine", None) is not None else np.eye(4)
    original = as_affine(meta["original_affine"]) if "original_affine" in meta else current
    shape = meta.get("spatial_shape")
    shape = tuple(int(s) for s in np.asarray(torch.as_tensor(shape).cpu()).reshape(-1)) if shape is not None else None
    return current, original, shape or tuple(x.shape[1:])
