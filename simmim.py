"""SimMIM: mask random 32x32 patches, encode the whole image with mask tokens, predict the hidden pixels.

The encoder (a ViT or a Swin Transformer) sees every patch, hidden ones replaced by a learned mask token; a
one-layer head (a 1x1 convolution, a pixel shuffle) maps its output back to full resolution. The target is the
input as the data pipeline hands it, each channel normalised by the ImageNet mean and std, nothing per patch (MAE's
norm_pix_loss has no counterpart here); the loss is the mean absolute error over the hidden pixels and 3 channels.
Masks are drawn on a 32-px grid (60 %), coarser than the encoder's patches: hidden pixels can't be copied from
visible neighbours.

Paper: Xie et al., "SimMIM: A Simple Framework for Masked Image Modeling", CVPR 2022, https://arxiv.org/abs/2111.09886
Official code: https://github.com/microsoft/SimMIM; same state_dict, same numbers (tests/test_simmim.py checks
fixtures made by it). Copy this file with common.py and it runs as here; inside a package, make the `from common
import` line relative. The models need only torch and torchvision's stochastic_depth.

    python simmim.py --model simmim_vit_tiny --epochs 5 --warmup_epochs 1          # CPU demo
    torchrun --nproc_per_node=8 simmim.py --data /imagenet --accum_iter 2          # ViT-B: 128 x 8 x 2 = 2048
    torchrun --nproc_per_node=8 simmim.py --model simmim_swin_base_w6 --data /imagenet --accum_iter 2
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR \
        --master_port=29500 simmim.py --data /imagenet                             # 2 nodes: 2048
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import stochastic_depth
from torchvision.utils import save_image

from common import (BILINEAR, IMAGENET_MEAN, IMAGENET_STD, cosine_lr, load_checkpoint, load_images, pretrain_loader,
                    pretrain_transform, progress, say, set_lr)

# Conventions: N batch, L mask units (s x s px), T encoder tokens (patches of p x p px), D width, p encoder patch
# size, s mask patch size. mask: 1 = hidden, 0 = visible. Parameter names follow the official models'.


# --- shared pieces ---
def trunc_normal_inverse_cdf_(tensor, std=0.02, a=-2.0, b=2.0):
    """Normal(0, std) truncated to [a, b] (absolute bounds) by the inverse CDF, as the official code's timm: the same
    draws from the same seed (PyTorch's nn.init.trunc_normal_ is a rejection sampler since 2.x: other draws)."""
    cdf = lambda x: (1.0 + math.erf(x / std / math.sqrt(2.0))) / 2.0    # noqa: E731
    with torch.no_grad():
        return tensor.uniform_(2 * cdf(a) - 1, 2 * cdf(b) - 1).erfinv_().mul_(std * math.sqrt(2.0)).clamp_(a, b)


def init_weights(model, types, a=-2.0, b=2.0):
    """Official init of the `types` layers: truncated normal .02 weights, zero biases (LayerNorms keep 1 and 0)."""
    for m in model.modules():
        if isinstance(m, types):
            trunc_normal_inverse_cdf_(m.weight, a=a, b=b)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def relative_position_index(h, w):
    """[h*w, h*w] index into a [(2h-1)(2w-1)] table of relative offsets between two grid positions."""
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # [2, h*w]
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)   # [h*w, h*w, 2], (dy, dx)
    return (rel[..., 0] + h - 1) * (2 * w - 1) + (rel[..., 1] + w - 1)


def attention(x, qkv, proj, num_heads, bias):
    """softmax(q k^T / sqrt(d) + bias) v of x [B, T, D], bias broadcastable to [B, heads, T, T]; qkv: (weight, bias)."""
    B, T, D = x.shape
    q, k, v = F.linear(x, *qkv).reshape(B, T, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4)
    if x.is_cuda:                                                       # a fused kernel takes the learned bias
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
    else:          # CPU: a bias that needs grad sends SDPA to this same math, plus mask checks
        x = ((q * (D // num_heads) ** -0.5) @ k.transpose(-2, -1) + bias).softmax(dim=-1) @ v
    return proj(x.transpose(1, 2).reshape(B, T, D))


# --- the ViT encoder (BEiT's: layer scale, one relative position bias for all blocks, no absolute position) ---
class RelativePositionBias(nn.Module):
    """One learned bias per relative offset and head, plus three for cls->patch, patch->cls, cls->cls."""

    def __init__(self, grid, num_heads):
        super().__init__()
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
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))
        self.gamma_1 = nn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = nn.Parameter(init_values * torch.ones(dim))
        self.drop_path = drop_path

    def forward(self, x, bias):
        x = x + stochastic_depth(self.gamma_1 * self.attn(self.norm1(x), bias), self.drop_path, "row", self.training)
        return x + stochastic_depth(self.gamma_2 * self.mlp(self.norm2(x)), self.drop_path, "row", self.training)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, dim, norm=False):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()        # Swin's patch_norm

    def forward(self, imgs):                                            # [N, 3, H, W]
        return self.norm(self.proj(imgs).flatten(2).transpose(1, 2))   # [N, T, D]


class VisionTransformerForSimMIM(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_path_rate=0.1, init_values=0.1):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size = self.stride = patch_size
        self.grid, self.num_features = img_size // patch_size, embed_dim
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.rel_pos_bias = RelativePositionBias(self.grid, num_heads)
        self.blocks = nn.ModuleList([ViTBlock(embed_dim, num_heads, mlp_ratio, drop_path_rate * i / max(depth - 1, 1),
                                              init_values) for i in range(depth)])   # drop path 0 -> rate
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # official init (BEiT): normal(0, .02) truncated at ±.02 (the official SimMIM ViT overrides the truncation of
        # every init call, not only the mask token's); block i's output projections / sqrt(2 i), i from 1
        trunc_normal_inverse_cdf_(self.cls_token, a=-0.02, b=0.02)
        init_weights(self, (nn.Linear, nn.Conv2d), a=-0.02, b=0.02)
        for i, blk in enumerate(self.blocks, start=1):
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * i))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * i))
        trunc_normal_inverse_cdf_(self.mask_token, a=-0.02, b=0.02)

    def forward(self, imgs, mask=None, norm=True):
        """imgs [N, 3, H, W], mask [N, H/p, W/p] (1 = hidden) or None -> [N, 1 + T, D], cls first;
        norm=False: before the final norm (what fine-tuning pools)."""
        x = self.patch_embed(imgs)                                      # [N, T, D]
        if mask is not None:                                            # §3.2: hidden patches -> mask token
            x = torch.where(mask.flatten(1)[..., None].bool(), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)   # [N, 1 + T, D]
        bias = self.rel_pos_bias()                                      # shared by every block
        for blk in self.blocks:
            x = blk(x, bias)
        return self.norm(x) if norm else x


# --- the Swin encoder (Liu et al. 2021): attention inside windows, shifted every other block ---
def window_partition(x, w):
    """[B, H, W, C] -> [B * H/w * W/w, w*w, C], windows in row-major order per image."""
    B, H, W, C = x.shape
    return x.view(B, H // w, w, W // w, w, C).transpose(2, 3).reshape(-1, w * w, C)


def shifted_window_mask(H, W, w, shift):
    """[nW, w*w, w*w]: 0 between tokens from the same image region, -100 across regions. After rolling the map by
    -shift, windows on the bottom and right edges hold tokens from up to four regions that are not neighbours in
    the image; they must not attend to each other. (-100, as the official: exp(-100) is 0 in fp32.)"""
    band = lambda n: (torch.arange(n) >= n - w).long() + (torch.arange(n) >= n - shift).long()   # 0 | 1 | 2
    region = window_partition((band(H)[:, None] * 3 + band(W))[None, :, :, None], w)[..., 0]   # 9 regions: [nW, w*w]
    return torch.where(region[:, None, :] != region[:, :, None], -100.0, 0.0)


class WindowAttention(nn.Module):
    """Multi-head attention inside w x w windows, with a learned bias per relative offset and head."""

    def __init__(self, dim, window, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window, window))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        trunc_normal_inverse_cdf_(self.relative_position_bias_table, std=0.02)   # here, as the official order

    def forward(self, x, mask=None):                                    # x [B*nW, w*w, C]; mask [nW, w*w, w*w]
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # [heads, T, T]
        if mask is not None:                                            # shifted windows: per-window mask
            bias = (bias + mask[:, None]).repeat(x.shape[0] // mask.shape[0], 1, 1, 1)   # [B*nW, heads, T, T]
        return attention(x, (self.qkv.weight, self.qkv.bias), self.proj, self.num_heads, bias)


class SwinBlock(nn.Module):
    """Window attention (shifted if `shift` > 0) and an MLP, pre-norm, residual; a stage within one window: no shift."""

    def __init__(self, dim, resolution, num_heads, window, shift, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        if resolution <= window:
            window, shift = resolution, 0
        self.resolution, self.window, self.shift = resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))
        self.drop_path = drop_path
        self.register_buffer("attn_mask", shifted_window_mask(resolution, resolution, window, shift) if shift else None)

    def forward(self, x):                                               # [N, H*W, C]
        N, L, C = x.shape
        R, w = self.resolution, self.window
        h = self.norm1(x).view(N, R, R, C)
        if self.shift:
            h = torch.roll(h, (-self.shift, -self.shift), dims=(1, 2))
        h = self.attn(window_partition(h, w), self.attn_mask)           # [N * R/w * R/w, w*w, C]
        h = h.view(N, R // w, R // w, w, w, C).transpose(2, 3).reshape(N, R, R, C)   # window_partition undone
        if self.shift:
            h = torch.roll(h, (self.shift, self.shift), dims=(1, 2))
        x = x + stochastic_depth(h.reshape(N, L, C), self.drop_path, "row", self.training)
        return x + stochastic_depth(self.mlp(self.norm2(x)), self.drop_path, "row", self.training)


class BasicLayer(nn.Module):
    """One stage: `depth` blocks, odd ones shifted by half a window, then (not last) a merge of 2x2 neighbours."""

    def __init__(self, dim, resolution, depth, num_heads, window, mlp_ratio, dpr, downsample):
        super().__init__()
        self.blocks = nn.ModuleList([SwinBlock(dim, resolution, num_heads, window, window // 2 if i % 2 else 0,
                                               mlp_ratio, dpr[i]) for i in range(depth)])
        self.downsample = nn.ModuleDict(dict(reduction=nn.Linear(4 * dim, 2 * dim, bias=False),   # PatchMerging
                                             norm=nn.LayerNorm(4 * dim))) if downsample else None

    def forward(self, x):                                               # [N, R*R, C]
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is None:
            return x
        x = x.unflatten(1, (math.isqrt(x.shape[1]), -1))                # [N, R, R, C]; merge 2x2 neighbours:
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1).flatten(1, 2)
        return self.downsample.reduction(self.downsample.norm(x))       # [N, R/2 * R/2, 4C] -> 2C


class SwinTransformerForSimMIM(nn.Module):
    def __init__(self, img_size=192, patch_size=4, in_chans=3, embed_dim=128, depths=(2, 2, 18, 2),
                 num_heads=(4, 8, 16, 32), window_size=6, mlp_ratio=4.0, drop_path_rate=0.0):
        super().__init__()
        stages = len(depths)
        sides = [img_size / patch_size / 2 ** i for i in range(stages)]  # tokens per side, stage by stage
        if any(r % 1 or (r > window_size and r % window_size) for r in sides):   # whole (halvable) windows, or one
            step = patch_size * window_size * 2 ** (stages - 1)
            raise ValueError(f"image size {img_size} does not fit Swin (patch {patch_size}, window {window_size}, "
                             f"{stages} stages): use a multiple of {step}, e.g. {(round(img_size / step) or 1) * step}")
        self.patch_size, self.grid = patch_size, img_size // patch_size
        self.num_features, self.stride = embed_dim * 2 ** (stages - 1), patch_size * 2 ** (stages - 1)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=True)
        dpr = [drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        self.layers = nn.ModuleList([
            BasicLayer(embed_dim * 2 ** i, self.grid // 2 ** i, depths[i], num_heads[i], window_size, mlp_ratio,
                       dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample=i < stages - 1)
            for i in range(stages)])
        self.norm = nn.LayerNorm(self.num_features)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        init_weights(self, nn.Linear)                                   # the patch convolution keeps PyTorch's
        trunc_normal_inverse_cdf_(self.mask_token)

    def forward(self, imgs, mask=None):
        """imgs [N, 3, H, W], mask [N, H/p, W/p] (1 = hidden) or None -> [N, H/stride * W/stride, C]."""
        x = self.patch_embed(imgs)                                      # [N, T, D], after patch norm
        if mask is not None:                                            # §3.2: hidden patches -> mask token
            x = torch.where(mask.flatten(1)[..., None].bool(), self.mask_token.to(x.dtype), x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


# --- masking (SimMIM §3.2 and data_simmim.py: random 32x32 patches, 60 %) ---
def random_mask(noise, mask_ratio):
    """Hide the ceil(L * mask_ratio) units with the largest noise, keep the smallest, as every file here (the official
    hides the first units of a random permutation: the same distribution). noise [N, L] -> mask [N, L], 1 = hidden."""
    len_keep = noise.shape[1] - math.ceil(noise.shape[1] * mask_ratio)
    return torch.zeros_like(noise, dtype=torch.float).scatter_(1, noise.argsort(dim=1)[:, len_keep:], 1.0)


def upsample_mask(mask, r):
    """mask [N, h, w] -> [N, h*r, w*r]: each unit repeated over the r x r cells (patches or pixels) it covers."""
    return mask.repeat_interleave(r, 1).repeat_interleave(r, 2)


# --- the model: encoder with mask tokens, one-layer prediction head, L1 on hidden pixels (§3) ---
class SimMIM(nn.Module):
    def __init__(self, encoder="vit", mask_patch_size=32, **encoder_kwargs):
        super().__init__()
        self.encoder = {"vit": VisionTransformerForSimMIM, "swin": SwinTransformerForSimMIM}[encoder](**encoder_kwargs)
        p, img_size = self.encoder.patch_size, self.encoder.grid * self.encoder.patch_size
        if mask_patch_size % p or img_size % mask_patch_size:
            raise ValueError(f"mask_patch_size {mask_patch_size} must be a multiple of the patch size {p} "
                             f"and divide the image size {img_size}")
        self.patch_size, self.mask_patch_size = p, mask_patch_size
        self.grid = img_size // mask_patch_size                         # mask units per side
        self.stride = self.encoder.stride                               # pixels per output position: 16 / 32
        self.decoder = nn.Sequential(nn.Conv2d(self.encoder.num_features, self.stride ** 2 * 3, 1),
                                     nn.PixelShuffle(self.stride))      # §3.3: a linear head back to pixels

    def forward(self, imgs, mask_ratio=0.6, noise=None, mask=None):
        """imgs [N, 3, H, W], mask [N, H/s, W/s] (1 = hidden) or None: drawn from noise [N, L] (or fresh)
        -> loss, pred [N, 3, H, W], mask [N, L]."""
        N = imgs.shape[0]
        if mask is None:
            if noise is None:
                noise = torch.rand(N, self.grid ** 2, device=imgs.device)
            mask = random_mask(noise, mask_ratio).view(N, self.grid, self.grid)
        if mask.shape != (N, self.grid, self.grid):
            raise ValueError(f"mask is {tuple(mask.shape)}; expected [N, {self.grid}, {self.grid}]: one entry per "
                             f"{self.mask_patch_size}-px mask unit, 1 = hidden")
        mask = mask.float()
        r = self.mask_patch_size // self.patch_size                     # encoder patches per mask unit side
        x = self.encoder(imgs, upsample_mask(mask, r))                  # [N, (1 +) T, D]: ViT's cls first
        g = imgs.shape[-1] // self.stride                               # output positions per side
        pred = self.decoder(x[:, -g * g:].transpose(1, 2).unflatten(2, (g, g)))   # [N, 3, H, W]
        return self.forward_loss(imgs, pred, mask), pred, mask.flatten(1)

    def forward_loss(self, imgs, pred, mask):
        """L1 on hidden pixels (§3.4), as the official: |imgs - pred| summed over the hidden pixels and channels
        / (hidden pixels + 1e-5) / 3. imgs: the input normalised per channel, nothing per patch. mask [N, H/s, W/s]."""
        hidden = upsample_mask(mask, self.mask_patch_size)[:, None]     # [N, 1, H, W]
        return ((imgs - pred).abs() * hidden).sum() / (hidden.sum() + 1e-5) / imgs.shape[1]

    def forward_features(self, imgs):
        """The encoder on the whole image, no mask: what the official fine-tuning model pools. [N, 3, H, W] -> ViT
        [N, 1 + T, D], cls first, before `norm` (mean of the patch tokens -> fc_norm); Swin [N, T', C] after `norm`."""
        if isinstance(self.encoder, VisionTransformerForSimMIM):
            return self.encoder(imgs, norm=False)
        return self.encoder(imgs)


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


def load_pretrained(model, checkpoint):
    """Load an official (or our) SimMIM pre-training checkpoint, a path or a state_dict: a full one strictly; one
    without the prediction head (`decoder.*`) too, if every encoder key matches: returns the absent head keys."""
    state = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    state = state.get("model", state)
    ours = model.state_dict()
    unexpected = sorted(set(state) - set(ours))
    missing = sorted(set(ours) - set(state))
    encoder_missing = [k for k in missing if not k.startswith("decoder.")]
    if unexpected or encoder_missing:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: unexpected {unexpected[:5]}, "
                         f"missing {encoder_missing[:5]} (a fine-tuned classifier? use finetune.py)")
    model.load_state_dict(state, strict=not missing)
    return missing


# --- arguments (defaults: the 800-epoch configs: ViT-B at 224 px, Swin-B at 192 px) ---
def get_args(argv=None):
    p = argparse.ArgumentParser(description="SimMIM pre-training",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="simmim_vit_base_patch16", help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--data", default=None, help="image folder (DIR/train/<class>/*, DIR/<class>/* or flat); "
                                                "none: the built-in data set")
    p.add_argument("--builtin_images", type=int, default=4096, help="size of the built-in data set (no --data)")
    p.add_argument("--input_size", type=int, default=None, help="default: the model's (ViT 224, Swin 192, tiny 32)")
    p.add_argument("--mask_ratio", type=float, default=0.6, help="fraction of 32x32 units hidden (paper: 60 %%)")
    # optimisation (configs: AdamW (0.9, 0.999), blr 1e-4, batch 2048, wd 0.05, 10 warmup epochs from
    # warmup_lr, x0.1 at epoch 700 of 800, grad clip 5; the 100-epoch Swin config: blr 2e-4, cosine)
    p.add_argument("--epochs", type=int, default=800)
    p.add_argument("--warmup_epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=128, help="per process; effective = batch x accum x processes")
    p.add_argument("--accum_iter", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--blr", type=float, default=1e-4, help="base lr: lr = blr x effective batch / 512 (SimMIM's rule)")
    p.add_argument("--lr", type=float, default=None, help="absolute lr; overrides --blr")
    p.add_argument("--warmup_lr", type=float, default=5e-7, help="lr at the start of warmup, scaled as --blr")
    p.add_argument("--min_lr", type=float, default=5e-6, help="cosine schedule's final lr, scaled as --blr")
    p.add_argument("--schedule", choices=["multistep", "cosine"], default="multistep",
                   help="after warmup: x0.1 at each --milestones epoch, or cosine to --min_lr")
    p.add_argument("--milestones", type=int, nargs="*", default=[700], help="multistep: epochs where lr drops x0.1")
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--clip_grad", type=float, default=5.0, help="max grad norm (the configs: 5); 0: off")
    p.add_argument("--output_dir", default=None, help="default: output/<model>")
    p.add_argument("--resume", default="", help="a checkpoint, or 'auto': output_dir/checkpoint-last.pth if present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="data workers per process")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--save_every", type=int, default=20, help="keep a copy of the checkpoint every N epochs")
    p.add_argument("--log_every", type=int, default=20, help="optimizer steps between log lines")
    args, unknown = p.parse_known_args(argv)
    if any("norm_pix_loss" in a for a in unknown):                     # a flag of the other four files
        sys.exit("error: --norm_pix_loss: SimMIM's target is the normalised image, nothing per patch (§3.4); drop it")
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    return check_args(args)


def check_args(args):
    """Bad input -> one line naming the flag and the fix (sys.exit), before any work starts; returns args."""
    if args.model not in MODELS:
        sys.exit(f"error: --model {args.model} is unknown; choose one of: {', '.join(MODELS)}")
    for flag in ("epochs", "batch_size", "accum_iter", "save_every", "log_every", "builtin_images"):
        if getattr(args, flag) < 1:
            sys.exit(f"error: --{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("warmup_epochs", "num_workers", "blr", "lr", "min_lr", "warmup_lr", "weight_decay",
                 "clip_grad"):
        value = getattr(args, flag)                                     # None: a default computed later
        if value is not None and not (math.isfinite(value) and value >= 0):
            sys.exit(f"error: --{flag} must be a finite number at least 0, got {value}")
    if not 0 < args.mask_ratio < 1:
        sys.exit(f"error: --mask_ratio must be a finite number in (0, 1), got {args.mask_ratio}")
    if any(epoch < 0 for epoch in args.milestones):
        sys.exit(f"error: --milestones are epochs, each at least 0; got {' '.join(map(str, args.milestones))}")
    defaults = MODELS[args.model].keywords
    unit = defaults.get("mask_patch_size", 32)                          # the mask's grid, in pixels
    args.input_size = defaults["img_size"] if args.input_size is None else args.input_size
    if args.input_size <= 0 or args.input_size % unit:
        sys.exit(f"error: --input_size {args.input_size} is not a positive multiple of {args.model}'s mask patch "
                 f"size {unit}; try {max(args.input_size // unit, 1) * unit}")
    try:
        with torch.device("meta"):                                      # shapes only: Swin's windows must tile
            MODELS[args.model](img_size=args.input_size)
    except ValueError as e:
        sys.exit(f"error: --input_size {args.input_size}: {e}")
    if args.amp in ("bf16", "fp16") and not torch.cuda.is_available() and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: --amp {args.amp} on CPU is fast only with native {args.amp} matmuls; the default is none")
    args.output_dir = args.output_dir or os.path.join("output", args.model)
    return args


# --- training (main_simmim.py) ---
def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases, norms (1-D) and tokens (the official decays the ViT's mask token: D
    values). Swin's relative position bias tables are decayed, as the official does in effect: its skip keyword for
    them gets an `encoder.` prefix that no parameter name contains."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith("_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain_lr(epoch, args):
    """Linear warmup from warmup_lr, then x0.1 at each milestone (800-epoch configs) or cosine to min_lr (100-epoch
    config); `epoch` is fractional. timm's cosine spans the warmup too: it resumes below peak (0.98 x lr at 10/100)."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr + (args.lr - args.warmup_lr) * epoch / args.warmup_epochs
    if args.schedule == "cosine":                                       # common's, over all epochs from 0
        return cosine_lr(epoch, args.lr, args.min_lr, 0, args.epochs)
    return args.lr * 0.1 ** sum(epoch >= m for m in args.milestones)


def setup_distributed():
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain python is rank 0 of 1. -> rank, world size, device, a
    gloo group on which the ranks agree on host-side flags without waiting for the GPU."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    if world_size == 1:
        return rank, world_size, device, None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device, dist.new_group(backend="gloo")


def count_ranks(flag, group=None):
    """On every rank, how many ranks have `flag` true: ranks must take the same branch around collectives."""
    if not dist.is_initialized():
        return int(flag)
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, group=group)
    return int(t.item())


class StopSignals:
    """SIGTERM (a scheduler's notice) or Ctrl-C: the loop ends its step, saves the position, exits 0 (Ctrl-C: 130). A
    second Ctrl-C aborts at once, unsaved (one within a second of the first is torchrun passing that one on)."""

    def __init__(self):
        self.received, self.at = None, 0.0
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request)

    def request(self, signum, frame):
        if signum == signal.SIGINT == self.received and time.monotonic() - self.at > 1.0:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)                         # the default: end now, no traceback
        if self.received is None:
            self.received, self.at = signum, time.monotonic()


def save_training_state(paths, model, optimizer, scaler, args, **position):
    """Rank 0 writes the state to each of `paths` atomically: a temp file, flushed to disk, then renamed."""
    if dist.is_initialized() and dist.get_rank() > 0:
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "args": vars(args), **position}
    for path in paths:
        with open(path + ".tmp", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)


def resume(args, model, optimizer, scaler, world_size, host_group, log):
    """--resume FILE or 'auto' (output_dir/checkpoint-last.pth if present): the training state, (epoch, batch)."""
    path = os.path.join(args.output_dir, "checkpoint-last.pth") if args.resume == "auto" else args.resume
    seen = count_ranks(bool(path) and os.path.isfile(path), host_group)   # every rank must load the same
    if not seen and args.resume in ("", "auto"):
        return 0, 0
    if seen < world_size:                                               # none, or --output_dir on each node's disk
        sys.exit(f"error: --resume {path}: no such file" if not seen else f"error: --resume {path} exists for "
                 f"{seen} of {world_size} processes; give a file every process can read (on a file system all share)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        found = ckpt["args"]["model"]
    except Exception as e:
        sys.exit(f"error: --resume {path}: not a training checkpoint of ours ({type(e).__name__})")
    if found != args.model:
        sys.exit(f"error: --resume {path} is a {found} checkpoint, not {args.model}; pass --model {found} or "
                 f"start a new --output_dir")
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (KeyError, RuntimeError, ValueError) as e:                   # other shapes, or other param groups
        sys.exit(f"error: --resume {path} does not fit {args.model} at --input_size {args.input_size} "
                 f"({str(e).strip().splitlines()[-1].strip()})")
    if ckpt["scaler"] and scaler.is_enabled():                          # empty unless saved by an fp16 run
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt["batch_in_epoch"] and (ckpt["world_size"], ckpt["args"]["batch_size"], ckpt["args"]["accum_iter"]) != \
            (world_size, args.batch_size, args.accum_iter):
        log(f"warning: {path} was saved mid-epoch by another processes x batch x accum layout; "
            f"restarting epoch {ckpt['epoch']} from its start")         # the position means other batches
        ckpt["batch_in_epoch"] = 0
    log(f"resumed from {path} at epoch {ckpt['epoch']}, batch {ckpt['batch_in_epoch']}")
    return ckpt["epoch"], ckpt["batch_in_epoch"]


@torch.no_grad()
def save_reconstruction(model, imgs, noise, mask_ratio, path):
    """One row per image: original | masked | reconstruction | reconstruction with visible patches pasted."""
    model.eval()
    _, pred, mask = model(imgs, mask_ratio, noise)
    model.train()
    hidden = upsample_mask(mask.view(-1, model.grid, model.grid), model.mask_patch_size)[:, None].cpu()  # 1 = hidden
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    orig = imgs.cpu() * std + mean                                     # back to [0, 1] pixels
    recon = pred.float().cpu() * std + mean                            # the image itself: nothing per patch to undo
    columns = [orig, orig * (1 - hidden) + 0.5 * hidden, recon, orig * (1 - hidden) + recon * hidden]
    grid = torch.stack(columns, dim=1).flatten(0, 1)                    # [4N, 3, H, W], row by row
    scale = -(-256 // (4 * grid.shape[-1]))                             # nearest upscaling: rows >= 256 px
    save_image(F.interpolate(grid.clamp(0, 1), scale_factor=scale, mode="nearest"), path, nrow=4, padding=1)


def main(args):
    # 1. setup: distributed (only rank 0 prints), then the output folder and its log, the run's first write
    rank, world_size, device, host_group = setup_distributed()
    distributed, is_main = world_size > 1, rank == 0
    log = say if is_main else (lambda *a: None)                         # common.say: print around progress bars
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        log_file = open(os.path.join(args.output_dir, "log.jsonl") if is_main else os.devnull, "a")
    except OSError as e:
        sys.exit(f"error: --output_dir {args.output_dir} is not writable ({e.strerror})")
    path_last = os.path.join(args.output_dir, "checkpoint-last.pth")

    # 2. seed: per rank, for what is drawn outside the data pipeline (model init: DDP copies rank 0's)
    torch.manual_seed(args.seed + rank)

    # 3. data: batches of (imgs [B, 3, H, W], noise [B, L]), SimMIM's crop (data_simmim.py), as in mae.py's step 3
    L = (args.input_size // MODELS[args.model].keywords.get("mask_patch_size", 32)) ** 2
    try:
        images = load_images(args.data, "train", args.input_size, args.builtin_images)
        loader = pretrain_loader(images, args.input_size, args.batch_size, L, args.seed, rank, world_size,
                                 args.num_workers, pretrain_transform(args.input_size, (0.67, 1.0), BILINEAR))
        demo = [loader.dataset[(0, i)] for i in range(0, len(images), max(len(images) // 8, 1))][:8]
    except ValueError as e:
        sys.exit(f"error: {e}")
    demo_imgs, demo_noise = (torch.stack(t).to(device) for t in zip(*demo))   # 8 images across the data set
    steps_per_epoch = len(loader) // args.accum_iter                   # whole optimizer steps only
    if steps_per_epoch == 0:
        sys.exit(f"error: --accum_iter {args.accum_iter} exceeds the {len(loader)} batches per epoch; lower it")
    batches_per_epoch = steps_per_epoch * args.accum_iter

    # 4. model: build, optionally compile, then wrap in DDP
    model = MODELS[args.model](img_size=args.input_size).to(device)
    model_without_ddp = model
    if args.compile:
        model = torch.compile(model)
    if distributed:                                                     # DDP warns on any grad whose strides differ
        for w in (p for p in model.parameters() if p.requires_grad):   # from the weight's, as 1x1 and depthwise conv
            w.register_hook(lambda g: g.flatten().view_as(g))           # grads do in size-1 dims: restrided, no copy
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # 5. param groups: no weight decay on biases, norms (1-D) and tokens
    groups = param_groups(model_without_ddp, args.weight_decay)

    # 6. optimizer: SimMIM's linear scaling rule, lr = blr x batch / 512 (warmup and min lr alike), betas (0.9, 0.999)
    eff_batch = args.batch_size * args.accum_iter * world_size
    args.lr = args.lr if args.lr is not None else args.blr * eff_batch / 512
    args.warmup_lr, args.min_lr = args.warmup_lr * eff_batch / 512, args.min_lr * eff_batch / 512
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # bf16 needs no loss scaling
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16,
                              enabled=amp != "none")
    log(f"{args.model} | {sum(p.numel() for p in model_without_ddp.parameters()) / 1e6:.1f} M params | "
        f"eff. batch {eff_batch} = {args.batch_size} x {args.accum_iter} x {world_size} | lr {args.lr:.3g} | "
        f"{steps_per_epoch} steps/epoch | amp {amp} | {device}")

    # 7. schedule: linear warmup, then step decay (or cosine), over the fractional epoch; set at the top of every step
    lr_at = partial(pretrain_lr, args=args)

    # 8. resume: weights, optimizer, scaler and the position (epoch, batch in epoch)
    epoch, batch_in_epoch = resume(args, model_without_ddp, optimizer, scaler, world_size, host_group, log)

    # 9. loop: steps of accum_iter micro-batches; SIGTERM or Ctrl-C ends it after a step, its position saved
    stop, stopping = StopSignals(), False
    while epoch < args.epochs and not stopping:
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip_batches = batch_in_epoch
        batches, first = iter(loader), batch_in_epoch // args.accum_iter + 1
        steps = progress(range(first, steps_per_epoch + 1), initial=first - 1, total=steps_per_epoch,
                         desc=f"epoch {epoch}", unit="step")
        loss_sum, n_summed, t_log = torch.zeros((), device=device), 0, time.time()
        for step in steps:
            lr = lr_at(epoch + (step - 1) / steps_per_epoch)
            set_lr(optimizer, lr)
            for micro in range(args.accum_iter):
                imgs, noise = (t.to(device, non_blocking=True) for t in next(batches))
                # what the model draws (drop path, if set) comes from a stream keyed by rank and micro-batch
                torch.manual_seed(args.seed + rank + world_size * (epoch * batches_per_epoch + batch_in_epoch))
                batch_in_epoch += 1
                # DDP all-reduces gradients on every backward unless told not to: only the last micro-step syncs
                with (model.no_sync() if distributed and micro < args.accum_iter - 1 else nullcontext()), autocast:
                    loss, _, _ = model(imgs, args.mask_ratio, noise)
                scaler.scale(loss / args.accum_iter).backward()
                loss_sum += loss.detach().float()                       # on the device: a NaN stays in the sum
                n_summed += 1
            if args.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            stopping = count_ranks(stop.received is not None, host_group) > 0   # any rank? a CPU float: no GPU sync
            if step % args.log_every == 0 or step == steps_per_epoch or stopping:
                if distributed:
                    dist.all_reduce(loss_sum)
                loss = loss_sum.item() / n_summed / world_size           # the only GPU sync: at log steps
                if not math.isfinite(loss):
                    sys.exit(f"error: loss is {loss} at epoch {epoch} step {step}; stopping without saving. The last "
                             f"good checkpoint is {path_last}; resume from it with a lower --blr or --amp none")
                ips = n_summed * args.batch_size * world_size / (time.time() - t_log)
                log(f"epoch {epoch} step {step}/{steps_per_epoch} | loss {loss:.4f} | lr {lr:.2e} | {ips:.0f} img/s")
                print(json.dumps({"epoch": epoch, "step": step, "loss": loss, "lr": lr, "img_per_s": round(ips, 1)}),
                      file=log_file, flush=True)
                steps.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                loss_sum, n_summed, t_log = torch.zeros((), device=device), 0, time.time()
            if stopping:
                break
        epoch_done = batch_in_epoch == batches_per_epoch                # also when the stop came at its last step
        if epoch_done:
            epoch, batch_in_epoch = epoch + 1, 0                        # saved as the next epoch's start
        if not torch.stack([p.isfinite().all() for p in model_without_ddp.parameters()]).all():   # a late divergence
            sys.exit(f"error: the weights are not finite (the last step diverged); not saving. The last good "
                     f"checkpoint is {path_last}; resume from it with a lower --blr or --amp none")
        paths = [path_last]
        if epoch_done and (epoch % args.save_every == 0 or epoch == args.epochs):
            paths.append(os.path.join(args.output_dir, f"checkpoint-{epoch:04d}.pth"))   # a copy every save_every
        save_training_state(paths, model_without_ddp, optimizer, scaler, args, world_size=world_size, epoch=epoch,
                            batch_in_epoch=batch_in_epoch)
        if epoch_done and is_main:
            save_reconstruction(model_without_ddp, demo_imgs, demo_noise, args.mask_ratio,
                                os.path.join(args.output_dir, f"recon-epoch{epoch:03d}.png"))
            log(f"epoch {epoch}/{args.epochs} done | checkpoint and picture in {args.output_dir}")
    if stopping:
        log(f"{'Ctrl-C' if stop.received == signal.SIGINT else 'SIGTERM'}: saved {path_last} at epoch {epoch}, "
            f"batch {batch_in_epoch}; continue with --resume auto")

    # 10. teardown
    if distributed:
        dist.destroy_process_group()
    return 130 if stop.received == signal.SIGINT else 0


if __name__ == "__main__":
    sys.exit(main(get_args()))
