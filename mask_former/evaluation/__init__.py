"""Evaluation: evaluator dispatch by ``evaluator_type`` and the evaluators detectron2 lacks."""

from .build import EVALUATORS, NoEvaluatorError, build_evaluator, fast_coco_eval_available
from .instance_evaluation import InstanceSegEvaluator

__all__ = [
    "EVALUATORS",
    "InstanceSegEvaluator",
    "NoEvaluatorError",
    "build_evaluator",
    "fast_coco_eval_available",
]
