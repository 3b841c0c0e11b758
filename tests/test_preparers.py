"""Datalist preparers on small fake folder trees, including the error cases, and datalist loading."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, save_nifti, script_main

from pipeline.data.datalist import load_datalist, subject_name
from pipeline.data.preparers import LAYOUTS, prepare_entries
from pipeline.errors import InputError

VOL = np.ones((6, 7, 5), np.float32)
SCRIPT = str(REPO / "scripts" / "prepare_datalist.py")


def make_tree(root, layout):
    """Two cases of ``layout`` with every modality; returns the expected (image, other) file names per case."""
    if layout == "hcp":
        for s in ("100307", "100408"):
            for m in ("T1w", "T2w"):
                save_nifti(VOL, root / s / "T1w" / f"{m}_acpc_dc_restore_brain.nii.gz")
    elif layout == "ixi":
        for s in ("IXI002-Guys-0828", "IXI012-HH-1211"):
            for m in ("T1", "T2", "PD"):
                save_nifti(VOL, root / "images" / f"{s}_{m}.nii.gz")
            save_nifti(VOL.astype(np.uint8), root / "segmentations" / f"{s}_T1_DLMUSE.nii.gz")
    elif layout == "brats2017":
        for c in ("Brats17_2013_2_1", "Brats17_TCIA_101_1"):
            for m in ("t1", "t1ce", "t2", "flair", "seg"):
                save_nifti(VOL, root / "HGG" / c / f"{c}_{m}.nii.gz")
    elif layout == "isles2015":
        for case, ident in (("1", 70612), ("2", 70618)):
            for i, m in enumerate(("T1", "T2", "Flair", "DWI", "OT")):
                kind = "OT" if m == "OT" else f"MR_{m}"
                name = f"VSD.Brain.XX.O.{kind}.{ident + i}"
                save_nifti(VOL, root / case / name / f"{name}.nii")
    elif layout == "brats2013-deepmedic":
        for c in ("pat0001", "pat0002"):
            for m in ("Flair_subtrMeanDivStd", "T1c_subtrMeanDivStd", "OTMultiClass", "brainmask"):
                save_nifti(VOL, root / c / f"{m}.nii.gz")
    elif layout == "brats-toolkit":
        for c in ("TCGA-DU-7294", "TCGA-DU-7300"):
            for m in ("t1_bet", "t1c_bet", "t2_bet", "fla_bet", "fusion_mav_pseudolabel"):
                save_nifti(VOL, root / c / f"{m}.nii.gz")
    elif layout == "open-ms":
        for c in ("patient01", "patient02"):
            for m in ("T1", "T2", "FLAIR", "T1POST", "lesion_gt"):
                save_nifti(VOL, root / c / f"{m}.nii.gz")


EXPECTED = {  # layout -> (modality, substring of every image name, keys of every entry, subject ids)
    "hcp": ("t1", "T1w_acpc_dc_restore_brain", {"image"}, ["100307", "100408"]),
    "ixi": (None, "_T1.nii.gz", {"image", "brainmask"}, ["IXI002-Guys-0828", "IXI012-HH-1211"]),
    "brats2017": ("T1c", "_t1ce.nii.gz", {"image", "label"}, ["Brats17_2013_2_1", "Brats17_TCIA_101_1"]),
    "isles2015": ("flair", "MR_Flair", {"image", "label"}, ["1", "2"]),
    "brats2013-deepmedic": (None, "T1c_subtrMeanDivStd", {"image", "brainmask", "label"}, ["pat0001", "pat0002"]),
    "open-ms": ("T1C", "T1POST", {"image", "label"}, ["patient01", "patient02"]),
    "brats-toolkit": ("flair", "fla_bet", {"image", "label"}, ["TCGA-DU-7294", "TCGA-DU-7300"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_finds_its_cases_with_their_subject_ids(tmp_path, layout):
    make_tree(tmp_path, layout)
    modality, token, keys, subjects = EXPECTED[layout]
    entries = prepare_entries(layout, tmp_path, modality)
    assert len(entries) == 2
    for entry in entries:
        assert set(entry) == keys | {"subject"} and token in entry["image"]
    assert [e["subject"] for e in entries] == subjects


def test_missing_label_and_grid_mismatch_are_all_reported(tmp_path):
    make_tree(tmp_path, "brats2017")
    (tmp_path / "HGG" / "Brats17_2013_2_1" / "Brats17_2013_2_1_seg.nii.gz").unlink()
    save_nifti(np.ones((6, 7, 4)), tmp_path / "HGG" / "Brats17_TCIA_101_1" / "Brats17_TCIA_101_1_seg.nii.gz")
    with pytest.raises(InputError) as info:
        prepare_entries("brats2017", tmp_path)
    text = str(info.value)
    assert "2 problem(s)" in text
    assert "Brats17_2013_2_1_seg.nii.gz is missing" in text
    assert "Brats17_TCIA_101_1_seg.nii.gz (label): shape (6, 7, 4) differs" in text


def test_affine_mismatch_and_unreadable_file(tmp_path):
    make_tree(tmp_path, "open-ms")
    save_nifti(VOL, tmp_path / "patient01" / "lesion_gt.nii.gz", np.diag([1.0, 1.0, 3.0, 1.0]))
    (tmp_path / "patient02" / "T1.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError) as info:
        prepare_entries("open-ms", tmp_path)
    assert "patient01/lesion_gt.nii.gz (label): affine differs" in str(info.value)
    assert "patient02/T1.nii.gz: cannot be read as NIfTI" in str(info.value)


def test_skip_incomplete_drops_images_without_mask(tmp_path):
    make_tree(tmp_path, "ixi")
    (tmp_path / "segmentations" / "IXI012-HH-1211_T1_DLMUSE.nii.gz").unlink()
    with pytest.raises(InputError, match="IXI012-HH-1211_T1.nii.gz: no mask"):
        prepare_entries("ixi", tmp_path)
    assert len(prepare_entries("ixi", tmp_path, skip_incomplete=True)) == 1


@pytest.mark.parametrize(
    "layout, root, modality, message",
    [
        ("nosuch", ".", None, "unknown layout"),
        ("hcp", "missing-dir", None, "does not exist"),
        ("hcp", ".", "DWI", "no modality 'DWI'"),
        ("hcp", ".", None, "no 'hcp' image"),
    ],
)
def test_user_errors(tmp_path, layout, root, modality, message):
    with pytest.raises(InputError, match=message):
        prepare_entries(layout, tmp_path / root, modality)


def test_cli_writes_relative_paths_and_merges_keys(tmp_path):
    make_tree(tmp_path / "ixi", "ixi")
    make_tree(tmp_path / "ms", "open-ms")
    out = tmp_path / "lists" / "datalist.json"
    main = script_main("prepare_datalist")
    assert main(["--layout", "ixi", "--root", str(tmp_path / "ixi"), "--out", str(out)]) == 0
    assert main(["--layout", "open-ms", "--root", str(tmp_path / "ms"), "--out", str(out)]) == 0
    assert (
        main(
            [
                "--layout",
                "open-ms",
                "--root",
                str(tmp_path / "ms"),
                "--out",
                str(out),
                "--modality",
                "flair",
                "--append",
            ]
        )
        == 0
    )
    content = json.loads(out.read_text())
    assert len(content["training"]) == 2 and len(content["test"]) == 4
    assert content["test"][0]["image"] == "../ms/patient01/T1.nii.gz"
    assert load_datalist(out, "test")[3]["image"].endswith("patient02/FLAIR.nii.gz")
    assert [e["subject"] for e in content["test"]] == ["patient01", "patient02", "patient01_FLAIR", "patient02_FLAIR"]


def test_cli_reports_errors_without_traceback(tmp_path):
    """One real subprocess: the command line a user types."""
    result = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--layout",
            "hcp",
            "--root",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "d.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "d.json").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"test": []}', "no list 'training'"),
        ('{"training": []}', "non-empty"),
        ('{"training": [{"brainmask": "m.nii.gz"}]}', "lacks \\['image'\\]"),
        ('{"training": [{"image": "a.nii.gz"}, {"image": "b.nii.gz"}]}', "2 problem"),
        ('{"training": [{"image": "a.nii.gz", "subject": "x/y"}]}', "'subject' must be a non-empty name without '/'"),
        ('{"training": [{"image": "a.nii.gz", "subject": 7}]}', "'subject' must be a non-empty name"),
        ('{"training": [{"image": "a.nii.gz", "subject": "s"}, {"image": "a.nii.gz", "subject": "s"}]}', "not unique"),
    ],
)
def test_datalist_errors(tmp_path, content, message):
    path = tmp_path / "datalist.json"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        load_datalist(path, "training")


def test_train_val_split_prefers_an_explicit_validation_list(tmp_path):
    from pipeline.bundle_support import train_val_split

    for name in ("a", "b", "c"):
        save_nifti(VOL, tmp_path / f"{name}.nii.gz")
    path = tmp_path / "datalist.json"
    path.write_text(
        json.dumps({"training": [{"image": "a.nii.gz"}, {"image": "b.nii.gz"}], "validation": [{"image": "c.nii.gz"}]})
    )
    training, validation = train_val_split(path, 0.5, seed=0)
    assert [e["image"] for e in validation] == [str(tmp_path / "c.nii.gz")] and len(training) == 2
    path.write_text(json.dumps({"training": [{"image": "a.nii.gz"}, {"image": "b.nii.gz"}]}))
    training, validation = train_val_split(path, 0.5, seed=0)
    assert len(training) == 1 and len(validation) == 1


def test_subject_ids_name_the_outputs_where_file_names_repeat(tmp_path):
    """BraTS-like layouts name every subject's file alike: the entries' subject ids tell them apart (loaded
    unchanged, used by subject_name); without one the file name is all there is (negative control)."""
    for case in ("pat0001", "pat0002"):
        save_nifti(VOL, tmp_path / case / "T1c.nii.gz")
    entries = [{"subject": c, "image": f"{c}/T1c.nii.gz"} for c in ("pat0001", "pat0002")]
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"test": entries}))
    loaded = load_datalist(path, "test")
    assert [subject_name(e) for e in loaded] == ["pat0001", "pat0002"]
    assert [subject_name({"image": e["image"]}) for e in loaded] == ["T1c", "T1c"]
