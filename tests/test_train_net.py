"""train_net.py: the Trainer's model/optimizer for every published config, loaders and evaluators
on the shapes datasets, CPU training + evaluation through ``main()``, resuming, a NaN loss,
evaluator dispatch, PQ of the real COCO panoptic sample and semantic test-time augmentation."""

import copy
import inspect
import json
import logging
import math
import platform
import re
import threading
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED, TINY_OVERRIDES, load_script, set_flat, tiny_cfg
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json
from detectron2.engine import HookBase, SimpleTrainer, default_argument_parser, hooks
from detectron2.evaluation import (
    CityscapesInstanceEvaluator,
    CityscapesSemSegEvaluator,
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)
from detectron2.modeling import build_model
from detectron2.projects.deeplab.lr_scheduler import WarmupPolyLR
from detectron2.solver import LRMultiplier
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from panopticapi.utils import rgb2id
from PIL import Image
from pycocotools import mask as mask_util
from torch import nn

from mask_former import add_mask_former_config
from mask_former.data.datasets import shapes
from mask_former.engine import amp_enabled, build_step_trainer
from mask_former.engine import defaults as engine_defaults
from mask_former.engine.defaults import (
    LeanAMPTrainer,
    LeanCPUAutocastTrainer,
    LeanSimpleTrainer,
    cpu_bf16_enabled,
)
from mask_former.engine.optimizer import (
    NORM_MODULE_TYPES,
    MostCommonLRScheduler,
    most_common_lr_group,
)
from mask_former.evaluation import (
    EVALUATORS,
    InstanceSegEvaluator,
    NoEvaluatorError,
    build_evaluator,
)
from mask_former.evaluation import build as evaluation_build
from mask_former.evaluation.build import load_sem_seg_label
from mask_former.test_time_augmentation import SemanticSegmentorWithTTA

NUM_TRAIN, NUM_VAL = 8, 4
NUM_SHAPES_CLASSES = len(shapes.SHAPES_CATEGORIES)
SEMANTIC_CONFIG = "configs/ade20k-150/maskformer_R50_bs16_160k.yaml"
PANOPTIC_CONFIG = "configs/ade20k-150-panoptic/maskformer_panoptic_R50_bs16_720k.yaml"
# Small fixed-size training inputs: short side 48, at most 64, padded by the mapper to 64x64.
PADDED_SIZE = 64
SMALL_INPUT = {
    "INPUT.MIN_SIZE_TRAIN": (48,),
    "INPUT.MAX_SIZE_TRAIN": PADDED_SIZE,
    "INPUT.MIN_SIZE_TEST": 48,
    "INPUT.MAX_SIZE_TEST": PADDED_SIZE,
    "INPUT.CROP.ENABLED": False,
    "INPUT.COLOR_AUG_SSD": False,
    "INPUT.SIZE_DIVISIBILITY": PADDED_SIZE,
    "INPUT.IMAGE_SIZE": PADDED_SIZE,
    "SOLVER.IMS_PER_BATCH": 2,
    "DATALOADER.NUM_WORKERS": 0,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": NUM_SHAPES_CLASSES,
}
SAMPLE = SHARED / "data" / "coco_panoptic_sample"


def load_train_net():
    """Imports ``train_net.py`` from the repository root."""
    return load_script("train_net.py", "train_net")


train_net = load_train_net()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and two OpenMP threads on a busy 2-core machine
    stall (seconds instead of milliseconds per iteration)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prepare_shapes(root, prefix):
    """Generates a small shapes dataset under ``root/shapes`` and registers it as
    ``{prefix}_{sem_seg,instance,panoptic}_{train,val}``; returns the registered names."""
    shapes.prepare_shapes_dataset(root / "shapes", NUM_TRAIN, NUM_VAL)
    shapes.register_all_shapes(root, prefix=prefix)
    return [f"{prefix}_{task}_{split}" for task in shapes._TASKS for split in shapes.SPLITS]


@pytest.fixture(scope="module")
def shapes_prefix(tmp_path_factory):
    """Prefix of a small shapes dataset registered for this module's tests."""
    prefix = f"shapes_tn_{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(shapes.NUM_IMAGES_ENV["train"], str(NUM_TRAIN))
        patch.setenv(shapes.NUM_IMAGES_ENV["val"], str(NUM_VAL))
        names = prepare_shapes(tmp_path_factory.mktemp("datasets"), prefix)
        yield prefix
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def shapes_overrides(prefix, task, output_dir, extra=()):
    """Dotted-key overrides that train and test a tiny model on the ``task`` shapes dataset, then
    ``extra`` (a dict of dotted keys)."""
    return {
        **TINY_OVERRIDES,
        **SMALL_INPUT,
        "DATASETS.TRAIN": (f"{prefix}_{task}_train",),
        "DATASETS.TEST": (f"{prefix}_{task}_val",),
        "OUTPUT_DIR": str(output_dir),
        "SOLVER.CHECKPOINT_PERIOD": 1000,
        "TEST.EVAL_PERIOD": 0,
        "SEED": 0,
        **dict(extra),
    }


def command_line(config_file, overrides, *flags):
    """Parsed ``train_net.py`` arguments: the flags, then the overrides as command-line opts."""
    opts = [str(item) for key, value in overrides.items() for item in (key, value)]
    return default_argument_parser().parse_args(["--config-file", config_file, *flags, *opts])


def read_metrics(output_dir):
    with open(output_dir / "metrics.json") as f:
        return [json.loads(line) for line in f]


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Model and optimizer of every published config
# ---------------------------------------------------------------------------------------------

CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml"))
LEAF_CONFIGS = [str(p) for p in CONFIGS if not p.name.startswith("Base-")]


def _check_param_groups(model, optimizer, solver):
    """Every trainable parameter is in one group with the published lr and weight decay."""
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(param, (module_name, module, param_name))
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    trainable = {p for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) == len(trainable) and set(grouped) == trainable
    kinds = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            module_name, module, param_name = owners[param]
            in_backbone = "backbone" in module_name
            assert group["lr"] == pytest.approx(
                solver.BASE_LR * (solver.BACKBONE_MULTIPLIER if in_backbone else 1.0)
            )
            if isinstance(module, nn.Embedding):
                kind, decay = "embedding", solver.WEIGHT_DECAY_EMBED
            elif isinstance(module, NORM_MODULE_TYPES):  # the list is checked in test_optimizer
                kind, decay = "norm", solver.WEIGHT_DECAY_NORM
            elif param_name in ("relative_position_bias_table", "absolute_pos_embed"):  # Swin
                kind, decay = "swin position", 0.0
            else:
                kind, decay = "other", solver.WEIGHT_DECAY
            assert group["weight_decay"] == decay, (module_name, type(module).__name__)
            kinds.add((kind, in_backbone))
    return kinds


@pytest.mark.parametrize("config_file", LEAF_CONFIGS)
def test_trainer_builds_model_and_optimizer(config_file):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(str(REPO / config_file), allow_unsafe=False)
    # On the meta device: shapes without memory or init time (Swin-L builds take seconds on CPU).
    set_flat(cfg, {"MODEL.DEVICE": "meta", "MODEL.WEIGHTS": ""})
    # Distinct values, so that a parameter in the wrong group shows.
    set_flat(cfg, {"SOLVER.WEIGHT_DECAY_NORM": 0.25, "SOLVER.WEIGHT_DECAY_EMBED": 0.5})
    cfg.freeze()
    with torch.device("meta"):
        model = train_net.Trainer.build_model(cfg)
        optimizer = train_net.Trainer.build_optimizer(cfg, model)
    expected_type = {"ADAMW": torch.optim.AdamW, "SGD": torch.optim.SGD}[cfg.SOLVER.OPTIMIZER]
    assert isinstance(optimizer, expected_type)
    clip = cfg.SOLVER.CLIP_GRADIENTS
    full_model = clip.ENABLED and clip.CLIP_TYPE == "full_model"
    assert type(optimizer).__name__.endswith("WithFullModelClipping") == full_model
    kinds = _check_param_groups(model, optimizer, cfg.SOLVER)
    assert {("other", True), ("other", False), ("norm", False)} <= kinds
    if cfg.MODEL.META_ARCHITECTURE == "MaskFormer":
        assert ("embedding", False) in kinds  # the query embeddings
    if cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer":
        assert {("swin position", True), ("norm", True)} <= kinds


def test_lr_scheduler_follows_config():
    cfg = tiny_cfg()
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR"
    scheduler = train_net.Trainer.build_lr_scheduler(cfg, optimizer)
    assert isinstance(scheduler, WarmupPolyLR)
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"
    assert isinstance(train_net.Trainer.build_lr_scheduler(cfg, optimizer), LRMultiplier)


def test_amp_is_skipped_on_cpu(caplog):
    cfg = tiny_cfg(SOLVER__AMP__ENABLED=True)
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with caplog.at_level(logging.WARNING, logger="mask_former.engine.defaults"):
        step_trainer = build_step_trainer(cfg, model, [], optimizer)
    assert type(step_trainer) is LeanSimpleTrainer and isinstance(step_trainer, SimpleTrainer)
    assert any("AMP skipped, training in fp32" in r.getMessage() for r in caplog.records)
    # With CPU_BF16 too, the CPU's bfloat16 autocast may take over: the log does not say fp32.
    cfg.SOLVER.AMP.CPU_BF16 = True
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mask_former.engine.defaults"):
        assert not amp_enabled(cfg)
    assert [r.getMessage() for r in caplog.records if "AMP skipped" in r.getMessage()]
    assert not any("fp32" in r.getMessage() for r in caplog.records)
    cfg.SOLVER.AMP.ENABLED = False
    caplog.clear()
    assert not amp_enabled(cfg) and not caplog.records


def test_amp_trainer_resumes_a_checkpoint_saved_without_amp(caplog):
    # A published M2F config (AMP on) started on CPU, where AMP is skipped, resumed on a GPU.
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    plain = LeanSimpleTrainer(model, [], optimizer)
    plain.iter = 7
    state = plain.state_dict()
    assert "grad_scaler" not in state
    with warnings.catch_warnings():  # GradScaler disables itself without CUDA, with a warning
        warnings.simplefilter("ignore")
        amp = LeanAMPTrainer(model, [], torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9))
    with caplog.at_level(logging.WARNING, logger="mask_former.engine.defaults"):
        amp.load_state_dict(state)
    assert amp.iter == 7
    assert amp.optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert any("no AMP grad-scaler state" in r.getMessage() for r in caplog.records)
    # With a scaler state it is read as detectron2 does (the real scaler is disabled on CPU).
    loaded = []
    amp.grad_scaler = SimpleNamespace(load_state_dict=loaded.append, state_dict=dict)
    amp.load_state_dict(dict(state, grad_scaler={"scale": 1024.0}))
    assert loaded == [{"scale": 1024.0}]


class _SquaredOutputLoss(nn.Module):
    """{"loss": mean squared output of ``inner``}; calls ``on_forward(output)`` first."""

    def __init__(self, inner, on_forward=None):
        super().__init__()
        self.inner = inner
        self.on_forward = on_forward

    def forward(self, x):
        out = self.inner(x)
        if self.on_forward is not None:
            self.on_forward(out)
        return {"loss": out.float().square().mean()}


def _linear_model_and_copy():
    """A seeded nn.Linear, a copy of it and two batches."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    reference = nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    return model, reference, [torch.randn(4, 3) for _ in range(2)]


def _assert_sgd_updates(model, reference, batches, bf16):
    """``model`` went through the SGD steps (lr 0.1) that ``reference`` takes here on
    ``batches``, with the forward pass under CPU bfloat16 autocast if ``bf16``."""
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for x in batches:
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = _SquaredOutputLoss(reference)(x)["loss"]
        loss.backward()
        optimizer.step()
    for param, ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(param, ref, rtol=0, atol=0)


def test_step_trainer_frees_gradients_after_the_step():
    model, reference, batches = _linear_model_and_copy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_model = _SquaredOutputLoss(model)
    step_trainer = build_step_trainer(tiny_cfg(), loss_model, iter(batches), optimizer)
    seen = []
    step_trainer.model.register_forward_pre_hook(
        lambda *_: seen.append([p.grad for p in model.parameters()])
    )
    with EventStorage(0) as storage:
        step_trainer.storage = storage
        for _ in batches:
            step_trainer.run_step()
    # No gradient is alive during the second forward pass, and none is left afterwards ...
    assert seen[1] == [None, None]
    assert all(p.grad is None for p in model.parameters())
    # ... while the updates are those of plain SGD.
    _assert_sgd_updates(model, reference, batches, bf16=False)


def test_cpu_bf16_trainer_autocasts_the_forward_pass_only(monkeypatch, caplog):
    # Whether or not this CPU has native bfloat16 (the CI machine's may not).
    monkeypatch.setattr(engine_defaults, "cpu_has_native_bf16", lambda: True)
    model, reference, batches = _linear_model_and_copy()
    seen = []
    loss_model = _SquaredOutputLoss(
        model, lambda out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
    )
    cfg = tiny_cfg(SOLVER__AMP__CPU_BF16=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step_trainer = build_step_trainer(cfg, loss_model, iter(batches), optimizer)
    assert type(step_trainer) is LeanCPUAutocastTrainer
    assert step_trainer.model is loss_model  # DefaultTrainer.model: evaluation uses it unwrapped
    with EventStorage(0) as storage:
        step_trainer.storage = storage
        for _ in batches:
            step_trainer.run_step()
    assert seen == [(True, torch.bfloat16)] * 2
    assert not torch.is_autocast_enabled("cpu")
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
    # The updates are SGD's on the gradients of the bfloat16 forward pass.
    _assert_sgd_updates(model, reference, batches, bf16=True)
    # Off by default; asked for another device or without native bfloat16, it is ignored with a
    # warning.
    assert not cpu_bf16_enabled(tiny_cfg())
    with caplog.at_level(logging.WARNING, logger="mask_former.engine.defaults"):
        assert cpu_bf16_enabled(cfg) and not caplog.records
        monkeypatch.setattr(engine_defaults, "cpu_has_native_bf16", lambda: False)
        assert not cpu_bf16_enabled(cfg)
        assert type(build_step_trainer(cfg, loss_model, iter(batches), optimizer)) is (
            LeanSimpleTrainer
        )
        cfg.MODEL.DEVICE = "cuda"
        assert not cpu_bf16_enabled(cfg)
    messages = [r.getMessage() for r in caplog.records]
    assert any("no native bfloat16" in m and "float32" in m for m in messages)
    assert any("MODEL.DEVICE is 'cuda'" in m for m in messages)


def test_cpu_bf16_trainer_honours_detectron2_main_options():
    if "async_write_metrics" not in inspect.signature(SimpleTrainer.__init__).parameters:
        pytest.skip("detectron2 v0.6's SimpleTrainer has no zero_grad_before_forward/async options")
    model, reference, batches = _linear_model_and_copy()
    events = []
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    zero_grad = optimizer.zero_grad
    optimizer.zero_grad = lambda *a, **k: events.append("zero_grad") or zero_grad(*a, **k)
    step_trainer = LeanCPUAutocastTrainer(
        _SquaredOutputLoss(model, lambda _: events.append("forward")),
        iter(batches),
        optimizer,
        zero_grad_before_forward=True,
        async_write_metrics=True,
    )
    write_metrics = step_trainer._write_metrics
    writer_threads = []
    step_trainer._write_metrics = lambda *a, **k: (
        writer_threads.append(threading.current_thread()) or write_metrics(*a, **k)
    )
    with EventStorage(0) as storage:
        step_trainer.storage = storage
        for _ in batches:
            step_trainer.run_step()
            storage.step()
        step_trainer.concurrent_executor.shutdown(wait=True)
        assert len(storage.history("total_loss").values()) == 2
    # The gradients are zeroed before each forward pass (and freed after each step) ...
    assert events[:3] == ["zero_grad", "forward", "zero_grad"]
    # ... and the metrics are written by the executor's thread.
    assert len(writer_threads) == 2 and threading.current_thread() not in writer_threads
    _assert_sgd_updates(model, reference, batches, bf16=True)


def test_cpu_native_bf16_check_agrees_with_cpuinfo():
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not cpuinfo.exists():
        pytest.skip("reads the x86 CPU flags of Linux")
    flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.M).group(1).split())
    expected = bool({"avx512_bf16", "amx_tile"} & flags)
    assert engine_defaults.cpu_has_native_bf16() is expected


@pytest.mark.parametrize("cuda_available,expected", [(False, "cpu"), (True, "cuda:1")])
def test_config_uses_the_cpu_when_cuda_is_missing(monkeypatch, caplog, cuda_available, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    args = default_argument_parser().parse_args(
        ["--config-file", str(REPO / "configs/shapes/maskformer_R18_shapes.yaml")]
        + ["MODEL.DEVICE", "cuda:1"]
    )
    with caplog.at_level(logging.WARNING, logger="mask_former.engine.defaults"):
        cfg = train_net.load_config(args)
    assert cfg.MODEL.DEVICE == expected
    warned = any("CUDA is not available" in r.getMessage() for r in caplog.records)
    assert warned == (not cuda_available)


# ---------------------------------------------------------------------------------------------
# Loaders and evaluators on the shapes datasets
# ---------------------------------------------------------------------------------------------

MAPPERS_BY_TASK = [
    ("sem_seg", "mask_former_semantic"),
    ("instance", "mask_former_instance"),
    ("instance", "coco_instance_lsj"),
    ("panoptic", "mask_former_panoptic"),
    ("panoptic", "coco_panoptic_lsj"),
    ("panoptic", "detr_panoptic"),
]


@pytest.mark.parametrize("task,mapper", MAPPERS_BY_TASK)
def test_train_loader_on_shapes(shapes_prefix, tmp_path, task, mapper):
    extra = {"INPUT.DATASET_MAPPER_NAME": mapper}
    cfg = set_flat(tiny_cfg(), shapes_overrides(shapes_prefix, task, tmp_path, extra))
    if mapper == "detr_panoptic":  # DETR's crop branch resizes to 400-600 px first
        cfg.INPUT.SIZE_DIVISIBILITY = -1
    batch = next(iter(train_net.Trainer.build_train_loader(cfg)))
    assert len(batch) == cfg.SOLVER.IMS_PER_BATCH
    for inputs in batch:
        image, instances = inputs["image"], inputs["instances"]
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        if cfg.INPUT.SIZE_DIVISIBILITY > 0:
            assert tuple(image.shape[1:]) == (PADDED_SIZE, PADDED_SIZE)
        assert tuple(instances.gt_masks.shape[1:]) == tuple(image.shape[1:])
        num_classes = shapes.NUM_THINGS if task == "instance" else NUM_SHAPES_CLASSES
        assert len(instances) > 0
        assert 0 <= instances.gt_classes.min() and instances.gt_classes.max() < num_classes


def test_unknown_mapper_name_is_a_clear_error():
    cfg = tiny_cfg(INPUT__DATASET_MAPPER_NAME="no_such_mapper")
    with pytest.raises(ValueError, match="no_such_mapper"):
        train_net.Trainer.build_train_loader(cfg)


def _register_fake(name, evaluator_type, source, **metadata):
    """Registers ``name`` with the records and metadata of dataset ``source``, but another
    evaluator_type (and ``metadata``)."""
    DatasetCatalog.register(name, lambda: DatasetCatalog.get(source))
    meta = MetadataCatalog.get(source).as_dict()
    meta.pop("name")
    meta.update(evaluator_type=evaluator_type, **metadata)
    MetadataCatalog.get(name).set(**meta)


@pytest.fixture
def fake_datasets(shapes_prefix):
    """Registers fake dataset names; removes them afterwards."""
    names = []

    def register(evaluator_type, source_task="panoptic", **metadata):
        name = f"fake_{evaluator_type}_{uuid.uuid4().hex[:6]}"
        _register_fake(name, evaluator_type, f"{shapes_prefix}_{source_task}_val", **metadata)
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


try:
    from detectron2 import _C as _D2_C
except ImportError:
    _D2_C = None
# Only a compiled detectron2 (e.g. current main built from source) has the C++ COCO evaluation.
HAS_FAST_COCO_EVAL = hasattr(_D2_C, "COCOevalEvaluateImages")

P, INS, S = "PANOPTIC_ON", "INSTANCE_ON", "SEMANTIC_ON"
# (evaluator_type, switches on, expected evaluator classes in order)
DISPATCH_CASES = [
    ("sem_seg", (), [SemSegEvaluator]),
    ("mapillary_vistas_sem_seg", (), [SemSegEvaluator]),
    ("coco", (), [COCOEvaluator]),
    ("coco_panoptic_seg", (P, INS, S), [COCOPanopticEvaluator, COCOEvaluator, SemSegEvaluator]),
    ("coco_panoptic_seg", (P,), [COCOPanopticEvaluator]),
    ("coco_panoptic_seg", (P, S), [COCOPanopticEvaluator, SemSegEvaluator]),
    (
        "ade20k_panoptic_seg",
        (P, INS, S),
        [COCOPanopticEvaluator, InstanceSegEvaluator, SemSegEvaluator],
    ),
    ("ade20k_panoptic_seg", (P, S), [COCOPanopticEvaluator, SemSegEvaluator]),
    ("mapillary_vistas_panoptic_seg", (P, S), [COCOPanopticEvaluator, SemSegEvaluator]),
    ("mapillary_vistas_panoptic_seg", (P, INS), [COCOPanopticEvaluator, InstanceSegEvaluator]),
    ("cityscapes_sem_seg", (), [CityscapesSemSegEvaluator]),
    ("cityscapes_instance", (), [CityscapesInstanceEvaluator]),
    (
        "cityscapes_panoptic_seg",
        (P, INS, S),
        [COCOPanopticEvaluator, CityscapesInstanceEvaluator, CityscapesSemSegEvaluator],
    ),
]


@pytest.mark.parametrize("evaluator_type,switches,expected", DISPATCH_CASES)
def test_evaluator_dispatch(fake_datasets, tmp_path, evaluator_type, switches, expected):
    name = fake_datasets(evaluator_type)
    cfg = tiny_cfg(OUTPUT_DIR=str(tmp_path))
    for switch in (P, INS, S):
        cfg.MODEL.MASK_FORMER.TEST[switch] = switch in switches
    evaluator = train_net.Trainer.build_evaluator(cfg, name)
    evaluators = evaluator._evaluators if isinstance(evaluator, DatasetEvaluators) else [evaluator]
    assert [type(e) for e in evaluators] == expected
    for e in evaluators:
        if isinstance(e, COCOEvaluator):
            assert e._use_fast_impl is HAS_FAST_COCO_EVAL
        if isinstance(e, (SemSegEvaluator, COCOEvaluator)):
            assert e._output_dir == str(tmp_path / "inference")


def test_semantic_label_loader(tmp_path):
    labels = np.array([[0, 1, 255], [7, 3, 2]], dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "labels.png")
    loaded = load_sem_seg_label(str(tmp_path / "labels.png"), dtype=int)
    assert loaded.dtype == np.dtype(int) and np.array_equal(loaded, labels)
    copied = load_sem_seg_label(str(tmp_path / "labels.png"), copy=True)
    assert copied.dtype == np.uint8 and copied.flags.writeable and np.array_equal(copied, labels)


class _SemSegEvaluatorV06:
    def __init__(self, dataset_name, distributed=True, output_dir=None, *, num_classes=None):
        self.kwargs = {}


class _SemSegEvaluatorMain:
    def __init__(self, dataset_name, distributed=True, output_dir=None, *, sem_seg_loading_fn=None):
        self.kwargs = {"sem_seg_loading_fn": sem_seg_loading_fn}


@pytest.mark.parametrize(
    "evaluator_class,expected",
    [(_SemSegEvaluatorV06, {}), (_SemSegEvaluatorMain, {"sem_seg_loading_fn": load_sem_seg_label})],
)
def test_semantic_evaluator_gets_numpy2_safe_loader(monkeypatch, evaluator_class, expected):
    # detectron2 main's own loader fails under numpy 2 ("Unable to avoid copy"); v0.6 has no
    # such argument. The semantic factory passes ours exactly when the evaluator accepts it.
    monkeypatch.setattr(evaluation_build, "SemSegEvaluator", evaluator_class)
    assert evaluation_build._semantic("any", None).kwargs == expected


@pytest.mark.parametrize("evaluator_type", ["coco_panoptic_seg", "ade20k_panoptic_seg"])
def test_panoptic_dataset_without_semantic_labels_gets_no_semantic_evaluator(
    fake_datasets, tmp_path, caplog, evaluator_type
):
    # detectron2's coco_2017_*_panoptic (the published MaskFormer COCO configs) has no semantic
    # label maps: SemSegEvaluator would raise a KeyError on 'sem_seg_file_name'.
    name = fake_datasets(evaluator_type)
    records = [
        {k: v for k, v in r.items() if k != "sem_seg_file_name"} for r in DatasetCatalog.get(name)
    ]
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    cfg = tiny_cfg(OUTPUT_DIR=str(tmp_path))
    for switch in (P, INS, S):
        cfg.MODEL.MASK_FORMER.TEST[switch] = True
    with caplog.at_level(logging.INFO, logger="mask_former.evaluation.build"):
        evaluator = train_net.Trainer.build_evaluator(cfg, name)
    assert [type(e) for e in evaluator._evaluators] == [
        COCOPanopticEvaluator,
        COCOEvaluator if evaluator_type == "coco_panoptic_seg" else InstanceSegEvaluator,
    ]
    assert any("No semantic evaluation" in r.getMessage() for r in caplog.records)
    cfg.MODEL.MASK_FORMER.TEST[P] = cfg.MODEL.MASK_FORMER.TEST[INS] = False
    with pytest.raises(NoEvaluatorError, match="no semantic labels"):
        train_net.Trainer.build_evaluator(cfg, name)


def test_every_evaluator_type_is_covered():
    assert {case[0] for case in DISPATCH_CASES} | {"lvis"} == set(EVALUATORS)


def test_lvis_dispatch(fake_datasets, tmp_path, monkeypatch):
    # detectron2's LVISEvaluator needs the optional `lvis` package (not a dependency): record
    # what it would be built with instead.
    built = []

    class RecordingLVISEvaluator:
        def __init__(self, dataset_name, output_dir=None):
            built.append((dataset_name, output_dir))

    monkeypatch.setattr(evaluation_build, "LVISEvaluator", RecordingLVISEvaluator)
    name = fake_datasets("lvis")
    evaluator = train_net.Trainer.build_evaluator(tiny_cfg(OUTPUT_DIR=str(tmp_path)), name)
    assert isinstance(evaluator, RecordingLVISEvaluator)
    assert built == [(name, str(tmp_path / "inference"))]


def test_evaluator_dispatch_errors(fake_datasets, tmp_path):
    cfg = tiny_cfg(OUTPUT_DIR=str(tmp_path))
    name = fake_datasets("pascal_voc")
    with pytest.raises(NoEvaluatorError, match=f"{name}.*'pascal_voc'"):
        train_net.Trainer.build_evaluator(cfg, name)
    for switch in (P, INS, S):
        cfg.MODEL.MASK_FORMER.TEST[switch] = False
    name = fake_datasets("coco_panoptic_seg")
    with pytest.raises(NoEvaluatorError, match="all off"):
        train_net.Trainer.build_evaluator(cfg, name)
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    name = fake_datasets("mapillary_vistas_panoptic_seg", json_file=None)
    with pytest.raises(ValueError, match="json_file=None"):
        build_evaluator(cfg, name, str(tmp_path))


def test_dataset_without_evaluator_does_not_stop_testing(fake_datasets, tmp_path, caplog):
    """As published, a dataset without an evaluator raises a NotImplementedError, which
    detectron2's DefaultTrainer.test logs before it goes on (periodic or final evaluation)."""
    assert issubclass(NoEvaluatorError, NotImplementedError)
    name = fake_datasets("pascal_voc")
    cfg = tiny_cfg(OUTPUT_DIR=str(tmp_path))
    cfg.DATASETS.TEST = (name,)
    with caplog.at_level(logging.WARNING):
        results = train_net.Trainer.test(cfg, model=None)
    assert results == {}
    assert any("No evaluator found" in r.getMessage() for r in caplog.records)


def _ground_truth_instances(record, class_map):
    """The record's annotations as predicted ``Instances`` (score 1), classes mapped."""
    height, width = record["height"], record["width"]
    instances = Instances((height, width))
    annotations = record["annotations"]
    masks = [mask_util.decode(a["segmentation"]).astype(bool) for a in annotations]
    instances.pred_masks = torch.as_tensor(np.stack(masks))
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)]
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.scores = torch.ones(len(annotations))
    instances.pred_classes = torch.tensor([class_map[a["category_id"]] for a in annotations])
    return instances


def test_instance_evaluator_with_things_among_all_classes(fake_datasets, shapes_prefix, tmp_path):
    """ADE20K-style metadata (thing ids spread over all classes): ground truth scores AP 100."""
    spread = {1: 0, 2: 2, 3: 4, 4: 5, 5: 7}  # dataset id -> index among all classes
    name = fake_datasets(
        "ade20k_panoptic_seg", source_task="instance", thing_dataset_id_to_contiguous_id=spread
    )
    evaluator = InstanceSegEvaluator(name, output_dir=str(tmp_path), use_fast_impl=False)
    evaluator.reset()
    records = DatasetCatalog.get(f"{shapes_prefix}_instance_val")
    for record in records:
        # load_coco_json maps categories to 0..4; spread them as ADE20K panoptic does.
        instances = _ground_truth_instances(record, {i: spread[i + 1] for i in range(5)})
        extra = copy.deepcopy(instances[:1])
        extra.pred_classes[:] = 1  # a stuff class: dropped, not scored
        evaluator.process([record], [{"instances": Instances.cat([instances, extra])}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id == spread


def test_coco_panoptic_sample_ground_truth_scores_pq_100(tmp_path):
    with open(SAMPLE / "panoptic_coco_categories.json") as f:
        categories = json.load(f)
    metadata = {
        "thing_classes": [c["name"] for c in categories if c["isthing"]],
        "stuff_classes": [c["name"] for c in categories],
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(categories) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }
    json_file, panoptic_root = SAMPLE / "panoptic_examples.json", SAMPLE / "panoptic"
    name = f"coco_panoptic_sample_{uuid.uuid4().hex[:6]}"
    records = load_coco_panoptic_json(
        str(json_file), str(SAMPLE / "images"), str(panoptic_root), metadata
    )
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(
        evaluator_type="coco_panoptic_seg",
        panoptic_json=str(json_file),
        panoptic_root=str(panoptic_root),
        **metadata,
    )
    try:
        cfg = tiny_cfg(OUTPUT_DIR=str(tmp_path))
        set_flat(cfg, {"MODEL.MASK_FORMER.TEST.PANOPTIC_ON": True})
        set_flat(cfg, {"MODEL.MASK_FORMER.TEST.SEMANTIC_ON": False})
        evaluator = train_net.Trainer.build_evaluator(cfg, name)
        assert isinstance(evaluator, COCOPanopticEvaluator)
        evaluator.reset()
        for record in records:
            ids = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]), dtype=np.uint32))
            prediction = (
                torch.as_tensor(ids.astype(np.int32)),
                copy.deepcopy(record["segments_info"]),
            )
            evaluator.process([record], [{"panoptic_seg": prediction}])
        results = evaluator.evaluate()["panoptic_seg"]
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"):
        assert results[key] == pytest.approx(100.0), key
    assert (tmp_path / "inference" / "predictions.json").exists()


# ---------------------------------------------------------------------------------------------
# Training and evaluation through main()
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_semantic(shapes_prefix, tmp_path_factory):
    """Output folder of a 2-iteration semantic training run of ``main()`` (evaluated at its end)."""
    output_dir = tmp_path_factory.mktemp("semantic_run")
    overrides = shapes_overrides(shapes_prefix, "sem_seg", output_dir, {"SOLVER.MAX_ITER": 2})
    assert train_net.main(command_line(SEMANTIC_CONFIG, overrides)) is None
    return output_dir, overrides


def test_main_trains_and_evaluates_semantic(trained_semantic):
    output_dir, _ = trained_semantic
    for name in ("config.yaml", "log.txt", "model_final.pth", "last_checkpoint"):
        assert (output_dir / name).exists(), name
    for name in ("sem_seg_predictions.json", "sem_seg_evaluation.pth"):
        assert (output_dir / "inference" / name).exists(), name
    metrics = read_metrics(output_dir)
    assert all(math.isfinite(m["total_loss"]) for m in metrics if "total_loss" in m)
    evaluation = [m for m in metrics if "sem_seg/mIoU" in m]
    assert len(evaluation) == 1 and 0.0 <= evaluation[0]["sem_seg/mIoU"] <= 100.0
    assert torch.load(output_dir / "model_final.pth", weights_only=False)["iteration"] == 1


def test_main_eval_only_reproduces_training_evaluation_and_runs_tta(trained_semantic):
    output_dir, overrides = trained_semantic
    weights = output_dir / "model_final.pth"
    tta = {
        "MODEL.WEIGHTS": str(weights),
        "TEST.AUG.ENABLED": True,
        "TEST.AUG.MIN_SIZES": (32, 48),
        "TEST.AUG.MAX_SIZE": PADDED_SIZE,
        "TEST.AUG.FLIP": True,
    }
    args = command_line(SEMANTIC_CONFIG, {**overrides, **tta}, "--eval-only")
    results = train_net.main(args)
    assert set(results) == {"sem_seg", "sem_seg_TTA"}
    trained = [m for m in read_metrics(output_dir) if "sem_seg/mIoU" in m][0]
    # Same weights and data: eval-only scores what the evaluation at the end of training scored.
    assert results["sem_seg"]["mIoU"] == pytest.approx(trained["sem_seg/mIoU"], abs=1e-6)
    assert 0.0 <= results["sem_seg_TTA"]["mIoU"] <= 100.0
    assert (output_dir / "inference_TTA" / "sem_seg_predictions.json").exists()


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_main_trains_and_evaluates_panoptic_with_instances(
    shapes_prefix, tmp_path, monkeypatch, cpu_bf16
):
    autocast_steps = []
    if cpu_bf16:  # training under CPU autocast, then the usual float32 evaluation
        monkeypatch.setattr(engine_defaults, "cpu_has_native_bf16", lambda: True)
        run_step = engine_defaults.CPUAutocastTrainer.run_step
        monkeypatch.setattr(
            engine_defaults.CPUAutocastTrainer,
            "run_step",
            lambda self: autocast_steps.append(self.iter) or run_step(self),
        )
    extra = {
        "SOLVER.AMP.CPU_BF16": cpu_bf16,
        "SOLVER.MAX_ITER": 2,
        "MODEL.MASK_FORMER.TEST.INSTANCE_ON": True,
        "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD": 0.0,
    }
    overrides = shapes_overrides(shapes_prefix, "panoptic", tmp_path, extra)
    train_net.main(command_line(PANOPTIC_CONFIG, overrides))
    evaluation = [m for m in read_metrics(tmp_path) if "panoptic_seg/PQ" in m]
    assert len(evaluation) == 1
    for key in ("panoptic_seg/PQ", "panoptic_seg/PQ_th", "sem_seg/mIoU", "segm/AP", "bbox/AP"):
        assert 0.0 <= evaluation[0][key] <= 100.0, key
    for name in ("predictions.json", "coco_instances_results.json", "sem_seg_predictions.json"):
        assert (tmp_path / "inference" / name).exists(), name
    assert autocast_steps == ([0, 1] if cpu_bf16 else [])


class _Crash(Exception):
    pass


class _CrashAfter(HookBase):
    """Raises after iteration ``iteration`` (once the checkpointer has run)."""

    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise _Crash


class _RecordIterations(HookBase):
    def __init__(self):
        self.iterations = []

    def after_step(self):
        self.iterations.append(self.trainer.iter)


def test_resume_continues_from_the_saved_iteration(shapes_prefix, tmp_path):
    extra = {"SOLVER.MAX_ITER": 4, "SOLVER.CHECKPOINT_PERIOD": 2, "DATASETS.TEST": ()}
    overrides = shapes_overrides(shapes_prefix, "sem_seg", tmp_path, extra)
    first = train_net.Trainer(train_net.setup(command_line(SEMANTIC_CONFIG, overrides)))
    first.resume_or_load(resume=False)
    first.register_hooks([_CrashAfter(1)])
    with pytest.raises(_Crash):
        first.train()
    checkpoint = torch.load(tmp_path / "model_0000001.pth", weights_only=False)
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000001.pth"

    cfg = train_net.setup(command_line(SEMANTIC_CONFIG, overrides, "--resume"))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == checkpoint["iteration"] + 1 == 2
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, checkpoint["model"][key]), key
    assert trainer.scheduler.last_epoch == 2
    steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {2}  # AdamW's moments came back too
    recorder = _RecordIterations()
    trainer.register_hooks([recorder])
    trainer.train()
    assert recorder.iterations == [2, 3]
    # "lr" is logged by the hook that reports the learning rate most parameters have
    lr_hooks = [h for h in trainer._hooks if isinstance(h, hooks.LRScheduler)]
    assert [type(h) for h in lr_hooks] == [MostCommonLRScheduler]
    assert lr_hooks[0]._best_param_group_id == most_common_lr_group(trainer.optimizer)
    assert torch.load(tmp_path / "model_final.pth", weights_only=False)["iteration"] == 3


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(shapes_prefix, tmp_path):
    nan_iteration = 2
    extra = {"SOLVER.MAX_ITER": 5, "SOLVER.CHECKPOINT_PERIOD": 1, "DATASETS.TEST": ()}
    overrides = shapes_overrides(shapes_prefix, "sem_seg", tmp_path, extra)
    cfg = train_net.setup(command_line(SEMANTIC_CONFIG, overrides))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)

    def poison(module, inputs, losses):
        if module.training and trainer.iter == nan_iteration:
            return {k: v * float("nan") for k, v in losses.items()}
        return None

    trainer.model.register_forward_hook(poison)
    with pytest.raises(
        FloatingPointError, match=f"Loss became infinite or NaN at iteration={nan_iteration}"
    ):
        trainer.train()
    last = (tmp_path / "last_checkpoint").read_text().strip()
    assert last == f"model_{nan_iteration - 1:07d}.pth"
    assert not (tmp_path / f"model_{nan_iteration:07d}.pth").exists()
    checkpoint = torch.load(tmp_path / last, weights_only=False)
    assert checkpoint["iteration"] == nan_iteration - 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    build_model(cfg).load_state_dict(checkpoint["model"])  # strict: every key, no extra one
    # The optimizer step was not taken: the live weights are finite too.
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ---------------------------------------------------------------------------------------------
# Semantic test-time augmentation
# ---------------------------------------------------------------------------------------------


def _tta_cfg(min_sizes, flip):
    cfg = tiny_cfg()
    set_flat(cfg, {"TEST.AUG.MIN_SIZES": min_sizes, "TEST.AUG.MAX_SIZE": 256})
    set_flat(cfg, {"TEST.AUG.FLIP": flip})
    return cfg


def _image(height=48, width=72):
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8)


def test_tta_with_one_scale_and_no_flip_equals_the_model():
    cfg = _tta_cfg((48,), False)
    model = build_model(cfg).eval()
    inputs = {"image": _image(), "height": 60, "width": 90}
    with torch.no_grad():
        plain = model([dict(inputs)])[0]["sem_seg"]
    tta = SemanticSegmentorWithTTA(cfg, model)([inputs])[0]["sem_seg"]
    assert tta.shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 60, 90)
    assert torch.equal(tta, plain)
    # The published signature's batch_size is accepted (and, as there, does not batch copies).
    batched = SemanticSegmentorWithTTA(cfg, model, batch_size=4)([inputs])[0]["sem_seg"]
    assert torch.equal(batched, plain)


def test_tta_of_a_model_without_semantic_output_says_why():
    cfg = tiny_cfg("configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml")
    set_flat(cfg, {"TEST.AUG.MIN_SIZES": (48,), "TEST.AUG.FLIP": False})
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = False  # Mask2Former then returns no sem_seg
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = True
    model = build_model(cfg).eval()
    with pytest.raises(ValueError, match=r"returned \['instances'\].*SEMANTIC_ON True"):
        SemanticSegmentorWithTTA(cfg, model)([{"image": _image()}])


def test_tta_averages_scales_and_flips_of_the_real_model():
    cfg = _tta_cfg((32, 48), True)
    model = build_model(cfg).eval()
    outputs = SemanticSegmentorWithTTA(cfg, model)([{"image": _image(), "height": 50, "width": 75}])
    assert outputs[0]["sem_seg"].shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 50, 75)
    assert torch.isfinite(outputs[0]["sem_seg"]).all()


class _EchoModel(nn.Module):
    """Returns the input image itself, resized to the requested size, as ``sem_seg``."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, batched_inputs):
        x = batched_inputs[0]
        self.calls.append(tuple(x["image"].shape[1:]))
        image = x["image"][None].float()
        size = (x["height"], x["width"])
        return [{"sem_seg": nn.functional.interpolate(image, size=size, mode="bilinear")[0]}]


def test_tta_flips_back_and_averages():
    cfg = _tta_cfg((40, 80), True)
    ramp = torch.linspace(0, 255, 120).expand(3, 60, 120).contiguous()  # left-to-right ramp
    model = _EchoModel()
    output = SemanticSegmentorWithTTA(cfg, model)([{"image": ramp, "height": 60, "width": 120}])
    assert sorted(model.calls) == [(40, 80), (40, 80), (80, 160), (80, 160)]
    # Every augmented copy, flipped back, echoes the ramp: so does their mean. A copy left
    # flipped would pull the mean towards the mirrored ramp (error ~60 on average).
    assert (output[0]["sem_seg"] - ramp).abs().mean() < 2.0
    assert (ramp.flip(dims=[2]) - ramp).abs().mean() > 100.0
