"""FCMAE: pre-train a ConvNeXt V2 as a fully convolutional masked autoencoder.

60 % of the image's 32x32 patches are hidden; the ConvNeXt V2 encoder (whose blocks add Global
Response Normalisation, GRN) sees only the visible ones, as a sparse convolutional network
would; a one-block ConvNeXt V2 decoder fills mask tokens in at hidden positions and predicts
their pixels (MSE on normalised patches, as MAE).

Paper: Woo et al., "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders",
CVPR 2023, https://arxiv.org/abs/2301.00808. Official code: https://github.com/facebookresearch/ConvNeXt-V2.
The official encoder runs on MinkowskiEngine (sparse convolution, CUDA-only). Here plain PyTorch computes
the same on the visible units only, cut out as tiles; the depthwise convolutions see them pasted on zeros, as
a sparse convolution sees absent sites (tests/test_convnextv2_fcmae.py checks it against a reference written
over the list of visible sites). It loads the official sparse checkpoints by converting their layout.
Copy it with common.py and it runs as it does here; inside a package, make the `from common import` line
relative. The model needs only torch, torchvision's stochastic_depth and common's patchify/unpatchify.

    python convnextv2_fcmae.py --model convnextv2_fcmae_test --epochs 5 --warmup_epochs 1   # CPU demo
    torchrun --nproc_per_node=8 convnextv2_fcmae.py --data /imagenet --accum_iter 8   # 64 x 8 x 8 = 4096
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR \
        --master_port=29500 convnextv2_fcmae.py --model convnextv2_fcmae_base --data /imagenet --accum_iter 4
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from torchvision.ops import stochastic_depth
from torchvision.utils import save_image

from common import (IMAGENET_MEAN, IMAGENET_STD, cosine_lr, load_checkpoint, load_images, patchify, pretrain_loader,
                    progress, say, set_lr, unpatchify)

# Conventions: N batch, L mask units (32x32 patches), C width, p = 32. mask: 1 = hidden, 0 = visible. Maps are
# [N, C, H, W] (channels-last inside blocks, as the official); masked, the visible tiles [N*L_keep, C, s, s].


# --- the visible units as tiles (FCMAE §3: the encoder sees the visible pixels only) ---
def cut_tiles(x, ids, grid):
    """The tiles of units `ids` [N, K] of a g x g unit grid: x [N, C, g*s, g*s] -> [N*K, C, s, s]."""
    N, C, H, W = x.shape
    x = x.permute(0, 2, 3, 1).reshape(N, grid, H // grid, grid, W // grid, C)   # [N, g, s, g, s, C]
    tiles = x[torch.arange(N, device=x.device)[:, None], ids // grid, :, ids % grid]   # [N, K, s, s, C]
    return tiles.flatten(0, 1).permute(0, 3, 1, 2)


def paste_tiles(tiles, ids, grid):
    """cut_tiles undone: tiles [N*K, C, s, s] in place on a zero canvas [N, C, g*s, g*s] (hidden units: 0)."""
    (N, K), (C, s) = ids.shape, tiles.shape[1:3]
    canvas = tiles.new_zeros(N, grid, s, grid, s, C)
    canvas[torch.arange(N, device=ids.device)[:, None], ids // grid, :, ids % grid] = \
        tiles.permute(0, 2, 3, 1).unflatten(0, (N, K))
    return canvas.view(N, grid * s, grid * s, C).permute(0, 3, 1, 2)


# --- ConvNeXt V2 blocks (names as the official dense convnextv2.py) ---
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of [N, C, H, W] maps (the official `channels_first` LayerNorm)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalisation (ConvNeXt V2 §4): each channel's L2 norm over space, divided by its mean
    over channels, rescales the features: x + gamma * (x * Nx) + beta. With over_batch, x [N*K, s, s, C] holds
    the visible tiles of the whole batch and the norm runs over all of them at once, not per image: the official
    sparse GRN (MinkowskiGRN) of the FCMAE encoder."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x, over_batch=False):                             # [N, H, W, C]
        gx = torch.linalg.vector_norm(x, dim=(0, 1, 2) if over_batch else (1, 2), keepdim=True)   # [N or 1, 1, 1, C]
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class Block(nn.Module):
    """ConvNeXt V2 block: 7x7 depthwise conv, LayerNorm, 1x1 up (4C), GELU, GRN, 1x1 down, residual.
    `drop_path` (stochastic depth: a whole sample's branch is zeroed, the others rescaled) is for fine-tuning.

    With `units` = (ids [N, K], grid), x is the visible tiles [N*K, C, s, s], and every operator but the depthwise
    convolution acts per position, on the tiles only (8 C^2 multiply-adds a position: nearly all the FLOPs); the
    depthwise one (49 C) sees them pasted on a zero canvas: hidden neighbours count 0, as absent sparse sites."""

    def __init__(self, dim, drop_path=0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.drop_path = drop_path

    def forward(self, x, units=None):                                   # [N, C, H, W] or [N*K, C, s, s]
        h = self.dwconv(x) if units is None else cut_tiles(self.dwconv(paste_tiles(x, *units)), *units)
        h = self.act(self.pwconv1(self.norm(h.permute(0, 2, 3, 1))))    # [N, H, W, 4C]: channels last
        h = self.pwconv2(self.grn(h, over_batch=units is not None)).permute(0, 3, 1, 2)   # [N, C, H, W]
        n = x.shape[0] if units is None else units[0].shape[0]          # drop path per image, not per tile
        return x + stochastic_depth(h.unflatten(0, (n, -1)), self.drop_path, "row", self.training).flatten(0, 1)


class ConvNeXtV2(nn.Module):
    """The encoder: a 4x4 stem, then four stages of blocks, stages 1-3 each after a 2x2 downsampling.

    forward(imgs, ids_keep) with ids_keep [N, L_keep] (the visible 32 px units, in row-major order) is the FCMAE
    encoder: the official sparse encoder's numbers, computed on the visible units' tiles only. The output
    [N, C3, H/32, W/32] is zero at hidden units."""

    def __init__(self, in_chans=3, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), drop_path_rate=0.0):
        super().__init__()
        self.downsample_layers = nn.ModuleList([nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4),
                                                              LayerNorm2d(dims[0], eps=1e-6))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(LayerNorm2d(dims[i], eps=1e-6),
                                                        nn.Conv2d(dims[i], dims[i + 1], 2, stride=2)))
        dpr = [drop_path_rate * j / max(sum(depths) - 1, 1) for j in range(sum(depths))]
        self.stages = nn.ModuleList([nn.Sequential(*[Block(dims[i], dpr[sum(depths[:i]) + j])
                                                     for j in range(depths[i])]) for i in range(4)])

    def forward(self, imgs, ids_keep=None):
        units = None if ids_keep is None else (ids_keep, imgs.shape[-1] // 32)   # 32: the total stride
        x = imgs if units is None else cut_tiles(imgs, *units)          # [N*K, 3, 32, 32]: the visible pixels
        for down, stage in zip(self.downsample_layers, self.stages):
            x = down(x)                                                 # its strides never cross a 32 px unit
            for blk in stage:
                x = blk(x, units)                                       # [N, C, H, W] or [N*K, C, s, s]
        return x if units is None else paste_tiles(x, *units)           # [N, C3, H/32, W/32]


# --- masking (ConvNeXt V2 §3: random 32x32 patches, 60 %) ---
def random_masking(noise, mask_ratio):
    """Keep the L_keep = int(L * (1 - mask_ratio)) units with the smallest noise (MAE §3): noise [N, L] -> ids_keep
    [N, L_keep] (by increasing noise), mask [N, L] (1 = hidden), ids_restore [N, L] (gather [kept, hidden] with it)."""
    len_keep = int(noise.shape[1] * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)                           # ascending: small = keep
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = (ids_restore >= len_keep).float()                            # fp32 under amp too
    return ids_shuffle[:, :len_keep], mask, ids_restore


# --- the model: sparse-equivalent encoder, one-block decoder with mask tokens, MAE loss ---
class FCMAE(nn.Module):
    def __init__(self, img_size=224, in_chans=3, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768),
                 decoder_embed_dim=512, decoder_depth=1, patch_size=32, norm_pix_loss=False, drop_path_rate=0.0):
        super().__init__()
        if patch_size != 32:
            raise ValueError(f"patch_size is the encoder's total stride, 32, not {patch_size}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of the {patch_size} px mask patch")
        self.patch_size, self.grid, self.norm_pix_loss = patch_size, img_size // patch_size, norm_pix_loss
        self.encoder = ConvNeXtV2(in_chans, depths, dims, drop_path_rate)
        self.proj = nn.Conv2d(dims[-1], decoder_embed_dim, 1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_embed_dim, 1, 1))
        self.decoder = nn.Sequential(*[Block(decoder_embed_dim) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_embed_dim, patch_size ** 2 * in_chans, 1)
        # the weights the official FCMAE ends with: its sparse encoder initialises every kernel and linear with a
        # truncated normal of std .02, then FCMAE's own init calls timm's trunc_normal_ without a std on depthwise
        # kernels, linears and dense convolutions: std 1 (cut at +-2); the downsampling convolutions keep .02; the
        # dense decoder block's nn.Linear layers keep PyTorch's init, biases too; other biases 0; LayerNorm 1, 0 and
        # GRN 0 as built; the mask token normal .02
        for name, m in self.named_modules():
            if isinstance(m, nn.Conv2d):
                downsample = name.startswith("encoder.downsample_layers.") and not name.endswith("0.0")
                nn.init.trunc_normal_(m.weight.data.view(m.weight.shape[0], -1), std=0.02 if downsample else 1.0,
                                      a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and name.startswith("encoder."):
                nn.init.trunc_normal_(m.weight, std=1.0, a=-2.0, b=2.0)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """imgs [N, 3, H, W] -> latent [N, C3, H/32, W/32] (zero at hidden units), mask [N, L]."""
        if imgs.shape[-2:] != (self.grid * self.patch_size,) * 2:
            raise ValueError(f"images are {tuple(imgs.shape[-2:])}, this model was built for "
                             f"{self.grid * self.patch_size} px (pass img_size= to the builder)")
        # normal noise, as fcmae.py. The loader passes uniform noise: other masks, the same mask distribution
        # (the argsort of i.i.d. noise picks every set of L_keep units with the same chance)
        if noise is None:
            noise = torch.randn(imgs.shape[0], self.grid ** 2, device=imgs.device)
        ids_keep, mask, _ = random_masking(noise, mask_ratio)
        return self.encoder(imgs, ids_keep.sort(dim=1).values), mask   # the tiles in row-major order, as sparse sites

    def forward_decoder(self, latent, mask):
        """latent [N, C3, g, g] -> pred [N, L, p*p*3]: mask tokens at hidden units, one dense block."""
        x = self.proj(latent)                                           # [N, Dd, g, g]
        x = torch.where(mask.view(-1, 1, self.grid, self.grid).bool(), self.mask_token.to(x.dtype), x)
        for blk in self.decoder:
            x = blk(x)
        return self.pred(x).flatten(2).transpose(1, 2)                  # [N, L, p*p*3]

    def forward_loss(self, imgs, pred, mask):
        """MAE's loss at 32 px: mean squared error over hidden units, each target patch normalised by its own
        mean and (unbiased) variance when norm_pix_loss."""
        target = patchify(imgs, self.patch_size)                        # [N, L, p*p*3]
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)                      # [N, L] per unit
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.6, noise=None):
        latent, mask = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, mask)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def forward_features(self, imgs):
        """The encoder on the whole image, no mask: what the official fine-tuning model pools. [N, 3, H, W] ->
        [N, C3, H/32, W/32], the dense encoder (convnextv2.py: global average pool -> its own `norm`)."""
        return self.encoder(imgs)

    def pred_to_pixels(self, imgs, pred):
        """pred [N, L, p*p*3] -> images in the input's normalisation; undoes norm_pix_loss per patch."""
        if self.norm_pix_loss:
            target = patchify(imgs, self.patch_size)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        return unpatchify(pred, self.patch_size)


# --- model builders (fcmae.py: the eight paper sizes, decoder 512-d, one block) ---
MODELS = {
    "convnextv2_fcmae_atto": partial(FCMAE, depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)),
    "convnextv2_fcmae_femto": partial(FCMAE, depths=(2, 2, 6, 2), dims=(48, 96, 192, 384)),
    "convnextv2_fcmae_pico": partial(FCMAE, depths=(2, 2, 6, 2), dims=(64, 128, 256, 512)),
    "convnextv2_fcmae_nano": partial(FCMAE, depths=(2, 2, 8, 2), dims=(80, 160, 320, 640)),
    "convnextv2_fcmae_tiny": partial(FCMAE, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "convnextv2_fcmae_base": partial(FCMAE, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "convnextv2_fcmae_large": partial(FCMAE, depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
    "convnextv2_fcmae_huge": partial(FCMAE, depths=(3, 3, 27, 3), dims=(352, 704, 1408, 2816)),
    # for tests and CPU demos: 64 px (the total stride is 32: a 2 x 2 unit grid), one block per stage
    "convnextv2_fcmae_test": partial(FCMAE, img_size=64, depths=(1, 1, 1, 1), dims=(16, 32, 64, 128),
                                     decoder_embed_dim=64),
}


# --- official checkpoints: MinkowskiEngine layout -> ours ---
def from_sparse_layout(state):
    """Convert a MinkowskiEngine-layout FCMAE state_dict to this file's dense layout (utils.py's
    remap_checkpoint_keys, keeping the `encoder.` prefix). Sparse kernels are [k*k, C_in, C_out] (depthwise
    [k*k, C]) with the offsets in column-major order: to [C_out, C_in, k, k], then the two spatial axes
    swapped. `.ln` / `.linear` wrappers drop out of the names; GRN [1, C] gains two axes; biases [1, C] lose one."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if parts[-1] == "kernel":
            ks = math.isqrt(v.shape[0])
            v = v.reshape(v.shape[0], -1, v.shape[-1])                  # [k*k, in, out]; depthwise [k*k, 1, C]
            v = v.permute(2, 1, 0).reshape(v.shape[2], v.shape[1], ks, ks).transpose(3, 2)
            parts[-1] = "weight"
        parts = [p for p in parts if p not in ("ln", "linear")]
        if parts[-1] == "bias" and v.ndim != 1:
            v = v.reshape(-1)
        elif ".grn." in k and v.ndim == 2:
            v = v[None, None]
        out[".".join(parts)] = v.contiguous()
    return out


def is_sparse_layout(state):
    return any(k.endswith(".kernel") or ".ln." in k or ".linear." in k for k in state)


def load_pretrained(model, checkpoint):
    """Load an official FCMAE checkpoint (MinkowskiEngine layout, converted) or one of ours into `model`, a path
    or a state_dict. An official fine-tuned ConvNeXt V2 (no `encoder.` prefix) loads into model.encoder (its
    `norm` and `head` are left out). Returns the keys of `model` the checkpoint did not have."""
    state = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    state = state.get("model", state)
    state = from_sparse_layout(state) if is_sparse_layout(state) else state
    if not any(k.startswith("encoder.") for k in state) and any(k.startswith("stages.") for k in state):
        state = {"encoder." + k: v for k, v in state.items() if not k.startswith(("norm.", "head."))}
    ours = model.state_dict()
    unexpected = sorted(set(state) - set(ours))
    missing = sorted(set(ours) - set(state))
    encoder_missing = [k for k in missing if k.startswith("encoder.")]
    wrong = [k for k in set(state) & set(ours) if state[k].shape != ours[k].shape]
    if unexpected or encoder_missing or wrong:
        raise ValueError(f"checkpoint is neither the official FCMAE layout nor ours for this model: unexpected "
                         f"{unexpected[:3]}, missing {encoder_missing[:3]}, other shapes {sorted(wrong)[:3]}")
    model.load_state_dict(state, strict=False)
    return missing


# --- arguments (defaults: TRAINING.md's FCMAE pre-training recipe) ---
def get_args(argv=None):
    p = argparse.ArgumentParser(description="ConvNeXt V2 FCMAE pre-training",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="convnextv2_fcmae_base", help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--data", default=None, help="image folder (DIR/train/<class>/*, DIR/<class>/* or flat); "
                                                "none: the built-in data set")
    p.add_argument("--builtin_images", type=int, default=4096, help="size of the built-in data set (no --data)")
    p.add_argument("--input_size", type=int, default=None, help="image size; default: the model's (224, test: 64)")
    p.add_argument("--mask_ratio", type=float, default=0.6, help="fraction of 32x32 units hidden (paper: 60 %%)")
    p.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="per-patch normalised pixel targets (TRAINING.md recipe)")
    # optimisation (TRAINING.md, main_pretrain.py: AdamW (0.9, 0.95), blr 1.5e-4, batch 4096, wd 0.05, cosine)
    p.add_argument("--epochs", type=int, default=1600)
    p.add_argument("--warmup_epochs", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=64,
                   help="per process; effective = batch_size x accum_iter x processes")
    p.add_argument("--accum_iter", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr x effective batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr; overrides --blr")
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--clip_grad", type=float, default=None, help="max grad norm; 0 or none: off (FCMAE clips none)")
    p.add_argument("--output_dir", default=None, help="default: output/<model>")
    p.add_argument("--resume", default="", help="a checkpoint, or 'auto': output_dir/checkpoint-last.pth if present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="data workers per process")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, none on "
                   "CPU (the official: fp32); fp16 is refused: the official init drives decoder outputs past its range")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--save_every", type=int, default=20, help="keep a copy of the checkpoint every N epochs")
    p.add_argument("--log_every", type=int, default=20, help="optimizer steps between log lines")
    return check_args(p.parse_args(argv))


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
    if args.amp == "fp16":         # std-1 init: pred reaches ~1e6 at visible units (outside the loss), proj ~1e5
        sys.exit("error: --amp fp16 overflows with FCMAE's official init (decoder outputs far above fp16's 65504); "
                 "use --amp bf16 or none (the official fp32)")
    args.input_size = MODELS[args.model].keywords.get("img_size", 224) if args.input_size is None else args.input_size
    if args.input_size <= 0 or args.input_size % 32:                    # the mask patch and the total stride
        sys.exit(f"error: --input_size {args.input_size} is not a positive multiple of {args.model}'s mask patch size "
                 f"32; try {max(args.input_size // 32, 1) * 32}")
    if args.amp in ("bf16", "fp16") and not torch.cuda.is_available() and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: --amp {args.amp} on CPU is fast only with native {args.amp} matmuls; the default is none")
    args.output_dir = args.output_dir or os.path.join("output", args.model)
    return args


# --- training (main_pretrain.py + engine_pretrain.py) ---
def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases and norms (1-D) nor on the mask token. The official decays
    the token (timm's rule skips 1-D tensors only, and it is 4-D); we keep one rule for all five methods, and
    it concerns one vector of decoder_embed_dim values. GRN's gamma and beta (4-D) are decayed, as the official's."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
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
    p = model.patch_size
    hidden = unpatchify(mask[..., None].expand(-1, -1, p * p * 3), p).cpu()  # [N, 3, H, W], 1 = hidden
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    orig = imgs.cpu() * std + mean                                     # back to [0, 1] pixels
    recon = model.pred_to_pixels(imgs, pred.float()).cpu() * std + mean
    columns = [orig, orig * (1 - hidden) + 0.5 * hidden, recon, orig * (1 - hidden) + recon * hidden]
    grid = torch.stack(columns, dim=1).flatten(0, 1)                    # [4N, 3, H, W], row by row
    scale = -(-256 // (4 * grid.shape[-1]))                             # nearest upscaling: rows >= 256 px
    save_image(nn.functional.interpolate(grid.clamp(0, 1), scale_factor=scale, mode="nearest"), path, nrow=4,
               padding=1)


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
    L = (args.input_size // 32) ** 2                                    # mask units
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
