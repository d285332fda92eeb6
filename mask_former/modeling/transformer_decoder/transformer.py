"""
DETR-style transformer encoder / decoder layers (post-norm by default, pre-norm optional).

Sequences are laid out as [L, B, C] (length first), the layout of ``nn.MultiheadAttention``.
Parameter names (``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``, ``norm1..3``) are
those of the published checkpoints. Attention is called with ``need_weights=True``, the published
code path: its results are bit-identical to the published model's on CPU (the fused kernel that
``need_weights=False`` selects rounds differently).
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerDecoder",
    "Transformer",
    "TransformerEncoderOnly",
    "get_activation_fn",
]

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}


def get_activation_fn(name):
    """Returns the activation function called ``name`` ("relu", "gelu" or "glu")."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation should be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


def _with_pos(tensor, pos):
    return tensor if pos is None else tensor + pos


def _xavier_init(module):
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class TransformerEncoderLayer(nn.Module):
    """Self-attention then feed-forward, each with a residual connection and LayerNorm."""

    def __init__(
        self,
        d_model,
        nhead,
        dim_feedforward=2048,
        dropout=0.1,
        activation="relu",
        normalize_before=False,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = get_activation_fn(activation)
        self.normalize_before = normalize_before

    def _attend(self, src, pos, attn_mask, key_padding_mask):
        q = k = _with_pos(src, pos)
        return self.self_attn(
            q,
            k,
            value=src,
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            need_weights=True,
        )[0]

    def _feed_forward(self, src):
        return self.linear2(self.dropout(self.activation(self.linear1(src))))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, pos=None):
        """
        Args:
            src (Tensor): [L, B, C].
            src_mask (Tensor or None): [L, L] attention mask.
            src_key_padding_mask (Tensor or None): [B, L], True at padding.
            pos (Tensor or None): [L, B, C] positional encoding, added to queries and keys.

        Returns:
            Tensor: [L, B, C].
        """
        if self.normalize_before:
            src = src + self.dropout1(
                self._attend(self.norm1(src), pos, src_mask, src_key_padding_mask)
            )
            return src + self.dropout2(self._feed_forward(self.norm2(src)))
        src = self.norm1(
            src + self.dropout1(self._attend(src, pos, src_mask, src_key_padding_mask))
        )
        return self.norm2(src + self.dropout2(self._feed_forward(src)))


class TransformerDecoderLayer(nn.Module):
    """Self-attention over queries, cross-attention to the memory, then feed-forward."""

    def __init__(
        self,
        d_model,
        nhead,
        dim_feedforward=2048,
        dropout=0.1,
        activation="relu",
        normalize_before=False,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = get_activation_fn(activation)
        self.normalize_before = normalize_before

    def forward(
        self,
        tgt,
        memory,
        tgt_mask=None,
        memory_mask=None,
        tgt_key_padding_mask=None,
        memory_key_padding_mask=None,
        pos=None,
        query_pos=None,
    ):
        """
        Args:
            tgt (Tensor): [Q, B, C] query features.
            memory (Tensor): [L, B, C] encoder output.
            pos (Tensor or None): [L, B, C] positional encoding of the memory (keys only).
            query_pos (Tensor or None): [Q, B, C] query positional embedding.
            The masks are as in ``nn.MultiheadAttention``.

        Returns:
            Tensor: [Q, B, C].
        """
        pre = self.normalize_before
        x = self.norm1(tgt) if pre else tgt
        q = k = _with_pos(x, query_pos)
        x = self.self_attn(
            q,
            k,
            value=x,
            attn_mask=tgt_mask,
            key_padding_mask=tgt_key_padding_mask,
            need_weights=True,
        )[0]
        tgt = tgt + self.dropout1(x)
        if not pre:
            tgt = self.norm1(tgt)

        x = self.norm2(tgt) if pre else tgt
        x = self.multihead_attn(
            query=_with_pos(x, query_pos),
            key=_with_pos(memory, pos),
            value=memory,
            attn_mask=memory_mask,
            key_padding_mask=memory_key_padding_mask,
            need_weights=True,
        )[0]
        tgt = tgt + self.dropout2(x)
        if not pre:
            tgt = self.norm2(tgt)

        x = self.norm3(tgt) if pre else tgt
        tgt = tgt + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        return tgt if pre else self.norm3(tgt)


class TransformerEncoder(nn.Module):
    """A stack of encoder layers with an optional final LayerNorm (used with pre-norm)."""

    def __init__(self, encoder_layer, num_layers, norm=None):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, src, mask=None, src_key_padding_mask=None, pos=None):
        output = src
        for layer in self.layers:
            output = layer(
                output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, pos=pos
            )
        return output if self.norm is None else self.norm(output)


class TransformerDecoder(nn.Module):
    """
    A stack of decoder layers followed by a shared LayerNorm. With ``return_intermediate`` the
    normalised output of every layer is returned (deep supervision).
    """

    def __init__(self, decoder_layer, num_layers, norm, return_intermediate=False):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None):
        """
        Returns:
            Tensor: [num_outputs, Q, B, C]; num_outputs is ``num_layers`` with
            ``return_intermediate``, else 1.
        """
        output = tgt
        intermediate = []
        for layer in self.layers:
            output = layer(
                output,
                memory,
                memory_key_padding_mask=memory_key_padding_mask,
                pos=pos,
                query_pos=query_pos,
            )
            if self.return_intermediate:
                intermediate.append(self.norm(output))
        if self.return_intermediate:
            return torch.stack(intermediate)
        return self.norm(output).unsqueeze(0)


def _flatten_map(x):
    # [B, C, H, W] -> [H*W, B, C]
    return x.flatten(2).permute(2, 0, 1)


def _build_encoder(
    d_model, nhead, num_layers, dim_feedforward, dropout, activation, normalize_before
):
    """The DETR encoder; with pre-norm it ends with a LayerNorm."""
    layer = TransformerEncoderLayer(
        d_model, nhead, dim_feedforward, dropout, activation, normalize_before
    )
    norm = nn.LayerNorm(d_model) if normalize_before else None
    return TransformerEncoder(layer, num_layers, norm)


class Transformer(nn.Module):
    """The DETR transformer: an encoder over the image features and a query decoder."""

    def __init__(
        self,
        d_model=512,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=2048,
        dropout=0.1,
        activation="relu",
        normalize_before=False,
        return_intermediate_dec=False,
    ):
        super().__init__()
        self.encoder = _build_encoder(
            d_model,
            nhead,
            num_encoder_layers,
            dim_feedforward,
            dropout,
            activation,
            normalize_before,
        )
        decoder_layer = TransformerDecoderLayer(
            d_model, nhead, dim_feedforward, dropout, activation, normalize_before
        )
        self.decoder = TransformerDecoder(
            decoder_layer,
            num_decoder_layers,
            nn.LayerNorm(d_model),
            return_intermediate=return_intermediate_dec,
        )
        _xavier_init(self)
        self.d_model = d_model
        self.nhead = nhead

    def forward(self, src, mask, query_embed, pos_embed):
        """
        Args:
            src (Tensor): [B, C, H, W] image features.
            mask (Tensor or None): [B, H, W] bool, True at padding.
            query_embed (Tensor): [Q, C] query positional embeddings.
            pos_embed (Tensor): [B, C, H, W] positional encoding of ``src``.

        Returns:
            hs (Tensor): [num_outputs, B, Q, C] decoder outputs.
            memory (Tensor): [B, C, H, W] encoder output.
        """
        batch, channels, height, width = src.shape
        src = _flatten_map(src)
        pos_embed = _flatten_map(pos_embed)
        query_embed = query_embed.unsqueeze(1).repeat(1, batch, 1)
        if mask is not None:
            mask = mask.flatten(1)
        tgt = query_embed.new_zeros(query_embed.shape)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs = self.decoder(
            tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_embed
        )
        return hs.transpose(1, 2), memory.permute(1, 2, 0).reshape(batch, channels, height, width)


class TransformerEncoderOnly(nn.Module):
    """The DETR encoder alone, on a [B, C, H, W] map (MaskFormer's transformer-encoder FPN)."""

    def __init__(
        self,
        d_model=512,
        nhead=8,
        num_encoder_layers=6,
        dim_feedforward=2048,
        dropout=0.1,
        activation="relu",
        normalize_before=False,
    ):
        super().__init__()
        self.encoder = _build_encoder(
            d_model,
            nhead,
            num_encoder_layers,
            dim_feedforward,
            dropout,
            activation,
            normalize_before,
        )
        _xavier_init(self)
        self.d_model = d_model
        self.nhead = nhead

    def forward(self, src, mask, pos_embed):
        """
        Args:
            src (Tensor): [B, C, H, W].
            mask (Tensor or None): [B, H, W] bool, True at padding.
            pos_embed (Tensor): [B, C, H, W].

        Returns:
            Tensor: [B, C, H, W] encoded features.
        """
        batch, channels, height, width = src.shape
        if mask is not None:
            mask = mask.flatten(1)
        memory = self.encoder(
            _flatten_map(src), src_key_padding_mask=mask, pos=_flatten_map(pos_embed)
        )
        return memory.permute(1, 2, 0).reshape(batch, channels, height, width)
