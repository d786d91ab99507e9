"""FastConvMAE: ConvMAE trained with four complementary masks, so every image teaches four times.

One random permutation of the 1/16-grid units is cut into four disjoint sets of 25 %: each set
is the visible part of one view, and the four views together show every unit exactly once
(complementary masking). The convolution stages run once per image, each position seeing only
its own view's pixels; the transformer stage and the decoder then process the four views as a
batch of 4N, and the loss is ConvMAE's over the hidden units of all four. Its README: 50 epochs
reach 84.4 ImageNet top-1 with pixel targets in 266 GPU-hours, where ConvMAE's 1600 epochs reach
85.0 in 4000.

Method: Gao et al., FastConvMAE (complementary masking and mixture of reconstructors), 2022.
Official code: https://github.com/Alpha-VL/FastConvMAE (complementary masking only).
This file rebuilds the official pre-training model with plain PyTorch: same state_dict,
same numbers (tests/test_fastconvmae.py checks it against fixtures made by the official code).

--mor adds the part its authors did not release, the Mixture of Reconstructors: the decoder's
last blocks branch, one branch per target, and besides the pixels the branches predict the
features of teachers (an EMA copy of the encoder; DINO and CLIP from user-supplied files) at
the hidden units. The official README's figure (figures/FastConvMAE.png) is our source for
it; our README lists what is our reading where that figure is silent.

    python fastconvmae.py --model fastconvmae_convvit_tiny --epochs 5 --warmup_epochs 1   # CPU demo
    python fastconvmae.py --model fastconvmae_convvit_tiny --epochs 5 --warmup_epochs 1 --mor   # + EMA teacher
    torchrun --nproc_per_node=8 fastconvmae.py --data /imagenet      # PRETRAIN.md: 8 x 64 = 512 per step
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR \
        --master_port=29500 fastconvmae.py --data /imagenet --batch_size 32    # 2 nodes, still 512
"""
import argparse
import copy
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import save_image
from tqdm import tqdm

from common import IMAGENET_MEAN, IMAGENET_STD, cosine_lr, load_images, patchify, pretrain_loader, set_lr, unpatchify

# Conventions: N batch, L mask units (16x16 patches of the 1/16 grid), D width, p patch size,
# V = 4 views. mask: 1 = hidden, 0 = visible. Rows of pred, mask and latent come view by view:
# [V * N, ...] holds view 0's N rows, then view 1's, ... The convolution stages keep their maps
# channels-last, [N, H, W, C]: LayerNorm acts on the last axis, convolutions read it directly.

VIEWS = 4                         # complementary masks of 25 % each (FastConvMAE §3.1)

# --- building blocks (parameter names as in the official vision_transformer.py) ---


def drop_path(x, p, training):
    """Stochastic depth (fine-tuning only): zero a residual branch for whole samples, rescale the rest."""
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    return x * x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)


class Conv(nn.Conv2d):
    """nn.Conv2d (its weights, init and state_dict) applied to channels-last maps [N, H, W, C].

    The permutes are views: the convolution reads channels-last memory directly, which oneDNN
    does faster on CPU than the NCHW layout, and, for 1x1 kernels, faster than a matmul.
    """

    def forward(self, x):
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """Strided convolution, LayerNorm, GELU: the down-sampling in front of each stage."""

    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.proj = Conv(in_chans, dim, patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)                                   # eps 1e-5, as the official
        self.act = nn.GELU()

    def forward(self, x):                                               # [N, H, W, C]
        return self.act(self.norm(self.proj(x)))                        # [N, H/p, W/p, D]


class CMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = Conv(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = Conv(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CBlock(nn.Module):
    """Convolution block of stages 1-2 (ConvMAE §3.1): a 5x5 depthwise convolution between two
    1x1 convolutions takes the place of self-attention (hence its official name `attn`).

    With `visible` [V, N, H, W, 1] (1 = visible; the views' visible sets are disjoint and cover
    the image) the depthwise convolution runs once per view on that view's visible positions,
    and each position keeps the result of its own view: no position sees pixels another view
    shows, so each view's visible tokens are exactly what ConvMAE's masked convolution would
    give that view alone. Every other operator acts per position.
    """

    def __init__(self, dim, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)                                  # eps 1e-5: CBlock ignores norm_layer
        self.conv1 = Conv(dim, dim, 1)
        self.conv2 = Conv(dim, dim, 1)
        self.attn = Conv(dim, dim, 5, padding=2, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = CMlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, visible=None):                                 # [N, H, W, C]
        h = self.conv1(self.norm1(x))
        if visible is None:
            h = self.attn(h)
        else:
            v = visible.to(h.dtype)                                     # [V, N, H, W, 1]
            per_view = self.attn((v * h).flatten(0, 1))                 # the V views as one batch [V*N, H, W, C]
            h = (v * per_view.unflatten(0, v.shape[:2])).sum(0)         # each position from its own view
        x = x + drop_path(self.conv2(h), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                               # [N, T, D]
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                            # [N, heads, T, D/heads] each
        x = F.scaled_dot_product_attention(q, k, v)                     # softmax(q k^T / sqrt(D/heads)) v
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden, act_layer=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block of stage 3 and the decoder (timm's names, LayerNorm eps 1e-6)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, eps=1e-6, act_layer=nn.GELU):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer)
        self.drop_path = drop_path

    def forward(self, x):                                               # [N, T, D]
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def sincos_pos_embed(dim, grid_size):
    """Fixed 2-D sin-cos position embedding [g*g, dim] (MAE §A.1; no cls token here).

    The first dim/2 channels encode the column index, the last dim/2 the row index; each half
    is [sin(pos * omega), cos(pos * omega)] with omega_i = 10000^(-i / (dim/4)).
    """
    assert dim % 4 == 0, f"sin-cos embedding needs a width divisible by 4, got {dim}"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    row, col = torch.meshgrid(torch.arange(grid_size, dtype=torch.float64),
                              torch.arange(grid_size, dtype=torch.float64), indexing="ij")
    halves = []
    for pos in (col.flatten(), row.flatten()):
        angle = pos[:, None] * omega[None]                             # [g*g, dim/4]
        halves += [angle.sin(), angle.cos()]
    return torch.cat(halves, dim=1).float()                             # [g*g, dim]


# --- complementary masking (FastConvMAE §3.1) ---


def complementary_masking(noise, mask_ratio=0.75):
    """Cut one permutation into V = 4 disjoint visible sets of L_keep = int(L * (1 - mask_ratio)).

    As MAE, units are ranked by increasing noise; view k sees the units ranked [k L_keep,
    (k + 1) L_keep). The four visible sets are disjoint and cover all L units, which needs
    4 L_keep = L (the paper's 75 %, and L divisible by 4).
    noise [N, L] -> ids_keep [V, N, L_keep], mask [V, N, L] (1 = hidden), ids_restore [N, L] (ranks).
    """
    N, L = noise.shape
    len_keep = int(L * (1 - mask_ratio))
    if VIEWS * len_keep != L:
        raise ValueError(f"complementary masking needs {VIEWS} equal visible sets covering the {L} units: "
                         f"mask_ratio {mask_ratio} keeps {len_keep} per view; use 0.75 and a unit count divisible by 4")
    ids_shuffle = torch.argsort(noise, dim=1)                           # ascending rank order
    ids_restore = torch.argsort(ids_shuffle, dim=1)                     # rank of each unit
    ids_keep = ids_shuffle.view(N, VIEWS, len_keep).transpose(0, 1)     # [V, N, L_keep]
    view = torch.arange(VIEWS, device=noise.device)[:, None, None]
    mask = (ids_restore // len_keep != view).float()                    # [V, N, L]; fp32 under amp too
    return ids_keep, mask, ids_restore


def visible_at(mask, grid, scale):
    """mask [..., g*g] on the 1/16 grid -> visible [..., g*s, g*s, 1] (1 = visible) at a stage s times
    finer: each unit becomes an s x s block, so a stage-1/2 position belongs to exactly one unit."""
    visible = (1 - mask).unflatten(-1, (grid, grid))
    return visible.repeat_interleave(scale, -2).repeat_interleave(scale, -1)[..., None]


def gather(x, ids):
    """x [N, L, D], ids [N, K] -> x[n, ids[n]]: [N, K, D]."""
    return torch.gather(x, 1, ids[..., None].expand(-1, -1, x.shape[-1]))


def masked_mse(pred, target, mask):
    """Squared error per unit (mean over its values), averaged over the hidden units of all views.
    pred [V*N, L, C] (view by view), target [N, L, C] (the same for every view), mask [V*N, L]."""
    loss = ((pred.unflatten(0, (VIEWS, -1)) - target) ** 2).mean(dim=-1)   # [V, N, L] per unit
    return (loss.flatten(0, 1) * mask).sum() / mask.sum()


# --- the model: ConvMAE's modules; four views through the encoder and decoder (§3.1) ---


class Reconstructor(nn.Module):
    """One branch of the Partially-Shared Decoder (MoR): blocks of its own on top of the shared
    decoder blocks, a norm and a linear head that predicts one teacher's feature per unit."""

    def __init__(self, dim, num_heads, depth, out_dim, mlp_ratio=4.0):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, x):                                               # [V*N, L, Dd]
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))                                  # [V*N, L, C]


class MaskedAutoencoderConvViT(nn.Module):
    """FastConvMAE. With `reconstructors` (MoR, off by default: {target name: feature width}) the
    last `branch_depth` decoder blocks, decoder_norm and decoder_pred become the pixel branch,
    and each target gets a Reconstructor fed by the shared blocks below; `loss_weights` weighs
    each target's loss ('pixel' included; 1 where absent). The official keys are unchanged; the
    branches add `reconstructors.<target>.*`."""

    def __init__(self, img_size=224, patch_size=(4, 2, 2), in_chans=3, embed_dim=(256, 384, 768), depth=(2, 2, 11),
                 num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=(4.0, 4.0, 4.0), norm_pix_loss=False, drop_path_rate=0.0,
                 reconstructors=None, branch_depth=2, loss_weights=None):
        super().__init__()
        p1, p2, p3 = patch_size
        self.patch_size = p1 * p2 * p3                                  # pixels per mask unit side: 16
        if img_size % self.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the total stride {self.patch_size}")
        self.grid, self.scales = img_size // self.patch_size, (p2 * p3, p3)   # stage-1/2 positions per unit side
        self.norm_pix_loss = norm_pix_loss
        D1, D2, D3 = embed_dim
        dpr = [drop_path_rate * i / max(sum(depth) - 1, 1) for i in range(sum(depth))]  # stochastic depth rule

        # encoder, built in the official order (the seeded init depends on it)
        self.patch_embed1 = PatchEmbed(p1, in_chans, D1)
        self.patch_embed2 = PatchEmbed(p2, D1, D2)
        self.patch_embed3 = PatchEmbed(p3, D2, D3)
        self.patch_embed4 = nn.Linear(D3, D3)
        self.stage1_output_decode = Conv(D1, D3, p2 * p3, stride=p2 * p3)   # multi-scale fusion (§3.3)
        self.stage2_output_decode = Conv(D2, D3, p3, stride=p3)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, D3), requires_grad=False)
        self.blocks1 = nn.ModuleList([CBlock(D1, mlp_ratio[0], dpr[i]) for i in range(depth[0])])
        self.blocks2 = nn.ModuleList([CBlock(D2, mlp_ratio[1], dpr[depth[0] + i]) for i in range(depth[1])])
        self.blocks3 = nn.ModuleList([Block(D3, num_heads, mlp_ratio[2], dpr[depth[0] + depth[1] + i])
                                      for i in range(depth[2])])
        self.norm = nn.LayerNorm(D3, eps=1e-6)

        # decoder: MAE's, without a cls token
        self.decoder_embed = nn.Linear(D3, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio[0])
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, self.patch_size ** 2 * in_chans)

        # Mixture of Reconstructors (MoR): one branch per teacher, above the shared decoder blocks
        reconstructors = reconstructors or {}
        if reconstructors and not 0 < branch_depth < decoder_depth:
            raise ValueError(f"branch_depth {branch_depth} must leave 1 to {decoder_depth - 1} of the "
                             f"{decoder_depth} decoder blocks shared")
        self.branch_depth = branch_depth if reconstructors else 0
        self.reconstructors = nn.ModuleDict({name: Reconstructor(decoder_embed_dim, decoder_num_heads, branch_depth,
                                                                 width, mlp_ratio[0])
                                             for name, width in reconstructors.items()})
        self.loss_weights = {name: 1.0 for name in ["pixel", *reconstructors]} | dict(loss_weights or {})
        self.initialize_weights()

    def initialize_weights(self):
        """Official init: sin-cos positions, xavier-uniform linears; convolutions keep PyTorch's."""
        self.pos_embed.data.copy_(sincos_pos_embed(self.pos_embed.shape[-1], self.grid)[None])
        self.decoder_pos_embed.data.copy_(sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid)[None])
        w = self.patch_embed3.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))                 # the last stride-2 conv as a linear layer
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _conv_stages(self, imgs, mask=None):
        """Stages 1 and 2, masked per view when `mask` [V, N, L] is given, and the stage-3 embedding.

        imgs [N, 3, H, W] -> tokens [N, L, D] (position added), stage-1 map [N, H/4, W/4, D1],
        stage-2 map [N, H/8, W/8, D2].
        """
        if imgs.shape[-2:] != (self.grid * self.patch_size,) * 2:
            raise ValueError(f"images are {tuple(imgs.shape[-2:])}, this model was built for "
                             f"{self.grid * self.patch_size} px (pass img_size= to the builder)")
        vis1, vis2 = (None, None) if mask is None else (visible_at(mask, self.grid, s) for s in self.scales)
        x = self.patch_embed1(imgs.permute(0, 2, 3, 1))                 # [N, H/4, W/4, D1]
        for blk in self.blocks1:
            x = blk(x, vis1)
        stage1 = x
        x = self.patch_embed2(x)                                        # [N, H/8, W/8, D2]
        for blk in self.blocks2:
            x = blk(x, vis2)
        tokens = self.patch_embed4(self.patch_embed3(x).flatten(1, 2))  # [N, L, D]
        return tokens + self.pos_embed, stage1, x

    def _fused(self, stage1, stage2):
        """Multi-scale fusion (§3.3): stage-1/2 maps strided to the 1/16 grid, [N, L, D]."""
        return (self.stage1_output_decode(stage1) + self.stage2_output_decode(stage2)).flatten(1, 2)

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """imgs [N, 3, H, W] -> latent [V*N, L_keep, D], mask [V*N, L], ids_restore [N, L]."""
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.grid ** 2, device=imgs.device)
        ids_keep, mask, ids_restore = complementary_masking(noise, mask_ratio)   # [V, N, L_keep], [V, N, L]
        x, stage1, stage2 = self._conv_stages(imgs, mask)               # once per image, all views at once
        ids_keep = ids_keep.flatten(0, 1)                               # [V*N, L_keep]
        x = gather(x.repeat(VIEWS, 1, 1), ids_keep)                     # each view's visible tokens
        fused = gather(self._fused(stage1, stage2).repeat(VIEWS, 1, 1), ids_keep)
        for blk in self.blocks3:                                        # the views as a batch of V*N
            x = blk(x)
        return self.norm(x + fused), mask.flatten(0, 1), ids_restore

    def forward_unmasked(self, imgs):
        """The encoder on every unit, computed as the pre-training latent is (multi-scale fusion,
        norm): what the EMA teacher gives as targets (MoR). imgs [N, 3, H, W] -> [N, L, D]."""
        x, stage1, stage2 = self._conv_stages(imgs)
        for blk in self.blocks3:
            x = blk(x)
        return self.norm(x + self._fused(stage1, stage2))

    def forward_decoder(self, latent, ids_restore, branches=()):
        """latent [V*N, L_keep, D] -> pred [V*N, L, p*p*3]: pixels of every unit, in image order,
        and {name: [V*N, L, C]} from the MoR branches named in `branches`."""
        x = self.decoder_embed(latent)                                  # [V*N, L_keep, Dd]
        (VN, K, _), (N, L) = x.shape, ids_restore.shape
        x = torch.cat([x, self.mask_token.expand(VN, L - K, -1)], dim=1)   # [V*N, L, Dd]
        # view k's tokens hold ranks [k K, (k + 1) K), not [0, K): shift its gather by k K
        # (the official code rolls each view's sequence by k K first; the result is the same)
        shift = torch.arange(VIEWS, device=x.device).repeat_interleave(N)[:, None] * K
        x = gather(x, (ids_restore.repeat(VIEWS, 1) - shift) % L) + self.decoder_pos_embed   # image order
        shared = len(self.decoder_blocks) - self.branch_depth           # all of them without MoR
        for blk in self.decoder_blocks[:shared]:
            x = blk(x)
        features = {name: self.reconstructors[name](x) for name in branches}
        for blk in self.decoder_blocks[shared:]:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x)), features

    def forward_loss(self, imgs, pred, mask):
        """ConvMAE's loss over the hidden units of all views: each view is scored against the
        same targets, normalised per patch when norm_pix_loss. pred [V*N, L, P], mask [V*N, L]."""
        target = patchify(imgs, self.patch_size)                        # [N, L, p*p*3]
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return masked_mse(pred, target, mask)

    def feature_loss(self, pred, target, mask):
        """A MoR branch's loss: the teacher's feature of each unit, normalised over its channels
        (zero mean, unit variance: teachers' scales differ), scored as the pixels are.
        pred [V*N, L, C], target [N, L, C], mask [V*N, L]."""
        target = F.layer_norm(target.float(), target.shape[-1:], eps=1e-6)
        return masked_mse(pred, target, mask)

    def forward(self, imgs, mask_ratio=0.75, noise=None, targets=None):
        """-> loss, pred [V*N, L, p*p*3], mask [V*N, L]. With `targets` (MoR: {name: teacher
        features [N, L, C]} for every branch) the first output is a dict of losses instead:
        'pixel', one per target, and 'loss', their sum weighted by loss_weights."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        if targets is not None and set(targets) != set(self.reconstructors):
            raise ValueError(f"targets {sorted(targets)} do not match the branches {sorted(self.reconstructors)}")
        pred, features = self.forward_decoder(latent, ids_restore, targets or ())
        loss = self.forward_loss(imgs, pred, mask)
        if targets is None:
            return loss, pred, mask
        losses = {"pixel": loss} | {name: self.feature_loss(features[name], targets[name], mask) for name in targets}
        losses["loss"] = sum(self.loss_weights[name] * value for name, value in losses.items())
        return losses, pred, mask

    def forward_features(self, imgs):
        """The encoder on all units, as the official fine-tuning model (models_convvit.py) runs it:
        no masking, no multi-scale fusion, no `norm` (it pools, then applies its own fc_norm).
        imgs [N, 3, H, W] -> [N, L, D]."""
        x, _, _ = self._conv_stages(imgs)
        for blk in self.blocks3:
            x = blk(x)
        return x

    def pred_to_pixels(self, imgs, pred):
        """pred [k*N, L, p*p*3] (k views) -> images [k*N, 3, H, W] in the input's normalisation;
        undoes norm_pix_loss with each patch's own statistics, for pictures."""
        if self.norm_pix_loss:
            target = patchify(imgs, self.patch_size).repeat(pred.shape[0] // imgs.shape[0], 1, 1)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        return unpatchify(pred, self.patch_size)


# --- Mixture of Reconstructors: the teachers whose features the branches predict (MoR) ---
# The official README's figure: an EMA copy of the encoder, DINO and CLIP give targets for the
# hidden units, one decoder branch each. No code was released; README says what is our reading.

DECODER = ("decoder_embed", "mask_token", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred",
           "reconstructors")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def ema_teacher(student):
    """A frozen copy of the student's encoder (its state_dict: the encoder's keys)."""
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    for name in DECODER:
        delattr(teacher, name)
    return teacher


@torch.no_grad()
def update_ema(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    student = dict(student.named_parameters())
    names, params = zip(*teacher.named_parameters())
    torch._foreach_lerp_(list(params), [student[n].detach() for n in names], 1.0 - momentum)


def ema_momentum(epoch, base, epochs):
    """BYOL's and DINO's schedule: from `base` at the start to 1 at the end, half a cosine."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * epoch / epochs) + 1) / 2


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ViTTeacher(nn.Module):
    """A plain ViT returning the patch tokens of its last layer after the final norm: a DINO ViT
    (timm's names) or, with clip=True, CLIP's image tower (ln_pre, QuickGELU, LayerNorm eps 1e-5,
    and the projection into CLIP's joint space). Heads are 64 wide, as in every DINO and CLIP ViT."""

    def __init__(self, patch_size, dim, depth, tokens, clip=False, out_dim=None):
        super().__init__()
        eps = 1e-5 if clip else 1e-6
        self.patch_size = patch_size
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size, bias=not clip)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.ln_pre = nn.LayerNorm(dim, eps=eps) if clip else nn.Identity()
        self.blocks = nn.ModuleList([Block(dim, dim // 64, 4.0, eps=eps, act_layer=QuickGELU if clip else nn.GELU)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, out_dim, bias=False) if clip else nn.Identity()

    def forward(self, x):                                               # [N, 3, H, W]
        x = self.patch_embed(x).flatten(2).transpose(1, 2)              # [N, T, D]
        g = int(math.sqrt(self.pos_embed.shape[1] - 1))
        pos = self.pos_embed
        if x.shape[1] != g * g:                                         # another image size: resize the grid
            side = int(math.sqrt(x.shape[1]))
            grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        x = self.ln_pre(torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + pos)
        for blk in self.blocks:
            x = blk(x)
        return self.proj(self.norm(x[:, 1:]))                           # [N, T, C]

    @classmethod
    def from_state_dict(cls, state):
        """A DINO/timm ViT state_dict (cls_token, pos_embed, patch_embed.proj, blocks.i.*, norm), or an
        OpenAI CLIP ViT one (visual.conv1, visual.transformer.resblocks.i.*, ...; the text tower is
        ignored). OpenAI's ViTs use QuickGELU; open_clip's LAION ViTs, same names, use GELU: not these."""
        if "visual.conv1.weight" in state:
            if "visual.class_embedding" not in state:
                raise ValueError("a CLIP ResNet image tower; only CLIP ViTs are supported")
            v = {k[len("visual."):]: t for k, t in state.items() if k.startswith("visual.")}
            dim, patch = v["conv1.weight"].shape[0], v["conv1.weight"].shape[-1]
            depth = len({k.split(".")[2] for k in v if k.startswith("transformer.resblocks.")})
            ours = {"patch_embed.weight": v["conv1.weight"], "cls_token": v["class_embedding"].view(1, 1, -1),
                    "pos_embed": v["positional_embedding"][None], "ln_pre.weight": v["ln_pre.weight"],
                    "ln_pre.bias": v["ln_pre.bias"], "norm.weight": v["ln_post.weight"],
                    "norm.bias": v["ln_post.bias"], "proj.weight": v["proj"].t()}
            names = {"attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
                     "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
                     "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias", "ln_2.weight": "norm2.weight",
                     "ln_2.bias": "norm2.bias", "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
                     "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}
            for i in range(depth):
                for theirs, mine in names.items():
                    ours[f"blocks.{i}.{mine}"] = v[f"transformer.resblocks.{i}.{theirs}"]
            teacher = cls(patch, dim, depth, v["positional_embedding"].shape[0], clip=True,
                          out_dim=v["proj"].shape[1])
        else:
            ours = {k.replace("patch_embed.proj.", "patch_embed."): t for k, t in state.items()
                    if not k.startswith("head.")}
            depth = len({k.split(".")[1] for k in ours if k.startswith("blocks.")})
            w = ours["patch_embed.weight"]
            teacher = cls(w.shape[-1], w.shape[0], depth, ours["pos_embed"].shape[1])
        teacher.load_state_dict(ours)
        return teacher


class FeatureTeacher(nn.Module):
    """A frozen external teacher (DINO, CLIP): images normalised as ours -> the teacher's own
    normalisation -> its patch features, one per mask unit [N, L, C]. `net` returns tokens
    [N, T, C] (T = g*g, or 1 + g*g with a leading cls token, dropped) or a map [N, C, g, g];
    a grid finer than ours by a whole factor is average-pooled onto ours."""

    def __init__(self, net, mean, std, grid):
        super().__init__()
        self.net = net                                                  # in eval mode (load_teacher)
        for p in net.parameters():                                      # (ScriptModules lack requires_grad_)
            p.requires_grad_(False)
        self.grid = grid
        ours_mean, ours_std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        theirs_mean, theirs_std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        self.register_buffer("scale", ours_std / theirs_std, persistent=False)     # x_theirs = x * scale + shift
        self.register_buffer("shift", (ours_mean - theirs_mean) / theirs_std, persistent=False)

    @torch.no_grad()
    def forward(self, imgs):                                            # [N, 3, H, W]
        out = self.net(imgs * self.scale + self.shift)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"returns a {type(out).__name__}; it must return one tensor of patch features")
        if out.ndim == 4:                                               # a map [N, C, g, g]
            out = out.flatten(2).transpose(1, 2)
        if out.ndim != 3:
            raise ValueError(f"returns shape {list(out.shape)}; it must return tokens [N, T, C] or a map [N, C, g, g]")
        side = math.isqrt(out.shape[1])
        if side * side != out.shape[1]:                                 # a cls token first
            out, side = out[:, 1:], math.isqrt(out.shape[1] - 1)
        if side * side != out.shape[1] or side % self.grid:
            raise ValueError(f"returns {out.shape[1]} tokens: not a square grid that pools onto the "
                             f"{self.grid} x {self.grid} units of this input size")
        if side != self.grid:
            out = F.avg_pool2d(out.transpose(1, 2).unflatten(2, (side, side)), side // self.grid)
            out = out.flatten(2).transpose(1, 2)
        return out.float()                                              # [N, L, C]


def load_teacher(path, kind, grid):
    """--teacher_dino / --teacher_clip FILE -> FeatureTeacher. FILE is a module mapping images to
    patch features, saved by torch.export (.pt2) or as TorchScript; OpenAI's CLIP ViT release
    (TorchScript: its image tower is rebuilt as a ViTTeacher); or a plain ViT state_dict in DINO's
    or CLIP's layout (DINO's released backbones load as they are)."""
    mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    if not os.path.isfile(path):
        raise ValueError("no such file")
    if path.endswith(".pt2"):
        try:
            return FeatureTeacher(torch.export.load(path).module(), mean, std, grid)   # exported in eval mode
        except Exception as e:
            raise ValueError(f"not a torch.export program ({type(e).__name__})") from None
    try:
        with warnings.catch_warnings():                                 # TorchScript is deprecated, still served
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(path, map_location="cpu")
        state = net.state_dict()
        if "visual.conv1.weight" not in state:                          # a module: used as it is
            return FeatureTeacher(net.eval(), mean, std, grid)
    except RuntimeError:                                                # not TorchScript: a checkpoint
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"neither TorchScript nor a readable checkpoint ({type(e).__name__})") from None
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a state_dict")
    try:                                                                # weights: rebuild the ViT (OpenAI's CLIP too)
        net = ViTTeacher.from_state_dict(state)
    except (KeyError, AttributeError, IndexError, RuntimeError) as e:
        raise ValueError(f"not a ViT state_dict in DINO's or CLIP's layout ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:120]})") from None
    return FeatureTeacher(net.eval(), mean, std, grid)


# --- model builders (models_fastconvmae.py: the base size, decoder fixed at 8 blocks) ---

MODELS = {
    "fastconvmae_convvit_base_patch16": partial(MaskedAutoencoderConvViT, patch_size=(4, 2, 2),
                                                embed_dim=(256, 384, 768), depth=(2, 2, 11), num_heads=12),
    # for tests and CPU demos: 32 px images, strides 2-2-2 (8 px units, a 4 x 4 grid: 4 views of 4 units)
    "fastconvmae_convvit_tiny": partial(MaskedAutoencoderConvViT, img_size=32, patch_size=(2, 2, 2),
                                        embed_dim=(32, 48, 96), depth=(1, 1, 3), num_heads=3,
                                        decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4),
}


def load_pretrained(model, checkpoint):
    """Load a FastConvMAE or ConvMAE pre-training checkpoint (same layout), a path or a state_dict.

    A full pre-training state_dict (ours, or the official ConvMAE-B release: FastConvMAE released
    none) loads strictly.
    An encoder-only state_dict loads too: every encoder key must match, and the names of the
    absent decoder keys are returned (they keep their fresh init).
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True) if isinstance(checkpoint, str) else checkpoint
    state = state.get("model", state)
    ours = model.state_dict()
    unexpected = sorted(set(state) - set(ours))
    missing = sorted(set(ours) - set(state))
    encoder_missing = [k for k in missing if not k.startswith(DECODER)]
    if unexpected or encoder_missing:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: unexpected {unexpected[:5]}, "
                         f"missing {encoder_missing[:5]} (a fine-tuned classifier? use finetune.py)")
    model.load_state_dict(state, strict=not missing)
    return missing


# --- arguments (defaults: the 50-epoch ConvViT-B recipe of PRETRAIN.md) ---


def get_args(argv=None):
    p = argparse.ArgumentParser(description="FastConvMAE pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="fastconvmae_convvit_base_patch16", help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--data", default=None, help="image folder (DIR/train/<class>/*, DIR/<class>/* or flat); "
                                                "none: the built-in data set")
    p.add_argument("--builtin_images", type=int, default=4096, help="size of the built-in data set (no --data)")
    p.add_argument("--input_size", type=int, default=None, help="image size; default: the model's (224, tiny: 32)")
    p.add_argument("--mask_ratio", type=float, default=0.75, help="fraction hidden in each of the 4 views: 0.75 (4 x 25 %% visible)")
    p.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="per-patch normalised pixel targets (PRETRAIN.md recipe)")
    # optimisation (PRETRAIN.md: AdamW, blr 6e-4, 64 per GPU on 8 GPUs, wd 0.05, cosine, 10 warmup epochs, 50 epochs)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--warmup_epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=64, help="per process; effective = batch_size x accum_iter x processes")
    p.add_argument("--accum_iter", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--blr", type=float, default=6e-4, help="base lr: lr = blr x effective batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr; overrides --blr")
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--clip_grad", type=float, default=None, help="max grad norm; FastConvMAE uses none")
    # Mixture of Reconstructors (paper only; README: what is the paper's and what is our reading)
    p.add_argument("--mor", action="store_true", help="Mixture of Reconstructors: a partially shared decoder "
                   "predicting pixels and the features of an EMA copy of the encoder (+ --teacher_dino/--teacher_clip)")
    p.add_argument("--teacher_dino", default=None, metavar="FILE", help="with --mor: a DINO teacher, TorchScript "
                   "(images -> patch features) or a ViT state_dict in DINO's layout; fed ImageNet-normalised images")
    p.add_argument("--teacher_clip", default=None, metavar="FILE", help="with --mor: a CLIP teacher, OpenAI's "
                   "release file or TorchScript (images -> patch features); fed CLIP-normalised images")
    p.add_argument("--mor_branch_depth", type=int, default=None, help="decoder blocks of each branch, the others "
                   "shared; default: a quarter of the decoder (base: 2 of 8), at least 1")
    p.add_argument("--ema_momentum", type=float, default=0.996, help="EMA teacher momentum at the start (cosine to 1)")
    p.add_argument("--mor_weights", nargs="*", default=[], metavar="NAME=W",
                   help="loss weights, e.g. pixel=1 ema=0.5 clip=2 (default 1 each)")
    # system
    p.add_argument("--output_dir", default=None, help="default: output/<model>")
    p.add_argument("--resume", default="", help="checkpoint path, or 'auto' for output_dir/checkpoint-last.pth if present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="data workers per process")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--save_every", type=int, default=20, help="keep a copy of the checkpoint every N epochs")
    p.add_argument("--log_every", type=int, default=20, help="optimizer steps between log lines")
    args = p.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    """Bad input -> one line naming the flag and the fix (sys.exit), before any work starts."""
    if args.model not in MODELS:
        sys.exit(f"error: --model {args.model} is unknown; choose one of: {', '.join(MODELS)}")
    for flag in ("epochs", "batch_size", "accum_iter", "save_every", "log_every", "builtin_images"):
        if getattr(args, flag) <= 0:
            sys.exit(f"error: --{flag} must be a positive integer, got {getattr(args, flag)}")
    if args.warmup_epochs < 0 or args.num_workers < 0:
        sys.exit("error: --warmup_epochs and --num_workers must be >= 0")
    if not 0.0 < args.mask_ratio < 1.0:
        sys.exit(f"error: --mask_ratio must be in (0, 1), got {args.mask_ratio}")
    defaults = MODELS[args.model].keywords
    check_mor_args(args, defaults.get("decoder_depth", 8))
    patch = math.prod(defaults["patch_size"])                           # total stride: pixels per unit side
    args.input_size = defaults.get("img_size", 224) if args.input_size is None else args.input_size
    if args.input_size <= 0 or args.input_size % patch:
        sys.exit(f"error: --input_size {args.input_size} is not a positive multiple of {args.model}'s patch size "
                 f"{patch}; try {max(args.input_size // patch, 1) * patch}")
    L = (args.input_size // patch) ** 2
    if VIEWS * int(L * (1 - args.mask_ratio)) != L:                    # 4 equal, disjoint views
        sys.exit(f"error: --mask_ratio {args.mask_ratio} with --input_size {args.input_size} ({L} units) does not "
                 f"split into {VIEWS} complementary views; use --mask_ratio 0.75 and a unit count divisible by 4")
    args.output_dir = args.output_dir or os.path.join("output", args.model)


def check_mor_args(args, decoder_depth):
    for kind in ("dino", "clip"):
        path = getattr(args, f"teacher_{kind}")
        if path and not args.mor:
            sys.exit(f"error: --teacher_{kind} gives a Mixture-of-Reconstructors target; add --mor")
        if path and not os.path.isfile(path):
            sys.exit(f"error: --teacher_{kind} {path}: no such file")
    if args.mor_branch_depth is None:
        args.mor_branch_depth = max(decoder_depth // 4, 1)
    if args.mor and not 0 < args.mor_branch_depth < decoder_depth:
        sys.exit(f"error: --mor_branch_depth must be 1 to {decoder_depth - 1} ({args.model}'s decoder has "
                 f"{decoder_depth} blocks, at least one shared), got {args.mor_branch_depth}")
    if not 0.0 <= args.ema_momentum <= 1.0:
        sys.exit(f"error: --ema_momentum must be in [0, 1], got {args.ema_momentum}")
    targets = ["pixel", "ema"] + [k for k in ("dino", "clip") if getattr(args, f"teacher_{k}")]
    weights = {}
    for item in args.mor_weights:
        name, _, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            sys.exit(f"error: --mor_weights {item}: expected NAME=NUMBER, e.g. ema=0.5")
        if name not in targets or not args.mor:
            sys.exit(f"error: --mor_weights {item}: {name} is not a target of this run (targets: "
                     f"{', '.join(targets) if args.mor else 'none without --mor'})")
    args.mor_weights = weights                                          # {target: weight}


# --- training (main_pretrain.py + engine_pretrain.py) ---


def save_checkpoint(state, path):
    """Atomic: a crash mid-write, even of the machine, leaves the previous file or the whole new one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_training_state(path, model, optimizer, scaler, args, epoch, batch_in_epoch, ema=None):
    """Every rank calls this (each rank's RNG streams are gathered); rank 0 writes.
    Weights that are not finite (an update diverged after its loss was checked) stop the run
    instead, so the file keeps the last good state."""
    if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():
        sys.exit(f"error: the weights are not finite (the last step diverged); not saving. "
                 f"The last good checkpoint is {path}; resume from it with a lower --blr or --amp none")
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [rng]
    if dist.is_initialized():
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng)
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                         "world_size": len(rngs), "args": vars(args), "rng": rngs,
                         **({"ema": ema.state_dict()} if ema is not None else {})}, path)


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases and norms (1-D) nor on tokens (the official decays
    the tokens, which are 3-D: README, "differs on purpose")."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:                                             # fixed pos embeds are not trained
            (no_decay if p.ndim <= 1 or name.endswith("_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def count_ranks(flag, group=None):
    """On every rank, how many ranks have `flag` true: ranks must take the same branch around collectives."""
    if not dist.is_initialized():
        return int(flag)
    t = torch.tensor([float(flag)])
    dist.all_reduce(t, group=group)
    return int(t.item())


def load_checkpoint(path, model_name):
    if not os.path.isfile(path):
        sys.exit(f"error: --resume {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        sys.exit(f"error: --resume {path}: not a readable checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or "model" not in ckpt or ckpt.get("args", {}).get("model") != model_name:
        found = ckpt.get("args", {}).get("model", "no model name") if isinstance(ckpt, dict) else "not a dict"
        sys.exit(f"error: --resume {path} is not a {model_name} training checkpoint ({found}); "
                 f"pass --model to match it or start a new --output_dir")
    return ckpt


def build_teachers(args, grid, batch, device):
    """--teacher_dino / --teacher_clip -> ({kind: FeatureTeacher}, {kind: feature width}). Each is
    tried once on a batch of the training size, so that a file that does not fit stops the run
    here, with one line, not mid-run."""
    teachers, widths = {}, {}
    for kind in ("dino", "clip"):
        path = getattr(args, f"teacher_{kind}")
        if path:
            try:
                teachers[kind] = load_teacher(path, kind, grid).to(device)
                widths[kind] = teachers[kind](batch.to(device)).shape[-1]
            except Exception as e:                                      # whatever the file does: one line
                what = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                sys.exit(f"error: --teacher_{kind} {path}: "
                         f"{what if isinstance(e, ValueError) else f'{type(e).__name__}: {what}'}")
    return teachers, widths


def teacher_targets(ema, teachers, imgs):
    """MoR targets: each teacher's features of the whole image, {name: [N, L, C]}, without gradients."""
    with torch.no_grad():
        return {"ema": ema.forward_unmasked(imgs)} | {kind: teacher(imgs) for kind, teacher in teachers.items()}


@torch.no_grad()
def save_reconstruction(model, imgs, noise, mask_ratio, path):
    """One row per image: original | masked | reconstruction | reconstruction with visible patches
    pasted, all for view 0 (the other three views are its complements)."""
    model.eval()
    _, pred, mask = model(imgs, mask_ratio, noise)
    model.train()
    pred, mask = pred[:len(imgs)], mask[:len(imgs)]                    # view 0's rows
    p = model.patch_size
    hidden = unpatchify(mask[..., None].expand(-1, -1, p * p * 3), p).cpu()  # [N, 3, H, W], 1 = hidden
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    orig = imgs.cpu() * std + mean                                     # back to [0, 1] pixels
    recon = model.pred_to_pixels(imgs, pred.float()).cpu() * std + mean
    columns = [orig, orig * (1 - hidden) + 0.5 * hidden, recon, orig * (1 - hidden) + recon * hidden]
    grid = torch.stack(columns, dim=1).flatten(0, 1)                    # [4N, 3, H, W], row by row
    save_image(grid.clamp(0, 1), path, nrow=4, padding=1)


def main(args):
    # 1. setup distributed: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain python is rank 0 of 1
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    distributed = world_size > 1
    if distributed:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    host_group = dist.new_group(backend="gloo") if distributed else None  # ranks agree on CPU: no GPU sync
    is_main = rank == 0
    log = tqdm.write if is_main else (lambda *a, **k: None)            # print, above the progress bar
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    if amp != "none" and device.type == "cpu":
        log(f"warning: --amp {amp} on CPU is fast only on CPUs with native {amp} matmuls; --amp none is the default")

    # 2. seed: per rank, for what is drawn outside the data pipeline (model init: DDP copies rank 0's)
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)

    # 3. data: each sample's crop, flip and masking noise are seeded by (seed, epoch, index)
    if is_main:
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            open(os.path.join(args.output_dir, ".write-test"), "w").close()
            os.remove(os.path.join(args.output_dir, ".write-test"))
        except OSError as e:
            sys.exit(f"error: --output_dir {args.output_dir} is not writable ({e.strerror})")
    L = (args.input_size // math.prod(MODELS[args.model].keywords["patch_size"])) ** 2   # mask units
    try:
        images = load_images(args.data, "train", args.input_size, args.builtin_images)
        loader = pretrain_loader(images, args.input_size, args.batch_size, L, args.seed, rank, world_size,
                                 args.num_workers)
        demo = [loader.dataset[(0, i)] for i in range(min(8, len(images)))]   # fixed batch for pictures
    except ValueError as e:
        sys.exit(f"error: {e}")
    demo_imgs, demo_noise = (torch.stack(t).to(device) for t in zip(*demo))
    batches_per_epoch = len(loader) // args.accum_iter * args.accum_iter   # whole optimizer steps only
    if batches_per_epoch == 0:
        sys.exit(f"error: --accum_iter {args.accum_iter} exceeds the {len(loader)} batches per epoch; lower it")

    # 4. model: build, optionally compile, then wrap in DDP. With --mor, the teachers come first
    # (their widths size the branches) and the EMA teacher starts as a copy of the encoder
    teachers, widths = build_teachers(args, math.isqrt(L), demo_imgs[:1].expand(args.batch_size, -1, -1, -1), device)
    mor = ({"ema": MODELS[args.model].keywords["embed_dim"][-1]} | widths) if args.mor else None
    model = MODELS[args.model](img_size=args.input_size, norm_pix_loss=args.norm_pix_loss, reconstructors=mor,
                               branch_depth=args.mor_branch_depth, loss_weights=args.mor_weights).to(device)
    model_without_ddp = model
    if args.compile:
        model = torch.compile(model)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    ema = ema_teacher(model_without_ddp) if args.mor else None           # after DDP: rank 0's weights everywhere

    # 5. param groups: no weight decay on biases, norms (1-D) and tokens
    groups = param_groups(model_without_ddp, args.weight_decay)

    # 6. optimizer: linear lr scaling rule (MAE §A.1: lr = blr x batch / 256), betas (0.9, 0.95)
    eff_batch = args.batch_size * args.accum_iter * world_size
    args.lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # bf16 needs no loss scaling
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp != "none" else nullcontext())
    if args.mor:
        log(f"MoR: targets {', '.join(model_without_ddp.loss_weights)} | weights "
            f"{' '.join(f'{k}={v:g}' for k, v in model_without_ddp.loss_weights.items())} | "
            f"{args.mor_branch_depth} of {len(model_without_ddp.decoder_blocks)} decoder blocks per branch | "
            f"EMA momentum {args.ema_momentum} -> 1")
    log(f"{args.model} | {sum(p.numel() for p in model_without_ddp.parameters()) / 1e6:.1f} M params | "
        f"eff. batch {eff_batch} = {args.batch_size} x {args.accum_iter} x {world_size} | lr {args.lr:.3g} | "
        f"{batches_per_epoch // args.accum_iter} steps/epoch | amp {amp} | {device}")

    # 7. schedule: the lr is set before every optimizer step from the fractional epoch (below)
    # 8. resume: model, optimizer, scaler, position in the run, RNG states
    epoch, batch_in_epoch = 0, 0
    path_last = os.path.join(args.output_dir, "checkpoint-last.pth")
    resume = path_last if args.resume == "auto" else args.resume
    seen = count_ranks(bool(resume) and os.path.isfile(resume), host_group)  # every rank must load the same
    if 0 < seen < world_size:                                           # e.g. --output_dir on each node's disk
        sys.exit(f"error: --resume {resume} exists for {seen} of {world_size} processes; put it and --output_dir "
                 f"on a file system that every node shares")
    if resume and (args.resume != "auto" or seen):
        ckpt = load_checkpoint(resume, args.model)
        try:
            model_without_ddp.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            sys.exit(f"error: --resume {resume} does not fit {args.model} at --input_size {args.input_size} "
                     f"({str(e).strip().splitlines()[-1].strip()})")
        optimizer.load_state_dict(ckpt["optimizer"])
        if ema is not None:                 # the model loaded with its branches: a --mor checkpoint, with 'ema'
            ema.load_state_dict(ckpt["ema"])
            for kind in ("dino", "clip"):
                if ckpt["args"].get(f"teacher_{kind}") != getattr(args, f"teacher_{kind}"):
                    log(f"warning: --teacher_{kind} is {getattr(args, f'teacher_{kind}')}; {resume} was trained "
                        f"with {ckpt['args'].get(f'teacher_{kind}')}")
        if ckpt["scaler"] and scaler.is_enabled():                      # empty unless saved by an fp16 run
            scaler.load_state_dict(ckpt["scaler"])
        epoch, batch_in_epoch = ckpt["epoch"], ckpt["batch_in_epoch"]
        same_layout = (ckpt["world_size"], ckpt["args"]["batch_size"], ckpt["args"]["accum_iter"]) == \
                      (world_size, args.batch_size, args.accum_iter)
        if batch_in_epoch and not same_layout:                          # the position means other batches
            log(f"warning: {resume} was saved mid-epoch by another processes x batch x accum layout; "
                f"restarting epoch {epoch} from its start")
            batch_in_epoch = 0
        if ckpt["world_size"] == world_size:                            # else a new world: fresh seeds
            torch.set_rng_state(ckpt["rng"][rank]["cpu"])
            if device.type == "cuda" and ckpt["rng"][rank]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"])
        log(f"resumed from {resume} at epoch {epoch}, batch {batch_in_epoch}")
    save_state = partial(save_training_state, path_last, model_without_ddp, optimizer, scaler, args, ema=ema)

    stop = {"signal": None}                                              # SIGTERM: save at the next step
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))

    # 9. loop
    log_file = open(os.path.join(args.output_dir, "log.jsonl"), "a") if is_main else None
    loss_names = ["loss", *model_without_ddp.loss_weights] if args.mor else ["loss"]   # logged: total, then each
    model.train()
    while epoch < args.epochs:
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip_batches = batch_in_epoch
        bar = tqdm(total=batches_per_epoch, initial=batch_in_epoch, desc=f"epoch {epoch}", dynamic_ncols=True,
                   leave=False, disable=not (is_main and sys.stderr.isatty()))   # a batch log gets the lines only
        loss_sum = torch.zeros(len(loss_names), device=device)
        nonfinite = torch.zeros((), device=device, dtype=torch.bool)
        n_logged, t_log = 0, time.time()
        for imgs, noise in itertools.islice(loader, batches_per_epoch - batch_in_epoch):
            if batch_in_epoch % args.accum_iter == 0:
                lr = cosine_lr(epoch + batch_in_epoch / batches_per_epoch, args.lr, args.min_lr,
                               args.warmup_epochs, args.epochs)
                set_lr(optimizer, lr)
            imgs, noise = imgs.to(device, non_blocking=True), noise.to(device, non_blocking=True)
            last_micro = (batch_in_epoch + 1) % args.accum_iter == 0
            # DDP all-reduces gradients on every backward unless told not to: only the last micro-step syncs
            with (model.no_sync() if distributed and not last_micro else nullcontext()), autocast:
                if args.mor:                                             # the teachers see the whole image
                    losses, _, _ = model(imgs, args.mask_ratio, noise, teacher_targets(ema, teachers, imgs))
                else:
                    losses = {"loss": model(imgs, args.mask_ratio, noise)[0]}
            scaler.scale(losses["loss"] / args.accum_iter).backward()
            loss = torch.stack([losses[k].detach().float() for k in loss_names])
            nonfinite |= ~torch.isfinite(loss[0])                        # checked at log time: no sync per step
            loss_sum += loss
            batch_in_epoch += 1
            bar.update()
            if not last_micro:
                continue
            if args.clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:                                          # the EMA teacher follows the step
                update_ema(ema, model_without_ddp,
                           ema_momentum(epoch + batch_in_epoch / batches_per_epoch, args.ema_momentum, args.epochs))
            n_logged += args.accum_iter
            step = batch_in_epoch // args.accum_iter
            stopping = count_ranks(stop["signal"] is not None, host_group) > 0
            if step % args.log_every == 0 or batch_in_epoch == batches_per_epoch or stopping:
                stats = torch.cat([loss_sum / n_logged, nonfinite.float()[None]])
                if distributed:
                    dist.all_reduce(stats)
                means, bad = (stats[:-1] / world_size).tolist(), stats[-1].item() > 0
                mean_loss = means[0]
                if bad or not math.isfinite(mean_loss):
                    bar.close()
                    sys.exit(f"error: loss is {mean_loss} at epoch {epoch} step {step}; stopping without saving. "
                             f"The last good checkpoint is {path_last}; resume from it with a lower --blr or --amp none")
                ips = n_logged * args.batch_size * world_size / (time.time() - t_log)
                record = {"epoch": epoch, "step": step, "loss": mean_loss, "lr": lr, "img_per_s": round(ips, 1),
                          **{f"loss_{k}": v for k, v in zip(loss_names[1:], means[1:])}}
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                each = "".join(f" | {k} {v:.4f}" for k, v in zip(loss_names[1:], means[1:]))   # MoR: per target
                log(f"epoch {epoch} step {step}/{batches_per_epoch // args.accum_iter} | loss {mean_loss:.4f} | "
                    f"lr {lr:.2e} | {ips:.0f} img/s{each}")
                if is_main:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                loss_sum.zero_(), nonfinite.zero_()
                n_logged, t_log = 0, time.time()
            if stopping:
                bar.close()
                save_state(epoch, batch_in_epoch)
                log(f"SIGTERM: saved {path_last} at epoch {epoch}, batch {batch_in_epoch}; exiting")
                if distributed:
                    dist.destroy_process_group()
                return
        bar.close()
        epoch, batch_in_epoch = epoch + 1, 0
        save_state(epoch, 0)
        if is_main:
            if epoch % args.save_every == 0 or epoch == args.epochs:     # a kept copy, written atomically
                kept = os.path.join(args.output_dir, f"checkpoint-{epoch:04d}.pth")
                shutil.copyfile(path_last, kept + ".tmp")
                os.replace(kept + ".tmp", kept)
            save_reconstruction(model_without_ddp, demo_imgs, demo_noise, args.mask_ratio,
                                os.path.join(args.output_dir, f"recon-epoch{epoch:03d}.png"))
            log(f"epoch {epoch}/{args.epochs} done | checkpoint and picture in {args.output_dir}")

    # 10. teardown
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args())
