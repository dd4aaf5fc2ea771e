import json
import subprocess
import sys


def test_make_data_cli_writes_the_layout(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "custom",
            "make-data",
            "--dataset",
            "thorax",
            "--out_dir",
            str(tmp_path),
            "--n_subjects",
            "1",
            "--shape",
            "[32,32,24]",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    spec = json.loads((tmp_path / "thorax" / "ThoraxCBCT_dataset.json").read_text())
    assert spec["numTraining"] == 3


def test_cli_rejects_unknown_dataset(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "custom", "make-data", "--dataset", "brain", "--out_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0 and "unknown dataset" in out.stderr


def test_make_data_keeps_an_existing_set_unless_told_and_then_leaves_nothing_of_it(tmp_path):
    from custom.__main__ import make_data

    tiny = dict(dataset="thorax", out_dir=str(tmp_path), n_subjects=1, shape=(24, 20, 16))
    make_data(**tiny)
    cbct = tmp_path / "thorax" / "imagesTr" / "ThoraxCBCT_0000_0001.nii.gz"
    mine = tmp_path / "thorax" / "imagesTr" / "my_own_scan.nii.gz"  # something a user put into the set's folder
    mine.write_bytes(b"keep me")
    before = cbct.read_bytes()
    for word in ("false", "no", "0"):
        out = subprocess.run(
            [sys.executable, "-m", "custom", "make-data", "--dataset", "thorax", "--out_dir", str(tmp_path),
             "--n_subjects", "1", "--shape", "[24,20,16]", "--realism", "cbct", "--overwrite", word],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode != 0 and "pass --overwrite true" in out.stderr
    assert mine.read_bytes() == b"keep me" and cbct.read_bytes() == before
    make_data(**tiny, realism="cbct", overwrite="true")
    assert not mine.exists()  # the earlier set's folder was emptied, not mixed with the new set
    assert cbct.read_bytes() != before and (tmp_path / "thorax" / "gtdisp").is_dir()  # the CBCT-like set
