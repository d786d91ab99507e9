"""FastConvMAE: ConvMAE trained with four complementary masks, so every image teaches four times.

One random permutation of the 1/16-grid units is cut into four disjoint sets of 25 %: each set is the visible part
of one view, and the four views together show every unit exactly once (complementary masking). The convolution
stages run once per image, each position seeing only its own view's pixels (the depthwise convolution runs once per
view, over the whole map with the other views' positions zeroed); the transformer stage and the decoder then process
the four views as a batch of 4N, and the loss is ConvMAE's over the hidden units of all four. Its README: 50 epochs
reach 84.4 ImageNet top-1 with pixel targets in 266 GPU-hours, where ConvMAE's 1600 epochs reach 85.0 in 4000.

Method: Gao et al., FastConvMAE (complementary masking and mixture of reconstructors), 2022. Official code:
https://github.com/Alpha-VL/FastConvMAE (complementary masking only). This file rebuilds the official pre-training
model with plain PyTorch: same state_dict, same numbers (tests/test_fastconvmae.py checks it against fixtures made
by the official code). The Mixture of Reconstructors, which its authors did not release, is in fastconvmae_mor.py.
Copy it with common.py and it runs as it does here; inside a package, make the `from common import` line
relative. The model needs only torch, torchvision's stochastic_depth and common's patchify/unpatchify.

    python fastconvmae.py --model fastconvmae_convvit_tiny --epochs 5 --warmup_epochs 1   # CPU demo
    torchrun --nproc_per_node=8 fastconvmae.py --data /imagenet      # PRETRAIN.md: 8 x 64 = 512 per step
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR \
        --master_port=29500 fastconvmae.py --data /imagenet --batch_size 32    # 2 nodes, still 512
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

from common import (IMAGENET_MEAN, IMAGENET_STD, cosine_lr, load_checkpoint, load_images, patchify, pretrain_loader,
                    progress, say, set_lr, unpatchify)

# Conventions: N batch, L mask units (16x16 patches of the 1/16 grid), D width, p patch size, V = 4 views.
# mask: 1 = hidden, 0 = visible. Rows of pred, mask and latent come view by view: [V * N, ...] holds view 0's N
# rows, then view 1's, ... Convolution stages keep maps channels-last, [N, H, W, C] (LayerNorm on the last axis).

VIEWS = 4                         # complementary masks of 25 % each (FastConvMAE §3.1)


# --- building blocks (parameter names as in the official vision_transformer.py) ---
class Conv(nn.Conv2d):
    """nn.Conv2d (its weights, init and state_dict) on the channels-last maps [N, H, W, C] of stages 1-2 (LayerNorm
    acts on the last axis). The permutes are views: oneDNN convolves channels-last memory faster on CPU than NCHW."""

    def forward(self, x):
        return super().forward(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def patch_embed(patch_size, in_chans, dim):
    """The down-sampling in front of each stage: strided conv, LayerNorm (eps 1e-5, as the official), GELU."""
    proj = Conv(in_chans, dim, patch_size, stride=patch_size)           # [N, H, W, C] -> [N, H/p, W/p, D]
    return nn.Sequential(OrderedDict(proj=proj, norm=nn.LayerNorm(dim), act=nn.GELU()))


class CBlock(nn.Module):
    """Convolution block of stages 1-2 (ConvMAE §3.1): a 5x5 depthwise convolution between two 1x1
    convolutions takes the place of self-attention (hence its official name `attn`).

    With `visible` [V, N, H, W, 1] (1 = visible; the views' visible sets are disjoint and cover the image)
    the depthwise convolution runs once per view, over the whole map with the positions that view hides
    zeroed, and each position keeps its own view's result: each view's visible tokens are exactly what
    ConvMAE's masked convolution gives that view alone. Every other operator acts per position, once.
    """

    def __init__(self, dim, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)                                  # eps 1e-5: CBlock ignores norm_layer
        self.conv1 = Conv(dim, dim, 1)
        self.conv2 = Conv(dim, dim, 1)
        self.attn = Conv(dim, dim, 5, padding=2, groups=dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=Conv(dim, hidden, 1), act=nn.GELU(), fc2=Conv(hidden, dim, 1)))
        self.drop_path = drop_path                                      # stochastic depth: fine-tuning only

    def forward(self, x, visible=None):                                 # [N, H, W, C]
        h = self.conv1(self.norm1(x))
        if visible is None:
            h = self.attn(h)
        else:
            v = visible.to(h.dtype)                                     # [V, N, H, W, 1]
            per_view = self.attn((v * h).flatten(0, 1))                 # the V views as one batch [V*N, H, W, C]
            h = (v * per_view.unflatten(0, v.shape[:2])).sum(0)         # each position from its own view
        x = x + stochastic_depth(self.conv2(h), self.drop_path, "row", self.training)
        return x + stochastic_depth(self.mlp(self.norm2(x)), self.drop_path, "row", self.training)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                               # [N, T, D]
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)   # [N, heads, T, D/heads]
        x = F.scaled_dot_product_attention(q, k, v)                     # softmax(q k^T / sqrt(D/heads)) v
        return self.proj(x.transpose(1, 2).flatten(2))


class Block(nn.Module):
    """Pre-norm transformer block; stochastic depth (`drop_path`: zero a sample's branch) is for fine-tuning only."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + stochastic_depth(self.attn(self.norm1(x)), self.drop_path, "row", self.training)
        return x + stochastic_depth(self.mlp(self.norm2(x)), self.drop_path, "row", self.training)


def sincos_pos_embed(dim, grid_size, cls_token=False):
    """Fixed 2-D sin-cos position embedding [g*g, dim] (MAE §A.1), after a row of zeros for a cls token if asked. The
    first dim/2 channels encode the column, the last the row: [sin(pos w), cos(pos w)], w_i = 10000^(-4i/dim)."""
    assert dim % 4 == 0, f"sin-cos embedding needs a width divisible by 4, got {dim}"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    row, col = torch.meshgrid(*[torch.arange(grid_size, dtype=torch.float64)] * 2, indexing="ij")
    angles = [pos.flatten()[:, None] * omega for pos in (col, row)]    # 2 x [g*g, dim/4]
    emb = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)   # [g*g, dim]
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb])   # [1 + g*g, dim]
    return emb.float()


# --- complementary masking (FastConvMAE §3.1) ---
def complementary_masking(noise, mask_ratio=0.75):
    """Cut one permutation into V = 4 disjoint visible sets of L_keep = int(L * (1 - mask_ratio)).

    As MAE, units are ranked by increasing noise; view k sees the units ranked [k L_keep, (k + 1) L_keep).
    The four visible sets are disjoint and cover all L units, which needs 4 L_keep = L (the paper's 75 %,
    and L divisible by 4). noise [N, L] -> ids_keep [V, N, L_keep], mask [V, N, L] (1 = hidden), ids_restore [N, L].
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
class MaskedAutoencoderConvViT(nn.Module):
    def __init__(self, img_size=224, patch_size=(4, 2, 2), in_chans=3, embed_dim=(256, 384, 768), depth=(2, 2, 11),
                 num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
                 mlp_ratio=(4.0, 4.0, 4.0), norm_pix_loss=False, drop_path_rate=0.0):
        super().__init__()
        p1, p2, p3 = patch_size
        self.patch_size = p1 * p2 * p3                                  # pixels per mask unit side: 16
        if img_size % self.patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the total stride {self.patch_size}")
        self.grid, self.scales = img_size // self.patch_size, (p2 * p3, p3)   # per unit side: units, stage 1/2 cells
        self.norm_pix_loss = norm_pix_loss
        (D1, D2, D3), Dd = embed_dim, decoder_embed_dim
        dpr = iter([drop_path_rate * i / max(sum(depth) - 1, 1) for i in range(sum(depth))])  # stochastic depth rule
        # encoder, built in the official order (the seeded init depends on it)
        self.patch_embed1 = patch_embed(p1, in_chans, D1)
        self.patch_embed2 = patch_embed(p2, D1, D2)
        self.patch_embed3 = patch_embed(p3, D2, D3)
        self.patch_embed4 = nn.Linear(D3, D3)
        self.stage1_output_decode = Conv(D1, D3, p2 * p3, stride=p2 * p3)   # multi-scale fusion (§3.3)
        self.stage2_output_decode = Conv(D2, D3, p3, stride=p3)
        self.pos_embed = nn.Parameter(sincos_pos_embed(D3, self.grid)[None], requires_grad=False)   # fixed
        self.blocks1 = nn.ModuleList([CBlock(D1, mlp_ratio[0], next(dpr)) for _ in range(depth[0])])
        self.blocks2 = nn.ModuleList([CBlock(D2, mlp_ratio[1], next(dpr)) for _ in range(depth[1])])
        self.blocks3 = nn.ModuleList([Block(D3, num_heads, mlp_ratio[2], next(dpr)) for _ in range(depth[2])])
        self.norm = nn.LayerNorm(D3, eps=1e-6)
        # decoder: MAE's, without a cls token
        self.decoder_embed = nn.Linear(D3, Dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, Dd))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(Dd, self.grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(Dd, decoder_num_heads, mlp_ratio[0]) for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, self.patch_size ** 2 * in_chans)
        # the official init: xavier-uniform linears and last patch conv; other convs keep PyTorch's, LayerNorms 1, 0
        nn.init.xavier_uniform_(self.patch_embed3.proj.weight.data.flatten(1))   # the last conv as a linear layer
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _conv_stages(self, imgs, mask=None):
        """Stages 1 and 2, masked per view when `mask` [V, N, L] is given, and the stage-3 embedding: imgs
        [N, 3, H, W] -> tokens [N, L, D] (position added), stage-1 map [N, H/4, W/4, D1], stage-2 [N, H/8, W/8, D2]."""
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
        x, stage1, stage2 = self._conv_stages(imgs, mask)               # once per image, the views' masks inside
        ids_keep = ids_keep.flatten(0, 1)                               # [V*N, L_keep]
        x = gather(x.repeat(VIEWS, 1, 1), ids_keep)                     # each view's visible tokens
        fused = gather(self._fused(stage1, stage2).repeat(VIEWS, 1, 1), ids_keep)
        for blk in self.blocks3:                                        # the views as a batch of V*N
            x = blk(x)
        return self.norm(x + fused), mask.flatten(0, 1), ids_restore

    def _decoder_tokens(self, latent, ids_restore):
        """latent [V*N, L_keep, D] -> the decoder's input [V*N, L, Dd]: each view's tokens and mask tokens,
        in image order, positions added."""
        x = self.decoder_embed(latent)                                  # [V*N, L_keep, Dd]
        (VN, K, _), (N, L) = x.shape, ids_restore.shape
        x = torch.cat([x, self.mask_token.expand(VN, L - K, -1)], dim=1)   # [V*N, L, Dd]
        # view k's tokens hold ranks [k K, (k + 1) K), not [0, K): shift its gather by k K
        # (the official code rolls each view's sequence by k K first; the result is the same)
        shift = torch.arange(VIEWS, device=x.device).repeat_interleave(N)[:, None] * K
        return gather(x, (ids_restore.repeat(VIEWS, 1) - shift) % L) + self.decoder_pos_embed

    def forward_decoder(self, latent, ids_restore):
        """latent [V*N, L_keep, D] -> pred [V*N, L, p*p*3]: pixels of every unit, in image order."""
        x = self._decoder_tokens(latent, ids_restore)                   # [V*N, L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, imgs, pred, mask):
        """ConvMAE's loss over the hidden units of all views: each view is scored against the
        same targets, normalised per patch when norm_pix_loss. pred [V*N, L, P], mask [V*N, L]."""
        target = patchify(imgs, self.patch_size)                        # [N, L, p*p*3]
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return masked_mse(pred, target, mask)

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        """-> loss, pred [V*N, L, p*p*3], mask [V*N, L]."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def forward_features(self, imgs):
        """The encoder on the whole image, no mask: what the official fine-tuning model pools. [N, 3, H, W] ->
        [N, L, D], no multi-scale fusion, no `norm` (models_convvit.py: the mean of the tokens -> fc_norm)."""
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
    """Load a FastConvMAE or ConvMAE pre-training checkpoint (same layout), a path or a state_dict: a full
    one (ours, or the official ConvMAE-B release: FastConvMAE released none) strictly; an encoder-only one
    too, returning the names of the absent decoder keys (they keep their fresh init)."""
    state = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    state = state.get("model", state)
    ours = model.state_dict()
    unexpected = sorted(set(state) - set(ours))
    missing = sorted(set(ours) - set(state))
    encoder_missing = [k for k in missing if not k.startswith(("decoder_", "mask_token"))]
    if unexpected or encoder_missing:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: unexpected {unexpected[:5]}, "
                         f"missing {encoder_missing[:5]} (a fine-tuned classifier? use finetune.py)")
    model.load_state_dict(state, strict=not missing)
    return missing


# --- arguments (defaults: the 50-epoch ConvViT-B recipe of PRETRAIN.md) ---
def parser():
    """The flags; fastconvmae_mor.py adds its own to these."""
    p = argparse.ArgumentParser(description="FastConvMAE pre-training",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="fastconvmae_convvit_base_patch16", help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--data", default=None, help="image folder (DIR/train/<class>/*, DIR/<class>/* or flat); "
                                                "none: the built-in data set")
    p.add_argument("--builtin_images", type=int, default=4096, help="size of the built-in data set (no --data)")
    p.add_argument("--input_size", type=int, default=None, help="image size; default: the model's (224, tiny: 32)")
    p.add_argument("--mask_ratio", type=float, default=0.75, help="hidden in each of the 4 views (4 x 25 %% visible)")
    p.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="per-patch normalised pixel targets (PRETRAIN.md recipe)")
    # optimisation (PRETRAIN.md: AdamW, blr 6e-4, 64 x 8 GPUs, wd 0.05, cosine, 10 warmup of 50 epochs)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--warmup_epochs", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=64,
                   help="per process; effective = batch_size x accum_iter x processes")
    p.add_argument("--accum_iter", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--blr", type=float, default=6e-4, help="base lr: lr = blr x effective batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr; overrides --blr")
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--clip_grad", type=float, default=None, help="max grad norm; 0 or none: off (official: none)")
    p.add_argument("--output_dir", default=None, help="default: output/<model>")
    p.add_argument("--resume", default="", help="a checkpoint, or 'auto': output_dir/checkpoint-last.pth if present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="data workers per process")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--save_every", type=int, default=20, help="keep a copy of the checkpoint every N epochs")
    p.add_argument("--log_every", type=int, default=20, help="optimizer steps between log lines")
    return p


def get_args(argv=None):
    return check_args(parser().parse_args(argv))


def check_args(args):
    """Bad input -> one line naming the flag and the fix (sys.exit), before any work starts; returns args."""
    if args.model not in MODELS:
        sys.exit(f"error: --model {args.model} is unknown; choose one of: {', '.join(MODELS)}")
    for flag in ("epochs", "batch_size", "accum_iter", "save_every", "log_every", "builtin_images"):
        if getattr(args, flag) < 1:
            sys.exit(f"error: --{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("warmup_epochs", "num_workers", "blr", "lr", "min_lr", "weight_decay", "clip_grad"):
        value = getattr(args, flag)                                     # None: a default computed later
        if value is not None and not (math.isfinite(value) and value >= 0):
            sys.exit(f"error: --{flag} must be a finite number at least 0, got {value}")
    if not 0 < args.mask_ratio < 1:
        sys.exit(f"error: --mask_ratio must be a finite number in (0, 1), got {args.mask_ratio}")
    patch, size = math.prod(MODELS[args.model].keywords["patch_size"]), MODELS[args.model].keywords.get("img_size", 224)
    args.input_size = size if args.input_size is None else args.input_size   # patch: the total stride
    if args.input_size <= 0 or args.input_size % patch:
        sys.exit(f"error: --input_size {args.input_size} is not a positive multiple of {args.model}'s patch size "
                 f"{patch}; try {max(args.input_size // patch, 1) * patch}")
    L = (args.input_size // patch) ** 2
    if VIEWS * int(L * (1 - args.mask_ratio)) != L:                    # 4 equal, disjoint views
        sys.exit(f"error: --mask_ratio {args.mask_ratio} with --input_size {args.input_size} ({L} units) does not "
                 f"split into {VIEWS} complementary views; use --mask_ratio 0.75 and a unit count divisible by 4")
    if args.amp in ("bf16", "fp16") and not torch.cuda.is_available() and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: --amp {args.amp} on CPU is fast only with native {args.amp} matmuls; the default is none")
    args.output_dir = args.output_dir or os.path.join("output", args.model)
    return args


# --- training (main_pretrain.py + engine_pretrain.py) ---
def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases, norms (1-D) and tokens (the official decays its 3-D tokens: 2 x D)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:                                             # fixed pos embeds are not trained
            (no_decay if p.ndim <= 1 or name.endswith("_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def resume_file(args, world_size, host_group):
    """--resume FILE, or 'auto': output_dir/checkpoint-last.pth if it exists -> (path, checkpoint), or
    (path, None) for a fresh start. Every rank reads the same file, a training checkpoint of --model."""
    path = os.path.join(args.output_dir, "checkpoint-last.pth") if args.resume == "auto" else args.resume
    seen = count_ranks(bool(path) and os.path.isfile(path), host_group)   # every rank must load the same
    if not seen and args.resume in ("", "auto"):
        return path, None
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
    return path, ckpt


def restore(path, ckpt, args, model, optimizer, scaler, world_size, log):
    """Loads resume_file's weights, optimizer and scaler; returns (epoch, batch in epoch) to go on from."""
    if ckpt is None:
        return 0, 0
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


def resume(args, model, optimizer, scaler, world_size, host_group, log):
    """--resume's weights, optimizer and scaler; returns (epoch, batch in epoch), (0, 0) for a fresh start."""
    path, ckpt = resume_file(args, world_size, host_group)
    if ckpt is not None and "ema" in ckpt:                              # its EMA teacher and branches need their file
        sys.exit(f"error: --resume {path} is a Mixture-of-Reconstructors checkpoint; resume it with fastconvmae_mor.py")
    return restore(path, ckpt, args, model, optimizer, scaler, world_size, log)


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

    # 3. data: batches of (imgs [B, 3, H, W], noise [B, L]); sample i of an epoch draws its crop, flip and masking noise
    # from a stream seeded by (seed, epoch, i): the same whatever the processes; resume skips to the batches to come
    L = (args.input_size // math.prod(MODELS[args.model].keywords["patch_size"])) ** 2   # mask units
    try:
        images = load_images(args.data, "train", args.input_size, args.builtin_images)
        loader = pretrain_loader(images, args.input_size, args.batch_size, L, args.seed, rank, world_size,
                                 args.num_workers)
        demo = [loader.dataset[(0, i)] for i in range(0, len(images), max(len(images) // 8, 1))][:8]
    except ValueError as e:
        sys.exit(f"error: {e}")
    demo_imgs, demo_noise = (torch.stack(t).to(device) for t in zip(*demo))   # 8 images across the data set
    steps_per_epoch = len(loader) // args.accum_iter                   # whole optimizer steps only
    if steps_per_epoch == 0:
        sys.exit(f"error: --accum_iter {args.accum_iter} exceeds the {len(loader)} batches per epoch; lower it")
    batches_per_epoch = steps_per_epoch * args.accum_iter

    # 4. model: build, optionally compile, then wrap in DDP
    model = MODELS[args.model](img_size=args.input_size, norm_pix_loss=args.norm_pix_loss).to(device)
    model_without_ddp = model
    if args.compile:
        model = torch.compile(model)
    if distributed:                                                     # DDP warns on any grad whose strides differ
        for w in (p for p in model.parameters() if p.requires_grad):   # from the weight's, as 1x1 and depthwise conv
            w.register_hook(lambda g: g.flatten().view_as(g))           # grads do in size-1 dims: restrided, no copy
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # 5. param groups: no weight decay on biases, norms (1-D) and tokens
    groups = param_groups(model_without_ddp, args.weight_decay)

    # 6. optimizer: linear lr scaling rule (MAE §A.1: lr = blr x batch / 256), betas (0.9, 0.95)
    eff_batch = args.batch_size * args.accum_iter * world_size
    args.lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # bf16 needs no loss scaling
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16,
                              enabled=amp != "none")
    log(f"{args.model} | {sum(p.numel() for p in model_without_ddp.parameters()) / 1e6:.1f} M params | "
        f"eff. batch {eff_batch} = {args.batch_size} x {args.accum_iter} x {world_size} | lr {args.lr:.3g} | "
        f"{steps_per_epoch} steps/epoch | amp {amp} | {device}")

    # 7. schedule: linear warmup, then cosine decay, over the fractional epoch; set at the top of every step
    lr_at = partial(cosine_lr, lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs)

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
