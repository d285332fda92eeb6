"""Sine positional encoding of 2-D feature maps (as in DETR and the MaskFormer papers)."""

import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """
    Encodes each pixel's (y, x) position with sines and cosines of ``num_pos_feats`` frequencies
    per axis. The output has ``2 * num_pos_feats`` channels: the y encoding, then the x encoding.
    """

    def __init__(self, num_pos_feats=64, temperature=10000, normalize=False, scale=None):
        """
        Args:
            num_pos_feats (int): channels per axis.
            temperature (float): base of the geometric frequency progression.
            normalize (bool): scale positions to (0, ``scale``] before encoding.
            scale (float): used with ``normalize``; default 2π.
        """
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: `scale` is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x, mask=None):
        """
        Args:
            x (Tensor): [B, C, H, W]; only its shape, device and dtype are used.
            mask (Tensor or None): [B, H, W] bool, True at padded pixels.

        Returns:
            Tensor: [B, 2 * num_pos_feats, H, W] in ``x``'s dtype.
        """
        batch, _, height, width = x.shape
        if mask is None:
            not_mask = torch.ones((batch, height, width), device=x.device, dtype=torch.bool)
        else:
            not_mask = ~mask
        # Positions count from 1 so that the first pixel is not encoded as zero.
        y_pos = not_mask.cumsum(1, dtype=torch.float32)
        x_pos = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_pos = y_pos / (y_pos[:, -1:, :] + eps) * self.scale
            x_pos = x_pos / (x_pos[:, :, -1:] + eps) * self.scale

        exponent = 2 * torch.div(
            torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device),
            2,
            rounding_mode="floor",
        )
        inv_freq = self.temperature ** (exponent / self.num_pos_feats)
        pos_y = self._interleave_sin_cos(y_pos[..., None] / inv_freq)
        pos_x = self._interleave_sin_cos(x_pos[..., None] / inv_freq)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)

    @staticmethod
    def _interleave_sin_cos(angles):
        # [B, H, W, F] -> sin of even channels and cos of odd channels, interleaved pairwise.
        return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=4).flatten(3)
