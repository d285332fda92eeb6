"""
MaskFormer / Mask2Former training and evaluation script.

Usage::

    python train_net.py --config-file configs/ade20k-150/maskformer_R50_bs16_160k.yaml --num-gpus 8
    python train_net.py --config-file <config> --eval-only MODEL.WEIGHTS <checkpoint>
    python train_net.py --config-file <config> --num-gpus 2 MODEL.DEVICE cpu  # 2 CPU workers (gloo)
"""

import logging
import os
import weakref
from collections import OrderedDict

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import verify_results
from detectron2.projects.deeplab import build_lr_scheduler
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from mask_former import add_mask_former_config  # importing mask_former registers everything
from mask_former.data.dataset_mappers import DATASET_MAPPERS
from mask_former.engine import (
    MostCommonLRScheduler,
    build_optimizer,
    build_step_trainer,
    create_ddp_model,
    launch,
    tune_malloc,
    use_cpu_without_cuda,
)
from mask_former.evaluation import build_evaluator
from mask_former.test_time_augmentation import SemanticSegmentorWithTTA

logger = logging.getLogger("mask_former.train_net")


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with MaskFormer's data, optimizer, schedule and evaluators."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__ with device-aware DDP and AMP (see mask_former.engine.defaults).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    # Checkpoints hold the optimizer (and AMP scaler) state, as in detectron2 main; v0.6's
    # DefaultTrainer saves only the iteration and the hooks, so resuming reset AdamW's moments.
    def state_dict(self):
        state = TrainerBase.state_dict(self)
        state["_trainer"] = self._trainer.state_dict()
        return state

    def load_state_dict(self, state_dict):
        TrainerBase.load_state_dict(self, state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_train_loader(cls, cfg):
        name = cfg.INPUT.DATASET_MAPPER_NAME
        if name not in DATASET_MAPPERS:
            raise ValueError(
                f"Unknown INPUT.DATASET_MAPPER_NAME {name!r}; known: {sorted(DATASET_MAPPERS)}"
            )
        return build_detection_train_loader(cfg, mapper=DATASET_MAPPERS[name](cfg, True))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    def build_hooks(self):
        # Our parameter groups are merged: log the "lr" most parameters have, as published.
        return [
            MostCommonLRScheduler() if type(hook) is hooks.LRScheduler else hook
            for hook in super().build_hooks()
        ]

    @classmethod
    def test_with_TTA(cls, cfg, model):
        """Evaluates ``model`` with multi-scale and flip semantic TTA (``TEST.AUG``); result keys
        get a ``_TTA`` suffix."""
        logger.info("Running inference with test-time augmentation ...")
        model = SemanticSegmentorWithTTA(cfg, model)
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference_TTA")
        evaluators = [
            cls.build_evaluator(cfg, name, output_folder=output_folder)
            for name in cfg.DATASETS.TEST
        ]
        results = cls.test(cfg, model, evaluators)
        return OrderedDict((key + "_TTA", value) for key, value in results.items())


def load_config(args):
    """The frozen config of the command line: defaults, our keys, the file, then the options; the
    CPU when the config names CUDA and there is none."""
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    use_cpu_without_cuda(cfg)
    cfg.freeze()
    return cfg


def setup(args):
    """The config, plus detectron2's per-job setup (logging, config backup, seeding)."""
    cfg = load_config(args)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="mask_former")
    return cfg


def main(args):
    cfg = setup(args)
    tune_malloc()
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            results.update(Trainer.test_with_TTA(cfg, model))
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        device=load_config(args).MODEL.DEVICE,
    )
