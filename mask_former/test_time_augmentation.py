"""Multi-scale and flip test-time augmentation of semantic segmentation."""

import copy

import numpy as np
import torch
from detectron2.data.detection_utils import read_image
from detectron2.data.transforms import HFlipTransform
from detectron2.modeling import DatasetMapperTTA
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["SemanticSegmentorWithTTA"]


class SemanticSegmentorWithTTA(nn.Module):
    """
    Runs a semantic segmentation model on the augmented copies of each image made by detectron2's
    ``DatasetMapperTTA`` (every ``TEST.AUG.MIN_SIZES`` scale within ``TEST.AUG.MAX_SIZE``, each
    also flipped when ``TEST.AUG.FLIP``) and averages their ``sem_seg`` outputs, flipped back.

    Input: a list of dicts like the model's (``image`` [C, H, W], or only ``file_name``; optional
    ``height``/``width``). Output per image: ``{"sem_seg": Tensor [K, height, width]}``.
    """

    def __init__(self, cfg, model, tta_mapper=None, batch_size=1):
        """
        Args:
            cfg (CfgNode): the config (``TEST.AUG``, ``INPUT.FORMAT``).
            model (nn.Module): a model returning ``sem_seg`` at the requested height and width.
            tta_mapper (callable): makes the augmented inputs of one dict, each with its
                ``transforms``; default ``DatasetMapperTTA(cfg)``.
            batch_size (int): accepted for compatibility with the published signature, whose
                implementation does not use it either: the augmented copies run one at a time
                (batching copies pads them to a common size, which changes the outputs).
        """
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        self.model = model
        self.tta_mapper = DatasetMapperTTA(cfg) if tta_mapper is None else tta_mapper
        self.input_format = cfg.INPUT.FORMAT
        self.batch_size = batch_size

    def forward(self, batched_inputs):
        """
        Args:
            batched_inputs (list[dict]): see the class docstring.

        Returns:
            list[dict]: ``{"sem_seg": Tensor [K, height, width]}`` per input.
        """
        return [self._inference_one_image(self._with_image(x)) for x in batched_inputs]

    def _with_image(self, dataset_dict):
        """A shallow copy with ``image`` [C, H, W] (read if missing) and output height/width."""
        inputs = copy.copy(dataset_dict)
        if "image" not in inputs:
            image = read_image(inputs["file_name"], self.input_format)
            inputs["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        inputs.setdefault("height", inputs["image"].shape[1])
        inputs.setdefault("width", inputs["image"].shape[2])
        return inputs

    def _inference_one_image(self, inputs):
        """Mean ``sem_seg`` [K, height, width] over the augmented copies of one image."""
        augmented_inputs = self.tta_mapper(inputs)
        total = None
        for augmented in augmented_inputs:
            transforms = augmented.pop("transforms")
            with torch.no_grad():
                result = self.model([augmented])[0]
            if "sem_seg" not in result:
                raise ValueError(
                    f"{type(self).__name__} averages semantic outputs, but the model returned "
                    f"{sorted(result)}: semantic TTA (TEST.AUG.ENABLED) needs "
                    "MODEL.MASK_FORMER.TEST.SEMANTIC_ON True"
                )
            sem_seg = result["sem_seg"]
            if any(isinstance(t, HFlipTransform) for t in transforms.transforms):
                sem_seg = sem_seg.flip(dims=[2])
            total = sem_seg if total is None else total + sem_seg
        return {"sem_seg": total / len(augmented_inputs)}
