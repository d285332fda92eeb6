"""Mask2Former's transformer decoder: queries attend to one feature level at a time, each only
inside the mask its previous prediction gave it (masked attention).

Shape legend:
    B: batch size
    Q: number of queries
    C: the decoder's width (``hidden_dim``)
    K: number of classes
    H, W: size of ``mask_features``
    h_l, w_l: size of feature level l (level 0 is the coarsest)

Sequences are laid out as [length, B, C], the layout of ``nn.MultiheadAttention``. Attention is
called with ``need_weights=True``, the published code path (see ``transformer.py``).
"""

import contextlib
import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.utils.logger import log_first_n
from fvcore.nn import weight_init
from torch import Tensor, nn
from torch.nn import functional as F

from .build import TRANSFORMER_DECODER_REGISTRY, check_decoder_config
from .position_encoding import PositionEmbeddingSine
from .standard_decoder import MLP
from .transformer import get_activation_fn

__all__ = [
    "MultiScaleMaskedTransformerDecoder",
    "SelfAttentionLayer",
    "CrossAttentionLayer",
    "FFNLayer",
    "CachedPositionEmbeddingSine",
    "NUM_FEATURE_LEVELS",
]

# Feature levels the queries cycle through (res5, res4, res3 in the published configs).
NUM_FEATURE_LEVELS = 3
# A pixel is outside a query's attention mask where its predicted mask probability is below this.
ATTN_MASK_THRESHOLD = 0.5


class CachedPositionEmbeddingSine(PositionEmbeddingSine):
    """:class:`PositionEmbeddingSine` memoised per map size, for maps without padding masks.

    Without a mask the encoding depends only on (H, W) (and is the same for every image of a
    batch), yet the pixel decoder and the transformer decoder need it for the same levels at every
    forward. It is computed once per (H, W, device, dtype) and returned as a batch-expanded view
    of the cached tensor, with the values :class:`PositionEmbeddingSine` computes. The result is
    shared: do not modify it in place.
    """

    # Cached sizes per instance (the least recently computed is dropped first).
    max_entries = 8

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cache: "OrderedDict[tuple, Tensor]" = OrderedDict()

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            x (Tensor): [B, C, H, W]; only its shape, device and dtype are used.
            mask (Tensor or None): [B, H, W] bool, True at padding (not cached).

        Returns:
            Tensor: [B, 2 * num_pos_feats, H, W] in ``x``'s dtype.
        """
        if mask is not None:
            return super().forward(x, mask)
        height, width = x.shape[-2:]
        # Inference-mode tensors may not be used outside inference mode: keep them apart.
        key = (height, width, x.device, x.dtype, torch.is_inference_mode_enabled())
        pos = self._cache.get(key)
        if pos is None:
            with torch.no_grad():
                pos = super().forward(x.new_empty((1, 0, height, width)))
            self._cache[key] = pos
            if len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return pos.expand(x.shape[0], -1, -1, -1)


def _xavier_init_matrices(module: nn.Module):
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def _attend(attn: nn.MultiheadAttention, query, key, value, attn_mask=None) -> Tensor:
    # need_weights=True is the published (bit-exact) path; the per-head weights it also returns
    # are discarded, so they are not averaged (average_attn_weights=False changes nothing else).
    return attn(
        query, key, value, attn_mask=attn_mask, need_weights=True, average_attn_weights=False
    )[0]


class SelfAttentionLayer(nn.Module):
    """Self-attention among the queries with a residual connection and LayerNorm."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before=False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init_matrices(self)

    def forward(self, tgt: Tensor, query_pos: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            tgt (Tensor): [Q, B, C] queries.
            query_pos (Tensor or None): [Q, B, C] positional embedding, added to queries and keys.

        Returns:
            Tensor: [Q, B, C].
        """
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = x if query_pos is None else x + query_pos
        tgt = tgt + self.dropout(_attend(self.self_attn, q, k, x))
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Attention from the queries to a feature level, with a residual connection and LayerNorm."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, normalize_before=False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init_matrices(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        key: Tensor,
        attn_mask: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            tgt (Tensor): [Q, B, C] queries.
            memory (Tensor): [h*w, B, C] the level's features (the values).
            key (Tensor): [h*w, B, C] ``memory`` plus its positional encoding. Passed in because
                ``memory`` is the same for every layer reading this level.
            attn_mask (Tensor or None): [B * nhead, Q, h*w], bool (True: may not attend) or an
                additive float mask, as ``nn.MultiheadAttention`` takes it.
            query_pos (Tensor or None): [Q, B, C] query positional embedding.

        Returns:
            Tensor: [Q, B, C].
        """
        x = self.norm(tgt) if self.normalize_before else tgt
        query = x if query_pos is None else x + query_pos
        tgt = tgt + self.dropout(_attend(self.multihead_attn, query, key, memory, attn_mask))
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """A two-layer feed-forward network with a residual connection and LayerNorm."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.activation = get_activation_fn(activation)
        self.normalize_before = normalize_before
        _xavier_init_matrices(self)

    def forward(self, tgt: Tensor) -> Tensor:
        """
        Args:
            tgt (Tensor): [Q, B, C].

        Returns:
            Tensor: [Q, B, C].
        """
        x = self.norm(tgt) if self.normalize_before else tgt
        x = self.linear2(self.dropout(self.activation(self.linear1(x))))
        tgt = tgt + self.dropout(x)
        return tgt if self.normalize_before else self.norm(tgt)


def attention_bias(attn_mask: Tensor, num_heads: int, dtype: torch.dtype) -> Tensor:
    """The additive mask ``nn.MultiheadAttention`` makes of a bool mask, repeated for every head.

    Args:
        attn_mask (Tensor): [B, Q, S] bool, True where a query may not attend.
        num_heads (int): attention heads.
        dtype (torch.dtype): of the attention scores.

    Returns:
        Tensor: [B * num_heads, Q, S], 0 where allowed and -inf where masked.
    """
    bias = torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(attn_mask, float("-inf"))
    batch, queries, length = attn_mask.shape
    # A view for B = 1 (the heads share one copy), else one copy per head.
    return bias[:, None].expand(-1, num_heads, -1, -1).reshape(batch * num_heads, queries, length)


def pixels_read_by_downsample(features: Tensor, size: Tuple[int, int]) -> Optional[Tensor]:
    """The pixels of ``features`` that a bilinear resize to ``size`` reads, when that resize is a
    downsampling by an even integer factor s > 2 in both directions, on the CPU.

    With ``align_corners=False``, output pixel d of such a resize is the mean of input pixels
    s*d + s/2 - 1 and s*d + s/2 (weights 0.5 and 0.5) in each direction. Resizing the [2h, 2w]
    map of those rows and columns to (h, w) (factor 2: pixels 2d and 2d + 1, weights 0.5) reads
    the same values with the same weights, so it gives the same result bit for bit; the mask
    logits of those pixels (dot products over channels) are also the same whether computed for
    the full map or for the selection (checked on the CPU, tests/test_mask2former_heads.py).

    Args:
        features (Tensor): [B, C, H, W].
        size (tuple): (h, w) of the resize.

    Returns:
        Tensor or None: [B, C, 2h, 2w] (a copy in the memory format of ``features``), or None
            where this does not apply: other factors, not on the CPU, or while traced (fvcore's
            FLOP count then sees the published computation).
    """
    if features.device.type != "cpu" or torch.jit.is_tracing():
        return None
    batch, channels, height, width = features.shape
    factors = []
    for full, target in ((height, size[0]), (width, size[1])):
        factor = full // target if target > 0 else 0
        if factor <= 2 or factor % 2 or factor * target != full:
            return None
        factors.append(factor)
    (fh, fw), (h, w) = factors, size
    channels_last = features.is_contiguous(memory_format=torch.channels_last)
    # Slice the pixel pairs from views; the copy keeps the layout (channels-last copies whole
    # channel vectors, and the einsum reads either layout without another copy).
    x = features.permute(0, 2, 3, 1) if channels_last else features
    rows, cols = (1, 3) if channels_last else (2, 4)
    x = x.unflatten(rows, (h, fh)).narrow(rows + 1, fh // 2 - 1, 2)
    x = x.unflatten(cols, (w, fw)).narrow(cols + 1, fw // 2 - 1, 2)
    if channels_last:
        return x.reshape(batch, 2 * h, 2 * w, channels).permute(0, 3, 1, 2)
    return x.reshape(batch, channels, 2 * h, 2 * w)


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """
    The Mask2Former decoder. Learnable query features (``query_feat``) are refined by
    ``num_layers`` layers, each a masked cross-attention to one feature level (levels taken in
    turn, coarsest first), a self-attention and an FFN (post-norm, or pre-norm). Before the first
    layer and after every layer, the queries give a prediction: class logits (``class_embed``) and
    mask logits (the ``mask_embed`` MLP dotted with ``mask_features``). The next layer's queries
    attend only to the pixels where that mask's probability is >= 0.5 (a query whose mask is
    empty at that level attends everywhere).
    """

    # It reads the pixel decoder's 3 feature levels (MaskFormerHead checks TRANSFORMER_IN_FEATURE).
    reads_multi_scale_features = True

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        dropout: float = 0.0,
        deep_supervision: bool = True,
    ):
        """
        Args:
            in_channels (int): channels of the multi-scale features.
            mask_classification (bool): predict class logits.
            num_classes (int): K.
            hidden_dim (int): C.
            num_queries (int): Q.
            nheads (int): attention heads.
            dim_feedforward (int): hidden width of the FFN layers.
            dec_layers (int): number of layers (DEC_LAYERS - 1 in the config, as published).
            pre_norm (bool): pre-norm instead of post-norm layers.
            mask_dim (int): channels of ``mask_features``.
            enforce_input_project (bool): project the features with a 1x1 conv even when
                ``in_channels == hidden_dim``.
            dropout (float): dropout of the layers; 0 when built from a config (the published
                decoder does not read MASK_FORMER.DROPOUT: its layers have none).
            deep_supervision (bool): also return the earlier predictions (``aux_outputs``).
        """
        super().__init__()
        self.mask_classification = mask_classification
        self.pe_layer = CachedPositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        self._build_layers(hidden_dim, nheads, dim_feedforward, dropout, pre_norm)
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.num_feature_levels = NUM_FEATURE_LEVELS
        self.level_embed = nn.Embedding(NUM_FEATURE_LEVELS, hidden_dim)
        self.input_proj = self._build_input_proj(in_channels, hidden_dim, enforce_input_project)
        if mask_classification:
            self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.aux_loss = deep_supervision
        # Eval mode returns the intermediate predictions too, as the published decoder does. The
        # MaskFormer meta-architecture turns this off while it runs inference, which reads only
        # the last prediction (see final_predictions_only): the decoder then skips their mask
        # logits and computes each attention mask from the few pixels its resize reads (same
        # values).
        self.aux_outputs_in_eval = True
        # Set by record_attention_masks(): where forward() logs its attention masks.
        self._attn_mask_log: Optional[List[Tensor]] = None

    def _build_layers(self, hidden_dim, nheads, dim_feedforward, dropout, pre_norm):
        # Registered as three lists (all self-attention layers, then all cross-attention layers,
        # then all FFNs), the published state_dict order.
        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(self.num_layers):
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(hidden_dim, nheads, dropout, normalize_before=pre_norm)
            )
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(hidden_dim, nheads, dropout, normalize_before=pre_norm)
            )
            self.transformer_ffn_layers.append(
                FFNLayer(hidden_dim, dim_feedforward, dropout, normalize_before=pre_norm)
            )

    @staticmethod
    def _build_input_proj(in_channels, hidden_dim, enforce_input_project) -> nn.ModuleList:
        """Per level a 1x1 conv to ``hidden_dim`` if needed, else an (empty) identity."""
        input_proj = nn.ModuleList()
        for _ in range(NUM_FEATURE_LEVELS):
            if in_channels != hidden_dim or enforce_input_project:
                input_proj.append(Conv2d(in_channels, hidden_dim, kernel_size=1))
                weight_init.c2_xavier_fill(input_proj[-1])
            else:
                input_proj.append(nn.Sequential())
        return input_proj

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        mf = cfg.MODEL.MASK_FORMER
        check_decoder_config(cfg)
        if mf.DROPOUT != 0:
            log_first_n(
                logging.WARNING,
                f"MODEL.MASK_FORMER.DROPOUT={mf.DROPOUT} is not read by {cls.__name__} (as "
                "published: its layers have no dropout); the pixel decoder still uses it.",
                key="message",
            )
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            # The prediction made from the learnable query features before any layer counts as
            # one of the DEC_LAYERS supervised outputs (published).
            "dec_layers": mf.DEC_LAYERS - 1,
            "pre_norm": mf.PRE_NORM,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
            # Published: the layers have no dropout whatever MASK_FORMER.DROPOUT says (the
            # deformable pixel decoder does read it).
            "dropout": 0.0,
            "deep_supervision": mf.DEEP_SUPERVISION,
        }

    @contextlib.contextmanager
    def record_attention_masks(self):
        """Records the attention masks of every forward run inside the context (for debugging and
        tests; nothing is recorded otherwise).

        Yields:
            list[Tensor]: filled by each forward with one bool [B, Q, h_l*w_l] per prediction
            (True: may not attend), taken before fully masked rows are reset; the entry of
            prediction i is used by layer i, the last one by no layer.
        """
        log: List[Tensor] = []
        self._attn_mask_log = log
        try:
            yield log
        finally:
            self._attn_mask_log = None

    def _prepare_levels(self, x: List[Tensor]):
        """Flattens the feature levels.

        Returns:
            memories (list[Tensor]): per level [h_l*w_l, B, C], projected, plus the level embedding.
            keys (list[Tensor]): per level the memory plus its sine positional encoding.
            sizes (list[tuple]): per level (h_l, w_l).
        """
        memories, keys, sizes = [], [], []
        for level in range(self.num_feature_levels):
            sizes.append(tuple(x[level].shape[-2:]))
            # [B, C, h, w] -> [h*w, B, C]
            pos = self.pe_layer(x[level], None).flatten(2).permute(2, 0, 1)
            embed = self.level_embed.weight[level][None, :, None]
            memory = (self.input_proj[level](x[level]).flatten(2) + embed).permute(2, 0, 1)
            memories.append(memory)
            keys.append(memory + pos)
        return memories, keys, sizes

    def forward(self, x: List[Tensor], mask_features: Tensor, mask: Optional[Tensor] = None):
        """
        Args:
            x (list[Tensor]): 3 feature levels [B, in_channels, h_l, w_l], coarsest first.
            mask_features (Tensor): [B, mask_dim, H, W] per-pixel embeddings.
            mask (Tensor or None): unused (no padding mask, as published).

        Returns:
            dict: ``pred_logits`` [B, Q, K+1] (with mask classification), ``pred_masks``
            [B, Q, H, W] mask logits of the last layer and, with deep supervision in training
            mode (or with ``aux_outputs_in_eval``), ``aux_outputs``: a list of such dicts for the
            earlier predictions, the one from the initial queries first.

        Raises:
            ValueError: if ``x`` does not hold 3 levels.
        """
        if not isinstance(x, (list, tuple)) or len(x) != self.num_feature_levels:
            got = f"{len(x)} levels" if isinstance(x, (list, tuple)) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} reads a list of {self.num_feature_levels} feature levels, "
                f"got {got} (MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE must be "
                "'multi_scale_pixel_decoder', and the pixel decoder must give that many levels: "
                "see MODEL.SEM_SEG_HEAD.IN_FEATURES and "
                "DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES)"
            )
        memories, keys, sizes = self._prepare_levels(x)
        batch = memories[0].shape[1]
        # [Q, C] -> [Q, B, C]
        query_pos = self.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)

        # With no layers (DEC_LAYERS 1), the prediction from the initial queries is the last one.
        outputs_class, outputs_mask, attn_mask = self._predict(
            output, mask_features, sizes[0], last=self.num_layers == 0
        )
        predictions = [(outputs_class, outputs_mask)]
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            output = self.transformer_cross_attention_layers[i](
                output, memories[level], keys[level], attn_mask, query_pos
            )
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
            last = i == self.num_layers - 1
            outputs_class, outputs_mask, attn_mask = self._predict(
                output, mask_features, sizes[(i + 1) % self.num_feature_levels], last
            )
            predictions.append((outputs_class, outputs_mask))
        return self._pack_outputs(predictions)

    def _predict(self, output, mask_features, attn_mask_size, last=False):
        """Class and mask logits of the current queries, and the next layer's attention mask.

        Args:
            output (Tensor): [Q, B, C] queries.
            mask_features (Tensor): [B, mask_dim, H, W].
            attn_mask_size (tuple): (h, w) of the level the next layer reads.
            last (bool): no layer follows; the attention mask is only made to be recorded.

        Returns:
            outputs_class (Tensor or None): [B, Q, K+1]; None without mask classification and
                for an intermediate prediction in eval mode.
            outputs_mask (Tensor or None): [B, Q, H, W] mask logits; None for an intermediate
                prediction in eval mode.
            attn_mask (Tensor or None): [B * nheads, Q, h*w] additive attention mask.
        """
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        mask_embed = self.mask_embed(decoder_output)
        if not (last or self._returns_aux_outputs()):
            # Only the attention mask is needed: the mask logits of the pixels its resize reads.
            sampled = pixels_read_by_downsample(mask_features, attn_mask_size)
            if sampled is not None:
                logits = torch.einsum("bqc,bchw->bqhw", mask_embed, sampled)
                attn_mask = self._attention_mask(logits, attn_mask_size)
                return None, None, attention_bias(attn_mask, self.num_heads, output.dtype)
        outputs_class = self.class_embed(decoder_output) if self.mask_classification else None
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        if last and self._attn_mask_log is None:
            return outputs_class, outputs_mask, None
        attn_mask = self._attention_mask(outputs_mask.detach(), attn_mask_size)
        return outputs_class, outputs_mask, attention_bias(attn_mask, self.num_heads, output.dtype)

    def _attention_mask(self, outputs_mask: Tensor, size: Tuple[int, int]) -> Tensor:
        """
        Args:
            outputs_mask (Tensor): [B, Q, H, W] mask logits.
            size (tuple): (h, w) of the level to attend to.

        Returns:
            Tensor: [B, Q, h*w] bool, True where a query may not attend; a query masked
            everywhere is unmasked everywhere instead.
        """
        resized = F.interpolate(outputs_mask, size=size, mode="bilinear", align_corners=False)
        attn_mask = resized.sigmoid().flatten(2) < ATTN_MASK_THRESHOLD
        if self._attn_mask_log is not None:
            self._attn_mask_log.append(attn_mask.clone())
        # Attending to nothing would make the softmax NaN.
        return attn_mask & ~attn_mask.all(-1, keepdim=True)

    def _returns_aux_outputs(self) -> bool:
        return self.aux_loss and (self.training or self.aux_outputs_in_eval)

    def _pack_outputs(self, predictions: List[Tuple[Optional[Tensor], Tensor]]) -> Dict:
        out = self._prediction_dict(*predictions[-1])
        if self._returns_aux_outputs():
            out["aux_outputs"] = [self._prediction_dict(c, m) for c, m in predictions[:-1]]
        return out

    def _prediction_dict(self, outputs_class, outputs_mask) -> Dict[str, Tensor]:
        if self.mask_classification:
            return {"pred_logits": outputs_class, "pred_masks": outputs_mask}
        return {"pred_masks": outputs_mask}
