"""SegReg command line: ``python -m custom <verb>`` (``make-data``, ``demo``, ``register``, ``warp``, ``convert``,
``invert``, ``export``).

Run ``python -m custom <verb> --help`` for the options of a verb.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import fire

from custom.validation import InputError


def make_data(
    dataset: str = "all",
    out_dir: str = "data/synthetic",
    n_subjects: int | None = None,
    seed: int = 0,
    shape: tuple | None = None,
    realism: str = "simple",
    overwrite: bool = False,
) -> dict:
    """Generate synthetic data in the published layouts.

    Args:
        dataset: "acdc", "abdomen", "thorax" or "all".
        out_dir: root folder; each set goes to ``<out_dir>/<dataset>``.
        n_subjects: subjects per set (defaults: ACDC 6 in training/ plus 2 in testing/, abdomen 8, thorax 3).
        seed: random seed.
        shape: volume shape (defaults: ACDC 128x128x16, abdomen 64x56x80, thorax 80x64x64).
        realism: thorax only: "simple" (the set the tables so far were measured on) or "cbct" (the upper abdomen
            under the diaphragm, lung density that follows inflation, cone-beam artefacts; see
            ``custom.synthetic.cbct``).
        overwrite: replace a set whose folder already holds files (true/false; default false: such a folder stops the
            command before anything is written). The folder is emptied first, so no file of the earlier set stays.
    """
    from custom.flags import as_bool
    from custom.io import check_overwrite
    from custom.synthetic.abdomen import make_abdomen
    from custom.synthetic.acdc import make_acdc
    from custom.synthetic.thorax import make_thorax

    makers = {"acdc": make_acdc, "abdomen": make_abdomen, "thorax": make_thorax}
    chosen = list(makers) if dataset == "all" else [dataset]
    unknown = [n for n in chosen if n not in makers]
    if unknown:
        raise InputError(f"unknown dataset {dataset!r} (--dataset); choose one of {list(makers) + ['all']}")
    if n_subjects is not None:
        n_subjects = positive_int(n_subjects, "n_subjects")
    if shape is not None:
        shape = shape_arg(shape)
    seed = positive_int(seed, "seed", minimum=0)
    if realism not in ("simple", "cbct"):
        raise InputError(f"--realism must be simple or cbct, got {realism!r}")
    if realism != "simple" and "thorax" not in chosen:
        raise InputError("--realism cbct applies to --dataset thorax only")
    overwrite = as_bool(overwrite, "overwrite")
    folders = [Path(out_dir) / name for name in chosen]
    used = [f for f in folders if f.is_file() or (f.is_dir() and any(f.iterdir()))]
    for folder in check_overwrite(used, overwrite, "make-data"):  # nothing of an earlier set stays beside the new one
        shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
    out = {}
    for name in chosen:
        kwargs = {"seed": seed, "n_test": 2} if name == "acdc" else {"seed": seed}
        if name == "thorax":
            kwargs["realism"] = realism
        if n_subjects is not None:
            kwargs["n_subjects"] = int(n_subjects)
        if shape is not None:
            kwargs["shape"] = shape
        out[name] = str(makers[name](str(Path(out_dir) / name), **kwargs))
        print(f"{name}: {out[name]}")
    return out


def positive_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, else an error naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().lstrip("-").isdigit():
        raise InputError(f"--{name} takes a whole number, got {value!r}")
    if int(value) < minimum:
        raise InputError(f"--{name} must be at least {minimum}, got {value}")
    return int(value)


def shape_arg(shape) -> tuple[int, int, int]:
    """``--shape`` as three whole numbers >= 8, e.g. ``--shape '[64,64,16]'``."""
    values = [shape] if isinstance(shape, (int, str)) else list(shape) if isinstance(shape, (list, tuple)) else None
    if values is None or len(values) != 3:
        raise InputError(f"--shape takes three whole numbers, e.g. --shape '[64,64,16]'; got {shape!r}")
    return tuple(positive_int(v, "shape", minimum=8) for v in values)


def run_bundle(config_files, workflow_type: str, **override):
    """Run a bundle config (or a list merged in order) through MONAI's ``ConfigWorkflow``; returns ``run``'s result."""
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=config_files, workflow_type=workflow_type, **override)
    wf.initialize()
    missing = wf.check_properties()
    if missing:
        raise ValueError(f"{config_files} lacks the bundle properties {missing}")
    out = wf.run()
    wf.finalize()
    return out


DEMO_BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "segreg_acdc"


def demo(
    out_dir: str = "outputs/demo",
    epochs: int = 15,
    n_subjects: int = 6,
    seed: int = 0,
    variant: str = "edt_dice",
    bundle_dir: str | None = None,
) -> dict:
    """Main job on the embedded default: train the ACDC bundle briefly on synthetic data, SegReg vs baseline.

    Generates a synthetic ACDC set (``n_subjects`` training + 2 test patients) under ``<out_dir>/data``, trains the
    bundle's SegReg ``variant`` and its one-region ``baseline`` for ``epochs`` epochs each (CPU-sized: volumes
    resampled to 3.6 x 3.6 x 10 mm, 64 x 64 x 16, learning rate 1e-3), evaluates both on the test pairs and prints
    the Dice / HD95 per structure, SDlogJ, % det J <= 0 and the end-point errors (mm) against the exact motion of the
    ES -> ED pairs. Tables, displacements, warped images and one figure per
    pair go to ``<out_dir>/eval/<variant>``; checkpoints to ``<out_dir>/models``.
    """
    from custom.synthetic.acdc import make_acdc

    epochs = positive_int(epochs, "epochs")
    n_subjects = positive_int(n_subjects, "n_subjects", minimum=3)
    seed = positive_int(seed, "seed", minimum=0)
    bundle = Path(bundle_dir) if bundle_dir else DEMO_BUNDLE
    if not (bundle / "configs" / "train.json").is_file():
        raise ValueError(f"{bundle} is not the segreg_acdc bundle (no configs/train.json); pass --bundle_dir")
    out = Path(out_dir).resolve()
    t0 = time.perf_counter()
    make_acdc(str(out / "data"), n_subjects=n_subjects, n_test=2, seed=seed)
    common = dict(
        bundle_root=str(bundle),
        dataset_dir=str(out / "data"),
        ckpt_dir=str(out / "models"),
        pixdim=[3.6, 3.6, 10.0],
        spatial_size=[64, 64, 16],
        num_workers=0,
        seed=seed,
    )
    configs = bundle / "configs"
    summaries = {}
    for name in (variant, "baseline"):
        print(f"\n== training {name} ({epochs} epochs) ==")
        run_bundle(
            str(configs / "train.json"),
            "train",
            variant=name,
            epochs=epochs,
            val_interval=max(1, epochs // 3),
            learning_rate=1e-3,
            overwrite=True,  # the demo's own folder: a rerun starts again
            output_dir=str(out / "runs" / name),
            **common,
        )
        print(f"== evaluating {name} on the test pairs ==")
        evaluation = str(out / "eval" / name)
        run_bundle(
            [str(configs / "inference.json"), str(configs / "evaluate.json")],
            "eval",
            variant=name,
            output_dir=evaluation,
            **{"writer#save_figures": True},
            **{k: v for k, v in common.items() if k != "seed"},
        )
        summaries[name] = json.loads((Path(evaluation) / "metrics.json").read_text())["summary"]
    labels = [k for k in summaries[variant] if k.startswith(("dice_", "hd95_"))] + ["sdlogj", "neg_jac_percent"]
    labels += [k for k in summaries[variant] if k.startswith(("epe_", "through_plane"))]
    header = f"{'metric':<22}{'SegReg (' + variant + ')':>22}{'baseline':>22}"
    print("\n" + header + "\n" + "-" * len(header))
    for k in labels:
        cells = [f"{summaries[m][k]['mean']:.2f} ± {summaries[m][k]['std']:.2f}" for m in (variant, "baseline")]
        print(f"{k:<22}{cells[0]:>22}{cells[1]:>22}")
    print(f"\n{time.perf_counter() - t0:.0f} s; tables, outputs and figures in {out / 'eval'}")
    return {m: {k: v["mean"] for k, v in s.items()} for m, s in summaries.items()}


def _written(result):
    """What the command line shows of a verb's return value: the file it wrote (``warp``, ``convert``); the other verbs
    print their own summary, so their return values (for Python callers) are not dumped again."""
    return f"written: {result}" if isinstance(result, Path) else None


def main() -> None:
    from custom.export import export_bundle
    from custom.interop import convert, invert
    from custom.register import register, warp

    verbs = {"make-data": make_data, "demo": demo, "register": register, "warp": warp, "convert": convert}
    verbs.update({"invert": invert, "export": export_bundle})
    try:
        fire.Fire(verbs, serialize=_written)
    except (InputError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
