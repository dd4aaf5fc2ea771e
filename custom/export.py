"""Export a bundle as a self-contained Model Zoo release: ``python -m custom export --bundle <name> --out_dir DIR``.

The release ``DIR/<name>/`` runs without this repository installed (only MONAI and its dependencies):

- the ``custom`` package travels inside the bundle root, and the configs reach it through ``importlib`` (alias
  ``custom_module``) after the
  first ``initialize`` step has put the bundle root on ``sys.path`` (MONAI itself adds it only at ``run``, after the
  import statements of a config were evaluated);
- ``bundle_root`` is ``"."`` (Model Zoo style: run from the bundle folder, or pass ``--bundle_root``);
- ``metadata.json`` lists every package the code imports, honest ``eval_metrics`` (synthetic-data figures until
  real-data weights exist) and the checkpoint name ``models/model.pt``; ``large_files.yml`` names the weights with their
  sha256; ``docs/data_license.txt`` and a README with the Zoo template's sections are written; a
  ``<name>_v<version>.zip`` of the folder is placed beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from importlib import metadata as importlib_metadata
from pathlib import Path

from custom.flags import as_bool
from custom.io import check_overwrite
from custom.validation import InputError

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
BUNDLES = ("segreg_acdc", "segreg_abdomen", "segreg_thorax")
# what the code inside the bundle imports besides MONAI, torch and numpy (pip names)
REQUIRED = ("nibabel", "pytorch-ignite", "scipy", "tqdm", "matplotlib", "tensorboard", "fire")
TRAINING_FREE = ("segreg_thorax",)  # no network weights: exempt from the Zoo's model-file, net in/out, TorchScript
BOOTSTRAP = (
    "$sys.path.insert(0, os.path.abspath(@bundle_root)) if os.path.abspath(@bundle_root) not in sys.path else None"
)
_CALL = re.compile(r"(?<![\w.'\"])custom((?:\.\w+)+)")


def module_and_attr(dotted: str) -> tuple[str, str]:
    """Split ``custom.a.b.c`` into the longest importable module (a file or package of ``custom``) and the rest."""
    parts = dotted.split(".")
    for k in range(len(parts), 1, -1):
        rel = Path(*parts[1:k])
        if (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file():
            return ".".join(parts[:k]), ".".join(parts[k:])
    return "custom", ".".join(parts[1:])


def rewrite_expression(text: str) -> str:
    """``$custom.mod.fn(...)`` -> ``$custom_module('custom.mod').fn(...)`` (``importlib.import_module`` at use time;
    the alias keeps the word "import" out of the expression, which MONAI would otherwise parse as an import statement).
    """

    def sub(m: re.Match) -> str:
        module, attr = module_and_attr("custom" + m.group(1))
        return f"custom_module('{module}')" + (f".{attr}" if attr else "")

    return _CALL.sub(sub, text)


def rewrite_config(cfg, top: bool = True):
    """A config with every ``custom`` reference made importable from the bundle root (see the module docstring)."""
    if isinstance(cfg, dict):
        out = {}
        for k, v in cfg.items():
            if top and k == "imports":
                kept = [s for s in v if not re.match(r"^\$(import|from) custom\b", s)]
                head = ["$from importlib import import_module as custom_module", "$import os", "$import sys"]
                out[k] = head + [s for s in kept if s not in head]
            elif top and k == "bundle_root":
                out[k] = "."
            elif top and k == "model_name":
                out[k] = "model.pt"
            elif top and k == "initialize":
                out[k] = [BOOTSTRAP] + [rewrite_config(x, False) for x in v]
            else:
                out[k] = rewrite_config(v, False)
        return out
    if isinstance(cfg, list):
        return [rewrite_config(x, False) for x in cfg]
    if isinstance(cfg, str) and cfg.startswith("$"):
        return rewrite_expression(cfg)
    return cfg


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def installed_version(name: str) -> str:
    try:
        return importlib_metadata.version(name)
    except importlib_metadata.PackageNotFoundError:
        return ""


def update_metadata(meta: dict, name: str, metrics: dict | None) -> dict:
    meta = dict(meta)
    meta["required_packages_version"] = {
        **meta.get("required_packages_version", {}),
        **{p: installed_version(p) for p in REQUIRED if installed_version(p)},
    }
    if metrics:
        meta["eval_metrics"] = {f"synthetic_{k}": round(float(v), 4) for k, v in metrics.items()}
    elif name in TRAINING_FREE or meta.get("eval_metrics") == {"mean_dice": 0.0}:
        meta.pop("eval_metrics", None)
    meta["data_source"] = meta.get("data_source", "") + (
        ". eval_metrics are figures on the synthetic set of this repository (python -m custom make-data), not on real"
        " data, until weights trained on real data are released."
    )
    return meta


def large_files_yml(path: Path, rel: str) -> str:
    return (
        "large_files:\n"
        f'  - path: "{rel}"\n'
        '    url: ""  # fill in the download address when the weights are published\n'
        f'    hash_val: "{sha256(path)}"\n'
        '    hash_type: "sha256"\n'
    )


DATA_LICENSE = """Third-party data licenses

This bundle was developed and tested on synthetic data generated by the SegReg repository
(`python -m custom make-data`), released with the code under the Apache License 2.0.

The real data sets the bundle is designed for are NOT distributed with it and keep their own terms:
- ACDC (Automated Cardiac Diagnosis Challenge, Bernard et al., IEEE TMI 2018): research use under the
  challenge's terms, https://www.creatis.insa-lyon.fr/Challenge/acdc/
- Learn2Reg AbdomenCTCT and ThoraxCBCT (Hering et al., IEEE TMI 2023): the terms stated on
  https://learn2reg.grand-challenge.org/ for each task.
Check those terms before training on, or publishing weights trained on, the real data.
"""


def zoo_readme(meta: dict, body: str, name: str) -> str:
    """The bundle README with the Model Zoo template's sections around the bundle's own documentation."""
    metrics = meta.get("eval_metrics") or {}
    perf = "\n".join(f"- {k}: {v}" for k, v in metrics.items()) or "- training-free: no weights, see the tables below"
    weights = (
        "No weights: the bundle optimises each pair (training-free)."
        if name in TRAINING_FREE
        else "`models/model.pt` (listed in `large_files.yml` with its sha256)."
    )
    return f"""# Model Overview
{meta.get("description", "")}

{body.strip()}

## Data
{meta.get("data_source", "")} Licenses of third-party data: `docs/data_license.txt`.

## Training configuration
See `configs/` and the sections above. Weights: {weights}

## Performance
Synthetic-data figures (not real data) until weights trained on real data are released:
{perf}

## System configuration
Runs on CPU (2 cores are enough for the synthetic sets) or one CUDA GPU; MONAI {meta.get("monai_version")},
PyTorch {meta.get("pytorch_version")}, and `required_packages_version` in `configs/metadata.json`.

## MONAI Bundle Commands
Run from this folder (or add `--bundle_root <this folder>`):
```bash
python -m monai.bundle run --config_file configs/inference.json --dataset_dir <data>
```

# Authors
{meta.get("authors", "")}

# Tags
registration, deformable, segmentation-driven, {name.replace("segreg_", "")}

# Citation
If you use this bundle, cite the SegReg method and the data sets listed under Data.

# References
{chr(10).join("- " + r for r in meta.get("references", []))}

# License
Copyright (c) the SegReg team. Apache License 2.0 (see `LICENSE`). Research use only, not for clinical use.
"""


def export_bundle(
    bundle: str,
    out_dir: str,
    checkpoint: str | None = None,
    metrics: str | None = None,
    overwrite: bool = False,
    require_weights: bool = True,
    overrides: dict | None = None,
) -> str:
    """Write ``out_dir/<bundle>/`` (Model Zoo layout, self-contained) and ``out_dir/<bundle>_v<version>.zip``.

    Args:
        bundle: ``segreg_acdc``, ``segreg_abdomen`` or ``segreg_thorax``.
        out_dir: destination folder (created).
        checkpoint: weights to ship as ``models/model.pt`` (default: the bundle's ``models/model_<variant>.pt`` of
            its default variant, if present). Training-free bundles ship none.
        metrics: a ``metrics.json`` written by the bundle's evaluation; its means become ``eval_metrics``.
        overwrite: replace an existing export.
        require_weights: refuse a trained bundle without weights (a Model Zoo release); ``False`` exports it
            without ``models/model.pt`` (the MONAI Label app trains it first).
        overrides: config ids the weights were trained with, written into the release's configs, e.g.
            ``--overrides '{"network_def#channels": [8,8,8,8,8,8,8,8]}'``.

    The checkpoint is opened and checked against the bundle's ``network_def`` and checkpoint record before anything
    is written (:func:`check_release_checkpoint`).
    """
    if bundle not in BUNDLES:
        raise InputError(f"unknown bundle {bundle!r} (--bundle); choose one of {list(BUNDLES)}")
    src = REPO / "bundles" / bundle
    if not (src / "configs" / "metadata.json").is_file():
        raise InputError(f"{src} is not a bundle folder; export runs from a clone of the SegReg repository")
    overwrite, require_weights = as_bool(overwrite, "overwrite"), as_bool(require_weights, "require_weights")
    out = Path(out_dir)
    dst = out / bundle
    meta = json.loads((src / "configs" / "metadata.json").read_text())
    archive = out / f"{bundle}_v{meta['version']}.zip"
    check_overwrite([dst, archive], overwrite, "export")
    ckpt = None
    if bundle not in TRAINING_FREE:
        ckpt = Path(checkpoint) if checkpoint else _default_checkpoint(src)
        missing = ckpt is None or not ckpt.is_file()
        if missing and (require_weights or checkpoint):
            raise FileNotFoundError(
                f"no weights to export for {bundle} ({ckpt or src / 'models'}); train the bundle first "
                "(python -m monai.bundle run training --config_file <bundle>/configs/train.json) or pass "
                "--checkpoint"
            )
        ckpt = None if missing else ckpt
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
        raise InputError(
            "--overrides takes a dict of config ids, e.g. '{\"network_def#channels\": [8,8,8,8,8,8,8,8]}'; got "
            f"{overrides!r}"
        )
    if ckpt is not None:
        check_release_checkpoint(ckpt, src, overrides)  # before anything is written
    summary = None
    if metrics:
        summary = read_metrics_summary(metrics)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{bundle}.export-") as tmp:
        stage = Path(tmp) / bundle
        shutil.copytree(src / "configs", stage / "configs")
        shutil.copytree(src / "docs", stage / "docs")
        shutil.copy2(src / "LICENSE", stage / "LICENSE")
        shutil.copytree(PACKAGE, stage / "custom", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        for cfg_path in sorted((stage / "configs").glob("*.json")):
            if cfg_path.name == "metadata.json":
                continue
            cfg = json.loads(cfg_path.read_text())
            if isinstance(cfg, dict) and ("imports" in cfg or "initialize" in cfg):  # a config, not a data file
                cfg_path.write_text(json.dumps(rewrite_config(set_ids(cfg, overrides)), indent=4) + "\n")
        meta = update_metadata(meta, bundle, summary)
        (stage / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
        (stage / "models").mkdir()
        if ckpt is not None:
            shutil.copy2(ckpt, stage / "models" / "model.pt")
            (stage / "large_files.yml").write_text(large_files_yml(stage / "models" / "model.pt", "models/model.pt"))
        (stage / "docs" / "data_license.txt").write_text(DATA_LICENSE)
        readme = stage / "docs" / "README.md"
        readme.write_text(zoo_readme(meta, readme.read_text(), bundle))
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(stage, dst)
    tmp_zip = archive.with_name(f".{archive.name}.tmp")
    with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(dst.rglob("*")):
            if f.is_file():
                zf.write(f, f.relative_to(out))
    os.replace(tmp_zip, archive)
    print(f"exported {dst} and {archive}")
    return str(dst)


def read_metrics_summary(path: str | os.PathLike) -> dict:
    """The means of the headline metrics of a ``metrics.json`` written by a bundle evaluation."""
    try:
        table = json.loads(Path(path).read_text())["summary"]
        return {k: v["mean"] for k, v in table.items() if k in ("dice_mean", "hd95_mean", "sdlogj", "tre_mm")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(
            f"cannot read the metrics table {path} ({type(e).__name__}: {e}); pass the metrics.json a bundle "
            "evaluation wrote (--metrics)"
        ) from e


def set_ids(cfg: dict, overrides: dict) -> dict:
    """``cfg`` with each ``"a#b#c"`` id of ``overrides`` set where its first part is a key of ``cfg``."""
    for key, value in overrides.items():
        parts = key.split("#")
        if parts[0] not in cfg:
            continue
        node = cfg
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value
    return cfg


def check_release_checkpoint(ckpt: Path, src: Path, overrides: dict | None = None) -> None:
    """Open ``ckpt`` and check it against the bundle's ``network_def`` and checkpoint record (variant, backbone,
    integration, frozen components) and load its weights strictly: a truncated file, another network's weights or
    another variant is refused naming the file, before the release is written."""
    import torch
    from monai.bundle import ConfigParser

    from custom.checkpoint import check_checkpoint

    parser = ConfigParser()
    parser.read_config(str(src / "configs" / "inference.json"))
    parser.read_meta(str(src / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(src), "device": "$torch.device('cpu')", **(overrides or {})})
    try:
        info = parser.get_parsed_content("model_info")
        check_checkpoint(ckpt, info, "pass --checkpoint with the weights of a training run of this bundle")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
        result = info.network.load_state_dict(state, strict=False)
    except InputError:
        raise
    except Exception as e:  # torch.load raises many types for a damaged file
        raise InputError(f"--checkpoint {ckpt} cannot be shipped with {src.name}: {type(e).__name__}: {e}") from e
    bad = list(result.missing_keys) + list(result.unexpected_keys)
    if bad:
        raise InputError(
            f"--checkpoint {ckpt} does not fit {src.name}'s network_def: {len(result.missing_keys)} missing and "
            f"{len(result.unexpected_keys)} unexpected weights (e.g. {bad[0]}); pass the weights of a training run "
            "of this bundle"
        )


def _default_checkpoint(src: Path) -> Path | None:
    cfg = json.loads((src / "configs" / "inference.json").read_text())
    variant = cfg.get("variant", "")
    path = src / "models" / f"model_{variant}.pt"
    return path if path.is_file() else None
