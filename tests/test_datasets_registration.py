"""Registration of the real datasets: names and metadata equal the published ones
(``../shared/spec/datasets``), missing data names the path and the script to run, registering
again is harmless, and tiny datasets in the real formats load through the registered loaders."""

import importlib
import json
import os
import re

import numpy as np
import pytest
import yaml
from conftest import REPO, SHARED
from dataset_samples import (
    MAPILLARY_STEM,
    load_prepare_script,
    write_ade20k,
    write_ade20k_full,
    write_coco_panoptic_val,
    write_coco_stuff_10k,
    write_mapillary_vistas_val,
)
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data.datasets import builtin as detectron2_builtin
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json

import mask_former.data.datasets as package_datasets
from mask_former.data.datasets import (
    ade20k,
    ade20k_full,
    coco_panoptic,
    coco_stuff_10k,
    mapillary_vistas,
)
from mask_former.data.datasets.registration import DatasetNotPreparedError, datasets_root

SPEC = SHARED / "spec" / "datasets"
# module -> its registration function (looked up on the module, which a test reloads)
REGISTRATIONS = {
    ade20k: "register_all_ade20k",
    ade20k_full: "register_all_ade20k_full",
    coco_panoptic: "register_all_coco_panoptic",
    coco_stuff_10k: "register_all_coco_stuff_10k",
    mapillary_vistas: "register_all_mapillary_vistas",
}


def _register_all(root):
    for module, function in REGISTRATIONS.items():
        getattr(module, function)(root)


def _read_spec(file_name):
    path = SPEC / file_name
    if not path.exists():
        pytest.fail(f"{path} is missing (set MASK_FORMER_SHARED to the shared/ folder)")
    with open(path) as f:
        return json.load(f)


MASK2FORMER = _read_spec("mask2former_datasets.json")
MASKFORMER = _read_spec("maskformer_datasets.json")
# Where the published projects disagree, this package follows Mask2Former (its ADE20K panoptic
# metadata names the instance json and lists the 100 thing classes only).
MASKFORMER_DIFFERENCES = {
    name: {"json_file", "thing_classes", "thing_colors"}
    for name in ("ade20k_panoptic_train", "ade20k_panoptic_val")
}


def _is_builtin(entry):
    return entry["registered_by"].startswith("detectron2")


OWN_NAMES = sorted(n for n, e in MASK2FORMER.items() if not _is_builtin(e))
BUILTIN_NAMES = sorted(n for n, e in MASK2FORMER.items() if _is_builtin(e))


def _jsonable(value):
    """As the spec stores it: dict keys as strings, tuples as lists."""
    return json.loads(json.dumps(value))


def _expected(entry, root):
    """The spec's metadata (resolved with DETECTRON2_DATASETS=datasets) with paths under root."""
    prefix = "datasets/"

    def rebase(value):
        if isinstance(value, str) and value.startswith(prefix):
            return os.path.join(root, value[len(prefix) :])
        return value

    return {key: rebase(value) for key, value in entry["metadata"].items()}


def _registered_metadata(name, keys=None):
    metadata = _jsonable(MetadataCatalog.get(name).as_dict())
    return metadata if keys is None else {k: metadata.get(k) for k in keys}


# ---------------------------------------------------------------------------------------------
# Names and metadata
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MASK2FORMER))
def test_metadata_equals_the_mask2former_spec(name):
    entry = MASK2FORMER[name]
    assert name in DatasetCatalog.list()
    expected = _expected(entry, datasets_root())
    # Of detectron2's own datasets the spec lists only the keys the project adds or replaces.
    keys = list(expected) if _is_builtin(entry) else None
    assert _registered_metadata(name, keys) == expected


@pytest.mark.parametrize("name", sorted(MASKFORMER))
def test_metadata_equals_the_maskformer_spec_but_for_the_documented_keys(name):
    entry = MASKFORMER[name]
    expected = _expected(entry, datasets_root())
    actual = _registered_metadata(name, list(expected) if _is_builtin(entry) else None)
    differences = {k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k)}
    assert differences == MASKFORMER_DIFFERENCES.get(name, set())


def test_detectron2_datasets_keep_their_loaders():
    for name in BUILTIN_NAMES:
        assert DatasetCatalog[name].__module__.startswith("detectron2."), name


def test_every_config_dataset_is_registered():
    names = set()
    for path in (REPO / "configs").rglob("*.yaml"):
        with open(path) as f:
            datasets = (yaml.safe_load(f) or {}).get("DATASETS", {})
        names.update(datasets.get("TRAIN", ()), datasets.get("TEST", ()))
    assert "ade20k_full_sem_seg_val" in names
    assert names <= set(DatasetCatalog.list()), names - set(DatasetCatalog.list())


def test_datasets_root_reads_the_environment(monkeypatch):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert datasets_root() == "datasets"
    monkeypatch.setenv("DETECTRON2_DATASETS", "~/data")
    assert datasets_root() == os.path.expanduser("~/data")


def test_registering_again_is_harmless():
    loaders = {name: DatasetCatalog[name] for name in MASK2FORMER}
    metadata = {name: _registered_metadata(name) for name in MASK2FORMER}
    importlib.reload(package_datasets)
    for module in REGISTRATIONS:
        importlib.reload(module)  # re-runs the module's registration
    _register_all(datasets_root())
    assert {name: DatasetCatalog[name] for name in MASK2FORMER} == loaders
    assert {name: _registered_metadata(name) for name in MASK2FORMER} == metadata


# ---------------------------------------------------------------------------------------------
# Data under a temporary $DETECTRON2_DATASETS
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path):
    """Registers this package's datasets and detectron2's ``ade20k_sem_seg_*`` with data under
    ``tmp_path`` in place of those registered at import, which are restored afterwards."""
    names = OWN_NAMES + ["ade20k_sem_seg_train", "ade20k_sem_seg_val"]
    saved = {name: (DatasetCatalog[name], MetadataCatalog.get(name)) for name in names}
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    try:
        detectron2_builtin.register_all_ade20k(str(tmp_path))
        _register_all(str(tmp_path))
        yield str(tmp_path)
    finally:
        for name in names:
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
            DatasetCatalog.register(name, saved[name][0])
            MetadataCatalog[name] = saved[name][1]


# name template -> (first path it misses under an empty root, and what the message must say)
SPLITS = {"train": "training", "val": "validation", "test": "test"}
MISSING = {
    "ade20k_full_sem_seg_{s}": (
        "ADE20K_2021_17_01/images_detectron2/{f}",
        "`python datasets/prepare_ade20k_full_sem_seg.py`",
    ),
    "ade20k_panoptic_{s}": (
        "ADEChallengeData2016/images/{f}",
        "datasets/prepare_ade20k_pan_seg.py",
    ),
    "ade20k_instance_{s}": (
        "ADEChallengeData2016/images/{f}",
        "datasets/prepare_ade20k_ins_seg.py",
    ),
    "coco_2017_{s}_panoptic_with_sem_seg": (
        "coco/{s}2017",
        "datasets/prepare_coco_semantic_annos_from_panoptic_annos.py",
    ),
    "coco_2017_{s}_stuff_10k_sem_seg": (
        "coco/coco_stuff_10k/images_detectron2/{s}",
        "`python datasets/prepare_coco_stuff_10k_sem_seg.py`",
    ),
    "mapillary_vistas_sem_seg_{s}": (
        "mapillary_vistas/{f}/images",
        "comes with the dataset's download",
    ),
    "mapillary_vistas_panoptic_{s}": (
        "mapillary_vistas/{f}/images",
        "comes with the dataset's download",
    ),
}


def _missing_cases():
    cases = {}
    for template, (path, hint) in MISSING.items():
        for split, folder in SPLITS.items():
            name = template.format(s=split)
            if name in OWN_NAMES:
                cases[name] = (path.format(s=split, f=folder), hint)
    return cases


def test_every_registered_name_has_a_missing_data_case():
    assert sorted(_missing_cases()) == OWN_NAMES


def test_missing_data_names_the_path_and_the_script(root):
    for name, (path, hint) in _missing_cases().items():
        with pytest.raises(DatasetNotPreparedError) as error:
            DatasetCatalog.get(name)
        message = str(error.value)
        assert f"{os.path.join(root, path)} does not exist" in message, message
        assert name in message and hint in message and "datasets/README.md" in message, message


def test_ade20k_loads_through_the_registered_loaders(root):
    write_ade20k(root)
    ade = os.path.join(root, "ADEChallengeData2016")
    # Downloaded but not prepared: the message names the panoptic json and its script.
    with pytest.raises(DatasetNotPreparedError, match="ade20k_panoptic_val.json") as error:
        DatasetCatalog.get("ade20k_panoptic_val")
    assert "`python datasets/prepare_ade20k_pan_seg.py`" in str(error.value)
    for script in ("prepare_ade20k_sem_seg", "prepare_ade20k_pan_seg", "prepare_ade20k_ins_seg"):
        load_prepare_script(script).main(["--root", root])

    semantic = DatasetCatalog.get("ade20k_sem_seg_val")
    assert [os.path.basename(r["sem_seg_file_name"]) for r in semantic] == [
        "ADE_val_00000001.png",
        "ADE_val_00000002.png",
    ]
    assert MetadataCatalog.get("ade20k_sem_seg_val").stuff_colors[7] == [204, 5, 255]  # bed

    first, second = DatasetCatalog.get("ade20k_panoptic_val")
    assert first["image_id"] == 1 and second["image_id"] == 2
    assert first["file_name"] == os.path.join(ade, "images", "validation", "ADE_val_00000001.jpg")
    assert first["pan_seg_file_name"] == os.path.join(
        ade, "ade20k_panoptic_val", "ADE_val_00000001.png"
    )
    assert first["sem_seg_file_name"] == os.path.join(
        ade, "annotations_detectron2", "validation", "ADE_val_00000001.png"
    )
    segments = [(s["id"], s["category_id"], s["isthing"]) for s in first["segments_info"]]
    assert segments == [(1, 0, False), (2, 3, False), (3, 7, True), (4, 12, True)]
    assert second["segments_info"] == []

    records = DatasetCatalog.get("ade20k_instance_val")
    assert [r["image_id"] for r in records] == [1, 2]
    # bed (ADE20K id 7) and person (12) are instance classes 0 and 3
    assert [a["category_id"] for a in records[0]["annotations"]] == [0, 3]
    assert records[0]["annotations"][0]["bbox"] == [4, 2, 3, 4]
    assert records[1]["annotations"] == []


def test_ade20k_full_loads_through_the_registered_loader(root):
    dataset = write_ade20k_full(root)
    load_prepare_script("prepare_ade20k_full_sem_seg").main(["--root", root])
    (record,) = DatasetCatalog.get("ade20k_full_sem_seg_val")
    assert record["file_name"] == os.path.join(
        dataset, "images_detectron2", "validation", "ADE_val_00000001.jpg"
    )
    labels = utils.read_image(record["sem_seg_file_name"])
    assert labels.dtype == np.uint16 and labels.tolist() == [[65535, 0, 0, 1]] * 3
    assert len(DatasetCatalog.get("ade20k_full_sem_seg_train")) == 1


def test_coco_panoptic_with_sem_seg_loads_the_real_sample(root):
    coco = write_coco_panoptic_val(root)
    with pytest.raises(DatasetNotPreparedError, match="panoptic_semseg_val2017"):
        DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    paths = coco_panoptic.coco_panoptic_paths(root, "val")
    load_prepare_script("prepare_coco_semantic_annos_from_panoptic_annos").convert_split(
        paths["panoptic_json"], paths["panoptic_root"], paths["sem_seg_root"]
    )
    records = DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert [r["image_id"] for r in records] == [142238, 439180]
    for record in records:
        stem = f"{record['image_id']:012d}"
        sem_seg_file_name = record.pop("sem_seg_file_name")
        assert sem_seg_file_name == os.path.join(coco, "panoptic_semseg_val2017", stem + ".png")
        assert os.path.isfile(sem_seg_file_name)
    # The rest is what detectron2's own COCO panoptic loader reads.
    expected = load_coco_panoptic_json(
        paths["panoptic_json"],
        paths["image_root"],
        paths["panoptic_root"],
        coco_panoptic.coco_panoptic_metadata(),
    )
    assert records == expected
    segments = {(s["category_id"], s["isthing"]) for r in records for s in r["segments_info"]}
    assert {(0, True), (90, False)} <= segments  # person (COCO id 1), gravel (125)


def test_coco_stuff_10k_loads_through_the_registered_loader(root):
    base = write_coco_stuff_10k(root)
    load_prepare_script("prepare_coco_stuff_10k_sem_seg").main(["--root", root])
    (record,) = DatasetCatalog.get("coco_2017_test_stuff_10k_sem_seg")
    assert record["file_name"] == os.path.join(
        base, "images_detectron2", "test", "COCO_train2014_000000000081.jpg"
    )
    assert utils.read_image(record["sem_seg_file_name"]).tolist() == [[255, 0, 255], [80, 170, 0]]


def test_mapillary_vistas_loads_the_v1_2_layout_as_it_is(root):
    split = write_mapillary_vistas_val(root)
    (record,) = DatasetCatalog.get("mapillary_vistas_sem_seg_val")
    # the palette PNG reads as class indices; 65 is the ignore label
    assert utils.read_image(record["sem_seg_file_name"]).tolist() == [[0, 0, 2], [2, 2, 65]]
    assert MetadataCatalog.get("mapillary_vistas_sem_seg_val").ignore_label == 65
    (record,) = DatasetCatalog.get("mapillary_vistas_panoptic_val")
    assert record["image_id"] == MAPILLARY_STEM  # string ids are kept
    assert record["file_name"] == os.path.join(split, "images", MAPILLARY_STEM + ".jpg")
    assert record["sem_seg_file_name"] == os.path.join(split, "labels", MAPILLARY_STEM + ".png")
    segments = [(s["id"], s["category_id"], s["isthing"]) for s in record["segments_info"]]
    assert segments == [(7, 0, True), (9, 2, False)]  # Bird (id 1), Curb (id 3)


def test_missing_files_listed_in_a_panoptic_json(root):
    split = write_mapillary_vistas_val(root)
    image = os.path.join(split, "images", MAPILLARY_STEM + ".jpg")
    os.remove(image)
    with pytest.raises(DatasetNotPreparedError, match=re.escape(image)):
        DatasetCatalog.get("mapillary_vistas_panoptic_val")
