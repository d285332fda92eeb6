"""The synthetic shapes dataset: determinism, agreement of its three formats, detectron2 loading,
recovery from half-written folders, and colour that does not give the class away."""

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_sem_seg
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json
from panopticapi.utils import rgb2id
from PIL import Image

from mask_former.data.datasets import shapes

SEED = shapes.DEFAULT_SEED  # the registered loaders prepare the default seed
NUM_TRAIN, NUM_VAL = 8, 4
NUM_CLASSES = len(shapes.SHAPES_CATEGORIES)
NUM_THINGS = shapes.NUM_THINGS


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    """A small shapes dataset ``<tmp>/datasets/shapes`` shared by the tests of this module."""
    root = tmp_path_factory.mktemp("datasets") / "shapes"
    shapes.prepare_shapes_dataset(root, NUM_TRAIN, NUM_VAL, seed=SEED)
    return root


def _hash_files(root):
    """Maps each file path relative to ``root`` to the sha256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _read_png(path):
    return np.asarray(Image.open(path))


def _bbox_and_area(mask):
    ys, xs = np.nonzero(mask)
    bbox = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    return [int(v) for v in bbox], int(mask.sum())


def test_same_seed_gives_identical_files(shapes_root, tmp_path):
    reference = _hash_files(shapes_root)
    assert len(reference) == 3 * (NUM_TRAIN + NUM_VAL) + 2 * 3  # images, PNGs, 3 jsons a split
    shapes.prepare_shapes_dataset(tmp_path / "same", NUM_TRAIN, NUM_VAL, seed=SEED)
    assert _hash_files(tmp_path / "same") == reference

    shapes.prepare_shapes_dataset(tmp_path / "other", NUM_TRAIN, NUM_VAL, seed=SEED + 1)
    other = _hash_files(tmp_path / "other")
    assert other.keys() == reference.keys()
    changed = [k for k in reference if k.endswith((".jpg", ".json")) and other[k] != reference[k]]
    assert len(changed) == NUM_TRAIN + NUM_VAL + 2 * 3


def _check_instances(sem_seg, instances, thing_id_map):
    """Instance masks are disjoint, cover exactly the thing pixels and agree with the labels."""
    union = np.zeros(sem_seg.shape, np.int32)
    for ann in instances:
        assert ann["iscrowd"] == 0
        mask = mask_util.decode(ann["segmentation"]).astype(bool)
        union += mask
        assert np.all(sem_seg[mask] == thing_id_map[ann["category_id"]])
        bbox, area = _bbox_and_area(mask)
        assert ann["bbox"] == bbox and ann["area"] == area
    assert union.max() <= 1
    np.testing.assert_array_equal(union.astype(bool), sem_seg < NUM_THINGS)


def _check_panoptic(sem_seg, pan_ids, segments, id_map):
    """Every pixel's segment category equals its semantic label; void is 0 exactly where 255."""
    np.testing.assert_array_equal(pan_ids == 0, sem_seg == shapes.IGNORE_LABEL)
    assert set(np.unique(pan_ids)) - {0} == {s["id"] for s in segments}
    for segment in segments:
        region = pan_ids == segment["id"]
        assert np.all(sem_seg[region] == id_map[segment["category_id"]])
        bbox, area = _bbox_and_area(region)
        assert segment["bbox"] == bbox and segment["area"] == area
    stuff_segments = [s for s in segments if id_map[s["category_id"]] >= NUM_THINGS]
    assert len({s["category_id"] for s in stuff_segments}) == len(stuff_segments)


@pytest.mark.parametrize("split", shapes.SPLITS)
def test_formats_agree(shapes_root, split):
    split_dir = shapes_root / split
    meta = shapes.shapes_class_metadata()
    instances_json = _read_json(split_dir / "instances.json")
    panoptic_json = _read_json(split_dir / "panoptic.json")
    assert len(panoptic_json["annotations"]) == len(instances_json["images"])
    assert {c["id"] for c in instances_json["categories"]} == shapes.THING_IDS
    instances_by_image = {}
    for ann in instances_json["annotations"]:
        instances_by_image.setdefault(ann["image_id"], []).append(ann)
    sizes = {im["id"]: (im["height"], im["width"]) for im in instances_json["images"]}
    for pan_ann in panoptic_json["annotations"]:
        stem = os.path.splitext(pan_ann["file_name"])[0]
        sem_seg = _read_png(split_dir / "sem_seg" / f"{stem}.png")
        pan_ids = rgb2id(_read_png(split_dir / "panoptic" / f"{stem}.png"))
        image = _read_png(split_dir / "images" / f"{stem}.jpg")
        assert sem_seg.dtype == np.uint8 and sem_seg.shape == sizes[pan_ann["image_id"]]
        assert image.shape == sem_seg.shape + (3,)
        assert set(np.unique(sem_seg)) <= set(range(NUM_CLASSES)) | {shapes.IGNORE_LABEL}
        instances = instances_by_image.get(pan_ann["image_id"], [])
        _check_instances(sem_seg, instances, meta["thing_dataset_id_to_contiguous_id"])
        _check_panoptic(
            sem_seg, pan_ids, pan_ann["segments_info"], meta["stuff_dataset_id_to_contiguous_id"]
        )
        things = [s for s in pan_ann["segments_info"] if s["category_id"] in shapes.THING_IDS]
        assert sorted(s["area"] for s in things) == sorted(a["area"] for a in instances)


def _sample_statistics(num_images):
    """Per-image sizes, per-instance (class, mean RGB, bbox) and void/touching counts."""
    stats = {"sizes": [], "instances": [], "void_images": 0, "touching_pairs": 0}
    for index in range(num_images):
        sample = shapes.generate_shapes_sample(shapes.image_rng(SEED, "train", index))
        stats["sizes"].append(sample["sem_seg"].shape)
        stats["void_images"] += int((sample["sem_seg"] == shapes.IGNORE_LABEL).any())
        things = [s for s in sample["segments_info"] if s["category_id"] in shapes.THING_IDS]
        masks = [sample["panoptic"] == s["id"] for s in things]
        for segment, mask in zip(things, masks):
            color = sample["image"][mask].astype(np.float64).mean(0)
            stats["instances"].append((segment["category_id"] - 1, color, segment["bbox"]))
        for i in range(len(masks)):
            grown = cv2.dilate(masks[i].astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            stats["touching_pairs"] += sum(bool((grown & m).any()) for m in masks[i + 1 :])
    return stats


@pytest.fixture(scope="module")
def sample_statistics():
    return _sample_statistics(200)


def _colour_separability(labels, colors):
    """How far class mean colours drift apart, and the accuracy of a nearest-class-mean classifier.

    Args:
        labels (ndarray): [N] thing class of each instance.
        colors (ndarray): [N, 3] mean RGB colour of each instance.
    """
    class_means = np.stack([colors[labels == c].mean(0) for c in range(NUM_THINGS)])
    drift = np.abs(class_means - class_means.mean(0)).max()
    distances = np.linalg.norm(colors[:, None] - class_means[None], axis=-1)
    return drift, (distances.argmin(1) == labels).mean()


def test_colour_does_not_identify_the_thing_class(sample_statistics):
    labels = np.array([label for label, _, _ in sample_statistics["instances"]])
    colors = np.stack([color for _, color, _ in sample_statistics["instances"]])
    assert np.bincount(labels, minlength=NUM_THINGS).min() >= 100
    assert colors.std(0).min() > 40  # instance colours spread widely...
    drift, accuracy = _colour_separability(labels, colors)
    assert drift < 16  # ...but every class has about the same mean colour
    assert accuracy < 0.35  # and colour predicts the class barely better than chance (1 / 5)
    # Control: a generator that tinted each class would be caught.
    tints = np.random.default_rng(0).normal(0, 40, (NUM_THINGS, 3))
    drift, accuracy = _colour_separability(labels, colors + tints[labels])
    assert drift > 16 and accuracy > 0.35


def test_images_vary_and_hold_occlusion_and_void(sample_statistics):
    sizes = np.array(sample_statistics["sizes"])
    assert sizes.min() >= shapes.IMAGE_SIZE_RANGE[0] and sizes.max() <= shapes.IMAGE_SIZE_RANGE[1]
    assert (sizes[:, 0] != sizes[:, 1]).mean() > 0.9 and len(set(map(tuple, sizes))) > 100
    boxes = np.array([bbox for _, _, bbox in sample_statistics["instances"]])
    assert len(boxes) / len(sizes) >= 3
    assert (
        np.median(boxes[:, 2:].max(1)) >= 20
        and boxes[:, 2:].max() <= shapes.OBJECT_SIZE_RANGE[1] + 2
    )
    assert sample_statistics["touching_pairs"] >= len(sizes) // 2
    assert 0.15 * len(sizes) <= sample_statistics["void_images"] <= 0.45 * len(sizes)


def test_detectron2_loaders_read_the_dataset(shapes_root):
    val = shapes_root / "val"
    meta = shapes.shapes_class_metadata()
    sem = load_sem_seg(str(val / "sem_seg"), str(val / "images"), gt_ext="png", image_ext="jpg")
    name = f"shapes_test_{uuid.uuid4().hex[:8]}"
    inst = load_coco_json(str(val / "instances.json"), str(val / "images"), name)
    assert MetadataCatalog.get(name).thing_classes == meta["thing_classes"]
    MetadataCatalog.remove(name)
    pan = load_coco_panoptic_json(
        str(val / "panoptic.json"), str(val / "images"), str(val / "panoptic"), meta
    )
    assert len(sem) == len(inst) == len(pan) == NUM_VAL
    for s, i, p in zip(sem, inst, pan):
        assert s["file_name"] == i["file_name"] == p["file_name"]
        assert os.path.isfile(s["file_name"]) and os.path.isfile(p["pan_seg_file_name"])
        thing_segments = [x for x in p["segments_info"] if x["isthing"]]
        assert [a["category_id"] for a in i["annotations"]] == [
            x["category_id"] for x in thing_segments
        ]
        assert all(0 <= a["category_id"] < NUM_THINGS for a in i["annotations"])
        assert all(x["isthing"] == (x["category_id"] < NUM_THINGS) for x in p["segments_info"])


@pytest.fixture
def registered(shapes_root, monkeypatch):
    """Registers the module's dataset under unique names (twice: it must be idempotent)."""
    prefix = f"shapes_test_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(shapes.NUM_IMAGES_ENV["train"], str(NUM_TRAIN))
    monkeypatch.setenv(shapes.NUM_IMAGES_ENV["val"], str(NUM_VAL))
    shapes.register_all_shapes(shapes_root.parent, prefix=prefix)
    shapes.register_all_shapes(shapes_root.parent, prefix=prefix)
    names = [f"{prefix}_{task}_{split}" for task in shapes._TASKS for split in shapes.SPLITS]
    yield prefix
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_registered_datasets_return_the_loader_records(shapes_root, registered):
    before = _hash_files(shapes_root)
    val = shapes_root / "val"
    meta = shapes.shapes_class_metadata()
    sem = DatasetCatalog.get(f"{registered}_sem_seg_val")
    expected_sem = load_sem_seg(
        str(val / "sem_seg"), str(val / "images"), gt_ext="png", image_ext="jpg"
    )
    assert [{k: r[k] for k in ("file_name", "sem_seg_file_name")} for r in sem] == expected_sem
    assert all((r["height"], r["width"]) == _read_png(r["sem_seg_file_name"]).shape for r in sem)
    inst = DatasetCatalog.get(f"{registered}_instance_val")
    name = f"{registered}_instance_val"
    assert inst == load_coco_json(str(val / "instances.json"), str(val / "images"), name)
    pan = DatasetCatalog.get(f"{registered}_panoptic_val")
    expected_pan = load_coco_panoptic_json(
        str(val / "panoptic.json"), str(val / "images"), str(val / "panoptic"), meta
    )
    for record, expected in zip(pan, expected_pan):
        assert {k: v for k, v in record.items() if k in expected} == expected
        assert record["sem_seg_file_name"] == str(
            val / "sem_seg" / os.path.basename(expected["pan_seg_file_name"])
        )
        assert (record["height"], record["width"]) == _read_png(record["sem_seg_file_name"]).shape
    assert (
        len(pan) == NUM_VAL and len(DatasetCatalog.get(f"{registered}_panoptic_train")) == NUM_TRAIN
    )
    assert _hash_files(shapes_root) == before  # nothing was regenerated


def test_registered_metadata(registered):
    expected_types = {"sem_seg": "sem_seg", "instance": "coco", "panoptic": "coco_panoptic_seg"}
    for task, evaluator_type in expected_types.items():
        meta = MetadataCatalog.get(f"{registered}_{task}_val")
        assert meta.evaluator_type == evaluator_type
        assert meta.thing_classes == ["circle", "square", "triangle", "star", "ring"]
        assert meta.stuff_classes == meta.thing_classes + ["sky", "ground", "water"]
        assert len(meta.thing_colors) == 5 and len(meta.stuff_colors) == 8
        assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(5)}
        assert meta.stuff_dataset_id_to_contiguous_id == {i + 1: i for i in range(8)}
        assert meta.ignore_label == 255 and meta.label_divisor == 1000
        for key in ("image_root", "sem_seg_root", "panoptic_root", "panoptic_json", "json_file"):
            assert getattr(meta, key).startswith(os.path.join(os.path.dirname(meta.image_root), ""))
    names = [f"shapes_{task}_{split}" for task in expected_types for split in shapes.SPLITS]
    assert set(names) <= set(DatasetCatalog.list())
    shapes.register_all_shapes(os.getenv("DETECTRON2_DATASETS", "datasets"))  # again: no crash
    assert MetadataCatalog.get("shapes_panoptic_val").evaluator_type == "coco_panoptic_seg"


def _break_and_repair(root, break_split, caplog):
    """Breaks a split with ``break_split(split_dir)``; preparing again must warn and restore it."""
    shapes.prepare_shapes_dataset(root, 3, 2, seed=SEED)
    reference = _hash_files(root)
    break_split(root / "val")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=shapes.__name__):
        shapes.prepare_shapes_dataset(root, 3, 2, seed=SEED)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(root / "val") in warnings[0]
    assert _hash_files(root) == reference
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize(
    "break_split",
    [
        lambda d: (d / "panoptic" / "000002.png").unlink(),
        lambda d: (d / "images" / "000001.jpg").unlink(),
        lambda d: (d / "panoptic.json").unlink(),
        lambda d: (d / shapes.MARKER_FILE).unlink(),
        lambda d: (d / shapes.MARKER_FILE).write_text('{"generator_version": 1, "se'),
    ],
    ids=["panoptic_png", "image", "json", "marker", "truncated_marker"],
)
def test_half_written_split_is_regenerated(tmp_path, break_split, caplog):
    _break_and_repair(tmp_path / "shapes", break_split, caplog)


def test_changed_settings_regenerate(tmp_path, caplog):
    root = tmp_path / "shapes"
    shapes.prepare_shapes_dataset(root, 3, 2, seed=SEED)
    with caplog.at_level(logging.WARNING, logger=shapes.__name__):
        shapes.prepare_shapes_dataset(root, 3, 4, seed=SEED)
    assert any("expected" in r.getMessage() for r in caplog.records)
    assert len(os.listdir(root / "val" / "images")) == 4
    assert _read_json(root / "val" / shapes.MARKER_FILE)["num_images"] == 4


def test_bad_arguments_raise_clear_errors(tmp_path, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(NotADirectoryError, match=str(not_a_dir)):
        shapes.prepare_shapes_dataset(not_a_dir, 1, 1)
    with pytest.raises(ValueError, match="positive"):
        shapes.prepare_shapes_dataset(tmp_path / "shapes", 0, 1)
    with pytest.raises(ValueError, match="split"):
        shapes.prepare_shapes_dataset(tmp_path / "shapes", 1, 1, splits=("test",))
    monkeypatch.setenv(shapes.NUM_IMAGES_ENV["val"], "many")
    with pytest.raises(ValueError, match=shapes.NUM_IMAGES_ENV["val"]):
        shapes._prepare_split(tmp_path / "shapes", "val")
