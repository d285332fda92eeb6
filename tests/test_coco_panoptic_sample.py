"""detectron2's ``load_coco_panoptic_json`` on the two real COCO panoptic val images of
``../shared/data/coco_panoptic_sample`` (RGB-encoded segment ids)."""

import json
import os

import numpy as np
import pytest
from conftest import SHARED
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json
from panopticapi.utils import rgb2id
from PIL import Image

SAMPLE = SHARED / "data" / "coco_panoptic_sample"
# image_id -> (number of segments, crowd segments, void pixels), read off the sample once.
EXPECTED = {142238: (18, 1, 2712), 439180: (32, 2, 7189)}
# COCO category id -> (contiguous id, name, isthing) for the categories in the sample.
EXPECTED_CATEGORIES = {
    1: (0, "person", True),
    8: (7, "truck", True),
    19: (17, "horse", True),
    37: (32, "sports ball", True),
    125: (90, "gravel", False),
    184: (116, "tree-merged", False),
    187: (119, "sky-other-merged", False),
    193: (125, "grass-merged", False),
}


def _read_json(path):
    if not path.exists():
        pytest.fail(f"{path} is missing (set MASK_FORMER_SHARED to the shared/ folder)")
    with open(path) as f:
        return json.load(f)


def coco_panoptic_metadata(categories):
    """Metadata as the published COCO panoptic registration builds it: things map to their index
    among all categories, and every category (thing or stuff) is in the stuff map, so that a
    semantic evaluator can run on the same contiguous ids."""
    return {
        "thing_classes": [c["name"] for c in categories if c["isthing"]],
        "stuff_classes": [c["name"] for c in categories],
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(categories) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }


@pytest.fixture(scope="module")
def categories():
    return _read_json(SAMPLE / "panoptic_coco_categories.json")


@pytest.fixture(scope="module")
def records(categories):
    meta = coco_panoptic_metadata(categories)
    return load_coco_panoptic_json(
        str(SAMPLE / "panoptic_examples.json"),
        str(SAMPLE / "images"),
        str(SAMPLE / "panoptic"),
        meta,
    )


def test_metadata_matches_the_published_registration(categories):
    meta = coco_panoptic_metadata(categories)
    assert len(categories) == 133 and len(meta["thing_classes"]) == 80
    published = _read_json(SHARED / "spec" / "datasets" / "mask2former_datasets.json")
    published = published["coco_2017_val_panoptic_with_sem_seg"]["metadata"]
    for key in ("thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id"):
        assert meta[key] == {int(k): v for k, v in published[key].items()}
    assert meta["stuff_classes"] == published["stuff_classes"]


def test_records_and_files(records):
    assert [r["image_id"] for r in records] == list(EXPECTED)
    for record in records:
        stem = f"{record['image_id']:012d}"
        assert record["file_name"] == str(SAMPLE / "images" / f"{stem}.jpg")
        assert record["pan_seg_file_name"] == str(SAMPLE / "panoptic" / f"{stem}.png")
        assert os.path.isfile(record["file_name"]) and os.path.isfile(record["pan_seg_file_name"])
        num_segments, num_crowd, _ = EXPECTED[record["image_id"]]
        assert len(record["segments_info"]) == num_segments
        assert sum(s["iscrowd"] for s in record["segments_info"]) == num_crowd
    assert sum(len(r["segments_info"]) for r in records) == 50


def test_segments_match_the_png(records):
    for record in records:
        ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
        segments = record["segments_info"]
        assert set(np.unique(ids).tolist()) == {s["id"] for s in segments} | {0}
        assert int((ids == 0).sum()) == EXPECTED[record["image_id"]][2]
        for segment in segments:
            region = ids == segment["id"]
            ys, xs = np.nonzero(region)
            assert int(region.sum()) == segment["area"]
            width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            assert segment["bbox"] == [xs.min(), ys.min(), width, height]


def test_categories_are_mapped_to_contiguous_ids(records, categories):
    annotations = _read_json(SAMPLE / "panoptic_examples.json")["annotations"]
    raw = {
        (a["image_id"], s["id"]): s["category_id"] for a in annotations for s in a["segments_info"]
    }
    names = [c["name"] for c in categories]
    seen = set()
    for record in records:
        for segment in record["segments_info"]:
            category_id = raw[record["image_id"], segment["id"]]
            contiguous, name, isthing = EXPECTED_CATEGORIES[category_id]
            assert segment["category_id"] == contiguous and names[contiguous] == name
            assert segment["isthing"] == isthing
            seen.add(category_id)
    assert seen == set(EXPECTED_CATEGORIES)
