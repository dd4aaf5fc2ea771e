"""The thorax benchmarks score the ``segreg_thorax`` bundle as shipped: ``benchmarks/synthetic_sets.THORAX_SETTINGS``,
run through ``custom.register.iterative_registration`` (as ``thorax_accuracy.py`` and the other thorax pages do),
must build the solver that the bundle's ``inference.json`` builds, and scale intensities over the same window."""

import inspect
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from custom.iterative import IterativeSegReg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

PLAIN = (int, float, str, bool, type(None), list, tuple, dict)
# per-pair state, and what is derived from the loss (compared through the loss terms) or decided outside the solver
# (``iterative_registration`` takes the in-plane decision itself and hands the solver the frozen components)
SKIP = {"progress", "last_profile", "pair_fov", "pair_mask_fov", "frozen_components", "batched_terms", "in_plane"}


class Built(Exception):
    """Raised by the patched solver once built: the test needs its settings, not a registration."""


def settings_of(obj) -> dict:
    """The plain-valued attributes of ``obj`` (numbers, strings, sequences), without per-pair state."""
    return {k: v for k, v in vars(obj).items() if isinstance(v, PLAIN) and k not in SKIP and not k.startswith("_")}


def solver_settings(solver: IterativeSegReg) -> dict:
    loss = solver.loss
    terms = {name: (type(t).__name__, settings_of(t)) for name, t in (("sim", loss.sim), ("mask", loss.mask))}
    terms["reg"] = (type(loss.reg).__name__, settings_of(loss.reg))
    return {**settings_of(solver), "loss_weights": dict(loss.weights), "loss_terms": terms}


def bundle_solver_and_window():
    from iterative_speed import bundle_config

    parser = bundle_config("segreg")
    return parser.get_parsed_content("inferer").optimiser, [
        float(v) for v in parser.get_parsed_content("intensity_range")
    ]


def test_thorax_settings_build_the_bundle_solver(tmp_path, monkeypatch):
    from synthetic_sets import THORAX_SETTINGS

    from custom.register import iterative_registration

    bundle, window = bundle_solver_and_window()
    rng = np.random.default_rng(0)
    paths = {}
    for name, arr in (
        ("fixed", rng.normal(0, 300, (16, 16, 16))),
        ("moving", rng.normal(0, 300, (16, 16, 16))),
        ("fixed_label", np.pad(np.ones((8, 8, 8)), 4)),
        ("moving_label", np.pad(np.ones((8, 8, 8)), 4)),
    ):
        paths[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(arr.astype(np.float32), np.diag([4.0, 4.0, 4.0, 1.0])), paths[name])
    built = {}

    def capture(self, fixed, moving, *args, **kwargs):
        built["solver"], built["fixed"] = self, fixed
        raise Built

    monkeypatch.setattr(IterativeSegReg, "__call__", capture)
    with pytest.raises(Built):
        iterative_registration(
            paths["fixed"],
            paths["moving"],
            paths["fixed_label"],
            paths["moving_label"],
            progress=False,
            **THORAX_SETTINGS,
        )
    ours, theirs = solver_settings(built["solver"]), solver_settings(bundle)
    assert ours.keys() == theirs.keys()
    differ = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not differ, f"benchmark THORAX_SETTINGS vs bundle inference.json: {differ}"
    in_plane = THORAX_SETTINGS.get("in_plane", inspect.signature(iterative_registration).parameters["in_plane"].default)
    assert in_plane == bundle.in_plane
    # the intensity window: THORAX_SETTINGS' range scaled the fixed image as the bundle's (a_min, a_max) does
    assert list(THORAX_SETTINGS["intensity_range"]) == window
    raw = torch.as_tensor(nib.load(paths["fixed"]).get_fdata(), dtype=torch.float32)
    expected = ((raw - window[0]) / (window[1] - window[0])).clamp(0, 1)
    assert torch.allclose(built["fixed"][0, 0].cpu(), expected, atol=1e-6)
