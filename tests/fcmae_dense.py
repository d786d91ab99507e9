"""The FCMAE encoder as a dense emulation: every position of every map is computed, and hidden positions are
zeroed again after each operator that could write into them (GRN's statistics masked to visible sites).
convnextv2_fcmae.py computed it so before it computed the visible units only; it stays here as the baseline
that tests/bench.py times and counts (the sparse ideal's FLOPs are derived from it) and that
tests/test_convnextv2_fcmae.py holds the masked path to (loss, prediction, gradients).
"""
import math

import torch
import torch.nn as nn
from torchvision.ops import stochastic_depth

from convnextv2_fcmae import FCMAE, MODELS, random_masking


def dense_block(blk, x, visible):
    """A convnextv2_fcmae.Block on whole maps x [N, C, H, W], zero at hidden positions; visible [N, 1, H, W]."""
    h = blk.dwconv(x).permute(0, 2, 3, 1)                               # [N, H, W, C]
    h = blk.act(blk.pwconv1(blk.norm(h)))                               # [N, H, W, 4C]
    gx = torch.linalg.vector_norm(h * visible.permute(0, 2, 3, 1), dim=(0, 1, 2), keepdim=True)   # visible sites
    h = blk.grn.gamma * (h * (gx / (gx.mean(dim=-1, keepdim=True) + 1e-6))) + blk.grn.beta + h
    h = blk.pwconv2(h).permute(0, 3, 1, 2)                              # [N, C, H, W]
    return (x + stochastic_depth(h, blk.drop_path, "row", blk.training)) * visible


def dense_encoder(encoder, imgs, mask):
    """A convnextv2_fcmae.ConvNeXtV2 on the whole image, mask [N, L] (1 = hidden) re-applied: [N, C3, g, g]."""
    x = encoder.downsample_layers[0](imgs)                              # [N, C0, H/4, W/4]
    g = math.isqrt(mask.shape[1])                                       # a 32 px unit: 8 x 8 stem positions
    visible = nn.functional.interpolate((1 - mask).view(-1, 1, g, g), size=x.shape[-2:]).to(x.dtype)
    x = x * visible
    for i, stage in enumerate(encoder.stages):
        if i > 0:
            norm, conv = encoder.downsample_layers[i]
            x, visible = norm(x) * visible, visible[:, :, ::2, ::2]     # LayerNorm of a zero site is its bias
            x = conv(x) * visible
        for blk in stage:
            x = dense_block(blk, x, visible)
    return x


class DenseFCMAE(FCMAE):
    """FCMAE with the dense encoder: the same modules and, built from the same seed, the same weights."""

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        if noise is None:
            noise = torch.randn(imgs.shape[0], self.grid ** 2, device=imgs.device)
        _, mask, _ = random_masking(noise, mask_ratio)
        return dense_encoder(self.encoder, imgs, mask), mask


def dense_emulation(name, **kwargs):
    """MODELS[name](**kwargs) with the dense encoder (same construction, so the same init under one seed)."""
    return DenseFCMAE(**{**MODELS[name].keywords, **kwargs})
