"""Model Zoo releases: ``python -m custom export`` writes a self-contained bundle that runs without this repository and
passes the Zoo's checks offline (schema, version, network in/out, TorchScript, properties, file sizes)."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import pytest
import torch
from bundle_utils import REPO, SCHEMA, TINY_NET, random_checkpoint
from monai.bundle import ConfigParser, ConfigWorkflow

from custom.export import TRAINING_FREE, export_bundle, rewrite_expression
from custom.synthetic.abdomen import make_abdomen
from custom.synthetic.acdc import make_acdc
from custom.synthetic.thorax import make_thorax

ACDC_SMALL = {"pixdim": [3.6, 3.6, 10.0], "spatial_size": [32, 32, 16], "num_workers": 0, **TINY_NET}
THORAX_SMALL = {"level_spacing_mm": [8.0, 4.0], "iterations": [3, 2], "num_workers": 0, "progress": False}
SMALL = {
    "segreg_acdc": ACDC_SMALL,
    "segreg_abdomen": {"n_train": 2, "n_val": 2, "num_workers": 0},
    "segreg_thorax": THORAX_SMALL,
}
MAX_FILE_MB = 25  # the Model Zoo's limit for files in the repository (weights go to large_files.yml)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo_data")
    make_acdc(str(root / "acdc"), n_subjects=3, n_test=1, shape=(64, 64, 16), seed=3)
    abdomen = make_abdomen(str(root / "abdomen"), n_subjects=6, shape=(32, 24, 32), seed=1)
    thorax = make_thorax(str(root / "thorax"), n_subjects=1, shape=(32, 24, 24), n_keypoints=10)
    return {"segreg_acdc": root / "acdc", "segreg_abdomen": abdomen.parent, "segreg_thorax": thorax.parent}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    ckpt = random_checkpoint("segreg_acdc", out / "weights" / "acdc.pt", **TINY_NET)
    abd = random_checkpoint("segreg_abdomen", out / "weights" / "abdomen.pt")
    return {
        "segreg_acdc": Path(
            export_bundle("segreg_acdc", str(out / "release"), checkpoint=str(ckpt), overrides=TINY_NET)
        ),
        "segreg_abdomen": Path(export_bundle("segreg_abdomen", str(out / "release"), checkpoint=str(abd))),
        "segreg_thorax": Path(export_bundle("segreg_thorax", str(out / "release"))),
    }


def test_expressions_reach_the_package_through_importlib_at_use_time():
    got = rewrite_expression("$custom.datasets.acdc.acdc_split(@dataset_dir, 'train') + custom.variants.x")
    want = "$custom_module('custom.datasets.acdc').acdc_split(@dataset_dir, 'train')"
    assert got == want + " + custom_module('custom.variants').x"
    assert "import" not in got  # MONAI parses any expression containing "import" as an import statement


@pytest.mark.parametrize("bundle", ["segreg_acdc", "segreg_abdomen", "segreg_thorax"])
def test_export_passes_the_model_zoo_checks_offline(exports, datasets, bundle, tmp_path):
    root = exports[bundle]
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    jsonschema.validate(meta, json.loads(SCHEMA.read_text()))  # schema 20240725, local copy
    assert meta["version"] in meta["changelog"]
    for pkg in ("nibabel", "pytorch-ignite", "scipy", "tqdm", "matplotlib"):
        assert meta["required_packages_version"].get(pkg), pkg
    assert "synthetic" in meta["data_source"] and meta.get("eval_metrics") != {"mean_dice": 0.0}
    assert (root / "docs" / "data_license.txt").is_file() and (root / "LICENSE").is_file()
    readme = (root / "docs" / "README.md").read_text()
    for section in (
        "# Model Overview",
        "## Data",
        "## Performance",
        "## System configuration",
        "# Authors",
        "# Tags",
        "# Citation",
        "# License",
    ):
        assert section in readme, section
    large = (root / "large_files.yml").read_text() if (root / "large_files.yml").exists() else ""
    for f in root.rglob("*"):
        if f.is_file() and f.relative_to(root).as_posix() not in large:
            assert f.stat().st_size < MAX_FILE_MB * 2**20, f
    configs = {p.name: p for p in (root / "configs").glob("*.json") if p.name != "metadata.json"}
    kinds = {
        "train.json": "train",
        "inference.json": "infer",
        "multi_gpu_train.json": "train",
        "evaluate.json": "infer",
    }
    for name, path in configs.items():
        if name not in kinds or name == "multi_gpu_train.json":  # not a config / needs torch.distributed to start
            continue
        files = (
            [path]
            if name in ("train.json", "inference.json")
            else [configs[{"evaluate.json": "inference.json", "multi_gpu_train.json": "train.json"}[name]], path]
        )
        wf = ConfigWorkflow(
            config_file=[str(f) for f in files],
            meta_file=str(root / "configs" / "metadata.json"),
            workflow_type=kinds[name],
            bundle_root=str(root),
            output_dir=str(tmp_path / name),
            dataset_dir=str(datasets[bundle]),
            **SMALL[bundle],
        )
        wf.initialize()
        assert wf.check_properties() == [], name
    if bundle in TRAINING_FREE:
        # exempt from the model-file, net in/out and TorchScript checks (the Zoo's exclusion lists): no weights
        assert not (root / "models" / "model.pt").exists() and not large
        return
    # model file with its sha256, network in/out, TorchScript equal to eager
    import hashlib

    assert hashlib.sha256((root / "models" / "model.pt").read_bytes()).hexdigest() in large
    parser = ConfigParser()
    parser.read_config(str(configs["inference.json"]))
    parser.read_meta(str(root / "configs" / "metadata.json"))
    parser["bundle_root"] = str(root)
    if bundle == "segreg_acdc":
        parser.update(TINY_NET)
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=False)["model"])
    fmt = meta["network_data_format"]
    x = torch.rand(1, fmt["inputs"]["image"]["num_channels"], *[16 * ((s + 15) // 16) for s in [32, 32, 16]])
    with torch.no_grad():
        y = net(x)
        ts = torch.jit.script(net)
        torch.testing.assert_close(ts(x), y, rtol=1e-5, atol=1e-5)
    assert y.shape == (1, fmt["outputs"]["pred"]["num_channels"], *x.shape[2:]) and y.dtype == torch.float32


def test_release_zip_holds_the_bundle_folder(exports):
    root = exports["segreg_thorax"]
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    with zipfile.ZipFile(root.parent / f"segreg_thorax_v{meta['version']}.zip") as zf:
        names = zf.namelist()
    assert "segreg_thorax/configs/inference.json" in names and "segreg_thorax/custom/iterative.py" in names


def run_isolated(root: Path, cwd: Path, files, **override) -> str:
    args = {"repo": str(REPO), "run_id": "run", "config_file": [str(root / "configs" / f) for f in files]}
    args.update(bundle_root=str(root), **override)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "run_isolated_bundle.py"), json.dumps(args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.parametrize("bundle", ["segreg_acdc", "segreg_abdomen", "segreg_thorax"])
def test_exported_bundle_runs_from_an_empty_folder_without_the_repository(exports, datasets, bundle, tmp_path):
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    out = tmp_path / "out"
    override = {**SMALL[bundle], "dataset_dir": str(datasets[bundle]), "output_dir": str(out)}
    stdout = run_isolated(exports[bundle], empty, ["inference.json", "evaluate.json"], **override)
    assert f"CUSTOM_FROM {exports[bundle] / 'custom' / '__init__.py'}" in stdout  # its own copy, not the repository
    table = json.loads((out / "metrics.json").read_text())
    assert table["cases"] and all(0 <= c["dice_mean"] <= 100 for c in table["cases"])
    assert list(empty.iterdir()) == []  # nothing written where it ran


def test_export_command_refuses_unknown_bundles_and_existing_exports(exports, tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "custom", "export", "--bundle", "segreg_lung", "--out_dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown bundle 'segreg_lung'" in bad.stderr
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_bundle("segreg_thorax", str(exports["segreg_thorax"].parent))


def test_a_trained_bundle_without_weights_is_refused_unless_asked_for(tmp_path):
    """A Zoo release needs its weights; the MONAI Label app exports the bundle without them and trains it first."""
    missing = tmp_path / "none.pt"
    with pytest.raises(FileNotFoundError, match="train the bundle first"):
        export_bundle("segreg_acdc", str(tmp_path / "a"), checkpoint=str(missing))
    with pytest.raises(FileNotFoundError, match="train the bundle first"):  # an explicit checkpoint must exist
        export_bundle("segreg_acdc", str(tmp_path / "b"), checkpoint=str(missing), require_weights=False)
    out = Path(export_bundle("segreg_acdc", str(tmp_path / "c"), require_weights=False))
    assert (out / "configs" / "train.json").is_file() and (out / "custom" / "plan.py").is_file()
    if not (REPO / "bundles" / "segreg_acdc" / "models" / "model_edt_dice.pt").is_file():  # nothing to ship
        assert not any((out / "models").iterdir()) and not (out / "large_files.yml").exists()


def test_export_opens_the_checkpoint_and_refuses_what_the_release_could_not_run(tmp_path):
    """A truncated file, another network's weights (a 2-D backbone; the tiny network without --overrides) or another
    variant never ship as models/model.pt; nothing is written."""
    good = random_checkpoint("segreg_acdc", tmp_path / "good.pt", **TINY_NET)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    flat = random_checkpoint("segreg_acdc", tmp_path / "flat.pt", **{**TINY_NET, "network_def#spatial_dims": 2})
    other = torch.load(good, weights_only=False)
    other["segreg"]["variant"] = "dice"
    torch.save(other, tmp_path / "dice.pt")
    cases = [
        (truncated, TINY_NET, "truncated.pt"),
        (flat, TINY_NET, "different backbone"),
        (good, {}, "different backbone"),  # trained with network_def overrides the release would not carry
        (tmp_path / "dice.pt", TINY_NET, "variant 'dice'"),
    ]
    for ckpt, overrides, match in cases:
        out = tmp_path / f"out_{ckpt.stem}_{len(overrides)}"
        with pytest.raises(ValueError, match=match):
            export_bundle("segreg_acdc", str(out), checkpoint=str(ckpt), overrides=overrides)
        assert not out.exists()
    cli = subprocess.run(
        [sys.executable, "-m", "custom", "export", "--bundle", "segreg_acdc", "--out_dir", str(tmp_path / "cli")]
        + ["--checkpoint", str(truncated)],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2 and "truncated.pt" in cli.stderr and not (tmp_path / "cli").exists()
