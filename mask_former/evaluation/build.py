"""The evaluators of a dataset, chosen by its metadata's ``evaluator_type``.

A dataset type lists (switch, factory) pairs: the factory's evaluator is used when the
``MODEL.MASK_FORMER.TEST`` switch that turns on the output it scores is set, or always (``None``)
for single-task datasets. Panoptic datasets thus get the panoptic, semantic and instance
evaluators of the outputs the model returns.

When a dataset gets no evaluator, :class:`NoEvaluatorError` (a ``NotImplementedError``, as the
published code raises) is raised: detectron2's ``DefaultTrainer.test`` logs it and goes on with
the next dataset, so a periodic or final evaluation does not stop a training run.
"""

import functools
import inspect
import logging

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    LVISEvaluator,
    SemSegEvaluator,
)
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image

from .instance_evaluation import InstanceSegEvaluator

__all__ = [
    "build_evaluator",
    "EVALUATORS",
    "NoEvaluatorError",
    "fast_coco_eval_available",
    "load_sem_seg_label",
]

logger = logging.getLogger(__name__)


class NoEvaluatorError(NotImplementedError):
    """A dataset has no evaluator for the outputs the config turns on."""


@functools.lru_cache(maxsize=None)
def fast_coco_eval_available():
    """Whether detectron2's C++ COCO evaluation exists (this project's v0.6 build has none)."""
    try:
        from detectron2 import _C
    except ImportError:
        _C = None
    available = hasattr(_C, "COCOevalEvaluateImages")
    if not available:
        logger.info(
            "detectron2._C has no COCOevalEvaluateImages: COCO evaluation uses pycocotools' "
            "(slower) implementation"
        )
    return available


def load_sem_seg_label(filename, copy=False, dtype=None):
    """Reads a semantic label PNG into a numpy array (``SemSegEvaluator``'s ``sem_seg_loading_fn``).

    detectron2 main's default loader calls ``np.array(image, copy=False)``, which numpy 2 rejects
    for PIL images ("Unable to avoid copy"); this one converts with ``np.asarray`` instead.
    """
    with PathManager.open(filename, "rb") as f:
        array = np.asarray(Image.open(f), dtype=dtype)
    return array.copy() if copy else array


def _semantic(dataset_name, output_dir):
    kwargs = {}
    # detectron2 v0.6 reads the labels itself and has no such argument.
    if "sem_seg_loading_fn" in inspect.signature(SemSegEvaluator.__init__).parameters:
        kwargs["sem_seg_loading_fn"] = load_sem_seg_label
    return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_dir, **kwargs)


def _semantic_if_labelled(dataset_name, output_dir):
    """The semantic evaluator of a panoptic dataset whose records have semantic label maps, else
    None (logged). detectron2's ``coco_2017_*_panoptic``, which the published MaskFormer COCO
    configs evaluate, has none (published MaskFormer adds no semantic evaluator there); the
    Mask2Former configs use the ``*_with_sem_seg`` variants, which have them."""
    records = DatasetCatalog.get(dataset_name)
    if all("sem_seg_file_name" in record for record in records):
        return _semantic(dataset_name, output_dir)
    logger.info(
        "No semantic evaluation on %r: its records have no 'sem_seg_file_name' (semantic label "
        "maps), so sem_seg outputs are not scored",
        dataset_name,
    )
    return None


def _panoptic(dataset_name, output_dir):
    return COCOPanopticEvaluator(dataset_name, output_dir)


def _check_instance_json(dataset_name):
    if MetadataCatalog.get(dataset_name).get("json_file", "") is None:
        raise ValueError(
            f"Instance evaluation of {dataset_name!r} needs an instance json file, but its "
            "metadata has json_file=None; set MODEL.MASK_FORMER.TEST.INSTANCE_ON False"
        )


def _coco_instances(dataset_name, output_dir):
    _check_instance_json(dataset_name)
    return COCOEvaluator(
        dataset_name, output_dir=output_dir, use_fast_impl=fast_coco_eval_available()
    )


def _instances_among_all_classes(dataset_name, output_dir):
    _check_instance_json(dataset_name)
    return InstanceSegEvaluator(
        dataset_name, output_dir=output_dir, use_fast_impl=fast_coco_eval_available()
    )


def _check_single_machine(dataset_name):
    # The Cityscapes evaluators write predictions to a temporary folder shared by the processes.
    if comm.get_world_size() != comm.get_local_size():
        raise ValueError(
            f"detectron2's Cityscapes evaluators ({dataset_name!r}) work on one machine only"
        )


def _cityscapes_semantic(dataset_name, output_dir):
    _check_single_machine(dataset_name)
    return CityscapesSemSegEvaluator(dataset_name)


def _cityscapes_instances(dataset_name, output_dir):
    _check_single_machine(dataset_name)
    return CityscapesInstanceEvaluator(dataset_name)


def _lvis(dataset_name, output_dir):
    return LVISEvaluator(dataset_name, output_dir=output_dir)


ALWAYS = None
# evaluator_type -> ((switch in MODEL.MASK_FORMER.TEST or ALWAYS, factory(name, output_dir)), ...)
EVALUATORS = {
    "sem_seg": ((ALWAYS, _semantic),),
    "mapillary_vistas_sem_seg": ((ALWAYS, _semantic),),
    "coco": ((ALWAYS, _coco_instances),),
    "lvis": ((ALWAYS, _lvis),),
    "coco_panoptic_seg": (
        ("PANOPTIC_ON", _panoptic),
        ("INSTANCE_ON", _coco_instances),
        ("SEMANTIC_ON", _semantic_if_labelled),
    ),
    "ade20k_panoptic_seg": (
        ("PANOPTIC_ON", _panoptic),
        ("INSTANCE_ON", _instances_among_all_classes),
        ("SEMANTIC_ON", _semantic_if_labelled),
    ),
    "mapillary_vistas_panoptic_seg": (
        ("PANOPTIC_ON", _panoptic),
        ("INSTANCE_ON", _instances_among_all_classes),
        ("SEMANTIC_ON", _semantic_if_labelled),
    ),
    "cityscapes_sem_seg": ((ALWAYS, _cityscapes_semantic),),
    "cityscapes_instance": ((ALWAYS, _cityscapes_instances),),
    "cityscapes_panoptic_seg": (
        ("PANOPTIC_ON", _panoptic),
        ("INSTANCE_ON", _cityscapes_instances),
        ("SEMANTIC_ON", _cityscapes_semantic),
    ),
}


def build_evaluator(cfg, dataset_name, output_dir):
    """
    The evaluator(s) of ``dataset_name`` for the outputs ``cfg`` turns on.

    Args:
        cfg (CfgNode): the config (``MODEL.MASK_FORMER.TEST`` switches).
        dataset_name (str): a registered dataset whose metadata has ``evaluator_type``.
        output_dir (str): where evaluators write their predictions.

    Returns:
        DatasetEvaluator: one evaluator, or ``DatasetEvaluators`` of several.

    Raises:
        NoEvaluatorError: for an unknown ``evaluator_type``, or when nothing the config turns on
            can be scored on this dataset.
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
    if evaluator_type not in EVALUATORS:
        raise NoEvaluatorError(
            f"No evaluator for dataset {dataset_name!r} with evaluator_type {evaluator_type!r}; "
            f"known types: {sorted(EVALUATORS)}"
        )
    switches = cfg.MODEL.MASK_FORMER.TEST
    factories = [
        factory
        for switch, factory in EVALUATORS[evaluator_type]
        if switch is ALWAYS or switches[switch]
    ]
    if not factories:
        names = [switch for switch, _ in EVALUATORS[evaluator_type]]
        raise NoEvaluatorError(
            f"Nothing to evaluate on {dataset_name!r} ({evaluator_type}): "
            f"MODEL.MASK_FORMER.TEST.{{{','.join(names)}}} are all off"
        )
    # A factory returns None when the dataset cannot be scored that way (logged).
    evaluators = [factory(dataset_name, output_dir) for factory in factories]
    evaluators = [e for e in evaluators if e is not None]
    if not evaluators:
        raise NoEvaluatorError(
            f"Nothing to evaluate on {dataset_name!r} ({evaluator_type}): only "
            f"MODEL.MASK_FORMER.TEST.SEMANTIC_ON is set, and its records have no semantic labels"
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)
