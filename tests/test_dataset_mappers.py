"""Training dataset mappers on synthetic files with known content, the shapes dataset and the real
COCO panoptic sample of ``../shared/data/coco_panoptic_sample``."""

import json
import logging
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from conftest import REPO, SHARED, set_flat
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets import load_coco_json, load_sem_seg
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json
from detectron2.projects.point_rend import ColorAugSSDTransform
from detectron2.structures import BitMasks, polygons_to_bitmask
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from mask_former import add_mask_former_config
from mask_former.data import DATASET_MAPPERS, build_train_mapper
from mask_former.data.augmentation import RandomAugmentationChoice, build_augmentations
from mask_former.data.dataset_mappers import (
    COCOInstanceNewBaselineDatasetMapper,
    COCOPanopticNewBaselineDatasetMapper,
    DETRPanopticDatasetMapper,
    MaskFormerInstanceDatasetMapper,
    MaskFormerPanopticDatasetMapper,
    MaskFormerSemanticDatasetMapper,
)
from mask_former.data.datasets.shapes import prepare_shapes_dataset, shapes_class_metadata

SAMPLE = SHARED / "data" / "coco_panoptic_sample"
H, W = 40, 60
# Synthetic panoptic segments: id -> (contiguous category, iscrowd).
SEGMENTS = {5: (2, 0), 300: (0, 0), 7: (6, 1)}
SEEDS = range(8)


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures
# ---------------------------------------------------------------------------------------------


def mapper_cfg(dataset="shapes_sem_seg_train", **flat):
    """Default config + MaskFormer keys; no crop, resize to the synthetic size (a no-op)."""
    cfg = get_cfg()
    add_mask_former_config(cfg)
    defaults = {
        "DATASETS.TRAIN": (dataset,),
        "INPUT.MIN_SIZE_TRAIN": (H,),
        "INPUT.MAX_SIZE_TRAIN": 1000,
        "INPUT.CROP.ENABLED": False,
    }
    set_flat(cfg, defaults)
    return set_flat(cfg, {k.replace("__", "."): v for k, v in flat.items()})


def run_seeded(mapper, record, seed):
    np.random.seed(seed)
    return mapper(record)


def was_flipped(image, expected):
    """Whether the mapper flipped ``expected`` [3, H, W] horizontally (it must be one of both)."""
    if torch.equal(image, expected):
        return False
    assert torch.equal(image, expected.flip(-1)), "image is neither the input nor its mirror"
    return True


def oriented(array, flipped):
    """``array`` [..., H, W] mirrored horizontally when ``flipped``."""
    return np.ascontiguousarray(array[..., ::-1]) if flipped else array


def uncompressed_rle(mask):
    """COCO's uncompressed RLE of a [H, W] mask (column-major runs, starting with zeros)."""
    flat = mask.flatten(order="F").astype(np.int64)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


@pytest.fixture
def synthetic(tmp_path):
    """Writes a 40x60 image, a semantic PNG (classes 1 and 3, 255 block) and a panoptic PNG."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    sem = np.ones((H, W), np.uint8)
    sem[:, 35:] = 3
    sem[5:12, 8:20] = 255
    pan = np.zeros((H, W), np.int64)
    pan[:, :30], pan[:, 30:], pan[20:, 40:] = 5, 300, 7
    pan[:6, :6] = 0
    paths = {name: str(tmp_path / f"{name}.png") for name in ("image", "sem", "pan")}
    Image.fromarray(rgb).save(paths["image"])
    Image.fromarray(sem).save(paths["sem"])
    Image.fromarray(id2rgb(pan)).save(paths["pan"])
    segments_info = [
        {"id": i, "category_id": c, "iscrowd": crowd} for i, (c, crowd) in SEGMENTS.items()
    ]
    return {
        "rgb": rgb,
        "bgr_chw": torch.as_tensor(np.ascontiguousarray(rgb[..., ::-1].transpose(2, 0, 1))),
        "sem": sem,
        "pan": pan,
        "paths": paths,
        "sem_record": {"file_name": paths["image"], "sem_seg_file_name": paths["sem"]},
        "pan_record": {
            "file_name": paths["image"],
            "pan_seg_file_name": paths["pan"],
            "segments_info": segments_info,
            "height": H,
            "width": W,
        },
    }


@pytest.fixture(scope="module")
def shapes_records(tmp_path_factory):
    """Records of a 4-image shapes train split in the three formats."""
    split_dir = prepare_shapes_dataset(tmp_path_factory.mktemp("shapes"), 4, 2, splits=("train",))
    split_dir = split_dir["train"]
    images, sem_dir, pan_dir = (f"{split_dir}/{d}" for d in ("images", "sem_seg", "panoptic"))
    panoptic = load_coco_panoptic_json(
        f"{split_dir}/panoptic.json", images, pan_dir, shapes_class_metadata()
    )
    for record in panoptic:
        record["sem_seg_file_name"] = record["pan_seg_file_name"].replace(pan_dir, sem_dir)
    return {
        "sem_seg": load_sem_seg(sem_dir, images, gt_ext="png", image_ext="jpg"),
        "instance": load_coco_json(f"{split_dir}/instances.json", images, "shapes_instance_train"),
        "panoptic": panoptic,
    }


@pytest.fixture(scope="module")
def coco_records():
    path = SAMPLE / "panoptic_coco_categories.json"
    if not path.exists():
        pytest.fail(f"{path} is missing (set MASK_FORMER_SHARED to the shared/ folder)")
    with open(path) as f:
        categories = json.load(f)
    meta = {
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(categories) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }
    records = load_coco_panoptic_json(
        str(SAMPLE / "panoptic_examples.json"),
        str(SAMPLE / "images"),
        str(SAMPLE / "panoptic"),
        meta,
    )
    return records, len(categories)


def register_ignore_3_dataset():
    """Metadata of a test dataset with 256 classes whose ignore label is 3; returns its name."""
    name = "mask_former_test_mappers_ignore_3"
    MetadataCatalog.get(name).set(ignore_label=3, stuff_classes=[f"c{i}" for i in range(256)])
    return name


def read_ids(path):
    return rgb2id(np.asarray(Image.open(path).convert("RGB")))


# ---------------------------------------------------------------------------------------------
# Semantic
# ---------------------------------------------------------------------------------------------


def test_semantic_masks_are_the_class_regions(synthetic):
    mapper = MaskFormerSemanticDatasetMapper(mapper_cfg(), True)
    sem = synthetic["sem"]
    seen = set()
    for seed in SEEDS:
        out = run_seeded(mapper, synthetic["sem_record"], seed)
        flipped = was_flipped(out["image"], synthetic["bgr_chw"])
        seen.add(flipped)
        expected = oriented(sem, flipped)
        masks = out["instances"].gt_masks
        assert out["instances"].gt_classes.tolist() == [1, 3]
        assert masks.dtype == torch.bool and masks.shape == (2, H, W)
        assert torch.equal(masks[0], torch.as_tensor(expected == 1))
        assert torch.equal(masks[1], torch.as_tensor(expected == 3))
        assert not masks.any(0)[torch.as_tensor(expected == 255)].any()
        assert out["sem_seg"].dtype == torch.int64
        assert torch.equal(out["sem_seg"], torch.as_tensor(expected.astype(np.int64)))
    assert seen == {False, True}, "the flip should happen for some seeds and not for others"


def test_semantic_resize_scales_mask_areas(synthetic):
    mapper = MaskFormerSemanticDatasetMapper(mapper_cfg(INPUT__MIN_SIZE_TRAIN=(2 * H,)), True)
    out = run_seeded(mapper, synthetic["sem_record"], 0)
    assert out["image"].shape == (3, 2 * H, 2 * W)
    areas = out["instances"].gt_masks.sum((1, 2)).tolist()
    assert areas == [4 * int((synthetic["sem"] == c).sum()) for c in (1, 3)]
    assert int((out["sem_seg"] == 255).sum()) == 4 * int((synthetic["sem"] == 255).sum())


def test_semantic_padding_to_exactly_size_divisibility(synthetic):
    mapper = MaskFormerSemanticDatasetMapper(mapper_cfg(INPUT__SIZE_DIVISIBILITY=64), True)
    out = run_seeded(mapper, synthetic["sem_record"], 0)
    image, sem_seg, instances = out["image"], out["sem_seg"], out["instances"]
    assert image.shape == (3, 64, 64) and sem_seg.shape == (64, 64)
    assert instances.image_size == (64, 64) and instances.gt_masks.shape == (2, 64, 64)
    flipped = was_flipped(image[:, :H, :W], synthetic["bgr_chw"])
    assert torch.equal(sem_seg[:H, :W], torch.as_tensor(oriented(synthetic["sem"], flipped)).long())
    pad = torch.ones(64, 64, dtype=torch.bool)
    pad[:H, :W] = False
    assert (image[:, pad] == 128).all()
    assert (sem_seg[pad] == 255).all()
    assert not instances.gt_masks[:, pad].any()


def test_padding_smaller_than_the_image_raises(synthetic):
    mapper = MaskFormerSemanticDatasetMapper(mapper_cfg(INPUT__SIZE_DIVISIBILITY=32), True)
    with pytest.raises(ValueError, match=r"40x60.*SIZE_DIVISIBILITY=32"):
        mapper(synthetic["sem_record"])


def test_semantic_with_only_ignore_pixels_has_no_targets(synthetic, tmp_path):
    Image.fromarray(np.full((H, W), 255, np.uint8)).save(tmp_path / "void.png")
    record = dict(synthetic["sem_record"], sem_seg_file_name=str(tmp_path / "void.png"))
    out = MaskFormerSemanticDatasetMapper(mapper_cfg(), True)(record)
    assert out["instances"].gt_masks.shape == (0, H, W)
    assert out["instances"].gt_classes.shape == (0,)
    assert out["instances"].gt_classes.dtype == torch.int64
    assert (out["sem_seg"] == 255).all()


def test_ignore_label_from_metadata_or_config(synthetic):
    cfg = mapper_cfg(register_ignore_3_dataset())
    out = MaskFormerSemanticDatasetMapper(cfg, True)(synthetic["sem_record"])
    assert out["instances"].gt_classes.tolist() == [1, 255]
    unregistered = mapper_cfg("mask_former_test_mappers_no_metadata")
    unregistered.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 1
    unregistered.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 256
    out = MaskFormerSemanticDatasetMapper(unregistered, True)(synthetic["sem_record"])
    assert out["instances"].gt_classes.tolist() == [3, 255]


def test_semantic_input_errors(synthetic, tmp_path):
    mapper = MaskFormerSemanticDatasetMapper(mapper_cfg(), True)
    record = synthetic["sem_record"]
    with pytest.raises(ValueError, match="annotations"):
        mapper(dict(record, annotations=[]))
    with pytest.raises(ValueError, match="sem_seg_file_name"):
        mapper({"file_name": record["file_name"]})
    missing = str(tmp_path / "no_such_image.jpg")
    with pytest.raises(FileNotFoundError, match="no_such_image.jpg"):
        mapper(dict(record, file_name=missing))
    bad = synthetic["sem"].copy()
    bad[0, 0] = 9  # shapes have 8 classes
    Image.fromarray(bad).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"Category id 9 .*shapes_sem_seg_train"):
        mapper(dict(record, sem_seg_file_name=str(tmp_path / "bad.png")))
    with pytest.raises(ValueError, match="training"):
        MaskFormerSemanticDatasetMapper(mapper_cfg(), False)


# ---------------------------------------------------------------------------------------------
# Panoptic
# ---------------------------------------------------------------------------------------------


def test_panoptic_masks_skip_crowd_and_void(synthetic):
    mapper = MaskFormerPanopticDatasetMapper(mapper_cfg("shapes_panoptic_train"), True)
    pan = synthetic["pan"]
    seen = set()
    for seed in SEEDS:
        out = run_seeded(mapper, synthetic["pan_record"], seed)
        flipped = was_flipped(out["image"], synthetic["bgr_chw"])
        seen.add(flipped)
        expected = oriented(pan, flipped)
        masks = out["instances"].gt_masks
        assert out["instances"].gt_classes.tolist() == [2, 0]
        assert torch.equal(masks[0], torch.as_tensor(expected == 5))
        assert torch.equal(masks[1], torch.as_tensor(expected == 300))
        assert not masks.any(0)[torch.as_tensor((expected == 7) | (expected == 0))].any()
        assert "sem_seg" not in out
    assert seen == {False, True}


def test_panoptic_reads_sem_seg_and_pads(synthetic):
    cfg = mapper_cfg("shapes_panoptic_train", INPUT__SIZE_DIVISIBILITY=64)
    record = dict(synthetic["pan_record"], sem_seg_file_name=synthetic["paths"]["sem"])
    out = run_seeded(MaskFormerPanopticDatasetMapper(cfg, True), record, 0)
    flipped = was_flipped(out["image"][:, :H, :W], synthetic["bgr_chw"])
    masks, sem_seg = out["instances"].gt_masks, out["sem_seg"]
    assert masks.shape == (2, 64, 64) and sem_seg.shape == (64, 64)
    assert torch.equal(
        masks[1, :H, :W], torch.as_tensor(oriented(synthetic["pan"], flipped) == 300)
    )
    assert torch.equal(sem_seg[:H, :W], torch.as_tensor(oriented(synthetic["sem"], flipped)).long())
    assert not masks[:, H:].any() and not masks[:, :, W:].any()
    assert (sem_seg[H:] == 255).all() and (sem_seg[:, W:] == 255).all()
    assert (out["image"][:, H:] == 128).all() and (out["image"][:, :, W:] == 128).all()


def test_panoptic_bad_category_and_empty_segments(synthetic):
    mapper = MaskFormerPanopticDatasetMapper(mapper_cfg("shapes_panoptic_train"), True)
    record = synthetic["pan_record"]
    bad = dict(record, segments_info=[{"id": 5, "category_id": 8, "iscrowd": 0}])
    with pytest.raises(ValueError, match=r"Category id 8 .*shapes_panoptic_train"):
        mapper(bad)
    crowd_only = dict(record, segments_info=[{"id": 7, "category_id": 6, "iscrowd": 1}])
    out = mapper(crowd_only)
    assert out["instances"].gt_masks.shape == (0, H, W)
    assert out["instances"].gt_classes.shape == (0,)
    with pytest.raises(FileNotFoundError, match="missing_pan.png"):
        mapper(dict(record, pan_seg_file_name=str(synthetic["paths"]["pan"]) + ".missing_pan.png"))


def test_panoptic_on_coco_sample(coco_records):
    records, num_classes = coco_records
    mapper = MaskFormerPanopticDatasetMapper(
        augmentations=[T.RandomFlip(prob=1.0)],
        image_format="RGB",
        ignore_label=255,
        size_divisibility=-1,
        num_classes=num_classes,
    )
    for record in records:
        out = mapper(record)
        ids = read_ids(record["pan_seg_file_name"])[:, ::-1]
        non_crowd = [s for s in record["segments_info"] if not s["iscrowd"]]
        crowd_ids = [s["id"] for s in record["segments_info"] if s["iscrowd"]]
        masks = out["instances"].gt_masks.numpy()
        assert out["image"].shape == (3, *ids.shape)
        assert out["instances"].gt_classes.tolist() == [s["category_id"] for s in non_crowd]
        assert len(masks) == len(record["segments_info"]) - len(crowd_ids)
        for mask, segment in zip(masks, non_crowd):
            np.testing.assert_array_equal(mask, ids == segment["id"])
            assert mask.sum() == segment["area"]
        covered = masks.any(0)
        assert not covered[np.isin(ids, crowd_ids)].any() and not covered[ids == 0].any()
        assert covered.sum() == sum(s["area"] for s in non_crowd)


def test_panoptic_lsj_on_coco_sample(coco_records):
    records, num_classes = coco_records
    size = 256
    cfg = mapper_cfg(INPUT__IMAGE_SIZE=size, INPUT__MIN_SCALE=1.0, INPUT__MAX_SCALE=1.0)
    mapper = COCOPanopticNewBaselineDatasetMapper(cfg, True, num_classes=num_classes)
    for record in records:
        out = run_seeded(mapper, record, 0)
        scale = size / max(out["height"], out["width"])
        height = round(out["height"] * scale)
        image, masks = out["image"], out["instances"].gt_masks
        assert image.shape == (3, size, size) and masks.shape[1:] == (size, size)
        assert out["instances"].image_size == (size, size)
        assert (image[:, height:] == 128).all() and not masks[:, height:].any()
        assert (image[:, :height] != 128).any(dim=0).float().mean() > 0.9
        areas = masks.sum((1, 2)).double()
        areas_in = [s["area"] for s in record["segments_info"] if not s["iscrowd"]]
        expected = torch.tensor(areas_in, dtype=torch.float64)
        assert torch.allclose(areas.sum(), expected.sum() * scale**2, rtol=0.02)
        big = expected > 2000
        assert torch.allclose(areas[big], expected[big] * scale**2, rtol=0.1)
        assert "sem_seg" not in out
        # as published, the masks' boxes
        boxes = BitMasks(masks).get_bounding_boxes().tensor
        assert len(boxes) and torch.equal(out["instances"].gt_boxes.tensor, boxes)


def test_detr_panoptic_branches_and_seeding(synthetic):
    cfg = mapper_cfg(
        "shapes_panoptic_train",
        INPUT__MIN_SIZE_TRAIN=(32, 48),
        INPUT__MIN_SIZE_TRAIN_SAMPLING="choice",
        INPUT__CROP__ENABLED=True,
        INPUT__CROP__TYPE="absolute_range",
        INPUT__CROP__SIZE=[384, 600],
    )
    mapper = DETRPanopticDatasetMapper(cfg, True)
    record = synthetic["pan_record"]
    shapes = set()
    for seed in range(16):
        first, second = run_seeded(mapper, record, seed), run_seeded(mapper, record, seed)
        assert torch.equal(first["image"], second["image"])
        assert torch.equal(first["instances"].gt_masks, second["instances"].gt_masks)
        height, width = first["image"].shape[1:]
        assert first["instances"].gt_masks.shape[1:] == (height, width)
        assert min(height, width) in (32, 48)
        shapes.add((height, width))
    # Without a crop the aspect ratio is kept: 40x60 -> 32x48 or 48x72.
    resized_only = {(32, 48), (48, 72)}
    assert shapes & resized_only, "the resize-only branch never ran"
    assert shapes - resized_only, "the resize-crop-resize branch never ran"


# ---------------------------------------------------------------------------------------------
# Instance
# ---------------------------------------------------------------------------------------------


def instance_annotations():
    """Annotations in every supported format, their expected [H, W] masks, and a crowd one."""
    masks = []
    for y0, y1, x0, x1 in [(5, 20, 10, 30), (0, 10, 40, 60), (25, 40, 0, 15), (12, 30, 20, 50)]:
        mask = np.zeros((H, W), np.uint8)
        mask[y0:y1, x0:x1] = 1
        masks.append(mask)
    masks[3][20:25, 30:35] = 0  # a hole
    ring = np.zeros((H, W), bool)
    ring[30:38, 40:58] = True
    compressed = mask_util.encode(np.asfortranarray(masks[1]))
    compressed_str = mask_util.encode(np.asfortranarray(masks[2]))
    compressed_str["counts"] = compressed_str["counts"].decode("ascii")
    segmentations = [
        [[10.0, 5.0, 30.0, 5.0, 30.0, 20.0, 10.0, 20.0]],
        compressed,
        compressed_str,
        uncompressed_rle(masks[3]),
        ring,
    ]
    annotations = [
        {"category_id": c, "iscrowd": 0, "segmentation": s}
        for c, s in zip([1, 2, 3, 4, 0], segmentations)
    ]
    crowd = {"category_id": 1, "iscrowd": 1, "segmentation": uncompressed_rle(masks[0])}
    return annotations + [crowd], [m.astype(bool) for m in masks] + [ring]


def test_instance_masks_from_every_segmentation_format(synthetic):
    annotations, expected = instance_annotations()
    record = {"file_name": synthetic["paths"]["image"], "annotations": annotations}
    mapper = MaskFormerInstanceDatasetMapper(mapper_cfg("shapes_instance_train"), True)
    seen = set()
    for seed in SEEDS:
        out = run_seeded(mapper, record, seed)
        flipped = was_flipped(out["image"], synthetic["bgr_chw"])
        seen.add(flipped)
        assert out["instances"].gt_classes.tolist() == [1, 2, 3, 4, 0]
        masks = out["instances"].gt_masks
        assert masks.dtype == torch.bool and masks.shape == (5, H, W)
        for mask, expected_mask in zip(masks, expected):
            assert torch.equal(mask, torch.as_tensor(oriented(expected_mask, flipped)))
    assert seen == {False, True}
    assert len(record["annotations"]) == 6, "the input record must not be modified"


def test_instance_crop_resize_and_empty(synthetic):
    annotations, expected = instance_annotations()
    record = {"file_name": synthetic["paths"]["image"], "annotations": annotations}
    cfg = mapper_cfg(
        "shapes_instance_train",
        INPUT__MIN_SIZE_TRAIN=(2 * H,),
        INPUT__CROP__ENABLED=True,
        INPUT__CROP__TYPE="absolute",
        INPUT__CROP__SIZE=[60, 70],
        INPUT__SIZE_DIVISIBILITY=80,
    )
    out = run_seeded(MaskFormerInstanceDatasetMapper(cfg, True), record, 0)
    masks = out["instances"].gt_masks
    assert out["image"].shape == (3, 80, 80) and masks.shape == (5, 80, 80)
    assert (out["image"][:, 60:] == 128).all() and (out["image"][:, :, 70:] == 128).all()
    assert not masks[:, 60:].any() and not masks[:, :, 70:].any()
    # Every mask is the crop of its 2x-upsampled input.
    assert all(mask.sum() <= 4 * e.sum() for mask, e in zip(masks, expected))
    assert masks.sum() < 4 * sum(e.sum() for e in expected)
    empty = MaskFormerInstanceDatasetMapper(mapper_cfg("shapes_instance_train"), True)(
        dict(record, annotations=[])
    )
    assert empty["instances"].gt_masks.shape == (0, H, W)
    assert empty["instances"].gt_classes.shape == (0,)


def test_instance_input_errors(synthetic):
    mapper = MaskFormerInstanceDatasetMapper(mapper_cfg("shapes_instance_train"), True)
    record = {"file_name": synthetic["paths"]["image"]}
    with pytest.raises(ValueError, match="annotations"):
        mapper(record)
    annotation = {"category_id": 5, "iscrowd": 0, "segmentation": [[1.0, 1, 9, 1, 9, 9]]}
    with pytest.raises(ValueError, match=r"Category id 5 .*shapes_instance_train"):
        mapper(dict(record, annotations=[annotation]))
    wrong_size = dict(annotation, category_id=0, segmentation=np.ones((H + 1, W), np.uint8))
    with pytest.raises(ValueError, match="does not match"):
        mapper(dict(record, annotations=[wrong_size]))


def test_instance_lsj_filters_empty_and_adds_boxes(synthetic):
    annotations, expected = instance_annotations()
    size = 96
    record = {"file_name": synthetic["paths"]["image"], "annotations": annotations}
    cfg = mapper_cfg("shapes_instance_train", INPUT__IMAGE_SIZE=size)
    mapper = COCOInstanceNewBaselineDatasetMapper(cfg, True)
    counts = set()
    for seed in range(12):
        instances = run_seeded(mapper, record, seed)["instances"]
        assert instances.image_size == (size, size)
        assert instances.gt_masks.shape[1:] == (size, size)
        # (no polygon here leaves a sub-pixel sliver in these crops, which would stay a target)
        assert instances.gt_masks.flatten(1).any(1).all(), "emptied instances must be dropped"
        boxes = BitMasks(instances.gt_masks).get_bounding_boxes().tensor
        assert torch.equal(instances.gt_boxes.tensor, boxes)
        assert set(instances.gt_classes.tolist()) <= {0, 1, 2, 3, 4}
        counts.add(len(instances))
    assert 5 in counts and min(counts) < 5, "large crops should drop some instances"


def left_half_lsj_mapper():
    """The LSJ instance mapper with one fixed augmentation: a crop to the left half."""
    return COCOInstanceNewBaselineDatasetMapper(
        augmentations=[T.CropTransform(0, 0, W // 2, H)],
        image_format="RGB",
        size_divisibility=-1,
        ignore_label=255,
        num_classes=5,
    )


def test_instance_mapper_logs_dropped_instance_totals(synthetic, caplog, monkeypatch):
    """Dropped instances are logged as running totals, at most once a minute (LSJ drops some in
    most images; one line per image flooded the training log)."""
    import detectron2.utils.logger as d2_logger

    monkeypatch.setattr(d2_logger, "_LOG_TIMER", {})
    annotations = [
        {"category_id": 1, "iscrowd": 0, "segmentation": [[2.0, 2, 20, 2, 20, 20, 2, 20]]},
        {"category_id": 2, "iscrowd": 0, "segmentation": [[40.0, 2, 50, 2, 50, 20, 40, 20]]},
    ]
    record = {"file_name": synthetic["paths"]["image"], "annotations": annotations}
    mapper = left_half_lsj_mapper()
    logger_name = "mask_former.data.dataset_mappers.instance"
    with caplog.at_level(logging.INFO, logger=logger_name):
        for _ in range(3):
            assert mapper(dict(record))["instances"].gt_classes.tolist() == [1]
    messages = [r.getMessage() for r in caplog.records if r.name == logger_name]
    assert len(messages) == 1, messages
    assert messages[0].startswith("1 of 2 instances so far were empty after augmentation")
    assert synthetic["paths"]["image"] in messages[0]
    assert (mapper._num_dropped, mapper._num_instances) == (3, 6)
    assert COCOInstanceNewBaselineDatasetMapper._num_dropped == 0  # per mapper, not shared

    monkeypatch.setattr(d2_logger, "_LOG_TIMER", {})  # a minute later
    with caplog.at_level(logging.INFO, logger=logger_name):
        mapper(dict(record))
    assert caplog.records[-1].getMessage().startswith("4 of 8 instances so far")


@pytest.mark.parametrize("size", [96, 64])
def test_instance_lsj_padding_mask(synthetic, size):
    """As published, ``padding_mask`` is True exactly where the fixed-size crop padded."""
    annotations, _ = instance_annotations()
    record = {"file_name": synthetic["paths"]["image"], "annotations": annotations}
    cfg = mapper_cfg(
        "shapes_instance_train", INPUT__IMAGE_SIZE=size, INPUT__MIN_SCALE=1.0, INPUT__MAX_SCALE=1.0
    )
    out = run_seeded(COCOInstanceNewBaselineDatasetMapper(cfg, True), record, 0)
    padding_mask = out["padding_mask"]
    assert padding_mask.dtype == torch.bool and padding_mask.shape == (size, size)
    # The 40x60 image scaled to fit: size x 1.5 size wide would be cropped, so the content is
    # (round(40 * size / 60), size) and only rows below it are padding.
    content_height = round(H * size / W)
    assert not padding_mask[:content_height].any() and padding_mask[content_height:].all()
    assert (out["image"][:, content_height:] == 128).all()


def test_instance_lsj_drops_instances_as_published(synthetic):
    """The published LSJ mapper filters instances on their polygons before rasterising: a polygon
    sliver inside the crop that covers no pixel stays a target (empty mask); polygons that left
    the crop are dropped; RLE masks are dropped when the crop empties them."""
    sliver = [[2.1, 2.1, 2.4, 2.1, 2.1, 2.4]]
    assert not polygons_to_bitmask(sliver, H, W // 2).any()  # the premise: no pixel covered
    right_half = np.zeros((H, W), np.uint8)
    right_half[5:20, 40:50] = 1
    annotations = [
        {"category_id": 1, "iscrowd": 0, "segmentation": [[2.0, 2, 20, 2, 20, 20, 2, 20]]},
        {"category_id": 2, "iscrowd": 0, "segmentation": [[40.0, 2, 50, 2, 50, 20, 40, 20]]},
        {"category_id": 3, "iscrowd": 0, "segmentation": sliver},
        {
            "category_id": 4,
            "iscrowd": 0,
            "segmentation": mask_util.encode(np.asfortranarray(right_half)),
        },
    ]
    record = {"file_name": synthetic["paths"]["image"], "annotations": annotations}
    mapper = left_half_lsj_mapper()
    instances = mapper(record)["instances"]
    assert instances.gt_classes.tolist() == [1, 3]
    assert instances.gt_masks.shape == (2, H, W // 2)
    assert instances.gt_masks[0].sum() > 0 and instances.gt_masks[1].sum() == 0
    assert instances.gt_boxes.tensor.shape == (2, 4)


def test_shapes_records_in_the_three_formats(shapes_records):
    no_augmentation = {"augmentations": [], "image_format": "RGB", "size_divisibility": -1}
    semantic = MaskFormerSemanticDatasetMapper(ignore_label=255, num_classes=8, **no_augmentation)
    panoptic = MaskFormerPanopticDatasetMapper(ignore_label=255, num_classes=8, **no_augmentation)
    instance = MaskFormerInstanceDatasetMapper(ignore_label=255, num_classes=5, **no_augmentation)
    for record in shapes_records["sem_seg"]:
        sem = np.asarray(Image.open(record["sem_seg_file_name"]))
        out = semantic(record)
        classes = [c for c in np.unique(sem).tolist() if c != 255]
        assert out["instances"].gt_classes.tolist() == classes
        for mask, c in zip(out["instances"].gt_masks.numpy(), classes):
            np.testing.assert_array_equal(mask, sem == c)
    for record in shapes_records["panoptic"]:
        ids, out = read_ids(record["pan_seg_file_name"]), panoptic(record)
        segments = record["segments_info"]
        assert out["instances"].gt_classes.tolist() == [s["category_id"] for s in segments]
        for mask, segment in zip(out["instances"].gt_masks.numpy(), segments):
            np.testing.assert_array_equal(mask, ids == segment["id"])
            assert (out["sem_seg"].numpy()[mask] == segment["category_id"]).all()
    for record in shapes_records["instance"]:
        image_path = Path(record["file_name"])
        sem = np.asarray(Image.open(image_path.parents[1] / "sem_seg" / f"{image_path.stem}.png"))
        out = instance(record)
        annotations = record["annotations"]
        assert out["instances"].gt_classes.tolist() == [a["category_id"] for a in annotations]
        for mask, annotation in zip(out["instances"].gt_masks.numpy(), annotations):
            assert mask.sum() == mask_util.area(annotation["segmentation"]) > 0
            assert (sem[mask] == annotation["category_id"]).all()


def test_shapes_lsj_scales_masks(shapes_records):
    size = 128
    cfg = mapper_cfg(
        "shapes_instance_train", INPUT__IMAGE_SIZE=size, INPUT__MIN_SCALE=0.5, INPUT__MAX_SCALE=0.5
    )
    mapper = COCOInstanceNewBaselineDatasetMapper(cfg, True)
    for record in shapes_records["instance"]:
        out = run_seeded(mapper, record, 0)
        scale = size * 0.5 / max(record["height"], record["width"])
        assert out["image"].shape == (3, size, size)
        assert (out["image"][:, size // 2 :] == 128).all()
        assert (out["image"][:, :, size // 2 :] == 128).all()
        areas = out["instances"].gt_masks.sum((1, 2)).double()
        areas_in = [mask_util.area(a["segmentation"]) for a in record["annotations"]]
        expected = torch.tensor(areas_in, dtype=torch.float64) * scale**2
        assert torch.allclose(areas, expected, rtol=0.25, atol=6)


# ---------------------------------------------------------------------------------------------
# Augmentation builder and dispatch
# ---------------------------------------------------------------------------------------------


def test_build_augmentations_follows_the_config():
    cfg = mapper_cfg(
        register_ignore_3_dataset(), INPUT__CROP__ENABLED=True, INPUT__COLOR_AUG_SSD=True
    )
    augmentations = build_augmentations(cfg, "semantic")
    assert [type(a) for a in augmentations] == [
        T.ResizeShortestEdge,
        T.RandomCrop_CategoryAreaConstraint,
        ColorAugSSDTransform,
        T.RandomFlip,
    ]
    # Published: the crop reads MODEL.SEM_SEG_HEAD.IGNORE_VALUE, not the dataset's ignore_label (3).
    assert augmentations[1].ignored_category == cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE == 255
    assert type(build_augmentations(cfg, "instance")[1]) is T.RandomCrop
    cfg.INPUT.RANDOM_FLIP = "none"
    assert [type(a) for a in build_augmentations(cfg, "lsj")] == [T.ResizeScale, T.FixedSizeCrop]
    cfg.INPUT.RANDOM_FLIP = "vertical"
    flip = build_augmentations(cfg, "lsj")[0]
    assert flip.vertical and not flip.horizontal
    (choice,) = build_augmentations(cfg, "detr")
    assert isinstance(choice, RandomAugmentationChoice)
    assert [type(a) for a in choice.alternative.augs] == [
        T.RandomFlip,
        T.ResizeShortestEdge,
        T.RandomCrop,
        T.ResizeShortestEdge,
    ]
    cfg.INPUT.CROP.ENABLED = False
    detr = build_augmentations(cfg, "detr")
    assert [type(a) for a in detr] == [T.RandomFlip, T.ResizeShortestEdge]
    with pytest.raises(KeyError, match="unknown_kind"):
        build_augmentations(cfg, "unknown_kind")


def test_published_configs_build_their_mapper():
    names = {}
    for path in sorted(REPO.glob("configs/**/Base-*.yaml")):
        cfg = get_cfg()
        add_mask_former_config(cfg)
        cfg.merge_from_file(str(path), allow_unsafe=False)
        mapper = build_train_mapper(cfg)
        assert type(mapper) is DATASET_MAPPERS[cfg.INPUT.DATASET_MAPPER_NAME]
        names[cfg.INPUT.DATASET_MAPPER_NAME] = mapper
    assert (
        set(names)
        == set(DATASET_MAPPERS)
        == {
            "mask_former_semantic",
            "mask_former_panoptic",
            "mask_former_instance",
            "coco_instance_lsj",
            "coco_panoptic_lsj",
            "detr_panoptic",
        }
    )
    cfg = mapper_cfg(INPUT__DATASET_MAPPER_NAME="no_such_mapper")
    with pytest.raises(KeyError, match="no_such_mapper"):
        build_train_mapper(cfg)
