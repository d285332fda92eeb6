"""Training augmentations of the MaskFormer / Mask2Former dataset mappers.

:func:`build_augmentations` is the one place that turns a config into an augmentation list; the
dataset mappers call it. The kinds follow the published mappers:

- ``"semantic"``: ResizeShortestEdge, category-area-constrained crop, SSD colour jitter, flip
  (``mask_former_semantic`` and ``mask_former_panoptic``).
- ``"instance"``: as ``"semantic"`` with a plain random crop (``mask_former_instance``).
- ``"lsj"``: large-scale jitter: flip, ResizeScale, FixedSizeCrop (``coco_*_lsj``).
- ``"detr"``: DETR's random resize or resize-crop-resize (``detr_panoptic``).
"""

from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T

__all__ = [
    "AUGMENTATION_BUILDERS",
    "RandomAugmentationChoice",
    "build_augmentations",
    "train_ignore_label",
]

# DETR's resize-crop branch first resizes the short side to one of these (published constant).
DETR_CROP_SHORT_EDGES = (400, 500, 600)
# Probability that DETR's augmentation takes the resize-crop branch.
DETR_CROP_PROBABILITY = 0.5


class RandomAugmentationChoice(T.Augmentation):
    """Applies ``alternative`` with probability ``prob`` and ``augmentations`` otherwise.

    ``T.RandomApply`` can only switch one augmentation on or off; DETR's training input picks one
    of two augmentation lists. The draw uses numpy's global random state (as every detectron2
    augmentation does), so seeding numpy makes the choice reproducible.
    """

    def __init__(self, augmentations, alternative, prob=0.5):
        """
        Args:
            augmentations (list[Augmentation or Transform]): applied with probability 1 - prob.
            alternative (list[Augmentation or Transform]): applied with probability ``prob``.
            prob (float): probability of the alternative, in [0, 1].
        """
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"Probability must be in [0, 1], got {prob}")
        self.augmentations = T.AugmentationList(augmentations)
        self.alternative = T.AugmentationList(alternative)
        self.prob = prob

    def __call__(self, aug_input):
        """Applies the chosen list to ``aug_input`` in place; returns its TransformList."""
        # Same draw and comparison as the published mapper (``np.random.rand() > 0.5``).
        if self._rand_range() > self.prob:
            return self.augmentations(aug_input)
        return self.alternative(aug_input)


def train_ignore_label(cfg):
    """The ignore label of the first training dataset (metadata ``ignore_label``), or
    ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE`` when its metadata has none."""
    default = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    if not cfg.DATASETS.TRAIN:
        return default
    return MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("ignore_label", default)


def _resize_shortest_edge(cfg):
    return T.ResizeShortestEdge(
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    )


def _color_aug_ssd(cfg):
    # Imported here: detectron2's projects package is only needed when the jitter is enabled.
    from detectron2.projects.point_rend import ColorAugSSDTransform

    return ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT)


def _resize_crop_color_flip(cfg, crop):
    """ResizeShortestEdge, ``crop`` (if INPUT.CROP.ENABLED), SSD colour jitter (if
    INPUT.COLOR_AUG_SSD), horizontal flip."""
    augmentations = [_resize_shortest_edge(cfg)]
    if cfg.INPUT.CROP.ENABLED:
        augmentations.append(crop)
    if cfg.INPUT.COLOR_AUG_SSD:
        augmentations.append(_color_aug_ssd(cfg))
    augmentations.append(T.RandomFlip())
    return augmentations


def _semantic_augmentations(cfg):
    # Published: the crop leaves out MODEL.SEM_SEG_HEAD.IGNORE_VALUE when it measures category
    # areas, while the mapper pads and drops the dataset's ignore_label (the same value in every
    # published config).
    crop = T.RandomCrop_CategoryAreaConstraint(
        cfg.INPUT.CROP.TYPE,
        cfg.INPUT.CROP.SIZE,
        cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
        cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
    )
    return _resize_crop_color_flip(cfg, crop)


def _instance_augmentations(cfg):
    return _resize_crop_color_flip(cfg, T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))


def _lsj_augmentations(cfg):
    """Flip (per INPUT.RANDOM_FLIP), ResizeScale to a random fraction of IMAGE_SIZE, then a crop
    (or a bottom/right pad with 128) to exactly IMAGE_SIZE x IMAGE_SIZE."""
    size = cfg.INPUT.IMAGE_SIZE
    augmentations = []
    if cfg.INPUT.RANDOM_FLIP != "none":
        augmentations.append(
            T.RandomFlip(
                horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
            )
        )
    augmentations.append(
        T.ResizeScale(
            min_scale=cfg.INPUT.MIN_SCALE,
            max_scale=cfg.INPUT.MAX_SCALE,
            target_height=size,
            target_width=size,
        )
    )
    augmentations.append(T.FixedSizeCrop(crop_size=(size, size)))
    return augmentations


def _detr_augmentations(cfg):
    """Flip + resize; with INPUT.CROP.ENABLED, half of the time flip + resize to 400-600 + random
    crop + resize instead."""
    flip, resize = T.RandomFlip(), _resize_shortest_edge(cfg)
    if not cfg.INPUT.CROP.ENABLED:
        return [flip, resize]
    resize_crop = [
        flip,
        T.ResizeShortestEdge(list(DETR_CROP_SHORT_EDGES), sample_style="choice"),
        T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE),
        resize,
    ]
    return [RandomAugmentationChoice([flip, resize], resize_crop, prob=DETR_CROP_PROBABILITY)]


# kind -> builder(cfg) -> list of augmentations.
AUGMENTATION_BUILDERS = {
    "semantic": _semantic_augmentations,
    "instance": _instance_augmentations,
    "lsj": _lsj_augmentations,
    "detr": _detr_augmentations,
}


def build_augmentations(cfg, kind):
    """Builds the training augmentations of one kind.

    Args:
        cfg (CfgNode): a config with the MaskFormer keys (``add_mask_former_config``).
        kind (str): one of ``AUGMENTATION_BUILDERS`` ("semantic", "instance", "lsj", "detr").

    Returns:
        list[Augmentation or Transform]: to wrap in ``T.AugmentationList``.
    """
    if kind not in AUGMENTATION_BUILDERS:
        raise KeyError(
            f"Unknown augmentation kind {kind!r}; expected one of {sorted(AUGMENTATION_BUILDERS)}"
        )
    return AUGMENTATION_BUILDERS[kind](cfg)
