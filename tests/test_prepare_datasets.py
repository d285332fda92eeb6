"""The prepare scripts of ``datasets/``, run on tiny inputs in the downloads' formats; outputs
checked by value."""

import io
import json
import os
import re

import numpy as np
import pycocotools.mask as mask_util
import pytest
from dataset_samples import (
    ADE_VAL1_INSTANCES,
    ADE_VAL1_SEMANTIC,
    COCO_SAMPLE,
    COCO_STUFF_LABELS,
    COCO_STUFF_NAMES,
    _rgb,
    load_prepare_script,
    write_ade20k,
    write_ade20k_full,
    write_coco_panoptic_val,
    write_coco_stuff_10k,
    write_png,
)
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from mask_former.data.datasets.ade20k import ADE20K_INSTANCE_CATEGORIES, decode_ade20k_instances
from mask_former.data.datasets.registration import DatasetNotPreparedError

IGNORE = 255


def _read(path):
    return np.asarray(Image.open(path))


def _read_json(path):
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# ADE20K-150 semantic
# ---------------------------------------------------------------------------------------------


def test_ade20k_label_shift():
    script = load_prepare_script("prepare_ade20k_sem_seg")
    labels = np.array([[0, 1, 2], [150, 149, 0]], np.uint8)
    expected = np.array([[255, 0, 1], [149, 148, 255]], np.uint8)
    shifted = script.shift_labels(labels)
    assert shifted.dtype == np.uint8 and np.array_equal(shifted, expected)
    with pytest.raises(ValueError, match="151"):
        script.shift_labels(np.array([[151]], np.uint8))


def test_prepare_ade20k_sem_seg(tmp_path):
    script = load_prepare_script("prepare_ade20k_sem_seg")
    ade = write_ade20k(tmp_path)
    script.main(["--root", str(tmp_path)])
    out = os.path.join(ade, "annotations_detectron2")
    assert sorted(os.listdir(os.path.join(out, "validation"))) == [
        "ADE_val_00000001.png",
        "ADE_val_00000002.png",
    ]
    expected = np.where(ADE_VAL1_SEMANTIC == 0, IGNORE, ADE_VAL1_SEMANTIC.astype(int) - 1)
    assert np.array_equal(_read(os.path.join(out, "validation", "ADE_val_00000001.png")), expected)
    assert (_read(os.path.join(out, "validation", "ADE_val_00000002.png")) == IGNORE).all()
    assert (_read(os.path.join(out, "training", "ADE_train_00000001.png")) == 2).all()  # sky


def test_prepare_ade20k_sem_seg_errors(tmp_path):
    script = load_prepare_script("prepare_ade20k_sem_seg")
    missing = tmp_path / "ADEChallengeData2016" / "annotations" / "training"
    with pytest.raises(DatasetNotPreparedError, match=re.escape(str(missing))):
        script.prepare_ade20k_sem_seg(str(tmp_path))
    write_png(str(missing / "ADE_train_00000009.png"), [[3, 200]])
    with pytest.raises(ValueError, match="ADE_train_00000009.png"):
        script.prepare_ade20k_sem_seg(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# ADE20K-full (847 classes)
# ---------------------------------------------------------------------------------------------


def test_ade20k_full_decoding_and_ids():
    script = load_prepare_script("prepare_ade20k_full_sem_seg")
    # R // 10 * 256 + G: (110, 162) and (113, 162) are both class-mask value 2978 ("wall").
    segmentation = np.array([[[110, 162, 0], [113, 162, 9], [10, 56, 0], [0, 0, 0]]], np.uint8)
    class_mask = script.decode_class_mask(segmentation)
    assert class_mask.tolist() == [[2978, 2978, 312, 0]]
    lookup = script.class_mask_lookup()
    assert lookup.dtype == np.uint16 and lookup[2978] == 0 and lookup[312] == 1
    assert lookup[3148] == 846 and lookup[5] == 65535
    labels = script.to_contiguous_ids(np.array([[2978, 312, 0, 5, 70000]]), lookup)
    assert labels.tolist() == [[0, 1, 65535, 65535, 65535]]
    assert script.resized_shape(600, 1200) == (512, 1024)
    assert script.resized_shape(512, 2000) is None
    assert script.split_of("ADE_val_00000003.jpg") == "validation"
    assert script.split_of("ADE_frame_00000003.jpg") == "training"


def test_prepare_ade20k_full_sem_seg(tmp_path):
    script = load_prepare_script("prepare_ade20k_full_sem_seg")
    dataset = write_ade20k_full(tmp_path)
    # A tiny limit exercises the resize: the 6 x 8 train image becomes 4 x 5, the 3 x 4 val image
    # is copied as it is.
    script.main(["--root", str(tmp_path), "--max-short-side", "4"])
    train_labels = _read(
        os.path.join(dataset, "annotations_detectron2/training/ADE_train_00000001.tif")
    )
    assert train_labels.dtype == np.uint16 and train_labels.shape == (4, 5)
    assert set(np.unique(train_labels).tolist()) == {0, 1, 65535}
    assert (train_labels[0] == 0).all() and (train_labels[-1, :2] == 1).all()
    assert (train_labels[-1, -2:] == 65535).all()
    assert _read(
        os.path.join(dataset, "images_detectron2/training/ADE_train_00000001.jpg")
    ).shape == (
        4,
        5,
        3,
    )
    val_labels = _read(
        os.path.join(dataset, "annotations_detectron2/validation/ADE_val_00000001.tif")
    )
    assert val_labels.tolist() == [[65535, 0, 0, 1]] * 3
    # Not resized, but re-encoded at PIL's default quality, as published.
    source = os.path.join(dataset, "images/ADE/validation/urban/street/ADE_val_00000001.jpg")
    encoded = io.BytesIO()
    Image.fromarray(_read(source)).save(encoded, format="JPEG", quality=75)
    out = os.path.join(dataset, "images_detectron2/validation/ADE_val_00000001.jpg")
    with open(out, "rb") as f:
        assert f.read() == encoded.getvalue()


def test_prepare_ade20k_full_sem_seg_missing_index(tmp_path):
    script = load_prepare_script("prepare_ade20k_full_sem_seg")
    index = tmp_path / "ADE20K_2021_17_01" / "index_ade20k.pkl"
    with pytest.raises(DatasetNotPreparedError, match=re.escape(str(index))):
        script.prepare_ade20k_full_sem_seg(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# ADE20K panoptic and instance
# ---------------------------------------------------------------------------------------------

# (id, category, area, bbox) of ADE_val_00000001: wall and floor from the semantic map (stuff
# first), then the bed and the person instances; the instance without a class is dropped. As
# published, the wall's area and box are those of its semantic region (15 pixels, 8 wide), though
# the person takes 4 of its pixels in the panoptic map.
ADE_VAL1_SEGMENTS = [
    (1, 0, 15, [0, 0, 8, 2]),
    (2, 3, 16, [0, 2, 4, 4]),
    (3, 7, 12, [4, 2, 3, 4]),
    (4, 12, 4, [6, 0, 2, 2]),
]


def _expected_ade_segment_map():
    segments = np.zeros((6, 8), np.int32)
    segments[ADE_VAL1_SEMANTIC == 1] = 1
    segments[ADE_VAL1_SEMANTIC == 4] = 2
    segments[2:, 4:7] = 3
    segments[:2, 6:] = 4
    return segments


def test_ade20k_panoptic_segments():
    script = load_prepare_script("prepare_ade20k_pan_seg")
    segment_map, segments = script.panoptic_segments(ADE_VAL1_SEMANTIC, ADE_VAL1_INSTANCES)
    assert np.array_equal(segment_map, _expected_ade_segment_map())
    assert [
        (s["id"], s["category_id"], s["area"], s["bbox"]) for s in segments
    ] == ADE_VAL1_SEGMENTS
    assert all(s["iscrowd"] == 0 for s in segments)


def test_ade20k_panoptic_keeps_covered_stuff_as_published():
    """A stuff region that an instance covers completely keeps its segment (and its semantic
    area), as in the published json, although no pixel of the panoptic map shows it."""
    script = load_prepare_script("prepare_ade20k_pan_seg")
    semantic = np.array([[1, 1], [4, 4]], np.uint8)  # wall (id 0) above floor (id 3)
    classes = np.array([[4, 4], [0, 0]], np.uint8)  # a person (ADE20K-150 id 12) over the wall
    ids = np.array([[1, 1], [0, 0]], np.uint8)
    instances = np.stack([classes, ids, np.zeros_like(ids)], axis=-1)
    segment_map, segments = script.panoptic_segments(semantic, instances)
    assert segment_map.tolist() == [[3, 3], [2, 2]]
    assert [(s["id"], s["category_id"], s["area"], s["bbox"]) for s in segments] == [
        (1, 0, 2, [0, 0, 2, 1]),
        (2, 3, 2, [0, 1, 2, 1]),
        (3, 12, 2, [0, 0, 2, 1]),
    ]


def test_prepare_ade20k_pan_seg(tmp_path):
    script = load_prepare_script("prepare_ade20k_pan_seg")
    ade = write_ade20k(tmp_path)
    script.main(["--root", str(tmp_path)])
    data = _read_json(os.path.join(ade, "ade20k_panoptic_val.json"))
    assert data["images"] == [
        {"id": 1, "file_name": "ADE_val_00000001.jpg", "height": 6, "width": 8},
        {"id": 2, "file_name": "ADE_val_00000002.jpg", "height": 4, "width": 5},
    ]
    first, second = data["annotations"]
    assert (first["image_id"], first["file_name"]) == (1, "ADE_val_00000001.png")
    segments = [(s["id"], s["category_id"], s["area"], s["bbox"]) for s in first["segments_info"]]
    assert segments == ADE_VAL1_SEGMENTS
    assert second["segments_info"] == []
    assert len(data["categories"]) == 150 and data["categories"][7]["name"] == "bed"
    assert sum(c["isthing"] for c in data["categories"]) == 100
    png = _read(os.path.join(ade, "ade20k_panoptic_val", "ADE_val_00000001.png"))
    assert np.array_equal(rgb2id(png), _expected_ade_segment_map())
    train = _read_json(os.path.join(ade, "ade20k_panoptic_train.json"))
    assert [(s["category_id"], s["area"]) for s in train["annotations"][0]["segments_info"]] == [
        (2, 20)
    ]


def test_prepare_ade20k_ins_seg(tmp_path):
    script = load_prepare_script("prepare_ade20k_ins_seg")
    ade = write_ade20k(tmp_path)
    script.main(["--root", str(tmp_path)])
    data = _read_json(os.path.join(ade, "ade20k_instance_val.json"))
    assert [image["id"] for image in data["images"]] == [1, 2]
    assert data["images"][0] == {
        "id": 1,
        "file_name": "ADE_val_00000001.jpg",
        "height": 6,
        "width": 8,
    }
    assert len(data["categories"]) == 100 and data["categories"][0] == {"id": 7, "name": "bed"}
    bed, person = data["annotations"]
    assert (bed["id"], bed["image_id"], bed["category_id"], bed["area"]) == (1, 1, 7, 12)
    assert (person["id"], person["category_id"], person["area"]) == (2, 12, 4)
    assert bed["bbox"] == [4, 2, 3, 4] and person["bbox"] == [6, 0, 2, 2]
    assert bed["iscrowd"] == 0
    expected_bed = np.zeros((6, 8), np.uint8)
    expected_bed[2:, 4:7] = 1
    assert np.array_equal(mask_util.decode(bed["segmentation"]), expected_bed)
    train = _read_json(os.path.join(ade, "ade20k_instance_train.json"))
    assert train["annotations"] == [] and train["images"][0]["id"] == 1


def test_ade20k_instance_classes_are_the_instance_challenge_ids():
    # R k is the k-th of the 100 instance categories (the published mapping file), not a
    # 1-based ADE20K-150 id: 1 is "bed" (7), 100 "flag" (149); values above 100 are an error.
    red = np.array([[1, 100, 55, 0]], np.uint8)
    annotation = _rgb(red, np.array([[1, 2, 3, 4]], np.uint8))
    decoded = [(c, m.nonzero()[1].tolist()) for c, m in decode_ade20k_instances(annotation)]
    assert decoded == [(7, [0]), (149, [1]), (ADE20K_INSTANCE_CATEGORIES[54]["id"], [2])]
    with pytest.raises(ValueError, match="class 101 .* not one of the 100"):
        decode_ade20k_instances(_rgb(np.array([[101]], np.uint8), np.array([[1]], np.uint8)))


def test_prepare_ade20k_pan_seg_missing_instances(tmp_path):
    script = load_prepare_script("prepare_ade20k_pan_seg")
    ade = tmp_path / "ADEChallengeData2016"
    write_png(str(ade / "annotations" / "training" / "ADE_train_00000001.png"), [[1]])
    with pytest.raises(DatasetNotPreparedError, match="annotations_instance"):
        script.prepare_ade20k_pan_seg(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# COCO semantic maps from panoptic annotations
# ---------------------------------------------------------------------------------------------


def test_panoptic_to_semantic():
    script = load_prepare_script("prepare_coco_semantic_annos_from_panoptic_annos")
    segment_ids = np.array([[0, 5, 5], [300, 300, 70000]])
    segments = [
        {"id": 5, "category_id": 1},  # person: 0
        {"id": 300, "category_id": 92},  # banner (stuff): 80
        {"id": 70000, "category_id": 200, "iscrowd": 1},  # rug-merged: 132
    ]
    id_map = {1: 0, 92: 80, 200: 132}
    semantic = script.panoptic_to_semantic(id2rgb(segment_ids), segments, id_map)
    assert semantic.dtype == np.uint8
    assert semantic.tolist() == [[255, 0, 0], [80, 80, 132]]


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_coco_semantic_on_the_real_sample(tmp_path, workers):
    script = load_prepare_script("prepare_coco_semantic_annos_from_panoptic_annos")
    coco = write_coco_panoptic_val(tmp_path)
    out = os.path.join(coco, "panoptic_semseg_val2017")
    count = script.convert_split(
        os.path.join(coco, "annotations", "panoptic_val2017.json"),
        os.path.join(coco, "panoptic_val2017"),
        out,
        workers=workers,
    )
    assert count == 2
    categories = _read_json(COCO_SAMPLE / "panoptic_coco_categories.json")
    contiguous = {c["id"]: i for i, c in enumerate(categories)}
    # void pixels of the two images, counted once on the panoptic PNGs (test_coco_panoptic_sample)
    void = {142238: 2712, 439180: 7189}
    for annotation in _read_json(COCO_SAMPLE / "panoptic_examples.json")["annotations"]:
        semantic = _read(os.path.join(out, annotation["file_name"]))
        segment_ids = rgb2id(_read(COCO_SAMPLE / "panoptic" / annotation["file_name"]))
        assert int((semantic == IGNORE).sum()) == void[annotation["image_id"]]
        for segment in annotation["segments_info"]:
            values = np.unique(semantic[segment_ids == segment["id"]])
            assert values.tolist() == [contiguous[segment["category_id"]]]


def test_prepare_coco_semantic_missing_json(tmp_path):
    script = load_prepare_script("prepare_coco_semantic_annos_from_panoptic_annos")
    with pytest.raises(DatasetNotPreparedError, match="panoptic_train2017.json"):
        script.prepare_coco_semantic_from_panoptic(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# COCO-Stuff-10K
# ---------------------------------------------------------------------------------------------


def test_prepare_coco_stuff_10k(tmp_path):
    script = load_prepare_script("prepare_coco_stuff_10k_sem_seg")
    base = write_coco_stuff_10k(tmp_path)
    script.main(["--root", str(tmp_path)])
    # 0 unlabeled and 12 (not a class) -> 255; person 1 -> 0, banner 92 -> 80, wood 182 -> 170
    expected = [[255, 0, 255], [80, 170, 0]]
    assert COCO_STUFF_LABELS.tolist() == [[0, 1, 12], [92, 182, 1]]
    for split, name in COCO_STUFF_NAMES.items():
        labels = _read(os.path.join(base, "annotations_detectron2", split, name + ".png"))
        assert labels.dtype == np.uint8 and labels.tolist() == expected
        with open(os.path.join(base, "images", name + ".jpg"), "rb") as a:
            with open(os.path.join(base, "images_detectron2", split, name + ".jpg"), "rb") as b:
                assert a.read() == b.read()


def test_prepare_coco_stuff_10k_missing_annotation(tmp_path):
    script = load_prepare_script("prepare_coco_stuff_10k_sem_seg")
    base = write_coco_stuff_10k(tmp_path)
    missing = os.path.join(base, "annotations", COCO_STUFF_NAMES["train"] + ".mat")
    os.remove(missing)
    with pytest.raises(DatasetNotPreparedError, match=re.escape(missing)):
        script.prepare_coco_stuff_10k_sem_seg(str(tmp_path))
