"""docs/CUSTOM_DATASETS.md: its code, run as written on a small shapes dataset. The semantic,
panoptic and instance registrations load, feed their training mappers and build their
evaluators; the semantic example trains and evaluates through train_net's main()."""

import importlib
import json
import os
import re

import pytest
from conftest import REPO
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.engine import default_argument_parser
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)

from mask_former import add_mask_former_config
from mask_former.data.dataset_mappers import build_train_mapper
from mask_former.data.datasets import shapes
from mask_former.evaluation import build_evaluator

DOC = REPO / "docs" / "CUSTOM_DATASETS.md"
# A code block the page asks to save: "<!-- file: NAME -->" right above the fence.
FILE_BLOCK = re.compile(r"<!-- file: (\S+) -->\n```\w+\n(.*?)```", re.S)
CONFIG = "configs/my_dataset/maskformer_R18_my_dataset.yaml"
NUM_TRAIN, NUM_VAL = 4, 2
# Small, fast inputs for the two-iteration run.
SMALL_RUN = [
    "MODEL.DEVICE", "cpu",
    "SOLVER.MAX_ITER", "2",
    "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
]  # fmt: skip


def doc_files():
    """{file name: code} of the page; blocks naming the same file are appended in order."""
    files = {}
    for name, code in FILE_BLOCK.findall(DOC.read_text()):
        files[name] = files.get(name, "") + code + "\n"
    return files


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder laid out like the repository root with the page's files, and its datasets
    registered (``my_dataset.py`` imported with DETECTRON2_DATASETS pointing there)."""
    root = tmp_path_factory.mktemp("custom_dataset")
    shapes.prepare_shapes_dataset(root / "datasets" / "shapes", NUM_TRAIN, NUM_VAL)
    for name, code in doc_files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(code)
    os.symlink(REPO / "configs" / "shapes", root / "configs" / "shapes")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DETECTRON2_DATASETS", str(root / "datasets"))
        patch.syspath_prepend(str(REPO))
        patch.syspath_prepend(str(root))
        importlib.import_module("my_dataset")
        entry_point = importlib.import_module("train_my_dataset")
    return root, entry_point


def test_the_page_has_the_files_of_the_example():
    assert set(doc_files()) == {"my_dataset.py", "train_my_dataset.py", CONFIG}


def task_cfg(task, mapper_name, num_classes, outputs):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "shapes" / "maskformer_R18_shapes.yaml"))
    cfg.DATASETS.TRAIN = (f"my_dataset_{task}_train",)
    cfg.DATASETS.TEST = (f"my_dataset_{task}_val",)
    cfg.INPUT.DATASET_MAPPER_NAME = mapper_name
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = num_classes
    for switch in ("SEMANTIC_ON", "PANOPTIC_ON", "INSTANCE_ON"):
        cfg.MODEL.MASK_FORMER.TEST[switch] = switch in outputs
    return cfg


@pytest.mark.parametrize(
    "task, mapper_name, num_classes, outputs, evaluators",
    [
        ("sem_seg", "mask_former_semantic", 8, ["SEMANTIC_ON"], [SemSegEvaluator]),
        (
            "panoptic",
            "mask_former_panoptic",
            8,
            ["PANOPTIC_ON", "INSTANCE_ON", "SEMANTIC_ON"],
            [COCOPanopticEvaluator, COCOEvaluator, SemSegEvaluator],
        ),
        ("instance", "mask_former_instance", 5, ["INSTANCE_ON"], [COCOEvaluator]),
    ],
)
def test_registrations_feed_mappers_and_evaluators(
    workdir, tmp_path, task, mapper_name, num_classes, outputs, evaluators
):
    cfg = task_cfg(task, mapper_name, num_classes, outputs)
    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    assert len(records) == NUM_TRAIN
    classes = set()
    for record in records:
        instances = build_train_mapper(cfg)(record)["instances"]
        assert len(instances) > 0 and instances.gt_masks.any(dim=(1, 2)).all()
        classes |= set(instances.gt_classes.tolist())
    assert classes <= set(range(num_classes))
    if task == "panoptic":
        assert classes & {0, 1, 2, 3, 4} and classes & {5, 6, 7}  # things and stuff
    evaluator = build_evaluator(cfg, cfg.DATASETS.TEST[0], str(tmp_path))
    found = evaluator._evaluators if isinstance(evaluator, DatasetEvaluators) else [evaluator]
    assert [type(e) for e in found] == evaluators


def test_semantic_example_trains_and_evaluates(workdir, tmp_path):
    root, entry_point = workdir
    args = default_argument_parser().parse_args(
        ["--config-file", str(root / CONFIG), *SMALL_RUN, "OUTPUT_DIR", str(tmp_path)]
    )
    entry_point.train_net.main(args)
    assert (tmp_path / "model_final.pth").exists()
    with open(tmp_path / "metrics.json") as f:
        evaluations = [line for line in map(json.loads, f) if "sem_seg/mIoU" in line]
    assert len(evaluations) == 1 and 0.0 <= evaluations[0]["sem_seg/mIoU"] <= 100.0
