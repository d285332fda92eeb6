"""Config keys of MaskFormer and Mask2Former.

:func:`add_mask_former_config` adds every key that the published MaskFormer and Mask2Former config
adders add, with the same defaults, so that published YAML files merge unchanged. It also adds the
keys of detectron2's DeepLab project (``add_deeplab_config``) when they are missing, because the
published YAMLs set some of them (``MODEL.RESNETS.STEM_TYPE``, ``SOLVER.POLY_LR_POWER``, ...).

One default differs from the published Mask2Former adder: ``TRANSFORMER_DECODER_NAME`` defaults to
``"StandardTransformerDecoder"`` so that MaskFormer configs (which never set it) build MaskFormer's
decoder. Every published Mask2Former config sets the key explicitly.

Keys of our own (not in the published adders) are marked "ours" below.
"""

from detectron2.config import CfgNode as CN

__all__ = ["add_mask_former_config", "add_maskformer2_config", "OWN_CONFIG_KEYS"]

# Full names of the keys this project adds beyond the published adders; documented in README.md.
OWN_CONFIG_KEYS = (
    "MODEL.MASK_FORMER.FAMILY",
    "MODEL.MASK_FORMER.CHANNELS_LAST",
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL",
    "SOLVER.AMP.CPU_BF16",
)


def _add_deeplab_keys(cfg):
    """Adds detectron2's DeepLab keys (as ``add_deeplab_config``) where they are missing."""
    if "POLY_LR_POWER" in cfg.SOLVER:
        return
    from detectron2.projects.deeplab import add_deeplab_config

    add_deeplab_config(cfg)


def add_mask_former_config(cfg):
    """
    Adds the MaskFormer / Mask2Former keys to a detectron2 config (in place).

    Args:
        cfg (CfgNode): usually ``detectron2.config.get_cfg()``.
    """
    _add_deeplab_keys(cfg)

    # ---------------------------------------------------------------- data
    # Name of the training dataset mapper, see mask_former.data.build_train_mapper.
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    # Photometric augmentation of SSD (brightness, contrast, saturation, hue).
    cfg.INPUT.COLOR_AUG_SSD = False
    # Largest area fraction a single category may cover in a random crop (1.0: no limit).
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # Training images are padded to exactly this size when positive; -1: no padding by the mapper.
    cfg.INPUT.SIZE_DIVISIBILITY = -1
    # Large-scale jitter (Mask2Former COCO mappers): output size and scale range.
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0

    # ---------------------------------------------------------------- solver
    # Weight decay of nn.Embedding weights (query embeddings).
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # "ADAMW" or "SGD".
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Learning-rate multiplier of the backbone's parameters.
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # (ours) Train on CPU under autocast with bfloat16 (float32 parameters, gradients and
    # optimizer state; losses and matching in float32). Faster where the CPU has native bfloat16
    # (AVX512-BF16, AMX); results differ from float32 training. SOLVER.AMP.ENABLED is CUDA's.
    cfg.SOLVER.AMP.CPU_BF16 = False

    # ---------------------------------------------------------------- MODEL.MASK_FORMER
    cfg.MODEL.MASK_FORMER = CN()
    # Which published behaviour to follow, "MaskFormer" or "Mask2Former" (criterion kind, panoptic
    # pixel rule; sem_seg output and resize before inference follow the TEST flags in both
    # families, README). "" (ours): derived from TRANSFORMER_DECODER_NAME (masked-attention
    # decoder: Mask2Former, otherwise MaskFormer).
    cfg.MODEL.MASK_FORMER.FAMILY = ""
    # (ours) Channels-last memory layout for the convolutions: same results up to float rounding;
    # faster for MaskFormer on CPU, not for Mask2Former (README, Benchmarks). Off by default.
    cfg.MODEL.MASK_FORMER.CHANNELS_LAST = False
    # Loss on every decoder layer's prediction (aux losses suffixed _0 .. _{L-2}).
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = True
    # Cross-entropy weight of the "no object" class.
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1
    # Loss and matching-cost weights of the class, mask (focal / BCE) and dice terms.
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 1.0
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 1.0
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 20.0

    # Transformer decoder: attention heads, dropout, FFN width, layers, width.
    cfg.MODEL.MASK_FORMER.NHEADS = 8
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.1
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048
    # Encoder layers of the standard decoder's own DETR encoder (0 in every published config).
    cfg.MODEL.MASK_FORMER.ENC_LAYERS = 0
    # Decoder layers (Mask2Former builds DEC_LAYERS - 1 masked-attention layers, as published).
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 6
    # Pre-norm instead of post-norm transformer layers.
    cfg.MODEL.MASK_FORMER.PRE_NORM = False
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 256
    # Number of queries N.
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 100
    # What the transformer decoder reads: "res5" (or another backbone feature),
    # "transformer_encoder", "pixel_embedding" or "multi_scale_pixel_decoder".
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "res5"
    # Always project the decoder's input with a 1x1 conv, even if its width equals HIDDEN_DIM.
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False
    # Registered name of the transformer decoder (see mask_former.modeling.transformer_decoder).
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "StandardTransformerDecoder"

    # Inference.
    cfg.MODEL.MASK_FORMER.TEST = CN()
    # Which outputs the model returns at inference.
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    # Panoptic: keep queries whose class score exceeds this.
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.0
    # Panoptic: drop a segment keeping less than this fraction of its own mask.
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.0
    # Resize mask logits to the output size before semantic inference (not after).
    cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False

    # Images are padded to a multiple of this; negative: the backbone's size_divisibility.
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32

    # Point-sampled mask losses (Mask2Former): points per mask, oversampling and importance ratios.
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 112 * 112
    cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75

    # ---------------------------------------------------------------- MODEL.SEM_SEG_HEAD
    # Width of the per-pixel embeddings (mask_features).
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    # Encoder layers of the pixel decoder (transformer-encoder FPN, deformable encoder).
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 0
    # Registered name of the pixel decoder (see mask_former.modeling.pixel_decoder).
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "BasePixelDecoder"
    # Backbone features read by the deformable-attention encoder.
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    # Declared by the published adder but not read by its encoder (which uses 4 points and
    # MODEL.MASK_FORMER.NHEADS); kept for compatibility, and likewise unread here.
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    # (ours) Core of the deformable attention: "auto" (Triton on CUDA when it imports, else the
    # published grid_sample arithmetic), "pytorch" (grid_sample), "gather" (embedding_bag; faster
    # CPU inference, equal up to float rounding) or "triton".
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_ATTENTION_IMPL = "auto"

    # ---------------------------------------------------------------- MODEL.SWIN
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.QKV_BIAS = True
    cfg.MODEL.SWIN.QK_SCALE = None
    cfg.MODEL.SWIN.DROP_RATE = 0.0
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    # Absolute position embedding.
    cfg.MODEL.SWIN.APE = False
    cfg.MODEL.SWIN.PATCH_NORM = True
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Gradient checkpointing of the Swin blocks.
    cfg.MODEL.SWIN.USE_CHECKPOINT = False


# The published Mask2Former name of the same adder.
add_maskformer2_config = add_mask_former_config
