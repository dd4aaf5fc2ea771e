"""Registration figure of one slice: fixed / moving / warped, the fixed image with the fixed and warped moving label
contours, the deformation grid and the Jacobian determinant."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from custom.io import atomic_path  # noqa: E402
from custom.metrics import jacobian_determinant  # noqa: E402


def _slice(t, z: int) -> np.ndarray:
    return torch.as_tensor(t)[0, 0].float().cpu().numpy()[:, :, z]


def registration_figure(fixed, moving, warped, ddf, path: str | Path, title: str = "", **kwargs) -> Path:
    """PNG of :func:`figure` (same arguments), written atomically."""
    fig = figure(fixed, moving, warped, ddf, title, **kwargs)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return Path(path)


def figure(fixed, moving, warped, ddf, title: str = "", z: int | None = None, fixed_label=None, warped_label=None):
    """One slice ``z`` (default: middle) of ``(1, 1, X, Y, Z)`` images and the ``(1, 3, X, Y, Z)`` ddf.

    With ``fixed_label`` and ``warped_label`` (``(1, 1, X, Y, Z)``: the fixed label map and the moving one warped onto
    the fixed grid) a panel shows both sets of contours on the fixed image: where they part, the registration missed.
    The title sits above the panels, never on one. Returns the matplotlib figure.
    """
    f = torch.as_tensor(fixed)[0, 0].float().cpu().numpy()
    u = torch.as_tensor(ddf).float().cpu()
    z = f.shape[2] // 2 if z is None else z
    jac = np.ones(f.shape[:2], np.float32)
    if min(f.shape) > 4:
        det = jacobian_determinant(u)[0].numpy()
        zz = int(np.clip(z - 2, 0, det.shape[2] - 1))
        jac[2:-2, 2:-2] = det[:, :, zz]
    contours = fixed_label is not None and warped_label is not None
    n = 6 if contours else 5
    fig, ax = plt.subplots(1, n, figsize=(3.4 * n, 4.0))
    for a, img, name in zip(ax[:3], (fixed, moving, warped), ("fixed", "moving", "warped moving")):
        a.imshow(_slice(img, z).T, cmap="gray", origin="lower")
        a.set_title(name)
    if contours:
        a = ax[3]
        a.imshow(f[:, :, z].T, cmap="gray", origin="lower")
        for label, colour in ((fixed_label, "lime"), (warped_label, "magenta")):
            lab = _slice(label, z).round().astype(int)
            for i in np.unique(lab[lab > 0]):
                a.contour((lab == i).T.astype(float), levels=[0.5], colors=colour, linewidths=0.8, origin="lower")
        a.set_title("fixed: fixed (green) /\nwarped moving (magenta) labels", fontsize=9)
    grid_ax, jac_ax = ax[n - 2], ax[n - 1]
    step = max(1, f.shape[0] // 24)
    gx, gy = np.meshgrid(np.arange(f.shape[0]), np.arange(f.shape[1]), indexing="ij")
    px, py = gx + u[0, 0, :, :, z].numpy(), gy + u[0, 1, :, :, z].numpy()
    for i in range(0, f.shape[0], step):
        grid_ax.plot(px[i, :], py[i, :], "k-", lw=0.5)
    for j in range(0, f.shape[1], step):
        grid_ax.plot(px[:, j], py[:, j], "k-", lw=0.5)
    grid_ax.set_aspect("equal")
    grid_ax.set_title("deformation grid")
    im = jac_ax.imshow(jac.T, cmap="RdBu_r", vmin=0, vmax=2, origin="lower")
    jac_ax.set_title("det J")
    fig.colorbar(im, ax=jac_ax, fraction=0.046)
    for a in ax:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.92))  # room for the title above the panels' own titles
    return fig
