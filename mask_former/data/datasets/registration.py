"""What the registrations of the real datasets share.

The datasets root, the category tables shipped with the package (``categories/*.json``),
idempotent registration, metadata added to detectron2's own datasets, loaders that name the missing
path and the script that prepares it, and the panoptic loader.

A registered loader first checks the paths its dataset needs (``required``: path -> the script under
``datasets/`` that writes it, or None for a path that comes with the dataset's download), so that
using a dataset that is not there says what to run instead of failing deep inside a loader.
"""

import functools
import json
import logging
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg
from detectron2.utils.file_io import PathManager

__all__ = [
    "DatasetNotPreparedError",
    "check_prepared",
    "datasets_root",
    "extend_metadata",
    "load_categories",
    "load_panoptic_with_sem_seg",
    "panoptic_class_metadata",
    "register_dataset",
    "register_panoptic",
    "register_sem_seg",
    "require_path",
]

logger = logging.getLogger(__name__)

ROOT_ENV = "DETECTRON2_DATASETS"
DEFAULT_ROOT = "datasets"
# Where the prepare scripts and the layout documentation live, relative to the repository root.
PREPARE_DIR = "datasets"
LAYOUT_DOC = "datasets/README.md"
IMAGE_EXT = "jpg"
_CATEGORIES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "categories")


class DatasetNotPreparedError(FileNotFoundError):
    """A file or folder a dataset needs is missing under ``$DETECTRON2_DATASETS``."""


def datasets_root():
    """The datasets folder: ``$DETECTRON2_DATASETS``, default "datasets", as detectron2 reads it."""
    return os.path.expanduser(os.getenv(ROOT_ENV, DEFAULT_ROOT))


def load_categories(file_name):
    """Reads a category table shipped in ``categories/``.

    Args:
        file_name (str): e.g. "ade20k_150.json".

    Returns:
        list[dict]: the categories, in the order that defines their contiguous ids.
    """
    with open(os.path.join(_CATEGORIES_DIR, file_name)) as f:
        return json.load(f)


def require_path(path, hint):
    """Raises :class:`DatasetNotPreparedError` naming ``path`` and ``hint`` if ``path`` is absent.

    Args:
        path (str): a file or folder.
        hint (str): how to get it, e.g. "run `python datasets/prepare_ade20k_sem_seg.py`".
    """
    if not os.path.exists(path):
        raise DatasetNotPreparedError(
            f"{path} does not exist: {hint} ({LAYOUT_DOC} shows the layout expected under "
            f"${ROOT_ENV})"
        )


def check_prepared(dataset_name, required):
    """Checks that the paths a dataset needs exist, naming the first missing one.

    Args:
        dataset_name (str): the registered name, for the message.
        required (dict[str, str or None]): path -> file name of the script in ``datasets/`` that
            writes it, or None for a path that comes with the dataset's download.
    """
    scripts = [f"`python {PREPARE_DIR}/{s}`" for s in dict.fromkeys(required.values()) if s]
    for path, script in required.items():
        if script is not None:
            hint = f"run `python {PREPARE_DIR}/{script}` to write it"
        elif scripts:
            hint = f"it comes with the dataset's download, then prepared by {' and '.join(scripts)}"
        else:
            hint = "it comes with the dataset's download (used as it is)"
        require_path(path, f"dataset {dataset_name!r} needs it; {hint}")


def _load_when_prepared(dataset_name, required, load):
    check_prepared(dataset_name, required)
    return load()


def register_dataset(name, load, metadata, required):
    """Registers a dataset unless the name is taken, so that registering again is harmless.

    Args:
        name (str): the dataset name.
        load (callable): returns the dataset dicts (called on use, after the check).
        metadata (dict): set on ``MetadataCatalog.get(name)``.
        required (dict[str, str or None]): see :func:`check_prepared`.
    """
    if name in DatasetCatalog.list():
        logger.debug("Dataset %s is already registered; skipping it", name)
        return
    DatasetCatalog.register(name, functools.partial(_load_when_prepared, name, required, load))
    MetadataCatalog.get(name).set(**metadata)


def extend_metadata(name, **values):
    """Sets metadata on a dataset detectron2 registers, replacing the values it sets differently.

    detectron2's ``Metadata.set`` refuses to change a value, hence the explicit replacement.

    Args:
        name (str): a registered dataset (e.g. "ade20k_sem_seg_train").
        values: metadata keys and values.
    """
    if name not in DatasetCatalog.list():
        raise KeyError(f"Dataset {name!r} is not registered; detectron2 should have registered it")
    metadata = MetadataCatalog.get(name)
    for key, value in values.items():
        if hasattr(metadata, key) and getattr(metadata, key) != value:
            logger.debug("Replacing detectron2's %s of dataset %s", key, name)
            delattr(metadata, key)
    metadata.set(**values)


def _contiguous_segment(segment, thing_ids, stuff_ids):
    """A ``segments_info`` entry with its category mapped to a contiguous id and ``isthing``."""
    segment = dict(segment)
    category_id = segment["category_id"]
    segment["isthing"] = category_id in thing_ids
    segment["category_id"] = (thing_ids if segment["isthing"] else stuff_ids)[category_id]
    return segment


def load_panoptic_with_sem_seg(
    json_file, image_root, panoptic_root, sem_seg_root, thing_ids, stuff_ids
):
    """Reads a COCO-format panoptic dataset plus its semantic maps.

    The records are those of detectron2's ``load_coco_panoptic_json`` with ``sem_seg_file_name``
    added, but image ids are kept as the json has them: Mapillary Vistas' (and the published ADE20K
    panoptic json's) are strings, which ``load_coco_panoptic_json`` would cast to int.

    Args:
        json_file (str): the panoptic json (``annotations`` with ``file_name``, ``image_id`` and
            ``segments_info``).
        image_root (str): images, ``<annotation file stem>.jpg``.
        panoptic_root (str): panoptic PNGs (segment ids encoded as RGB), named as in the json.
        sem_seg_root (str): semantic maps of contiguous ids, named as the panoptic PNGs.
        thing_ids (dict[int, int]): dataset id -> contiguous id of the thing categories.
        stuff_ids (dict[int, int]): dataset id -> contiguous id of the other categories.

    Returns:
        list[dict]: records with file_name, image_id, pan_seg_file_name, sem_seg_file_name and
        segments_info (category_id contiguous, isthing added).
    """
    with PathManager.open(json_file) as f:
        annotations = json.load(f)["annotations"]
    records = []
    for annotation in annotations:
        stem = os.path.splitext(annotation["file_name"])[0]
        segments = [
            _contiguous_segment(s, thing_ids, stuff_ids) for s in annotation["segments_info"]
        ]
        records.append(
            {
                "file_name": os.path.join(image_root, f"{stem}.{IMAGE_EXT}"),
                "image_id": annotation["image_id"],
                "pan_seg_file_name": os.path.join(panoptic_root, annotation["file_name"]),
                "sem_seg_file_name": os.path.join(sem_seg_root, annotation["file_name"]),
                "segments_info": segments,
            }
        )
    if not records:
        raise ValueError(f"{json_file} has no annotations")
    for key in ("file_name", "pan_seg_file_name", "sem_seg_file_name"):
        require_path(records[0][key], f"it is listed in {json_file}")
    logger.info("Loaded %d images in COCO panoptic format from %s", len(records), json_file)
    return records


def register_sem_seg(name, image_root, sem_seg_root, *, metadata, script, gt_ext="png"):
    """Registers a semantic segmentation dataset read by detectron2's ``load_sem_seg``.

    Args:
        name (str): the dataset name.
        image_root (str): images, ``*.jpg``.
        sem_seg_root (str): semantic maps of contiguous ids, named as the images.
        metadata (dict): class names, ``ignore_label``...; the roots and ``evaluator_type``
            "sem_seg" are added.
        script (str or None): the prepare script that writes both folders, None for a download.
        gt_ext (str): extension of the semantic maps.
    """
    load = functools.partial(
        load_sem_seg, sem_seg_root, image_root, gt_ext=gt_ext, image_ext=IMAGE_EXT
    )
    metadata = dict(
        metadata, image_root=image_root, sem_seg_root=sem_seg_root, evaluator_type="sem_seg"
    )
    register_dataset(name, load, metadata, {image_root: script, sem_seg_root: script})


def register_panoptic(name, *, paths, sem_seg_root, metadata, required):
    """Registers a COCO-format panoptic dataset read by :func:`load_panoptic_with_sem_seg`.

    Args:
        name (str): the dataset name.
        paths (dict): "image_root", "panoptic_root" and "panoptic_json"; set as metadata.
        sem_seg_root (str): semantic maps of the records (``sem_seg_file_name``).
        metadata (dict): class names, id maps (see :func:`panoptic_class_metadata`),
            ``evaluator_type``...
        required (dict[str, str or None]): see :func:`check_prepared`.
    """
    load = functools.partial(
        load_panoptic_with_sem_seg,
        paths["panoptic_json"],
        paths["image_root"],
        paths["panoptic_root"],
        sem_seg_root,
        metadata["thing_dataset_id_to_contiguous_id"],
        metadata["stuff_dataset_id_to_contiguous_id"],
    )
    register_dataset(name, load, dict(metadata, **paths), required)


def panoptic_class_metadata(categories):
    """Class names, colours and id maps of a panoptic dataset, as published registrations set them.

    Contiguous ids are positions in ``categories`` (things keep their position among all classes),
    and every class is in the stuff map, so that semantic evaluation runs on the same ids.

    Args:
        categories (list[dict]): "id", "name", "color" and "isthing" of every class.
    """
    things = [(i, c) for i, c in enumerate(categories) if c["isthing"]]
    return {
        "thing_classes": [c["name"] for _, c in things],
        "thing_colors": [c["color"] for _, c in things],
        "stuff_classes": [c["name"] for c in categories],
        "stuff_colors": [c["color"] for c in categories],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in things},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }
