"""Flags read the way users type them: every ``python -m custom`` verb and every bundle config id that is a flag takes
``false``/``False``/``0``/``no`` (and the true spellings) as the boolean it means, and refuses anything else by name.

Python Fire and ``python -m monai.bundle run`` hand ``--overwrite false`` through as the text ``"false"``; the verbs
run here in-process through ``custom.__main__.main`` with ``sys.argv`` as the shell would give it, and the bundles
through ``ConfigWorkflow`` with the text overrides MONAI's runner passes on.
"""

import json
import sys
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import pytest
from bundle_utils import REPO, TINY_NET, configs, error_text, run, workflow
from test_register_cli import RAS, shifted_pair

from custom.flags import as_bool, auto_or_bool, check_flags, optional, optional_float
from custom.synthetic.thorax import make_thorax
from custom.validation import InputError, root_cause

FALSE = ["false", "False", "0", "no"]
TRUE = ["true", "True", "1", "yes"]
FAST_ARGS = ["--levels", "[2,1]", "--iterations", "[8,4]"]


def cli(*args) -> int:
    """``python -m custom <args>`` in this process; the exit status (0 when it returns)."""
    from custom.__main__ import main

    with mock.patch.object(sys, "argv", ["custom", *map(str, args)]):
        try:
            main()
        except SystemExit as e:
            return int(e.code or 0)
    return 0


def test_every_spelling_reads_as_the_boolean_it_means_and_others_are_refused_by_name():
    for word in FALSE + ["FALSE", "Off", " no ", False, 0]:
        assert as_bool(word, "x") is False, word
    for word in TRUE + ["TRUE", "On", True, 1]:
        assert as_bool(word, "x") is True, word
    for bad in ("maybe", "", "2", 2, None, [True]):
        with pytest.raises(InputError, match="--overwrite takes true or false"):
            as_bool(bad, "overwrite")
    assert auto_or_bool("AUTO", "in_plane") == "auto" and auto_or_bool("no", "in_plane") is False
    with pytest.raises(InputError, match="--in_plane takes auto, true or false") as refused:
        auto_or_bool("sometimes", "in_plane")
    # the one-line summary under a bundle's traceback names the same values (not the hidden as_bool message)
    wrapped = RuntimeError("Failed to evaluate ConfigExpression")
    wrapped.__cause__ = refused.value
    assert "takes auto, true or false" in str(root_cause(wrapped))
    assert optional("None") is None and optional("null") is None and optional_float("none", "g") is None
    assert optional_float("2", "g") == 2.0
    with pytest.raises(InputError, match="--noise_gate takes a number or none"):
        optional_float("abc", "noise_gate")
    assert check_flags({"a": "no", "b": "On"}) == {"a": False, "b": True}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("flag_pair")
    return shifted_pair(root, RAS)


@pytest.fixture(scope="module")
def thick_pair(tmp_path_factory):
    """The sliding-box pair on a 2 x 2 x 6 mm grid: thick slices (ratio 3)."""
    root = tmp_path_factory.mktemp("thick_pair")
    return shifted_pair(root, np.diag([2.0, 2.0, 6.0, 1.0]))


@pytest.mark.parametrize("word", FALSE)
def test_register_save_warped_false_writes_only_the_displacement(pair, tmp_path, word):
    f, fl, m, ml = pair
    assert cli("register", f, m, "--fixed_label", fl, "--moving_label", ml, "--out_dir", tmp_path, *FAST_ARGS,
               "--progress", "false", "--save_warped", word, "--inverse", word) == 0  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["f__m_disp.nii.gz"]  # no warped files, no inverse


@pytest.mark.parametrize("word", FALSE)
def test_register_warp_and_export_overwrite_false_refuse_and_keep_the_files(pair, tmp_path, word, capsys):
    f, fl, m, ml = pair
    out = tmp_path / "reg"
    args = ["register", f, m, "--fixed_label", fl, "--moving_label", ml, "--out_dir", out, *FAST_ARGS]
    assert cli(*args, "--progress", "false") == 0
    before = {p: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 3
    capsys.readouterr()
    assert cli(*args, "--overwrite", word) == 2
    assert "--overwrite true" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.iterdir()} == before
    warped = out / "again.nii.gz"
    disp = str(out / "f__m_disp.nii.gz")
    assert cli("warp", m, disp, warped) == 0
    kept = warped.read_bytes()
    assert cli("warp", fl, disp, warped, "--kind", "label", "--overwrite", word) == 2 and warped.read_bytes() == kept
    for verb in ("convert", "invert"):
        assert cli(verb, disp, warped, "--overwrite", word) == 2 and warped.read_bytes() == kept
    release = tmp_path / "release"
    assert cli("export", "--bundle", "segreg_thorax", "--out_dir", release) == 0
    stamp = (release / "segreg_thorax" / "configs" / "inference.json").stat().st_mtime_ns
    assert cli("export", "--bundle", "segreg_thorax", "--out_dir", release, "--overwrite", word) == 2
    assert (release / "segreg_thorax" / "configs" / "inference.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("word", FALSE)
def test_register_in_plane_and_progress_false_turn_the_mode_off(thick_pair, tmp_path, word, capsys):
    f, fl, m, ml = thick_pair
    base = ["register", f, m, "--fixed_label", fl, "--moving_label", ml, *FAST_ARGS, "--save_warped", "no"]
    assert cli(*base, "--out_dir", tmp_path / "auto", "--progress", word) == 0
    out = capsys.readouterr()
    assert "IterativeSegReg" not in out.err  # no progress bar
    assert "through-plane displacement (axis 2) is held at 0" in out.out  # the default on thick slices, said once
    assert np.abs(nib.load(tmp_path / "auto" / "f__m_disp.nii.gz").get_fdata()[..., 2]).max() == 0
    assert cli(*base, "--out_dir", tmp_path / "free", "--in_plane", word, "--progress", "0") == 0
    assert "held at 0" not in capsys.readouterr().out
    assert np.abs(nib.load(tmp_path / "free" / "f__m_disp.nii.gz").get_fdata()[..., 2]).max() > 0


def test_require_weights_false_exports_a_trained_bundle_without_weights(tmp_path):
    if (REPO / "bundles" / "segreg_acdc" / "models" / "model_edt_dice.pt").is_file():
        pytest.skip("this clone has trained weights; the bundle would ship them")
    for word in FALSE:
        out = tmp_path / word
        assert cli("export", "--bundle", "segreg_acdc", "--out_dir", out, "--require_weights", word) == 0
        assert not any((out / "segreg_acdc" / "models").iterdir())
    assert cli("export", "--bundle", "segreg_acdc", "--out_dir", tmp_path / "t", "--require_weights", "true") == 2


def test_a_bad_spelling_is_refused_by_every_verb_before_any_work(pair, tmp_path, capsys):
    f, fl, m, ml = pair
    out = ["--out_dir", tmp_path / "o"]
    for args, option in (
        (["register", f, m, *out, "--save_warped", "maybe"], "--save_warped"),
        (["register", f, m, *out, "--in_plane", "sometimes"], "--in_plane"),
        (["register", f, m, *out, "--noise_gate", "high"], "--noise_gate"),
        (["register", f, m, *out, "--sigma_mm", "wide"], "--sigma_mm"),
        (["register", f, m, *out, "--sigma", "2", "--sigma_mm", "2"], "--sigma_mm"),
        (["warp", m, f, tmp_path / "w" / "x.nii.gz", "--overwrite", "perhaps"], "--overwrite"),
        (["export", "--bundle", "segreg_thorax", *out, "--overwrite", "yes please"], "--overwrite"),
    ):
        capsys.readouterr()
        assert cli(*args) == 2, args
        assert option in capsys.readouterr().err, args
    assert not any(tmp_path.iterdir())  # nothing written, no folder made


def test_register_noise_gate_none_means_plain_mind(pair, tmp_path):
    f, fl, m, ml = pair
    args = ["register", f, m, "--out_dir", tmp_path, *FAST_ARGS, "--save_warped", "false", "--progress", "false"]
    assert cli(*args, "--noise_gate", "none") == 0


# ---------------------------------------------------------------------------------------------- bundle config flags
def bool_ids(path: Path) -> list[str]:
    cfg = json.loads(path.read_text())
    return [k for k, v in cfg.items() if isinstance(v, bool)]


@pytest.mark.parametrize(
    "path", sorted(REPO.glob("bundles/*/configs/*.json")), ids=lambda p: f"{p.parent.parent.name}/{p.name}"
)
def test_every_flag_id_of_a_config_is_read_before_use(path):
    """Each top-level boolean id is checked in ``initialize`` and every use converts the text MONAI hands through."""
    cfg = json.loads(path.read_text())
    if not isinstance(cfg, dict) or "initialize" not in cfg:
        return
    base = path.parent / ("train.json" if "train" in path.name else "inference.json")
    flags = bool_ids(base) if base != path else bool_ids(path)
    checks = " ".join(s for s in cfg["initialize"] if "custom.flags" in s)
    for flag in flags:
        assert f"'{flag}': @{flag}" in checks, f"{path.name}: {flag} not checked in initialize"
    text = json.dumps(cfg)
    for flag in flags:
        for use in text.split(f"@{flag}")[1:]:
            assert not use[:1].isalnum() and not use.startswith("_")  # an id of its own, e.g. @amp not @amp_x
        plain_uses = text.count(f'"@{flag}"')  # handed to a component: ours read it with custom.flags
        wrapped = text.count(f"as_bool(@{flag}, '{flag}')")
        assert text.count(f"@{flag}") >= plain_uses + wrapped


@pytest.fixture(scope="module")
def thorax(tmp_path_factory):
    root = tmp_path_factory.mktemp("flag_thorax")
    return make_thorax(str(root), n_subjects=1, shape=(24, 20, 16), n_keypoints=5, seed=0).parent


THORAX_FAST = {"level_spacing_mm": [8.0], "iterations": [2], "num_workers": 0}


@pytest.mark.parametrize("word", FALSE)
def test_bundle_evaluation_reads_save_warped_overwrite_and_progress(thorax, tmp_path, word):
    infer = configs("segreg_thorax") / "inference.json"
    out = tmp_path / "eval"
    run([infer], "infer", dataset_dir=str(thorax), output_dir=str(out), save_warped=word, progress=word, **THORAX_FAST)
    assert (out / "metrics.csv").is_file() and not (out / "warped").exists()
    table = (out / "metrics.csv").read_bytes()
    with pytest.raises(Exception) as err:
        run([infer], "infer", dataset_dir=str(thorax), output_dir=str(out), overwrite=word, **THORAX_FAST)
    assert "--overwrite true" in error_text(err.value) and (out / "metrics.csv").read_bytes() == table
    wf = workflow([infer], "infer", dataset_dir=str(thorax), progress=word, in_plane=word, **THORAX_FAST)
    optimiser = wf.parser.get_parsed_content("inferer").optimiser
    assert optimiser.progress is False and optimiser.in_plane is False


@pytest.mark.parametrize("bundle", ["segreg_acdc", "segreg_abdomen", "segreg_thorax"])
@pytest.mark.parametrize("evaluate", [False, True], ids=["inference", "evaluate"])
def test_bundle_progress_id_turns_the_ignite_bar_off(bundle, evaluate, tmp_path):
    # --progress false in a bundle run drops its ignite ProgressBar (and the thorax solver's own bar, tested above)
    files = [configs(bundle) / "inference.json"] + ([configs(bundle) / "evaluate.json"] if evaluate else [])

    def bars(**override):
        wf = workflow(files, "infer", dataset_dir=str(tmp_path), output_dir=str(tmp_path / "out"), **override)
        return [type(h).__name__ for h in wf.parser.get_parsed_content("handlers")].count("ProgressBar")

    assert bars() == 1
    for word in ("no", "False", "0"):
        assert bars(progress=word) == 0
    assert bars(progress="yes") == 1


@pytest.mark.parametrize("word", FALSE)
def test_bundle_training_reads_resume_overwrite_amp_and_augment(tmp_path, word):
    from custom.synthetic.acdc import make_acdc

    train = configs("segreg_acdc") / "train.json"
    make_acdc(str(tmp_path / "acdc"), n_subjects=2, n_test=0, shape=(32, 32, 16), seed=0)
    kw = dict(dataset_dir=str(tmp_path / "acdc"), ckpt_dir=str(tmp_path / "models"), num_workers=0, **TINY_NET)
    kw.update(pixdim=[3.6, 3.6, 10.0], spatial_size=[32, 32, 16], train_fraction=0.5, val_interval=1)
    wf = workflow([train], "train", amp=word, augment=word, resume=word, overwrite=word, **kw)
    assert wf.parser.get_parsed_content("train#trainer").amp is False
    names = [type(t).__name__ for t in wf.parser.get_parsed_content("train#preprocessing").transforms]
    assert not any(n.startswith("Rand") and n != "RandRegionPaird" for n in names)
    (tmp_path / "models").mkdir(exist_ok=True)
    last = tmp_path / "models" / "last_model_edt_dice.pt"
    last.write_bytes(b"an earlier run")
    with pytest.raises(Exception) as err:  # neither resumed nor overwritten: refused, the file kept
        run([train], "train", epochs=1, resume=word, overwrite=word, **kw)
    assert "--resume true" in error_text(err.value) and last.read_bytes() == b"an earlier run"


def test_bundle_configs_refuse_a_bad_spelling_at_initialize(thorax, tmp_path):
    with pytest.raises(Exception) as err:
        workflow([configs("segreg_thorax") / "inference.json"], "infer", dataset_dir=str(thorax), overwrite="nope")
    assert "--overwrite takes true or false" in error_text(err.value)
    with pytest.raises(Exception) as err:
        workflow([configs("segreg_acdc") / "train.json"], "train", augment="sure")
    assert "--augment takes true or false" in error_text(err.value)


def test_thorax_composition_width_in_voxels_and_in_mm_together_are_refused(thorax):
    # since 0.3.7 the width is composition_sigma_mm; an override of the old composition_sigma alone must not be
    # silently combined with it
    wf = workflow([configs("segreg_thorax") / "inference.json"], "infer", dataset_dir=str(thorax), composition_sigma=2)
    with pytest.raises(Exception) as err:
        wf.parser.get_parsed_content("inferer")
    assert "sigma (voxels) or sigma_mm, not both" in error_text(err.value)
    wf = workflow(
        [configs("segreg_thorax") / "inference.json"],
        "infer",
        dataset_dir=str(thorax),
        composition_sigma=2,
        composition_sigma_mm=None,
    )
    assert wf.parser.get_parsed_content("inferer").optimiser.composition_sigma([4.0, 4.0, 4.0]) == 2.0
    default = workflow([configs("segreg_thorax") / "inference.json"], "infer", dataset_dir=str(thorax))
    assert default.parser.get_parsed_content("inferer").optimiser.composition_sigma([4.0, 2.0, 1.0]) == (0.5, 1.0, 2.0)
