"""MaskFormer's transformer decoder ("predictor"): a DETR decoder over one feature map."""

import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d
from fvcore.nn import weight_init
from torch import nn
from torch.nn import functional as F

from .build import TRANSFORMER_DECODER_REGISTRY, check_decoder_config
from .position_encoding import PositionEmbeddingSine
from .transformer import Transformer

__all__ = ["StandardTransformerDecoder", "MLP"]


class MLP(nn.Module):
    """A multi-layer perceptron with ReLU between layers (none after the last)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


@TRANSFORMER_DECODER_REGISTRY.register()
class StandardTransformerDecoder(nn.Module):
    """
    The MaskFormer decoder: a DETR transformer whose N outputs give class logits (``class_embed``)
    and mask embeddings (``mask_embed``, a 3-layer MLP); a mask is the dot product of its
    embedding with the per-pixel embeddings ``mask_features``.
    """

    # It reads one feature map (MaskFormerHead checks TRANSFORMER_IN_FEATURE against this).
    reads_multi_scale_features = False

    @configurable
    def __init__(
        self,
        in_channels,
        mask_classification=True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dropout: float,
        dim_feedforward: int,
        enc_layers: int,
        dec_layers: int,
        pre_norm: bool,
        deep_supervision: bool,
        mask_dim: int,
        enforce_input_project: bool,
    ):
        """
        Args:
            in_channels (int): channels of the feature map the decoder attends to.
            mask_classification (bool): predict classes (False for the per-pixel baseline plus,
                whose N = K "queries" are the classes themselves).
            num_classes (int): K.
            hidden_dim (int): transformer width.
            num_queries (int): N.
            nheads, dropout, dim_feedforward, enc_layers, dec_layers, pre_norm: the DETR
                transformer's settings.
            deep_supervision (bool): also return every intermediate layer's predictions.
            mask_dim (int): channels of ``mask_features``.
            enforce_input_project (bool): add the 1x1 input projection even when
                ``in_channels == hidden_dim``.
        """
        super().__init__()
        self.mask_classification = mask_classification
        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer = Transformer(
            d_model=hidden_dim,
            dropout=dropout,
            nhead=nheads,
            dim_feedforward=dim_feedforward,
            num_encoder_layers=enc_layers,
            num_decoder_layers=dec_layers,
            normalize_before=pre_norm,
            return_intermediate_dec=deep_supervision,
        )
        self.num_queries = num_queries
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        if in_channels != hidden_dim or enforce_input_project:
            self.input_proj = Conv2d(in_channels, hidden_dim, kernel_size=1)
            weight_init.c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Sequential()
        self.aux_loss = deep_supervision
        # Eval mode returns the intermediate predictions too, as the published decoder does; the
        # MaskFormer meta-architecture turns this off while it runs inference, which reads only
        # the last prediction (see final_predictions_only).
        self.aux_outputs_in_eval = True
        if mask_classification:
            self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels, mask_classification):
        mf = cfg.MODEL.MASK_FORMER
        check_decoder_config(cfg)
        return {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mf.HIDDEN_DIM,
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "nheads": mf.NHEADS,
            "dropout": mf.DROPOUT,
            "dim_feedforward": mf.DIM_FEEDFORWARD,
            "enc_layers": mf.ENC_LAYERS,
            "dec_layers": mf.DEC_LAYERS,
            "pre_norm": mf.PRE_NORM,
            "deep_supervision": mf.DEEP_SUPERVISION,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
            "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
        }

    def forward(self, x, mask_features, mask=None):
        """
        Args:
            x (Tensor): [B, in_channels, h, w] features the queries attend to.
            mask_features (Tensor): [B, mask_dim, H, W] per-pixel embeddings.
            mask (Tensor or None): unused (no padding mask, as published).

        Returns:
            dict: ``pred_logits`` [B, Q, K+1] (with mask classification), ``pred_masks``
            [B, Q, H, W] mask logits and, with deep supervision in training mode (or with
            ``aux_outputs_in_eval``), ``aux_outputs``: a list of such dicts for every decoder
            layer but the last.
        """
        pos = self.pe_layer(x)
        hs, _ = self.transformer(self.input_proj(x), None, self.query_embed.weight, pos)
        # hs: [L, B, Q, C] (L = decoder layers with deep supervision, else 1)
        with_aux = self.aux_loss and (self.training or self.aux_outputs_in_eval)
        if not with_aux:
            hs = hs[-1:]
        outputs_class = self.class_embed(hs) if self.mask_classification else None
        mask_embed = self.mask_embed(hs)
        outputs_mask = torch.einsum("lbqc,bchw->lbqhw", mask_embed, mask_features)
        out = {"pred_masks": outputs_mask[-1]}
        if outputs_class is not None:
            out["pred_logits"] = outputs_class[-1]
        if with_aux:
            out["aux_outputs"] = self._aux_outputs(outputs_class, outputs_mask)
        return out

    @torch.jit.unused
    def _aux_outputs(self, outputs_class, outputs_mask):
        if outputs_class is None:
            return [{"pred_masks": m} for m in outputs_mask[:-1]]
        return [
            {"pred_logits": c, "pred_masks": m}
            for c, m in zip(outputs_class[:-1], outputs_mask[:-1])
        ]
