"""A tiny MONAI segmentation bundle, trained in seconds on the synthetic abdomen, to exercise the seg chain.

Its label ids are ours reversed (``14 - id``), as a Zoo bundle's ids differ from the registration bundle's; the
merge map written beside it maps them back.
"""

import json
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import UNet

from custom.io import load_nifti

N_CLASSES = 14
NET = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": N_CLASSES,
    "channels": [8, 16],
    "strides": [2],
    "num_res_units": 0,
}


def inference_config() -> dict:
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "datalist": [],
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "UNet", **NET},
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "ensure_channel_first": True, "image_only": True},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "image",
                    "a_min": -1000,
                    "a_max": 1000,
                    "b_min": 0.0,
                    "b_max": 1.0,
                    "clip": True,
                },
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 4, "overlap": 0.25},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "output_dir": "@output_dir",
                    "output_postfix": "seg",
                    "resample": False,
                    "separate_folder": True,
                    "output_dtype": "$np.uint8",
                },
            ],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            }
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
        },
        "run": ["$@evaluator.run()"],
    }


def make_segmentation_bundle(root: Path, images, labels, iterations: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """Train the tiny UNet on (image, label) files; write the bundle and its merge map. Returns (bundle, map)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = UNet(**NET)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    vols = []
    for i, lab in zip(images, labels):
        img = np.clip((load_nifti(i)[0] + 1000) / 2000, 0, 1).astype(np.float32)
        seg = load_nifti(lab)[0].astype(np.int64)
        vols.append((torch.as_tensor(img), torch.as_tensor(np.where(seg > 0, N_CLASSES - seg, 0))))
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(iterations):
        img, seg = vols[rng.integers(len(vols))]
        c = [int(rng.integers(0, max(1, s - 24 + 1))) for s in img.shape]
        sl = tuple(slice(a, a + 24) for a in c)
        opt.zero_grad()
        loss = loss_fn(net(img[sl][None, None]), seg[sl][None])
        loss.backward()
        opt.step()
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    (root / "configs" / "inference.json").write_text(json.dumps(inference_config(), indent=4))
    merge = root / "label_map.json"
    merge.write_text(
        json.dumps(
            {
                "regions": {str(k): str(k) for k in range(N_CLASSES)},
                "map": {str(N_CLASSES - k): k for k in range(1, N_CLASSES)},
            },
            indent=4,
        )
    )
    return root, merge
