"""The MONAI Label app (``apps/monailabel``) against a real server on 127.0.0.1 with a synthetic datastore.

Needs the ``label`` extra (``pip install -e ".[label]"``); skipped without it. ``.ci/run`` runs it in a second
virtual environment (see the README). The server is started once per module and stopped by its PID.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_utils import REPO, random_checkpoint
from seg_bundle import make_segmentation_bundle

pytest.importorskip("monailabel", reason="needs the label extra: pip install -e '.[label]'")
requests = pytest.importorskip("requests")

from custom.export import export_bundle  # noqa: E402
from custom.regions import load_merge_map, merge_labels  # noqa: E402
from custom.register import register_with_bundle  # noqa: E402
from custom.synthetic.abdomen import make_abdomen  # noqa: E402
from custom.synthetic.acdc import make_acdc  # noqa: E402
from custom.synthetic.thorax import make_thorax  # noqa: E402

APP = REPO / "apps" / "monailabel"
START_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_studies(root: Path) -> dict:
    """A MONAI Label datastore folder: 3 ACDC patients (ED + ES, all labelled), one thorax case (planning CT and
    CBCT 1, labelled with TotalSegmentator ids; CBCT 2 has no label map) and two abdomen subjects (only the moving one
    labelled; the other is segmented by the bundle's automatic chain, trained on two further subjects)."""
    acdc = root / "acdc"
    make_acdc(str(acdc), n_subjects=3, shape=(64, 64, 16), seed=3)
    thorax = make_thorax(str(root / "thorax"), n_subjects=1, shape=(48, 40, 40), n_keypoints=4).parent
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    gt = {}
    for image in sorted(acdc.glob("training/patient*/patient*_frame??.nii.gz")):
        shutil.copy(image, studies / image.name)
        label = image.with_name(image.name.replace(".nii.gz", "_gt.nii.gz"))
        shutil.copy(label, studies / "labels" / "final" / image.name)
        gt[image.name[: -len(".nii.gz")]] = label
    for image in sorted((thorax / "imagesTr").glob("*.nii.gz")):
        shutil.copy(image, studies / image.name)
        gt[image.name[: -len(".nii.gz")]] = thorax / "segmentationsTr" / image.name
        if not image.name.endswith("_0002.nii.gz"):
            shutil.copy(gt[image.name[: -len(".nii.gz")]], studies / "labels" / "final" / image.name)
    abdomen = make_abdomen(str(root / "abdomen"), n_subjects=4, shape=(32, 24, 32), seed=1).parent
    for k in (1, 2):
        name = f"AbdomenCTCT_000{k}_0000.nii.gz"
        shutil.copy(abdomen / "imagesTr" / name, studies / name)
    shutil.copy(abdomen / "labelsTr" / "AbdomenCTCT_0002_0000.nii.gz", studies / "labels" / "final")
    seg_images = [abdomen / "imagesTr" / f"AbdomenCTCT_000{k}_0000.nii.gz" for k in (3, 4)]
    seg = make_segmentation_bundle(root / "seg_bundle", seg_images, [abdomen / "labelsTr" / p.name for p in seg_images])
    # the ES frame of each patient (ED is frame01; the ES frame number differs per patient, as in ACDC)
    es = {k.split("_")[0]: k for k in gt if k.startswith("patient") and not k.endswith("_frame01")}
    return {"studies": studies, "gt": gt, "thorax": thorax, "seg_bundle": seg, "es": es}


def perturbed_checkpoint(path: Path) -> Path:
    """The ACDC network with perturbed random weights: its fields move every structure far off (Dice ~0-20 % where no
    registration gives 65-90 %), unlike a fresh network, which predicts a field of ~0."""
    random_checkpoint("segreg_acdc", path)
    ckpt = torch.load(path, weights_only=False)
    gen = torch.Generator().manual_seed(1)
    ckpt["model"] = {
        k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
        for k, v in ckpt["model"].items()
    }
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel")
    data = build_studies(root)
    bundles = root / "bundles"
    export_bundle("segreg_acdc", str(bundles), checkpoint=str(perturbed_checkpoint(root / "random.pt")))
    export_bundle("segreg_thorax", str(bundles))
    export_bundle("segreg_abdomen", str(bundles), checkpoint=str(random_checkpoint("segreg_abdomen", root / "a.pt")))
    cfg_path = bundles / "segreg_abdomen" / "configs" / "inference.json"  # a user pointing the bundle at a seg model
    cfg = json.loads(cfg_path.read_text())
    cfg["seg_bundle"], cfg["seg_label_map"] = (str(p) for p in data["seg_bundle"])
    cfg_path.write_text(json.dumps(cfg, indent=4))
    port = free_port()
    log = open(root / "server.log", "w")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env["MONAI_LABEL_DATASTORE_AUTO_RELOAD"] = "false"
    cmd = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(APP),
        "--studies",
        str(data["studies"]),
        "--conf",
        "models",
        "segreg_acdc,segreg_thorax,segreg_abdomen",
        "--conf",
        "bundle_dir",
        str(bundles),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{(root / 'server.log').read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail(f"no answer in {START_TIMEOUT_S} s:\n{(root / 'server.log').read_text()[-4000:]}")
            time.sleep(1)
        yield {"url": url, "bundles": bundles, "root": root, "log": root / "server.log", **data}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # stop by PID (its process group: uvicorn and any worker)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def infer(server, model: str, image: str, out: Path, **params) -> Path:
    r = requests.post(
        f"{server['url']}/infer/{model}",
        params={"image": image, "output": "image"},
        files={"params": (None, json.dumps(params))},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert r.status_code == 200, f"{r.status_code}: {r.text[:2000]}\n{server['log'].read_text()[-3000:]}"
    out.write_bytes(r.content)
    return out


def array(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def dice(a: np.ndarray, b: np.ndarray, labels) -> dict:
    return {int(k): 200.0 * np.sum((a == k) & (b == k)) / max(np.sum(a == k) + np.sum(b == k), 1) for k in labels}


def assert_same_header(result: Path, image: Path):
    r, f = nib.load(str(result)), nib.load(str(image))
    assert r.shape[:3] == f.shape[:3]
    np.testing.assert_allclose(r.affine, f.affine, atol=1e-5)
    np.testing.assert_allclose(r.header.get_zooms()[:3], f.header.get_zooms()[:3], atol=1e-6)
    assert int(r.header["qform_code"]) == int(f.header["qform_code"])


def test_info_lists_models_with_the_bundle_label_names(server):
    info = requests.get(f"{server['url']}/info/", timeout=30).json()
    for name in ("segreg_acdc", "segreg_thorax"):
        meta = json.loads((server["bundles"] / name / "configs" / "metadata.json").read_text())
        want = {n: int(i) for i, n in meta["labels"].items() if int(i) != 0}
        assert info["models"][name]["labels"] == want
    assert "segreg_acdc" in info["trainers"] and "segreg_thorax" not in info["trainers"]  # training-free
    assert {"RV", "myocardium", "LV_cavity", "lung", "heart"} <= set(info["labels"])


def test_thorax_propagates_the_planning_ct_labels_onto_the_cbct(server, tmp_path):
    """No checkpoint needed; the default moving image is the case's planning CT (phase 0000)."""
    fixed = server["studies"] / "ThoraxCBCT_0000_0001.nii.gz"
    result = infer(server, "segreg_thorax", "ThoraxCBCT_0000_0001", tmp_path / "label.nii.gz")
    assert_same_header(result, fixed)
    # the bundle's default region set
    mapping = load_merge_map(
        server["bundles"] / "segreg_thorax" / "configs" / "totalsegmentator_to_segreg_extended.json"
    )
    truth = merge_labels(array(server["gt"]["ThoraxCBCT_0000_0001"]).astype(np.int64), mapping["map"], "ignore")
    before = merge_labels(array(server["gt"]["ThoraxCBCT_0000_0000"]).astype(np.int64), mapping["map"], "ignore")
    labels = [k for k in np.unique(truth) if k]
    after_d, before_d = dice(array(result), truth, labels), dice(before, truth, labels)
    assert set(np.unique(array(result))) <= set(mapping["regions"])  # bundle ids, not TotalSegmentator ids
    assert all(after_d[k] > 0 for k in labels), after_d
    assert np.mean(list(after_d.values())) >= np.mean(list(before_d.values())) - 0.5, (after_d, before_d)
    # the displacement against the exact motion (mm), inside the body
    disp = infer(server, "segreg_thorax", "ThoraxCBCT_0000_0001", tmp_path / "ddf.nii.gz", result="ddf")
    assert_same_header(disp, fixed)
    truth_disp = array(server["thorax"] / "gtdisp" / "disp_0000_0001_0000_0000.nii.gz")
    spacing = np.array(nib.load(str(fixed)).header.get_zooms()[:3])
    body = truth > 0
    epe = np.linalg.norm((array(disp) - truth_disp) * spacing, axis=-1)[body].mean()
    epe0 = np.linalg.norm(truth_disp * spacing, axis=-1)[body].mean()
    assert epe < 0.7 * epe0, (epe, epe0)


def test_acdc_result_is_what_the_exported_bundle_computes(server, tmp_path):
    """The default moving image of an ES frame is the patient's other (ED) frame; the app's label map equals the one
    the bundle writes when run directly on the same pair."""
    fixed_id, moving_id = server["es"]["patient001"], "patient001_frame01"
    studies, labels = server["studies"], server["studies"] / "labels" / "final"
    result = infer(server, "segreg_acdc", fixed_id, tmp_path / "label.nii.gz")
    assert_same_header(result, studies / f"{fixed_id}.nii.gz")
    direct = tmp_path / "direct"
    register_with_bundle(
        str(studies / f"{fixed_id}.nii.gz"),
        str(studies / f"{moving_id}.nii.gz"),
        str(labels / f"{fixed_id}.nii.gz"),
        str(labels / f"{moving_id}.nii.gz"),
        str(direct),
        str(server["bundles"] / "segreg_acdc"),
    )
    (warped,) = (direct / "warped").glob("*_label.nii.gz")
    np.testing.assert_array_equal(array(result), array(warped))
    assert set(np.unique(array(result))) == {0, 1, 2, 3}
    moved = np.mean(array(result) != array(labels / f"{moving_id}.nii.gz"))
    assert moved > 0.01, "the perturbed network moves the labels"


def test_an_unlabelled_fixed_image_is_segmented_by_the_bundle_chain(server, tmp_path):
    fixed_id = "AbdomenCTCT_0001_0000"
    r = requests.post(
        f"{server['url']}/infer/segreg_abdomen",
        params={"image": fixed_id, "output": "json"},
        files={"params": (None, json.dumps({"moving_image": "AbdomenCTCT_0002_0000"}))},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert r.status_code == 200, f"{r.status_code}: {r.text[:2000]}\n{server['log'].read_text()[-3000:]}"
    result = r.json()
    assert result["fixed_label_source"].startswith("automatic segmentation"), result
    assert (result["fixed_image"], result["moving_image"]) == (fixed_id, "AbdomenCTCT_0002_0000")
    # no default moving image for inter-subject data
    r = requests.post(
        f"{server['url']}/infer/segreg_abdomen",
        params={"image": fixed_id, "output": "json"},
        files={"params": (None, "{}")},
        timeout=60,
    )
    assert r.status_code == 400 and "moving_image" in r.text


BAD_REQUESTS = [  # (model, image, params, words the answer must hold)
    ("segreg_thorax", "ThoraxCBCT_0000_0002", {}, ("no label map", "fixed_label_tag")),
    ("segreg_acdc", "ES:patient001", {"moving_image": "patient999_frame01"}, ("patient999_frame01",)),
    ("segreg_thorax", "ThoraxCBCT_0000_0000", {}, ("planning CT",)),
    ("segreg_thorax", "ThoraxCBCT_0099_0001", {}, ("not in the datastore",)),
]


@pytest.mark.parametrize("model, image, params, words", BAD_REQUESTS)
def test_requests_it_cannot_serve_get_a_400_with_the_fix(server, model, image, params, words):
    image = server["es"][image[3:]] if image.startswith("ES:") else image
    r = requests.post(
        f"{server['url']}/infer/{model}",
        params={"image": image, "output": "json"},
        files={"params": (None, json.dumps(params))},
        timeout=60,
    )
    assert r.status_code == 400 and all(w in r.text for w in words), r.text


def test_train_builds_pairs_by_subject_and_the_next_inference_uses_the_weights(server, tmp_path):
    model = server["bundles"] / "segreg_acdc" / "models" / "model.pt"
    before = model.read_bytes()
    r = requests.post(
        f"{server['url']}/train/segreg_acdc",
        params={"run_sync": "true"},
        json={"max_epochs": 1, "val_fraction": 0.3},
        timeout=REQUEST_TIMEOUT_S,
    )
    assert r.status_code == 200, f"{r.status_code}: {r.text[:2000]}\n{server['log'].read_text()[-3000:]}"
    stats = r.json()
    # 3 patients, both directions within each: 2 patients train (4 pairs), 1 validates (2 pairs)
    assert (stats["train_pairs"], stats["val_pairs"], stats["epochs"], stats["validation_held_out"]) == (4, 2, 1, True)
    assert stats["best_metric"] is not None and model.read_bytes() != before
    fixed_id = server["es"]["patient002"]
    result = infer(server, "segreg_acdc", fixed_id, tmp_path / "label.nii.gz")
    truth = array(server["gt"][fixed_id])
    unregistered = dice(array(server["gt"]["patient002_frame01"]), truth, (1, 2, 3))
    after = dice(array(result), truth, (1, 2, 3))
    # one epoch barely moves anything, but the new weights must be the ones used: the perturbed ones score ~0-20 %
    assert np.mean(list(after.values())) >= np.mean(list(unregistered.values())) - 2.0, (after, unregistered)
