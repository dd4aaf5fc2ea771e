"""Evaluator handler that writes the per-pair outputs and the metrics table of a registration run."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from custom.evaluation import epe_metrics, keypoint_tre, pair_metrics, references, write_table
from custom.figures import registration_figure
from custom.flags import as_bool
from custom.geometry import displacement_to_grid, labels_to_grid, original_geometry, voxel_spacing, warp_volume
from custom.io import (
    check_overwrite,
    file_stem,
    learn2reg_disp_name,
    load_nifti,
    remove_stale_temps,
    save_displacement,
    save_nifti,
)
from custom.metrics import warp_labels
from custom.utils import plain
from custom.validation import InputError, check_output_dir

logger = logging.getLogger(__name__)


SUBFOLDERS = ("", "submission", "displacements", "warped", "figures")


def _meta(x) -> dict:
    return dict(getattr(x, "meta", {}) or {})


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
      ``<output_dir>/displacements/<pair>.nii.gz`` (``naming="pair"``): ``(X, Y, Z, 3)`` voxels on the fixed image's
      *original* grid and header (the registration grid's field carried over by
      ``custom.geometry.displacement_to_grid``);
    - ``<output_dir>/warped/<pair>_image.nii.gz`` and ``<pair>_label.nii.gz`` (``save_warped``): the original moving
      files warped onto the original fixed grid;
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
        border_band: width (voxels) of the band around label borders for ``epe_border_mm``.
        fov_threshold: original fixed-image intensity at or below which a voxel lies outside the scanner's field of
            view (e.g. -1000 for a cone-beam CT padded with air): the EPE columns then also report
            ``epe_in_fov_mm`` and ``epe_outside_fov_mm`` over the labelled voxels. ``None``: not reported.
        overwrite: replace the results of an earlier run in ``output_dir`` (with a warning); ``False`` refuses.

    Where the batch record names a ``true_displacement`` file (the synthetic sets store the exact motion), the row
    also gets end-point errors in mm (``custom.evaluation.epe_metrics``).
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
        border_band: int = 2,
        overwrite: bool = True,
        fov_threshold: float | None = None,
    ) -> None:
        if naming not in ("pair", "learn2reg"):
            raise ValueError(f"naming must be 'pair' or 'learn2reg', got {naming!r}")
        self.output_dir = Path(output_dir)
        self.labels = label_names(labels)
        self.table_name, self.naming = table_name, naming
        self.save_warped, self.keypoints = as_bool(save_warped, "save_warped"), as_bool(keypoints, "keypoints")
        self.save_figures = as_bool(save_figures, "save_figures")
        self.jacobian_border = jacobian_border if isinstance(jacobian_border, int) else list(jacobian_border)
        self.border_band = int(border_band)
        self.fov_threshold = None if fov_threshold is None else float(fov_threshold)
        self.overwrite = as_bool(overwrite, "overwrite")
        self.rows: list[dict] = []
        self.summary: dict = {}
        self.checked = False  # outputs checked for this run (check_outputs); cleared when the run completes

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write_table)

    def check_outputs(self, create: bool = True) -> None:
        """Check the output folder can be written and refuse (``overwrite=False``) or announce replacing the results of
        an earlier run there: its table or any per-pair file. Configs call it with ``create=False`` at the start of
        ``run``, before any work; the run's start checks again and creates the folder."""
        check_output_dir(self.output_dir, create)
        for sub in SUBFOLDERS:
            if (self.output_dir / sub).is_dir():
                remove_stale_temps(self.output_dir / sub)
        earlier = [self.output_dir / f"{self.table_name}.{ext}" for ext in ("csv", "json")]
        earlier += [
            p for sub in SUBFOLDERS[1:] if (self.output_dir / sub).is_dir() for p in (self.output_dir / sub).iterdir()
        ]
        if check_overwrite(earlier, self.overwrite, "an evaluation; --output_dir") and not self.checked:
            logger.warning("replacing the results of an earlier run in %s", self.output_dir)
        self.checked = True

    def reset(self, engine=None) -> None:
        """Start of a run: :meth:`check_outputs` unless the config's ``run`` already did (under torchrun another rank
        may be writing its pairs by now), and an empty table."""
        self.rows = []
        if self.checked:  # by the config before the run: only make the folder (another rank may be writing there)
            check_output_dir(self.output_dir)
        else:
            self.check_outputs()

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
        return learn2reg_disp_name(f, m)[:-7] if self.naming == "learn2reg" else f"{file_stem(f)}__{file_stem(m)}"

    def write_pair(self, b: Mapping, o: Mapping) -> dict:
        """Write one pair's files (on the fixed image's original grid); return its metric row."""
        pred = o["pred"] if isinstance(o.get("pred"), Mapping) else o
        refs = references(o)
        fl, ml = (plain(refs[k]).detach().float().cpu()[None] for k in ("fixed_reference", "moving_reference"))
        ddf = plain(pred["ddf"]).detach().float().cpu()[None]
        fixed, moving = b["fixed_image"], b["moving_image"]
        reg_affine, fixed_affine, fixed_shape = original_geometry(fixed)
        _, moving_affine, moving_shape = original_geometry(moving)
        spacing = voxel_spacing(reg_affine).tolist()
        name = self.pair_name(b)
        disp = displacement_to_grid(ddf[0], reg_affine, fixed_affine, fixed_shape, moving_affine)
        if not torch.isfinite(disp).all():
            raise ValueError(f"the displacement of {name} is not finite; nothing is written for it")
        f, m = (_meta(b[k]).get("filename_or_obj", "") for k in ("fixed_image", "moving_image"))
        if self.naming == "learn2reg":
            path = self.output_dir / "submission" / learn2reg_disp_name(f, m)
        else:
            path = self.output_dir / "displacements" / f"{name}.nii.gz"
        save_displacement(disp.numpy(), path, fixed_affine, moving_affine, moving_shape)
        if self.save_warped:
            self.save_warped_files(b, disp, fixed_affine, name)
        if self.save_figures:
            images = [plain(x).detach().float().cpu()[None] for x in (fixed, moving, pred["warped_image"])]
            path = self.output_dir / "figures" / f"{name}.png"
            registration_figure(*images, ddf, path, title=name, fixed_label=fl, warped_label=warp_labels(ml, ddf))
        row = {"pair": name}
        tre = keypoint_tre(ddf, refs) if self.keypoints else None
        row.update(pair_metrics(ddf, fl, ml, self.labels, spacing, tre, self.jacobian_border))
        truth = b.get("true_displacement")
        if isinstance(truth, (str, Path)) and Path(truth).is_file():
            row.update(self.epe_row(disp, truth, moving_affine, refs, _meta(fixed).get("filename_or_obj")))
        logger.info("%s: %s", name, ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith(("mean", "mm"))))
        return row

    def save_warped_files(self, b: Mapping, disp: torch.Tensor, fixed_affine, name: str) -> None:
        """The original moving image (linear) and label map (nearest) warped onto the original fixed grid."""
        for key, mode, kind, dtype in (
            ("moving_image", "bilinear", "image", np.float32),
            ("moving_label", "nearest", "label", np.int16),
        ):
            path = _meta(b.get(key)).get("filename_or_obj") if key in b else None
            if not path:
                continue
            volume = torch.as_tensor(np.asarray(load_nifti(path)[0], dtype=np.float32))
            warped = warp_volume(volume, disp, mode).numpy()
            save_nifti(warped, self.output_dir / "warped" / f"{name}_{kind}.nii.gz", fixed_affine, dtype=dtype)

    def epe_row(self, disp: torch.Tensor, truth_path, moving_affine, refs: Mapping, fixed_path=None) -> dict:
        """End-point error columns against the true displacement file (original fixed grid); regions from the fixed
        reference label map (as the registration used its ids) carried back onto that grid; inside and outside the
        field of view of the original fixed image ``fixed_path`` where ``fov_threshold`` is set."""
        truth = np.moveaxis(np.asarray(load_nifti(truth_path)[0], dtype=np.float32), -1, 0)
        ref = refs["fixed_reference"]
        reg_affine, fixed_affine, fixed_shape = original_geometry(ref)
        label = labels_to_grid(plain(ref).detach().cpu()[0], reg_affine, fixed_affine, fixed_shape).numpy()
        fov = None
        if self.fov_threshold is not None and fixed_path:
            fov = np.asarray(load_nifti(fixed_path)[0]) > self.fov_threshold
        return epe_metrics(disp.numpy(), truth, moving_affine, label, self.labels, self.border_band, fov)

    def gather_rows(self) -> list[dict] | None:
        """Every rank's rows, merged in pair order, on rank 0 (``None`` on the other ranks); this rank's rows without
        ``torch.distributed``. Under torchrun each rank evaluates a share of the pairs (``DistributedSampler``)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.rows
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, self.rows)  # every rank has written its pairs' files by now
        if dist.get_rank() != 0:
            return None
        rows = sorted((r for share in shares for r in share), key=lambda r: str(r.get("pair", "")))
        folder = self.output_dir / ("submission" if self.naming == "learn2reg" else "displacements")
        missing = [r["pair"] for r in rows if not (folder / f"{r['pair']}.nii.gz").is_file()]
        if missing:
            raise InputError(
                f"{len(missing)} of {len(rows)} displacements are not in {folder} (e.g. {missing[0]}): the other ranks "
                "wrote them on their own machines. Under torchrun on several nodes, --output_dir must be a folder "
                "every node shares (a network file system)."
            )
        return rows

    def write_table(self, engine=None) -> dict:
        self.checked = False  # a later run checks again
        rows = self.gather_rows()
        if rows is None:  # not rank 0: rank 0 writes the merged table
            return {}
        self.rows = rows
        if not self.rows:
            logger.warning("RegistrationWriter: no pairs were evaluated, no table written")
            return {}
        settings = {"jacobian_border": self.jacobian_border, "border_band": self.border_band, "pairs": len(self.rows)}
        self.summary = write_table(self.rows, self.output_dir, self.table_name, settings)
        shown = {k: v["mean"] for k, v in self.summary.items() if k in ("dice_mean", "hd95_mean", "sdlogj", "tre_mm")}
        logger.info("%s over %d pairs: %s", self.table_name, len(self.rows), shown)
        return self.summary
