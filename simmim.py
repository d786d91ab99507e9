"""SimMIM: mask random 32x32 patches, encode the whole image with mask tokens, predict raw pixels.

The encoder (a ViT or a Swin Transformer) sees every patch, hidden ones replaced by a learned
mask token; a one-layer head (a 1x1 convolution and a pixel shuffle) maps its output back to
full resolution, and the loss is the L1 distance to the normalised pixels of the hidden
patches. Masks are drawn on a 32-px grid (60 %), coarser than the encoder's patches, so that
hidden pixels cannot be copied from visible neighbours.

Paper: Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022,
https://arxiv.org/abs/2111.09886. Official code: https://github.com/microsoft/SimMIM.
This file rebuilds the official pre-training models with plain PyTorch: same state_dict,
same numbers (tests/test_simmim.py checks it against fixtures made by the official code).

    python simmim.py --model simmim_vit_tiny --epochs 5 --warmup_epochs 1          # CPU demo
    torchrun --nproc_per_node=8 simmim.py --data /imagenet --accum_iter 2          # ViT-B: 128 x 8 x 2 = 2048
    torchrun --nproc_per_node=8 simmim.py --model simmim_swin_base_w6 --data /imagenet --accum_iter 2
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR \
        --master_port=29500 simmim.py --data /imagenet                             # 2 nodes: 2048
"""
import argparse
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image
from tqdm import tqdm

from common import BILINEAR, IMAGENET_MEAN, IMAGENET_STD, load_images, pretrain_loader, pretrain_transform, set_lr, cosine_lr

# Conventions: N batch, L mask units (32x32 px), D width, p encoder patch size, s mask patch size.
# mask: 1 = hidden, 0 = visible. Parameter names follow the official models (timm 0.3-era names).

# --- shared pieces ---


def drop_path(x, p, training):
    """Stochastic depth: zero a residual branch for whole samples, rescale the rest."""
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    return x * x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def trunc_normal_(tensor, std=0.02, a=-2.0, b=2.0):
    """Normal(0, std) truncated to [a, b] by the inverse CDF, as timm's trunc_normal_ that the
    official code calls: the same draws from the same seed (PyTorch's own is a rejection
    sampler since 2.x, whose draws differ)."""
    cdf = lambda x: (1.0 + math.erf(x / std / math.sqrt(2.0))) / 2.0    # noqa: E731
    with torch.no_grad():
        return tensor.uniform_(2 * cdf(a) - 1, 2 * cdf(b) - 1).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(a, b)


def relative_position_index(h, w):
    """[h*w, h*w] index into a [(2h-1)(2w-1)] table of relative offsets between two grid positions."""
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # [2, h*w]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)   # [h*w, h*w, 2], (dy, dx)
    return (rel[..., 0] + h - 1) * (2 * w - 1) + (rel[..., 1] + w - 1)


def attention(x, qkv, proj, num_heads, bias):
    """Multi-head attention of x [B, T, D] with an additive logit bias broadcastable to
    [B, heads, T, T]; qkv (weight, bias) as one projection."""
    B, T, D = x.shape
    q, k, v = F.linear(x, *qkv).reshape(B, T, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))   # softmax(q k^T / sqrt(d) + bias) v
    return proj(x.transpose(1, 2).reshape(B, T, D))


# --- the ViT encoder (BEiT-style, as SimMIM's ViT-B: layer scale, a relative position bias
#     shared by all blocks, no absolute position embedding) ---


class RelativePositionBias(nn.Module):
    """One learned bias per relative offset and head, plus three for cls->patch, patch->cls, cls->cls."""

    def __init__(self, grid, num_heads):
        super().__init__()
        self.grid = grid
        n = (2 * grid - 1) ** 2
        self.relative_position_bias_table = nn.Parameter(torch.zeros(n + 3, num_heads))   # zeros, as the official
        index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
        index[1:, 1:] = relative_position_index(grid, grid)
        index[0, :], index[:, 0], index[0, 0] = n, n + 1, n + 2
        self.register_buffer("relative_position_index", index)

    def forward(self):                                                  # [heads, 1 + L, 1 + L]
        return self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)


class ViTAttention(nn.Module):
    """qkv without a bias of its own: learned q and v biases, and a zero k bias (BEiT)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias):
        qkv_bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        return attention(x, (self.qkv.weight, qkv_bias), self.proj, self.num_heads, bias)


class ViTBlock(nn.Module):
    """Pre-norm block with layer scale: x + gamma * branch(norm(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, init_values=0.1):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        self.drop_path = drop_path

    def forward(self, x, bias):
        x = x + drop_path(self.gamma_1 * self.attn(self.norm1(x), bias), self.drop_path, self.training)
        return x + drop_path(self.gamma_2 * self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, dim, norm=False):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        if norm:                                                        # Swin's patch_norm
            self.norm = nn.LayerNorm(dim)

    def forward(self, imgs):                                            # [N, 3, H, W]
        x = self.proj(imgs).flatten(2).transpose(1, 2)                  # [N, L, D]
        return self.norm(x) if hasattr(self, "norm") else x


class VisionTransformerForSimMIM(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_path_rate=0.1, init_values=0.1):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size, self.grid, self.num_features = patch_size, img_size // patch_size, embed_dim
        self.stride = patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.rel_pos_bias = RelativePositionBias(self.grid, num_heads)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([ViTBlock(embed_dim, num_heads, mlp_ratio, dpr[i], init_values)
                                     for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.initialize_weights()

    def initialize_weights(self):
        """Official init (BEiT): normal(0, .02) truncated at one standard deviation, ±.02 (the
        official SimMIM subclass overrides the truncation used by every init call, not only the
        mask token's); each block's output projections scaled by 1/sqrt(2 i), block i from 1."""
        trunc_normal_(self.cls_token, std=0.02, a=-0.02, b=0.02)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for i, blk in enumerate(self.blocks, start=1):
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * i))
        trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def forward(self, imgs, mask=None):
        """imgs [N, 3, H, W], mask [N, H/p, W/p] (1 = hidden) or None -> [N, D, H/p, W/p]."""
        x = self.tokens(imgs, mask)[:, 1:]                              # drop cls: [N, L, D]
        return x.transpose(1, 2).unflatten(2, (self.grid, self.grid))

    def tokens(self, imgs, mask=None, norm=True):
        x = self.patch_embed(imgs)                                      # [N, L, D]
        if mask is not None:                                            # §3: hidden patches -> mask token
            w = mask.flatten(1)[..., None].to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)   # [N, 1 + L, D]
        bias = self.rel_pos_bias()                                      # shared by every block
        for blk in self.blocks:
            x = blk(x, bias)
        return self.norm(x) if norm else x


# --- the Swin encoder (Liu et al. 2021): attention inside windows, shifted every other block ---


def window_partition(x, w):
    """[B, H, W, C] -> [B * H/w * W/w, w*w, C], windows in row-major order per image."""
    B, H, W, C = x.shape
    return x.view(B, H // w, w, W // w, w, C).transpose(2, 3).reshape(-1, w * w, C)


def window_reverse(windows, w, H, W):
    """window_partition undone: [B * H/w * W/w, w*w, C] -> [B, H, W, C]."""
    C = windows.shape[-1]
    return windows.view(-1, H // w, W // w, w, w, C).transpose(2, 3).reshape(-1, H, W, C)


def shifted_window_mask(H, W, w, shift):
    """[nW, w*w, w*w]: 0 between tokens from the same image region, -100 across regions.

    After rolling the map by -shift, windows on the bottom and right edges hold tokens from
    up to four regions that are not neighbours in the image; they must not attend to each
    other. (-100, as the official: after softmax, exp(-100) is 0 in fp32.)"""
    region = torch.zeros(1, H, W, 1)
    bands = (slice(0, -w), slice(-w, -shift), slice(-shift, None))
    for i, (hs, ws) in enumerate((hs, ws) for hs in bands for ws in bands):
        region[:, hs, ws] = i
    region = window_partition(region, w)[..., 0]                        # [nW, w*w]
    different = region[:, None, :] != region[:, :, None]
    return torch.zeros(different.shape).masked_fill(different, -100.0)


class WindowAttention(nn.Module):
    """Multi-head attention inside w x w windows, with a learned bias per relative offset and head."""

    def __init__(self, dim, window, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window, window))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_(self.relative_position_bias_table, std=0.02)   # here, as the official order

    def forward(self, x, mask=None):                                    # x [B*nW, w*w, C]; mask [nW, w*w, w*w]
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # [heads, T, T]
        if mask is not None:                                            # shifted windows: per-window mask
            nW = mask.shape[0]
            bias = (bias + mask[:, None]).repeat(x.shape[0] // nW, 1, 1, 1)   # [B*nW, heads, T, T]
        return attention(x, (self.qkv.weight, self.qkv.bias), self.proj, self.num_heads, bias)


class SwinBlock(nn.Module):
    """Window attention (shifted by `shift` when > 0) and an MLP, each pre-norm with a residual.
    A stage no larger than the window is one window: no shift (the official rule)."""

    def __init__(self, dim, resolution, num_heads, window, shift, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        if resolution <= window:
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path
        self.register_buffer("attn_mask", shifted_window_mask(resolution, resolution, window, shift) if shift else None)

    def forward(self, x):                                               # [N, H*W, C]
        N, L, C = x.shape
        H = W = self.resolution
        h = self.norm1(x).view(N, H, W, C)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), dims=(1, 2))
        h = window_reverse(self.attn(window_partition(h, self.window), self.attn_mask), self.window, H, W)
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), dims=(1, 2))
        x = x + drop_path(h.reshape(N, L, C), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (4C), normalised, projected to 2C: half the resolution."""

    def __init__(self, resolution, dim):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):                                               # [N, H*W, C]
        N, L, C = x.shape
        x = x.view(N, self.resolution, self.resolution, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(N, -1, 4 * C)))         # [N, H/2*W/2, 2C]


class BasicLayer(nn.Module):
    """One stage: `depth` blocks, odd ones shifted by half a window, then (not last) a merge."""

    def __init__(self, dim, resolution, depth, num_heads, window, mlp_ratio, dpr, downsample):
        super().__init__()
        self.blocks = nn.ModuleList([SwinBlock(dim, resolution, num_heads, window, window // 2 if i % 2 else 0,
                                               mlp_ratio, dpr[i]) for i in range(depth)])
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class SwinTransformerForSimMIM(nn.Module):
    def __init__(self, img_size=192, patch_size=4, in_chans=3, embed_dim=128, depths=(2, 2, 18, 2),
                 num_heads=(4, 8, 16, 32), window_size=6, mlp_ratio=4.0, drop_path_rate=0.0):
        super().__init__()
        check_swin_size(img_size, patch_size, window_size, len(depths))
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.stride = patch_size * 2 ** (len(depths) - 1)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=True)
        dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        self.layers = nn.ModuleList([
            BasicLayer(embed_dim * 2 ** i, self.grid // 2 ** i, depths[i], num_heads[i], window_size, mlp_ratio,
                       dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample=i < len(depths) - 1)
            for i in range(len(depths))])
        self.norm = nn.LayerNorm(self.num_features)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.initialize_weights()

    def initialize_weights(self):
        """Official init: truncated normal .02 for linears (the patch convolution keeps PyTorch's)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        trunc_normal_(self.mask_token, std=0.02)

    def forward(self, imgs, mask=None):
        """imgs [N, 3, H, W], mask [N, H/p, W/p] (1 = hidden) or None -> [N, C, H/32, W/32]."""
        x = self.tokens(imgs, mask)                                     # [N, H/32 * W/32, C]
        g = self.grid * self.patch_size // self.stride
        return x.transpose(1, 2).unflatten(2, (g, g))

    def tokens(self, imgs, mask=None):
        x = self.patch_embed(imgs)                                      # [N, L, D], after patch norm
        if mask is not None:                                            # §3: hidden patches -> mask token
            w = mask.flatten(1)[..., None].to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def check_swin_size(img_size, patch_size, window, stages):
    """Every stage must tile into whole windows (or fit in one) and halve evenly."""
    for i in range(stages):
        r, ok = img_size / patch_size / 2 ** i, True
        ok = r == int(r) and (r <= window or r % window == 0) and (i == stages - 1 or r % 2 == 0)
        if not ok:
            step = patch_size * window * 2 ** (stages - 1)
            raise ValueError(f"image size {img_size} does not fit Swin with patch {patch_size}, window {window} and "
                             f"{stages} stages: use a multiple of {step}, e.g. {max(round(img_size / step), 1) * step}")


# --- masking (SimMIM §3.1 and data_simmim.py: random 32x32 patches, 60 %) ---


def random_mask(noise, mask_ratio):
    """Hide mask_count = ceil(L * mask_ratio) of the L mask units: those with the largest noise,
    so that, as in every file here, the units kept are the ones with the smallest noise.
    (The official draws a random permutation and hides its first mask_count units: the same
    distribution.) noise [N, L] -> mask [N, L], 1 = hidden."""
    L = noise.shape[1]
    len_keep = L - math.ceil(L * mask_ratio)
    ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return (ranks >= len_keep).float()


# --- the model: encoder with mask tokens, one-layer prediction head, L1 on hidden pixels (§3) ---


class SimMIM(nn.Module):
    def __init__(self, encoder="vit", mask_patch_size=32, norm_pix_loss=False, **encoder_kwargs):
        super().__init__()
        if norm_pix_loss:
            raise ValueError("SimMIM predicts raw (normalised) pixels; norm_pix_loss is for MAE-style methods")
        build = {"vit": VisionTransformerForSimMIM, "swin": SwinTransformerForSimMIM}[encoder]
        self.encoder = build(**encoder_kwargs)
        p, img_size = self.encoder.patch_size, self.encoder.grid * self.encoder.patch_size
        if mask_patch_size % p or img_size % mask_patch_size:
            raise ValueError(f"mask_patch_size {mask_patch_size} must be a multiple of the patch size {p} "
                             f"and divide the image size {img_size}")
        self.patch_size, self.mask_patch_size = p, mask_patch_size
        self.grid = img_size // mask_patch_size                         # mask units per side
        self.stride = self.encoder.stride                               # pixels per output position: 16 / 32
        self.decoder = nn.Sequential(nn.Conv2d(self.encoder.num_features, self.stride ** 2 * 3, 1),
                                     nn.PixelShuffle(self.stride))      # §3.3: a linear head back to pixels
        self.no_decay_keywords = ("relative_position_bias_table",) if encoder == "swin" else ()

    def forward(self, imgs, mask_ratio=0.6, noise=None, mask=None):
        """imgs [N, 3, H, W] -> loss, pred [N, 3, H, W], mask [N, L] (units of mask_patch_size px).

        mask: [N, H/s, W/s] (1 = hidden); without it, one is drawn from noise [N, L] (or fresh).
        """
        N = imgs.shape[0]
        if mask is None:
            if noise is None:
                noise = torch.rand(N, self.grid ** 2, device=imgs.device)
            mask = random_mask(noise, mask_ratio).view(N, self.grid, self.grid)
        mask = mask.float()
        r = self.mask_patch_size // self.patch_size                     # encoder patches per mask unit side
        pred = self.decoder(self.encoder(imgs, mask.repeat_interleave(r, 1).repeat_interleave(r, 2)))
        return self.forward_loss(imgs, pred, mask), pred, mask.flatten(1)

    def forward_loss(self, imgs, pred, mask):
        """L1 over hidden pixels, per channel (§3.4): sum |x - pred| over hidden pixels / (hidden
        pixels + 1e-5) / 3, as the official normalises it. mask [N, H/s, W/s]."""
        s = self.mask_patch_size
        hidden = mask.repeat_interleave(s, 1).repeat_interleave(s, 2)[:, None]   # [N, 1, H, W]
        return ((imgs - pred).abs() * hidden).sum() / (hidden.sum() + 1e-5) / imgs.shape[1]

    def forward_features(self, imgs):
        """The encoder on the whole image, no mask: ViT [N, 1 + L, D] before its final norm (the
        fine-tuning model mean-pools, then applies fc_norm); Swin [N, L, C] after `norm`."""
        if isinstance(self.encoder, VisionTransformerForSimMIM):
            return self.encoder.tokens(imgs, norm=False)
        return self.encoder.tokens(imgs)


# --- model builders (configs/*: ViT-B 224 px; Swin-B 192 px, window 6; mask patches 32 px) ---

MODELS = {
    "simmim_vit_base_patch16": partial(SimMIM, encoder="vit", img_size=224, patch_size=16, embed_dim=768, depth=12,
                                       num_heads=12, drop_path_rate=0.1),
    "simmim_swin_base_w6": partial(SimMIM, encoder="swin", img_size=192, patch_size=4, embed_dim=128,
                                   depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=6),
    # for tests and CPU demos: 32 px images, 8 px mask units (a 4 x 4 grid, 10 hidden)
    "simmim_vit_tiny": partial(SimMIM, encoder="vit", img_size=32, patch_size=4, embed_dim=192, depth=4,
                               num_heads=3, drop_path_rate=0.0, mask_patch_size=8),
    "simmim_swin_tiny": partial(SimMIM, encoder="swin", img_size=32, patch_size=2, embed_dim=32, depths=(2, 2),
                                num_heads=(2, 4), window_size=4, mask_patch_size=8),
}
