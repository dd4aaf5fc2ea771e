"""Registration figure: fixed / moving / warped / deformation grid / Jacobian determinant (one axial slice)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from custom.io import atomic_path  # noqa: E402
from custom.metrics import jacobian_determinant  # noqa: E402


def registration_figure(fixed, moving, warped, ddf, path: str | Path, title: str = "", z: int | None = None) -> Path:
    """PNG of one slice ``z`` (default: middle) of ``(1, 1, X, Y, Z)`` images and the ``(1, 3, X, Y, Z)`` ddf."""
    f, m, w = (torch.as_tensor(t)[0, 0].float().cpu().numpy() for t in (fixed, moving, warped))
    u = torch.as_tensor(ddf).float().cpu()
    z = f.shape[2] // 2 if z is None else z
    jac = np.ones(f.shape[:2], np.float32)
    if min(f.shape) > 4:
        det = jacobian_determinant(u)[0].numpy()
        zz = int(np.clip(z - 2, 0, det.shape[2] - 1))
        jac[2:-2, 2:-2] = det[:, :, zz]
    fig, ax = plt.subplots(1, 5, figsize=(17, 3.8))
    for a, img, name in zip(ax[:3], (f, m, w), ("fixed", "moving", "warped moving")):
        a.imshow(img[:, :, z].T, cmap="gray", origin="lower")
        a.set_title(name)
    step = max(1, f.shape[0] // 24)
    gx, gy = np.meshgrid(np.arange(f.shape[0]), np.arange(f.shape[1]), indexing="ij")
    px, py = gx + u[0, 0, :, :, z].numpy(), gy + u[0, 1, :, :, z].numpy()
    for i in range(0, f.shape[0], step):
        ax[3].plot(px[i, :], py[i, :], "k-", lw=0.5)
    for j in range(0, f.shape[1], step):
        ax[3].plot(px[:, j], py[:, j], "k-", lw=0.5)
    ax[3].set_aspect("equal")
    ax[3].set_title("deformation grid")
    im = ax[4].imshow(jac.T, cmap="RdBu_r", vmin=0, vmax=2, origin="lower")
    ax[4].set_title("det J")
    fig.colorbar(im, ax=ax[4], fraction=0.046)
    for a in ax:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return Path(path)
