"""Evaluator handler that writes the per-pair outputs and the metrics table of a registration run."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from custom.evaluation import pair_metrics, references, write_table
from custom.figures import registration_figure
from custom.io import learn2reg_disp_name, save_displacement, save_nifti
from custom.utils import plain

logger = logging.getLogger(__name__)


def _meta(x) -> dict:
    return dict(getattr(x, "meta", {}) or {})


def _affine(x) -> np.ndarray:
    aff = getattr(x, "affine", None)
    return np.eye(4) if aff is None else np.asarray(torch.as_tensor(aff).cpu(), dtype=np.float64)


def _stem(path) -> str:
    return Path(str(path)).name.split(".")[0]


def label_names(labels: Mapping | Sequence[str]) -> dict[int, str]:
    """``{id: name}`` from a metadata-style ``{"0": "background", ...}`` dict or a list of names (index = id)."""
    if isinstance(labels, Mapping):
        return {int(k): str(v) for k, v in labels.items()}
    return {i: str(n) for i, n in enumerate(labels)}


class RegistrationWriter:
    """Ignite handler for evaluators: per pair a displacement file, the warped image and label, one metric row.

    Reads the decollated ``engine.state.output``: ``ddf``, ``warped_image``, ``warped_label`` (from the inferer) and the
    references of ``custom.training.PairBatch`` (``fixed_reference``, ``moving_reference``, keypoints), flat or under
    ``pred`` / ``label``; and ``engine.state.batch`` for the file names and the fixed image's affine. Metrics come
    from :func:`custom.evaluation.pair_metrics`, the same path as the evaluator's key metric: the moving reference
    (ground truth where it exists) warped with the displacement, against the fixed reference. Files (written
    atomically):

    - ``<output_dir>/submission/disp_<fixed>_<moving>.nii.gz`` (``naming="learn2reg"``) or
      ``<output_dir>/displacements/<pair>.nii.gz`` (``naming="pair"``): ``(X, Y, Z, 3)`` voxels, fixed grid;
    - ``<output_dir>/warped/<pair>_image.nii.gz`` and ``<pair>_label.nii.gz`` (``save_warped``);
    - ``<output_dir>/<table_name>.csv`` and ``.json`` (rows + mean/std) when the run completes.

    Args:
        output_dir: destination folder (created).
        labels: label names by id (metadata ``{"0": "background", ...}`` or a list); 0 is not scored.
        table_name: file stem of the metrics table.
        naming: "pair" or "learn2reg" displacement names.
        save_warped: also write the warped image and label.
        keypoints: compute TRE where the output has ``fixed_keypoints``/``moving_keypoints``.
        save_figures: also write ``<output_dir>/figures/<pair>.png`` (fixed / moving / warped / grid / det J).
        jacobian_border: voxels dropped per axis for SDlogJ and % det J <= 0 (one int or one per axis).
    """

    def __init__(
        self,
        output_dir: str,
        labels: Mapping | Sequence[str],
        table_name: str = "metrics",
        naming: str = "pair",
        save_warped: bool = True,
        keypoints: bool = True,
        save_figures: bool = False,
        jacobian_border: int | Sequence[int] = 2,
    ) -> None:
        if naming not in ("pair", "learn2reg"):
            raise ValueError(f"naming must be 'pair' or 'learn2reg', got {naming!r}")
        self.output_dir = Path(output_dir)
        self.labels = label_names(labels)
        self.table_name, self.naming, self.save_warped, self.keypoints = table_name, naming, save_warped, keypoints
        self.save_figures = save_figures
        self.jacobian_border = jacobian_border if isinstance(jacobian_border, int) else list(jacobian_border)
        self.rows: list[dict] = []
        self.summary: dict = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write_table)

    def reset(self, engine=None) -> None:
        self.rows = []

    def __call__(self, engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(output, Mapping):
            raise ValueError("RegistrationWriter needs a decollated output: keep decollate=True in the evaluator")
        for b, o in zip(batch, output):
            self.rows.append(self.write_pair(b, o))

    def pair_name(self, b: Mapping) -> str:
        if "pair_id" in b:
            return str(b["pair_id"])
        f, m = (_meta(b[k]).get("filename_or_obj", k) for k in ("fixed_image", "moving_image"))
        return learn2reg_disp_name(f, m)[:-7] if self.naming == "learn2reg" else f"{_stem(f)}__{_stem(m)}"

    def write_pair(self, b: Mapping, o: Mapping) -> dict:
        """Write one pair's files; return its metric row."""
        pred = o["pred"] if isinstance(o.get("pred"), Mapping) else o
        refs = references(o)
        fl, ml = (plain(refs[k]).detach().float().cpu()[None] for k in ("fixed_reference", "moving_reference"))
        kp = None
        if self.keypoints and "fixed_keypoints" in refs and "moving_keypoints" in refs:
            kp = tuple(plain(refs[k]).detach().cpu() for k in ("fixed_keypoints", "moving_keypoints"))
        ddf = plain(pred["ddf"]).detach().float().cpu()[None]
        fixed = b["fixed_image"]
        affine = _affine(fixed)
        spacing = np.linalg.norm(affine[:3, :3], axis=0).tolist()
        name = self.pair_name(b)
        if self.naming == "learn2reg":
            f, m = (_meta(b[k]).get("filename_or_obj", "") for k in ("fixed_image", "moving_image"))
            save_displacement(ddf[0].numpy(), self.output_dir / "submission" / learn2reg_disp_name(f, m), affine)
        else:
            save_displacement(ddf[0].numpy(), self.output_dir / "displacements" / f"{name}.nii.gz", affine)
        warped_label = plain(pred["warped_label"]).detach().cpu()[None]
        if self.save_warped:
            save_nifti(
                plain(pred["warped_image"]).detach().cpu()[0].numpy(),
                self.output_dir / "warped" / f"{name}_image.nii.gz",
                affine,
                dtype=np.float32,
            )
            save_nifti(
                warped_label[0, 0].numpy(), self.output_dir / "warped" / f"{name}_label.nii.gz", affine, dtype=np.int16
            )
        if self.save_figures:
            images = [plain(x).detach().float().cpu()[None] for x in (fixed, b["moving_image"], pred["warped_image"])]
            registration_figure(*images, ddf, self.output_dir / "figures" / f"{name}.png", title=name)
        row = {"pair": name}
        row.update(pair_metrics(ddf, fl, ml, self.labels, spacing, kp, self.jacobian_border))
        logger.info("%s: %s", name, ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("mean")))
        return row

    def write_table(self, engine=None) -> dict:
        if not self.rows:
            logger.warning("RegistrationWriter: no pairs were evaluated, no table written")
            return {}
        settings = {"jacobian_border": self.jacobian_border, "pairs": len(self.rows)}
        self.summary = write_table(self.rows, self.output_dir, self.table_name, settings)
        shown = {k: v["mean"] for k, v in self.summary.items() if k in ("dice_mean", "hd95_mean", "sdlogj", "tre_mm")}
        logger.info("%s over %d pairs: %s", self.table_name, len(self.rows), shown)
        return self.summary
