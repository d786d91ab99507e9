"""Fine-tune, linear-probe or evaluate the encoder of any of the five pre-training methods.

    python finetune.py --model mae_vit_base_patch16 --finetune mae_pretrain_vit_base.pth --data /imagenet
    python finetune.py --model mae_vit_base_patch16 --finetune ... --linprobe
    python finetune.py --model mae_vit_base_patch16 --eval --resume mae_finetuned_vit_base.pth --data /imagenet
    python finetune.py --model mae_vit_tiny --finetune output/mae_vit_tiny/checkpoint-last.pth   # built-in data

--model is a pre-training model's name (its prefix names the method file). The classifier keeps that file's encoder
(modules, names and code) and adds the head of the official fine-tuning model, whose checkpoints load strictly.
The defaults are each method's published fine-tuning recipe (RECIPES): layer-wise lr decay by the method's own
layer-id rule, drop path, AdamW, warmup + cosine, MixUp/CutMix, label smoothing, RandAugment, random erasing.
--linprobe is MAE's linear-probing protocol: frozen encoder, BatchNorm without affine, linear head, LARS.
--knn trains nothing: DINO's weighted k-NN accuracy on the probe's frozen features (k 20, T 0.07).
Without --finetune the same classifier trains from scratch: the baseline that pre-training is measured against.
"""
import argparse
import copy
import itertools
import json
import math
import os
import pickle
import signal
import sys
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import v2

import convmae
import convnextv2_fcmae
import fastconvmae
import mae
import simmim
from augment import ProbeCrop, RandAugment
from common import (BICUBIC, IMAGENET_MEAN, IMAGENET_STD, ImageFiles, cosine_lr, ignore_stop_signals, load_checkpoint,
                    load_images, pretrain_loader, progress, say, set_lr)
from mae import StopSignals, count_ranks, save_training_state, setup_distributed   # the loop's helpers

METHODS = {"mae": mae, "convmae": convmae, "fastconvmae": fastconvmae, "simmim": simmim, "convnextv2": convnextv2_fcmae}
MODELS = {name: method for method, module in METHODS.items() for name in module.MODELS}   # model name -> method

# --- fine-tuning recipes: the official defaults per method (and size) ---
# MAE FINETUNE.md / main_finetune.py: the base of every recipe here
_MAE = dict(epochs=100, warmup_epochs=5, batch_size=32, blr=5e-4, min_lr=1e-6, weight_decay=0.05, layer_decay=0.65,
            drop_path=0.1, mixup=0.8, cutmix=1.0, smoothing=0.1, reprob=0.25, clip_grad=0.0, input_size=None,
            layer_decay_type="single", window_size=None, model_ema=False, schedule="mae")
# SimMIM configs/*finetune*: lr 1.25e-3 per 512 images (= 6.25e-4 per 256), 20 warmup epochs, clip 5, timm's cosine
# from and down to 2.5e-7 per 512 images (min_lr None: that, at the run's batch; see simmim_lr)
_SIMMIM = dict(_MAE, warmup_epochs=20, blr=6.25e-4, min_lr=None, clip_grad=5.0, schedule="simmim")
# ConvNeXt V2 TRAINING.md: base (group layer decay), tiny, atto (no MixUp/CutMix); every command keeps an EMA
_CONVNEXT_BASE = dict(_MAE, warmup_epochs=20, blr=6.25e-4, layer_decay=0.6, layer_decay_type="group", model_ema=True)
_CONVNEXT_TINY = dict(_MAE, epochs=300, warmup_epochs=40, blr=8e-4, layer_decay=0.9, drop_path=0.2, model_ema=True)
_CONVNEXT_ATTO = dict(_MAE, epochs=600, warmup_epochs=0, blr=2e-4, layer_decay=0.9, weight_decay=0.3,
                      mixup=0.0, cutmix=0.0, smoothing=0.2, model_ema=True)
RECIPES = {
    "mae_vit_large_patch16": dict(_MAE, epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.2),
    "mae_vit_huge_patch14": dict(_MAE, epochs=50, blr=1e-3, layer_decay=0.75, drop_path=0.3),
    "simmim_vit_base_patch16": _SIMMIM, "simmim_vit_tiny": _SIMMIM,
    "simmim_swin_base_w6": dict(_SIMMIM, layer_decay=0.8, input_size=224, window_size=7),   # 192 px, window 6 -> 224, 7
    "simmim_swin_tiny": dict(_SIMMIM, layer_decay=0.8),
    **{f"convnextv2_fcmae_{s}": _CONVNEXT_ATTO for s in ("atto", "femto", "pico", "nano", "test")},
    "convnextv2_fcmae_tiny": _CONVNEXT_TINY,
    **{f"convnextv2_fcmae_{s}": _CONVNEXT_BASE for s in ("base", "large", "huge")},
}                                                               # any other name: _MAE (ConvMAE FINETUNE.md is MAE's)
# MAE main_linprobe.py: LARS, blr 0.1, no weight decay, 90 epochs, 16384 images per step, light augmentation
LINPROBE = dict(epochs=90, warmup_epochs=10, batch_size=512, blr=0.1, min_lr=0.0, weight_decay=0.0, layer_decay=1.0,
                drop_path=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, reprob=0.0, clip_grad=0.0, model_ema=False,
                schedule="mae")


# --- classifiers: the official fine-tuning models, made of a pre-training model's encoder ---
class Classifier(nn.Module):
    """head(features(imgs)), layer decay, checkpoint adaptation, the scratch init, the probe head. Subclasses hold a
    pre-training model's encoder modules (the same objects, the official names) and `encode`, its forward_features;
    they define features (imgs -> [N, D]) and num_layers (the top layer id), and what their official code changes."""
    new_keys = ("head.", "fc_norm.")            # what a pre-training checkpoint cannot hold
    linear_probe = False
    scratch_init = (nn.Linear,)                 # what init_for_scratch re-inits (timm's ViT: not the patch conv)
    blocks_prefix = "blocks."                   # the transformer blocks, one layer id each

    def forward(self, imgs):
        with torch.no_grad() if self.linear_probe else nullcontext():   # a frozen encoder keeps no graph
            features = self.features(imgs)                              # [N, D]
        return self.head(features.float())                              # the probe's BatchNorm: fp32 under amp

    def layer_id(self, name):
        """MAE util/lr_decay.py (also ConvMAE's, SimMIM's get_vit_layer): embeddings 0, block i i + 1, the rest top."""
        if name.startswith(self.blocks_prefix):
            return int(name.split(".")[1]) + 1
        if name in ("cls_token", "pos_embed") or name.startswith(("patch_embed", "blocks1", "blocks2")):
            return 0
        return self.num_layers

    def no_weight_decay(self, name, p):                                 # SimMIM's ViT rule too (biases are 1-D)
        return p.ndim == 1 or name in ("pos_embed", "cls_token")

    def adapt(self, state):
        """Any checkpoint's state_dict in this model's names: no `encoder.` prefix (SimMIM, FCMAE), the position
        embedding resized to this grid; what cannot be mapped keeps its name (reported as unused)."""
        state = {k.removeprefix("encoder."): v for k, v in state.items()}
        if "pos_embed" in state and hasattr(self, "pos_embed"):
            extra = int(hasattr(self, "cls_token"))                     # ViT's cls row; ConvViT has none
            grid = math.isqrt(self.pos_embed.shape[1] - extra)
            state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], grid, extra)
        return state

    def param_groups(self, weight_decay, layer_decay):
        """AdamW groups per (layer id, decay), lr_scale = layer_decay ** (num_layers - id): BEiT's layer decay."""
        groups = {}
        for name, p in ((name, p) for name, p in self.named_parameters() if p.requires_grad):
            wd = 0.0 if self.no_weight_decay(name, p) else weight_decay
            layer = self.layer_id(name)
            group = groups.setdefault((layer, wd), {"params": [], "names": [], "weight_decay": wd, "layer_id": layer,
                                                    "lr_scale": layer_decay ** (self.num_layers - layer)})
            group["params"].append(p)
            group["names"].append(name)
        return list(groups.values())

    def init_for_scratch(self):
        """The official fine-tuning model's init, not the pre-training file's (FCMAE's ends with std-1 weights, which
        barely train): truncated normal .02 for `scratch_init` modules and tokens; the head keeps its own init."""
        if not self.scratch_init:
            return
        for m in self.modules():
            if isinstance(m, self.scratch_init) and m is not self.head:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for name in ("cls_token", "pos_embed"):
            if hasattr(self, name):
                nn.init.trunc_normal_(getattr(self, name), std=0.02)

    def make_linear_probe(self):
        """MAE main_linprobe.py: freeze all but the head, head = BatchNorm1d(no affine) -> Linear (std .01)."""
        self.requires_grad_(False)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(self.head.in_features, affine=False, eps=1e-6), self.head)
        self.head.requires_grad_(True)
        self.linear_probe = True


def linear_head(dim, num_classes, std, scale=1.0):
    """The official heads' init: truncated normal (nn.init's bounds, +-2 absolute, are timm's), zero bias, x scale."""
    head = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(head.weight, std=std)
    nn.init.zeros_(head.bias)
    head.weight.data.mul_(scale)
    return head


def interpolate_pos_embed(pos, grid, extra):
    """[1, extra + g*g, D] -> [1, extra + grid*grid, D], bicubic, `extra` (cls) rows kept (MAE util/pos_embed.py)."""
    g = math.isqrt(pos.shape[1] - extra)
    if g == grid or g * g != pos.shape[1] - extra:                      # same grid, or not one (reported later)
        return pos
    tokens = pos[:, extra:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    tokens = F.interpolate(tokens, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :extra], tokens.permute(0, 2, 3, 1).flatten(1, 2).to(pos.dtype)], dim=1)


def interpolate_rel_pos_table(table, side, extra=0):
    """A relative position bias table [s*s + extra, heads] -> [side*side + extra, heads] as SimMIM's utils.py: the old
    offsets on a geometric grid reaching about side // 2, scipy's interp2d(kind='cubic') at the integer ones, `extra`
    (cls) rows kept. interp2d on a grid is the tensor-product not-a-knot cubic spline, clamped to it: here in fp64."""
    s = math.isqrt(table.shape[0] - extra)
    if s == side or s * s != table.shape[0] - extra:
        return table
    if s < 4:
        raise ValueError(f"a relative position table of {s} x {s} offsets is too small for SimMIM's cubic resize")
    left, right = 1.01, 1.5                                             # bisection for the ratio q
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (s // 2)) / (1.0 - q) > side // 2:               # 1 + q + ... + q^(s//2 - 1)
            right = q
        else:
            left = q
    far = list(itertools.accumulate(q ** i for i in range(s // 2)))   # 1, 1 + q, 1 + q + q^2, ...
    x = torch.tensor([-d for d in reversed(far)] + [0.0] + far, dtype=torch.float64)
    S = cubic_spline_matrix(x, torch.arange(-(side // 2), side // 2 + 1, dtype=torch.float64))   # [side, s]
    z = table[:s * s].T.reshape(-1, s, s).double()                      # [heads, s, s]: z[h, row (y), column (x)]
    z = (S @ z @ S.T).reshape(-1, side * side).T                        # [side * side, heads]
    return torch.cat([z.to(table.dtype), table[s * s:]])


def cubic_spline_matrix(x, u):
    """[len(u), len(x)]: the not-a-knot cubic spline through (x, y) at u clamped to [x_0, x_n-1], a matrix acting on y.
    Its second derivatives M: n - 2 continuity equations and a continuous third derivative at x_1 and x_n-2."""
    n, h = len(x), x[1:] - x[:-1]
    A, B, eye = torch.zeros(n, n, dtype=x.dtype), torch.zeros(n, n, dtype=x.dtype), torch.eye(n, dtype=x.dtype)
    for i in range(1, n - 1):                                           # A M = B y
        A[i, i - 1:i + 2] = torch.stack([h[i - 1], 2 * (h[i - 1] + h[i]), h[i]])
        B[i, i - 1:i + 2] = torch.stack([6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]])
    A[0, :3] = torch.stack([-h[1], h[0] + h[1], -h[0]])
    A[-1, -3:] = torch.stack([-h[-1], h[-2] + h[-1], -h[-2]])
    M = torch.linalg.solve(A, B)                                        # [n, n]: M = that matrix @ y
    u = u.clamp(x[0], x[-1])
    k = (torch.searchsorted(x, u, right=True) - 1).clamp(0, n - 2)
    a, b, hk = (x[k + 1] - u)[:, None], (u - x[k])[:, None], h[k][:, None]
    return (M[k] * a ** 3 + M[k + 1] * b ** 3) / (6 * hk) + (eye[k] - M[k] * hk ** 2 / 6) * a / hk + \
        (eye[k + 1] - M[k + 1] * hk ** 2 / 6) * b / hk


class ViT(Classifier):
    """MAE's models_vit.py: the encoder on all patches with a trainable position embedding, then the mean of the
    patch tokens -> fc_norm -> head (global_pool, fine-tuning: no `norm`) or the cls token after `norm` (probe)."""

    def __init__(self, pre, num_classes, global_pool=True):
        super().__init__()
        D = pre.cls_token.shape[-1]
        self.cls_token, self.patch_embed, self.blocks = pre.cls_token, pre.patch_embed, pre.blocks
        self.pos_embed = pre.pos_embed.requires_grad_(True)            # fixed in pre-training, trained here
        self.encode, self.global_pool = pre.forward_features, global_pool   # mae.py's: [N, 1 + L, D], before `norm`
        if global_pool:
            self.fc_norm = nn.LayerNorm(D, eps=1e-6)
        else:
            self.norm = pre.norm
            self.new_keys = ("head.",)
        self.head = linear_head(D, num_classes, std=2e-5)               # main_finetune.py
        self.num_layers = len(self.blocks) + 1

    def features(self, imgs):                                           # [N, 3, H, W] -> [N, D]
        x = self.encode(imgs)                                           # [N, 1 + L, D]
        return self.fc_norm(x[:, 1:].mean(dim=1)) if self.global_pool else self.norm(x)[:, 0]


class ConvViT(Classifier):
    """ConvMAE's models_convvit.py (FastConvMAE fine-tunes the same model): the convolution stages and transformer
    stage on the whole image, no multi-scale fusion, no `norm`; the mean of the stage-3 tokens -> fc_norm -> head."""
    blocks_prefix = "blocks3."

    def __init__(self, pre, num_classes):
        super().__init__()
        D = pre.pos_embed.shape[-1]
        for name in ("patch_embed1", "patch_embed2", "patch_embed3", "patch_embed4", "blocks1", "blocks2", "blocks3"):
            setattr(self, name, getattr(pre, name))
        self.pos_embed = pre.pos_embed.requires_grad_(True)            # [1, L, D], no cls row; trained here
        self.encode = pre.forward_features                              # convmae.py's: [N, L, D], no fusion, no `norm`
        self.fc_norm = nn.LayerNorm(D, eps=1e-6)
        self.head = linear_head(D, num_classes, std=2e-5)               # main_finetune.py
        self.num_layers = len(self.blocks3) + 1

    def features(self, imgs):
        return self.fc_norm(self.encode(imgs).mean(dim=1))


class SimMIMViT(Classifier):
    """SimMIM's vision_transformer.py as its fine-tuning config builds it (USE_RPB, mean pooling): each block its own
    copy of the shared relative position bias; mean of patch tokens -> fc_norm -> head (init x 0.001); no `norm`."""
    scratch_init = ()                           # the method file's init is BEiT's, as the fine-tuning model's

    def __init__(self, pre, num_classes):
        super().__init__()
        enc = pre.encoder
        self.patch_embed, self.cls_token, self.blocks = enc.patch_embed, enc.cls_token, enc.blocks
        shared = enc.rel_pos_bias
        for blk in self.blocks:                                         # names as the official per-block bias
            blk.attn.relative_position_bias_table = nn.Parameter(shared.relative_position_bias_table.detach().clone())
            blk.attn.register_buffer("relative_position_index", shared.relative_position_index.clone())
        self.grid = enc.grid
        self.fc_norm = nn.LayerNorm(enc.num_features, eps=1e-6)
        self.head = linear_head(enc.num_features, num_classes, std=0.02, scale=0.001)   # init_scale
        self.num_layers = len(self.blocks) + 1

    def features(self, imgs):                   # simmim.py's shares one table: a copy with one table per block
        x = self.patch_embed(imgs)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for blk in self.blocks:
            bias = blk.attn.relative_position_bias_table[blk.attn.relative_position_index].permute(2, 0, 1)
            x = blk(x, bias)
        return self.fc_norm(x[:, 1:].mean(dim=1))

    def adapt(self, state):
        """utils.py remap_pretrained_keys_vit: the shared bias table copied into every block, resized to this grid."""
        state = super().adapt(state)
        shared = state.pop("rel_pos_bias.relative_position_bias_table", None)
        state.pop("rel_pos_bias.relative_position_index", None)
        for i, blk in enumerate(self.blocks):
            key = f"blocks.{i}.attn.relative_position_bias_table"
            if shared is not None and key not in state:
                state[key] = shared.clone()
            if key in state:
                state[key] = interpolate_rel_pos_table(state[key], 2 * self.grid - 1, extra=3)
            state[f"blocks.{i}.attn.relative_position_index"] = blk.attn.relative_position_index   # ours
        return state


class Swin(Classifier):
    """SimMIM's swin_transformer.py: stages, `norm`, mean over positions, head. Fine-tuned at another size and
    window than pre-trained (192 px, 6 -> 224 px, 7)."""
    new_keys = ("head.",)
    scratch_init = ()                           # the method file's init is Swin's, as the fine-tuning model's

    def __init__(self, pre, num_classes):
        super().__init__()
        enc = pre.encoder
        self.patch_embed, self.layers, self.norm = enc.patch_embed, enc.layers, enc.norm
        self.encode = pre.forward_features                              # simmim.py's: [N, T, C] after `norm`
        self.depths = [len(layer.blocks) for layer in self.layers]
        self.head = linear_head(enc.num_features, num_classes, std=0.02)
        self.num_layers = sum(self.depths) + 1

    def features(self, imgs):
        return self.encode(imgs).mean(dim=1)

    def layer_id(self, name):                                           # SimMIM optimizer.py get_swin_layer
        if name == "mask_token" or name.startswith("patch_embed"):
            return 0
        if name.startswith("layers."):
            _, stage, part, block = name.split(".")[:4]
            if part == "downsample":                                    # with the last block of its stage
                return sum(self.depths[:int(stage) + 1])
            return sum(self.depths[:int(stage)]) + int(block) + 1
        return self.num_layers

    def no_weight_decay(self, name, p):
        return p.ndim == 1 or name.endswith(".bias") or "relative_position_bias_table" in name

    def adapt(self, state):
        """utils.py remap_pretrained_keys_swin: tables resized to this window; index and shift-mask buffers are ours."""
        state = super().adapt(state)
        ours = self.state_dict()
        for k in list(state):
            if k.endswith("relative_position_bias_table") and k in ours:
                state[k] = interpolate_rel_pos_table(state[k], math.isqrt(ours[k].shape[0]))
            elif k.endswith(("relative_position_index", "attn_mask")):
                del state[k]
        state.update({k: v for k, v in ours.items() if k.endswith(("relative_position_index", "attn_mask"))})
        return state


class ConvNeXtV2(Classifier):
    """ConvNeXt V2's convnextv2.py: the dense encoder (per-image GRN), global average pooling, `norm`, head."""
    new_keys = ("head.", "norm.")
    scratch_init = (nn.Linear, nn.Conv2d)

    def __init__(self, pre, num_classes, layer_decay_type="single"):
        super().__init__()
        enc = pre.encoder
        self.downsample_layers, self.stages = enc.downsample_layers, enc.stages
        self.encode = pre.forward_features                              # convnextv2_fcmae.py's: [N, C, H/32, W/32]
        self.depths = [len(stage) for stage in self.stages]
        D = self.downsample_layers[-1][1].out_channels
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = linear_head(D, num_classes, std=0.02, scale=0.001)  # head_init_scale
        self.layer_decay_type = layer_decay_type
        self.num_layers = 13 if layer_decay_type == "group" else sum(self.depths) + 1

    def features(self, imgs):
        return self.norm(self.encode(imgs).mean(dim=(-2, -1)))

    def layer_id(self, name):
        """optim_factory.py: 'single', one id per block (downsampling: the next stage's first); 'group', 12 groups."""
        parts = name.split(".")
        if parts[0] not in ("downsample_layers", "stages"):
            return self.num_layers
        stage = int(parts[1])
        if self.layer_decay_type == "single":
            return sum(self.depths[:stage]) + 1 + (int(parts[2]) if parts[0] == "stages" else 0)
        if parts[0] == "downsample_layers":
            return (0, 2, 3, 12)[stage]
        return (1, 2, 3 + int(parts[2]) // 3, 12)[stage]

    def no_weight_decay(self, name, p):
        return p.ndim == 1 or name.endswith((".bias", ".gamma", ".beta"))

    def adapt(self, state):
        if convnextv2_fcmae.is_sparse_layout(state):                   # the official FCMAE release
            state = convnextv2_fcmae.from_sparse_layout(state)
        return super().adapt(state)


def build_classifier(name, num_classes, img_size=None, drop_path=0.0, linprobe=False, window_size=None,
                     layer_decay_type="single"):
    """The classifier of pre-training model `name` (e.g. "mae_vit_base_patch16"): its encoder, the official head."""
    method = MODELS[name]
    sizes = {k: v for k, v in (("img_size", img_size), ("window_size", window_size)) if v is not None}
    pre = METHODS[method].MODELS[name](drop_path_rate=drop_path, **sizes)          # other sizes: the builder's
    if method == "simmim":
        return (SimMIMViT if isinstance(pre.encoder, simmim.VisionTransformerForSimMIM) else Swin)(pre, num_classes)
    if method == "convnextv2":
        return ConvNeXtV2(pre, num_classes, layer_decay_type=layer_decay_type)
    if method == "mae":
        return ViT(pre, num_classes, global_pool=not linprobe)
    return ConvViT(pre, num_classes)


# --- checkpoints: any of ours or the official ones, with the mismatches named ---
def describe(state):
    """A short guess at what a state_dict holds, for error messages."""
    state = {k.removeprefix("encoder."): v for k, v in state.items()}
    count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})   # blocks
    width = lambda key, axis=0: state[key].shape[axis] if key in state else "?"
    if count("blocks3."):
        return f"a ConvMAE/FastConvMAE ConvViT ({count('blocks3.')} ViT blocks, width {width('patch_embed4.weight')})"
    if count("layers."):
        return f"a Swin (width {width('patch_embed.proj.weight')}, {count('layers.')} stages)"
    if count("stages."):
        return f"a ConvNeXt V2 (stem width {width('downsample_layers.0.0.weight')}, {count('stages.')} stages)"
    if any(k.endswith("attn.q_bias") for k in state):
        return f"a SimMIM ViT ({count('blocks.')} blocks, width {width('patch_embed.proj.weight')})"
    if count("blocks."):
        return (f"a MAE ViT ({count('blocks.')} blocks, width {width('patch_embed.proj.weight')}, "
                f"patch {width('patch_embed.proj.weight', -1)})")
    return "no encoder this file knows"


def summarize(keys):
    """Key names grouped by their first component: 'decoder_blocks.* (24), mask_token'."""
    groups = [(g, list(ks)) for g, ks in itertools.groupby(sorted(keys), key=lambda k: k.split(".")[0])]
    return ", ".join(ks[0] if len(ks) == 1 else f"{g}.* ({len(ks)})" for g, ks in groups) or "none"


def load_weights(model, checkpoint, flag, strict=False):
    """Load `checkpoint` (a dict read from a file) into `model`; returns (missing, unused) key names. Pre-trained
    weights: every encoder key with its shape, new_keys may be missing, a head of another class count is dropped;
    strict (a fine-tuned checkpoint): every key must fit. Else a one-line error saying what the checkpoint holds."""
    ours, raw = model.state_dict(), checkpoint.get("model", checkpoint)   # ours, or an official file's dict
    state = model.adapt(raw)
    dropped = [k for k in state if k.startswith("head.") and k in ours and state[k].shape != ours[k].shape]
    if strict and dropped:
        k = dropped[0]
        sys.exit(f"error: {flag}: its head has {state[k].shape[0]} classes, the data set {ours[k].shape[0]}")
    state = {k: v for k, v in state.items() if k not in dropped}
    wrong = sorted(k for k in set(state) & set(ours) if state[k].shape != ours[k].shape)
    missing = sorted(set(ours) - set(state))
    unused = sorted(set(state) - set(ours)) + dropped
    bad_missing = [k for k in missing if strict or not k.startswith(model.new_keys)]
    if wrong or bad_missing or (strict and unused):
        saved = checkpoint.get("args") or {}                            # ours: a dict; official scripts: Namespace
        found = saved.get("model") if isinstance(saved, dict) else getattr(saved, "model", None)
        looks = f"{found}'s weights" if found else describe(raw)
        detail = f"other shapes: {summarize(wrong)}" if wrong else f"missing: {summarize(bad_missing or unused)}"
        sys.exit(f"error: {flag} does not fit this classifier ({describe(ours)}): it holds {looks}; {detail}")
    model.load_state_dict(state, strict=False)
    return missing, unused


# --- data: train and eval transforms, MixUp / CutMix, the evaluation loader ---
def train_transform(size, reprob, randaug=9):
    """timm's create_transform as the fine-tuning scripts call it, in torchvision v2 (timm is no dependency): random
    resized crop (bicubic), flip, RandAugment (timm's; --randaug sets its mean magnitude, 0: off), normalisation,
    random erasing (per-pixel noise)."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        RandAugment(randaug) if randaug > 0 else v2.Identity(),
        transforms.ToTensor(), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),   # x / 255 as timm's (v2 multiplies by 1/255)
        v2.RandomErasing(p=reprob, value="random") if reprob > 0 else v2.Identity()])


def probe_transform(size):
    """MAE main_linprobe.py: its crop (augment.ProbeCrop, bicubic), flip, normalisation."""
    return transforms.Compose([ProbeCrop(size, interpolation=BICUBIC), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def eval_transform(size, method="mae"):
    """Each official evaluation's resize (bicubic) and centre crop. MAE (ConvMAE and the linear probe too): the short
    side to size / 0.875 up to 224 px, to size above; SimMIM: to 256 / 224 x size; ConvNeXt V2: to size / 0.875
    below 384 px, from 384 px the whole image to size x size (no crop)."""
    if method == "convnextv2" and size >= 384:
        resize = [v2.Resize((size, size), interpolation=BICUBIC)]
    else:
        crop_pct = 1.0 if method != "convnextv2" and size > 224 else 224 / 256
        short = int(256 / 224 * size) if method == "simmim" else int(size / crop_pct)
        resize = [v2.Resize(short, interpolation=BICUBIC), v2.CenterCrop(size)]
    return v2.Compose([*resize, transforms.ToTensor(), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class Transformed(Dataset):
    def __init__(self, images, transform, indices):
        self.images, self.transform, self.indices = images, transform, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        img, label = self.images[self.indices[i]]
        return self.transform(img), label


def mix_and_smooth(mixup, cutmix, smoothing, num_classes):
    """(imgs, labels [B]) -> (imgs, soft targets [B, K]): MixUp or CutMix per batch at equal odds (timm's switch prob
    0.5), then label smoothing (timm's, before mixing, is the same). None when neither is on."""
    choices = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
              ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
    if not choices:
        return None
    mix = v2.RandomChoice(choices)

    def apply(imgs, labels):
        imgs, soft = mix(imgs, labels)
        return imgs, soft * (1 - smoothing) + smoothing / num_classes
    return apply


@torch.no_grad()
def evaluate(model, loader, device, autocast, distributed, classify=None):
    """Top-1 and top-5 accuracy (%) of classify(imgs) (the model's logits) over all ranks' disjoint shares."""
    training = model.training
    model.eval()
    counts = torch.zeros(3, device=device, dtype=torch.float64)        # top-1 hits, top-5 hits, images
    for imgs, labels in progress(loader, desc="evaluating", unit="batch"):
        with autocast:
            scores = (classify or model)(imgs.to(device, non_blocking=True))
        hits = scores.topk(min(5, scores.shape[1]), dim=1).indices == labels.to(device)[:, None]   # [N, 5]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(hits), device=device)])
    if distributed:
        dist.all_reduce(counts)
    model.train(training)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


@torch.no_grad()
def knn(model, train_images, val_loader, num_classes, device, rank, world_size, log_file, k=20, T=0.07):
    """DINO's weighted k-NN (eval_knn.py) on the probe's frozen features, in fp32: the k training images most
    cosine-similar to a validation image vote for their labels with weight exp(similarity / T). Top-1, top-5 (%)."""
    model.eval()
    share = Transformed(train_images, val_loader.dataset.transform, range(rank, len(train_images), world_size))
    batches = DataLoader(share, val_loader.batch_size, num_workers=val_loader.num_workers,
                         worker_init_fn=ignore_stop_signals)
    bank = [(model.features(x.to(device)).cpu(), y) for x, y in progress(batches, desc="k-NN features", unit="batch")]
    bank, labels = (torch.cat(t) for t in zip(*bank))
    if world_size > 1:                                                  # all ranks' shares, of any sizes
        shares = [None] * world_size
        dist.all_gather_object(shares, (bank, labels))
        bank, labels = (torch.cat(t) for t in zip(*shares))
    bank, labels = F.normalize(bank.to(device), dim=1), labels.to(device)   # [train images, D], [train images]

    def vote(imgs):                                                     # -> class scores [N, classes]
        sim, nearest = (F.normalize(model.features(imgs), dim=1) @ bank.T).topk(min(k, len(bank)), dim=1)
        return torch.zeros(len(imgs), num_classes, device=device).scatter_add_(1, labels[nearest], (sim / T).exp())
    acc1, acc5 = evaluate(model, val_loader, device, nullcontext(), world_size > 1, classify=vote)
    print(json.dumps({"knn_acc1": acc1, "knn_acc5": acc5}), file=log_file, flush=True)
    return acc1, acc5


def evaluate_epoch(model, ema, loader, device, autocast, distributed, best):
    """Top-1/top-5 of the model and of its EMA (if kept), and the best top-1 of each so far (kept in `best`, as the
    official scripts keep it and its checkpoint) -> (the best checkpoints to write, the log record, the log line)."""
    record, improved, line = {}, [], []
    for who, name, net in (("", "best", model), ("ema_", "best-ema", ema.module if ema else None)):
        if net is not None:
            acc1, acc5 = evaluate(net, loader, device, autocast, distributed)
            if acc1 > best.get(who + "acc1", 0.0):                      # as the official: strictly above, from 0
                improved.append(name)
            best[who + "acc1"] = max(acc1, best.get(who + "acc1", 0.0))
            record |= {who + "acc1": acc1, who + "acc5": acc5, f"best_{who}acc1": best[who + "acc1"]}
            line.append(f"{'EMA ' * bool(who)}top-1 {acc1:.2f} % (best {best[who + 'acc1']:.2f}) | top-5 {acc5:.2f} %")
    return improved, record, " | ".join(line)


# --- EMA of the weights (timm's ModelEma, as ConvNeXt V2's fine-tuning keeps one) ---
class ModelEma:
    """A copy of the model whose floating-point weights and buffers move to decay x theirs + (1 - decay) x the model's
    after every optimizer step (timm 0.3.2's ModelEma; integer buffers are copied); evaluated beside the model. The
    update is two foreach kernels on the model's device: nothing waits for the GPU."""

    def __init__(self, model, decay):
        self.module, self.decay = copy.deepcopy(model).eval().requires_grad_(False), decay
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values()))
        self.averaged = list(zip(*[(e, m) for e, m in pairs if e.is_floating_point()]))   # ([ema ...], [model ...])
        self.copied = [(e, m) for e, m in pairs if not e.is_floating_point()]

    @torch.no_grad()
    def update(self):
        torch._foreach_mul_(self.averaged[0], self.decay)
        torch._foreach_add_(self.averaged[0], self.averaged[1], alpha=1 - self.decay)
        for e, m in self.copied:
            e.copy_(m)


# --- learning rate: MAE's schedule (common.cosine_lr) or SimMIM's ---
def simmim_lr(t, peak, floor, warmup, total):
    """timm's CosineLRScheduler as SimMIM's lr_scheduler.py sets it up, at micro-batch t of `total`: linear from `floor`
    to `peak` over the first `warmup`, and a cosine from `peak` to `floor` over all `total`, warmup included (t_initial
    = all steps). A group's peak is lr x its layer-decay scale; floor and warmup start are not scaled."""
    if t < warmup:
        return floor + t * (peak - floor) / warmup
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(t, total) / total))


def set_step_lr(optimizer, args, t, batches_per_epoch):
    """Each group's lr for the step from micro-batch t of the run on; -> the lr at layer scale 1 (the head's). MAE:
    common.cosine_lr x each group's scale. SimMIM: timm's scheduler, stepped after each step at its last micro-batch."""
    if args.schedule != "simmim":
        lr = cosine_lr(t / batches_per_epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
        set_lr(optimizer, lr)
        return lr
    at = partial(simmim_lr, max(t - 1, 0), floor=args.min_lr, warmup=args.warmup_epochs * batches_per_epoch,
                 total=args.epochs * batches_per_epoch)
    for g in optimizer.param_groups:
        g["lr"] = at(peak=args.lr * g.get("lr_scale", 1.0))
    return at(peak=args.lr)


# --- LARS (MAE util/lars.py, for the linear probe) ---
def scaled_lr(blr, eff_batch, linprobe):
    """blr x eff_batch / 256; the linear probe below MAE's batch 16384 keeps MAE's lr, blr x 16384 / 256 (--blr)."""
    return blr * (max(eff_batch, 16384) if linprobe else eff_batch) / 256


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step, for weights (ndim > 1), includes weight decay and is rescaled
    by trust_coefficient * |w| / |step| (You et al. 2017); 1-D parameters take plain SGD steps."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in (p for p in g["params"] if p.grad is not None):
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    w_norm, d_norm = p.norm(), d.norm()
                    d = d * torch.where((w_norm > 0) & (d_norm > 0), g["trust_coefficient"] * w_norm / d_norm, 1.0)
                mu = self.state[p].setdefault("mu", torch.zeros_like(p)).mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])


# --- arguments (defaults: the method's fine-tuning recipe, filled in by check_args) ---
def get_args(argv=None):
    p = argparse.ArgumentParser(description="fine-tuning, linear probing and evaluation",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mae_vit_base_patch16", help=f"a pre-training model name: {', '.join(MODELS)}")
    p.add_argument("--finetune", default="", help="pre-trained checkpoint (official or ours); none: from scratch")
    p.add_argument("--linprobe", action="store_true", help="linear probe: frozen encoder, BN + linear head, LARS")
    p.add_argument("--eval", action="store_true", help="only evaluate --resume (e.g. an official fine-tuned file)")
    p.add_argument("--knn", action="store_true", help="k-NN on the frozen features (DINO eval_knn: k=20, T=0.07)")
    p.add_argument("--data", default=None, help="DIR/train/<class>/* and DIR/val/<class>/*; none: the built-in data")
    p.add_argument("--builtin_images", type=int, default=4096, help="training images of the built-in data set")
    p.add_argument("--input_size", type=int, default=None, help="image size; default: the recipe's (pre-training size)")
    recipe = "default: the model's recipe (finetune.py RECIPES)"
    p.add_argument("--epochs", type=int, default=None, help=recipe)
    p.add_argument("--warmup_epochs", type=int, default=None, help=recipe)
    p.add_argument("--batch_size", type=int, default=None, help=f"per process; {recipe}")
    p.add_argument("--accum_iter", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--blr", type=float, default=None, help=f"lr = blr x effective batch B / 256; --linprobe below "
                   f"MAE's B=16384 keeps its lr, blr x 16384 / 256 (LARS steps are lr x 0.001 of |w|); {recipe}")
    p.add_argument("--lr", type=float, default=None, help="absolute lr; overrides --blr")
    p.add_argument("--min_lr", type=float, default=None, help=f"{recipe}; SimMIM's: 2.5e-7 x B / 512, warmup's start")
    p.add_argument("--weight_decay", type=float, default=None, help=recipe)
    p.add_argument("--layer_decay", type=float, default=None, help=f"layer-wise lr decay; {recipe}")
    p.add_argument("--drop_path", type=float, default=None, help=recipe)
    p.add_argument("--clip_grad", type=float, default=None, help="max grad norm (0: off); default: the recipe's")
    p.add_argument("--layer_decay_type", choices=["single", "group"], default=None,
                   help="ConvNeXt V2 only: one layer id per block, or stage 3 in threes; default: the recipe's")
    p.add_argument("--mixup", type=float, default=None, help=f"MixUp alpha, 0 = off; {recipe}")
    p.add_argument("--cutmix", type=float, default=None, help=f"CutMix alpha, 0 = off; {recipe}")
    p.add_argument("--smoothing", type=float, default=None, help=f"label smoothing; {recipe}")
    p.add_argument("--reprob", type=float, default=None, help=f"random erasing probability; {recipe}")
    p.add_argument("--randaug", type=int, default=9, help="mean magnitude (of 10; 0: off) of rand-m9-mstd0.5-inc1")
    p.add_argument("--model_ema", action=argparse.BooleanOptionalAction, default=None, help="keep an EMA of the "
                   "weights, evaluated each epoch (--eval: evaluate the checkpoint's EMA); default: the recipe's")
    p.add_argument("--model_ema_decay", type=float, default=0.9999, help="EMA decay per optimizer step")
    p.add_argument("--output_dir", default=None, help="default: output/<model>-finetune (or -linprobe)")
    p.add_argument("--resume", default="", help="checkpoint, or 'auto': output_dir/checkpoint-last.pth if present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="data workers per process")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--save_every", type=int, default=20, help="keep a copy of the checkpoint every N epochs")
    p.add_argument("--log_every", type=int, default=20, help="optimizer steps between log lines")
    args = p.parse_args(argv)
    args.linprobe = args.linprobe or args.knn                           # k-NN reads the probe's features
    return check_args(args)


def input_unit(name):
    """What --input_size must be a multiple of: the patch (MAE), the total stride (ConvMAE), else the mask unit."""
    kw = METHODS[MODELS[name]].MODELS[name].keywords
    if MODELS[name] == "mae":
        return kw["patch_size"]
    if MODELS[name].endswith("convmae"):
        return math.prod(kw["patch_size"])
    return kw.get("mask_patch_size", 32)                                # SimMIM, ConvNeXt V2; Swin: checked when built


def check_args(args):
    """Bad input -> one line naming the flag and the fix (sys.exit), before any work starts; returns args."""
    if args.model not in MODELS:
        sys.exit(f"error: --model {args.model} is unknown; choose one of: {', '.join(MODELS)}")
    recipe = {**RECIPES.get(args.model, _MAE), **(LINPROBE if args.linprobe else {})}
    if args.eval:                                                       # evaluates the weights --resume names
        recipe["model_ema"] = False
    vars(args).update({flag: value for flag, value in recipe.items() if getattr(args, flag, None) is None})
    for flag in ("epochs", "batch_size", "accum_iter", "save_every", "log_every", "builtin_images"):
        if getattr(args, flag) < 1:
            sys.exit(f"error: --{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("warmup_epochs", "num_workers", "blr", "lr", "min_lr", "weight_decay", "clip_grad", "mixup", "cutmix"):
        value = getattr(args, flag)                                     # None: a default computed later
        if value is not None and not (math.isfinite(value) and value >= 0):
            sys.exit(f"error: --{flag} must be a finite number at least 0, got {value}")
    for flag in ("drop_path", "smoothing", "reprob", "model_ema_decay"):
        if not 0 <= getattr(args, flag) < 1:
            sys.exit(f"error: --{flag} must be a finite number in [0, 1), got {getattr(args, flag)}")
    if not 0 < args.layer_decay <= 1:
        sys.exit(f"error: --layer_decay must be a finite number in (0, 1], got {args.layer_decay}")
    if not 0 <= args.randaug <= 10:
        sys.exit(f"error: --randaug must be in 0..10, got {args.randaug}")
    if args.eval and not os.path.isfile(args.resume):
        sys.exit(f"error: --eval needs --resume CKPT, a fine-tuned checkpoint (official or ours); got '{args.resume}'")
    if args.data and os.path.isdir(args.data) and not os.path.isdir(os.path.join(args.data, "val")):
        sys.exit(f"error: --data {args.data} has no val/ folder; fine-tuning reads DIR/train/<class>/* and evaluates "
                 f"on DIR/val/<class>/* (ImageNet's flat val folder: sort it into class folders, README shows how)")
    if args.finetune and not os.path.isfile(args.finetune):
        sys.exit(f"error: --finetune {args.finetune}: no such file")
    args.input_size = args.input_size or METHODS[MODELS[args.model]].MODELS[args.model].keywords.get("img_size", 224)
    unit = input_unit(args.model)
    if args.input_size <= 0 or args.input_size % unit:
        sys.exit(f"error: --input_size {args.input_size} is not a positive multiple of {unit} for {args.model}; "
                 f"try {max(args.input_size // unit, 1) * unit}")
    if args.amp in ("bf16", "fp16") and not torch.cuda.is_available() and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: --amp {args.amp} on CPU is fast only with native {args.amp} matmuls; the default is none")
    args.output_dir = args.output_dir or f"output/{args.model}-{'linprobe' if args.linprobe else 'finetune'}"
    return args


# --- training (main_finetune.py / main_linprobe.py + engine_finetune.py) ---
def read_checkpoint(path, flag, mmap=False):
    """The dict in a checkpoint file that exists, or a one-line error. mmap: the tensors are mapped, not read."""
    try:
        return load_checkpoint(path, mmap)
    except pickle.UnpicklingError as e:                                 # it would run code: names what
        sys.exit(f"error: {flag} {e}")
    except Exception as e:
        sys.exit(f"error: {flag} {path}: not a readable checkpoint ({type(e).__name__})")


def data(args, rank, world_size):
    """The training images, their loader (None with --eval), MixUp/CutMix (applied on the device, in the loop) and a
    loader of this rank's share of the validation images (disjoint, none padded: each counted once)."""
    try:
        train_images = load_images(args.data, "train", args.input_size, args.builtin_images)
        val_images = load_images(args.data, "val", args.input_size, max(args.builtin_images // 4, 10))
        classes = train_images.classes
        if isinstance(train_images, ImageFiles) and not classes:
            raise ValueError(f"--data {args.data}: no class folders; fine-tuning needs DIR/{{train,val}}/<class>/*")
        if getattr(val_images, "classes", classes) != classes:
            raise ValueError(f"--data {args.data}: train and val have different class folders")
        transform = (probe_transform(args.input_size) if args.linprobe
                     else train_transform(args.input_size, args.reprob, args.randaug))
        loader = None if args.eval else pretrain_loader(train_images, args.input_size, args.batch_size, 0,
                                                        args.seed, rank, world_size, args.num_workers, transform)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if loader is not None and len(loader) < args.accum_iter:
        sys.exit(f"error: --accum_iter {args.accum_iter} exceeds the {len(loader)} batches per epoch; lower it")
    val_transform = eval_transform(args.input_size, "mae" if args.linprobe else MODELS[args.model])
    val_share = Transformed(val_images, val_transform, range(rank, len(val_images), world_size))
    val_loader = DataLoader(val_share, args.batch_size, num_workers=args.num_workers,
                            pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_stop_signals)
    return train_images, loader, mix_and_smooth(args.mixup, args.cutmix, args.smoothing, len(classes)), val_loader


def build_model(args, num_classes, device, log):
    """The classifier and its first weights, on `device`: --finetune's encoder, --eval's fine-tuned checkpoint
    (strict), or the official fine-tuning init (from scratch); for --linprobe, the probe's head."""
    try:
        model = build_classifier(args.model, num_classes, args.input_size, args.drop_path, args.linprobe,
                                 args.window_size, args.layer_decay_type)
    except ValueError as e:
        sys.exit(f"error: --input_size {args.input_size}: {e}")
    if not args.finetune and not args.eval:
        model.init_for_scratch()
    if args.finetune:
        pretrained = read_checkpoint(args.finetune, "--finetune")
        missing, unused = load_weights(model, pretrained, f"--finetune {args.finetune}")
        log(f"loaded {args.finetune}\n  not in it (trained from their init): {summarize(missing)}\n"
            f"  in it, not used: {summarize(unused)}")
    if args.linprobe:
        model.make_linear_probe()
    if args.eval:                                                       # the weights, or with --model_ema the EMA's
        ckpt = read_checkpoint(args.resume, "--resume")
        if args.model_ema and "model_ema" not in ckpt:
            sys.exit(f"error: --resume {args.resume} holds no EMA weights ('model_ema'); drop --model_ema")
        ckpt = {**ckpt, "model": ckpt["model_ema"]} if args.model_ema else ckpt
        load_weights(model, ckpt, f"--resume {args.resume}", strict=True)
    model = model.to(device)
    if dist.is_initialized():                                           # DDP warns on any grad whose strides differ
        for w in (p for p in model.parameters() if p.requires_grad):   # from the weight's, as 1x1 and depthwise conv
            w.register_hook(lambda g: g.flatten().view_as(g))           # grads do in size-1 dims: restrided, no copy
    return model


def resume(args, model, optimizer, scaler, ema, world_size, host_group, log):
    """mae.resume (weights, optimizer, scaler, position (epoch, batch in epoch)) once the file's args (read alone,
    mmap) say it is this script's checkpoint in this mode (pre-trained weights belong to --finetune); then the EMA
    and the best top-1 so far. Returns (epoch, batch in epoch, best: {"acc1": .., "ema_acc1": ..})."""
    path = os.path.join(args.output_dir, "checkpoint-last.pth") if args.resume == "auto" else args.resume
    ckpt = {}
    if path and os.path.isfile(path):
        ckpt = read_checkpoint(path, "--resume", mmap=True)
        saved = ckpt["args"] if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) else {}   # ours: a dict
        mode = {True: "linprobe", False: "finetune"}.get(saved.get("linprobe"), "pre-training")   # ours save it
        found = f"{saved.get('model', 'no model name')} {mode}"
        want = f"{args.model} {'linprobe' if args.linprobe else 'finetune'}"
        if found != want:
            sys.exit(f"error: --resume {path} is not a {want} checkpoint ({found}); pass --finetune for pre-trained "
                     f"weights, or start a new --output_dir")
    epoch, batch_in_epoch = mae.resume(args, model, optimizer, scaler, world_size, host_group, log)
    if ema and "model_ema" in ckpt:
        ema.module.load_state_dict(ckpt["model_ema"])
    elif ema and ckpt:
        log(f"warning: {path} holds no EMA ('model_ema'): the EMA starts from its weights")
    return epoch, batch_in_epoch, ckpt.get("best", {})


def evaluate_only(args, model, train_images, val_loader, device, autocast, rank, world_size, log_file, log):
    """--eval (top-1/top-5 of --resume's weights) or --knn (of the frozen features): one line, then the end."""
    if args.knn:
        acc1, acc5 = knn(model, train_images, val_loader, len(train_images.classes), device, rank, world_size, log_file)
    else:
        acc1, acc5 = evaluate(model, val_loader, device, autocast, world_size > 1)
    log(f"{'k-NN, ' * args.knn}{args.resume or args.finetune or 'random weights'}: top-1 {acc1:.2f} % | "
        f"top-5 {acc5:.2f} % on {len(val_loader.dataset.images)} images")
    if world_size > 1:
        dist.destroy_process_group()
    return 0


def main(args):
    # 1. setup: distributed (only rank 0 prints), then the output folder and its log (--eval writes nothing)
    rank, world_size, device, host_group = setup_distributed()
    distributed, is_main = world_size > 1, rank == 0
    log = say if is_main else (lambda *a: None)                         # common.say: print around progress bars
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    try:
        if not args.eval:
            os.makedirs(args.output_dir, exist_ok=True)
        log_file = open(os.path.join(args.output_dir, "log.jsonl") if is_main and not args.eval else os.devnull, "a")
    except OSError as e:
        sys.exit(f"error: --output_dir {args.output_dir} is not writable ({e.strerror})")
    path_last = os.path.join(args.output_dir, "checkpoint-last.pth")

    # 2. seed: per rank, for what is drawn outside the data pipeline and the loop (the head's init: DDP copies rank 0's)
    torch.manual_seed(args.seed + rank)

    # 3. data: training batches of (imgs [B, 3, H, W], labels [B]); sample i of an epoch draws its crop, flip,
    # RandAugment and erasing from a stream seeded by (seed, epoch, i): the same whatever the processes
    train_images, loader, mix, val_loader = data(args, rank, world_size)

    # 4. model: the classifier and its weights, optionally compiled; --eval and --knn evaluate here and end; DDP
    model = build_model(args, len(train_images.classes), device, log)
    model_without_ddp = model
    if args.compile:
        model = torch.compile(model)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16,
                              enabled=amp != "none")
    if args.eval or args.knn:
        return evaluate_only(args, model, train_images, val_loader, device, autocast, rank, world_size, log_file, log)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = len(loader) // args.accum_iter                   # whole optimizer steps only
    batches_per_epoch = steps_per_epoch * args.accum_iter

    # 5. param groups: layer-wise lr decay and no weight decay on 1-D params and tokens, by the method's own rules
    groups = model_without_ddp.param_groups(args.weight_decay, args.layer_decay)   # --linprobe: the head only

    # 6. optimizer: lr = blr x eff_batch / 256; AdamW, or LARS for the linear probe (MAE §A.1)
    eff_batch = args.batch_size * args.accum_iter * world_size
    args.lr = args.lr if args.lr is not None else scaled_lr(args.blr, eff_batch, args.linprobe)
    args.min_lr = args.min_lr if args.min_lr is not None else 2.5e-7 * eff_batch / 512   # SimMIM's rule
    optimizer = LARS(groups) if args.linprobe else torch.optim.AdamW(groups, lr=args.lr, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # bf16 needs no loss scaling
    log(f"{args.model} {'linear probe' if args.linprobe else 'fine-tune'} | {len(train_images.classes)} classes | "
        f"{sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad) / 1e6:.2f} M trained params | "
        f"eff. batch {eff_batch} = {args.batch_size} x {args.accum_iter} x {world_size} | lr {args.lr:.3g} | "
        f"{steps_per_epoch} steps/epoch | amp {amp} | {device}")

    # 7. schedule: the method's warmup + cosine, from the step's first micro-batch; set at the top of every step
    lr_at = partial(set_step_lr, optimizer, args, batches_per_epoch=batches_per_epoch)

    # 8. resume: weights, optimizer, scaler, EMA, the position (epoch, batch in epoch) and the best top-1 so far
    ema = ModelEma(model_without_ddp, args.model_ema_decay) if args.model_ema else None
    epoch, batch_in_epoch, best = resume(args, model_without_ddp, optimizer, scaler, ema, world_size, host_group, log)

    # 9. loop: steps of accum_iter micro-batches, an evaluation after each epoch; SIGTERM or Ctrl-C ends it after a
    # step, its position saved
    stop, stopping = StopSignals(), False
    while epoch < args.epochs and not stopping:
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip_batches = batch_in_epoch
        batches, first = iter(loader), batch_in_epoch // args.accum_iter + 1
        steps = progress(range(first, steps_per_epoch + 1), initial=first - 1, total=steps_per_epoch,
                         desc=f"epoch {epoch}", unit="step")
        loss_sum, n_summed, t_log = torch.zeros((), device=device), 0, time.time()
        for step in steps:
            lr = lr_at(epoch * batches_per_epoch + batch_in_epoch)
            for micro in range(args.accum_iter):
                imgs, labels = (t.to(device, non_blocking=True) for t in next(batches))
                # MixUp/CutMix and drop path draw from a stream keyed by rank and micro-batch: resume is exact
                torch.manual_seed(args.seed + rank + world_size * (epoch * batches_per_epoch + batch_in_epoch))
                batch_in_epoch += 1
                if mix is not None:
                    imgs, labels = mix(imgs, labels)                    # labels -> soft targets [B, K], smoothed
                # DDP all-reduces gradients on every backward unless told not to: only the last micro-step syncs
                with (model.no_sync() if distributed and micro < args.accum_iter - 1 else nullcontext()), autocast:
                    loss = F.cross_entropy(model(imgs).float(), labels, label_smoothing=0.0 if mix else args.smoothing)
                scaler.scale(loss / args.accum_iter).backward()
                loss_sum += loss.detach()                               # on the device: a NaN stays in the sum
                n_summed += 1
            if args.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema:
                ema.update()
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
        epoch_done, improved = batch_in_epoch == batches_per_epoch, []   # done: also when stopped at its last step
        if epoch_done:
            epoch, batch_in_epoch = epoch + 1, 0                        # saved as the next epoch's start
            improved, record, line = evaluate_epoch(model_without_ddp, ema, val_loader, device, autocast, distributed,
                                                    best)
        if not torch.stack([p.isfinite().all() for p in model_without_ddp.parameters()]).all():   # a late divergence
            sys.exit(f"error: the weights are not finite (the last step diverged); not saving. The last good "
                     f"checkpoint is {path_last}; resume from it with a lower --blr or --amp none")
        paths = [path_last] + [os.path.join(args.output_dir, f"checkpoint-{name}.pth") for name in improved]
        if epoch_done and (epoch % args.save_every == 0 or epoch == args.epochs):
            paths.append(os.path.join(args.output_dir, f"checkpoint-{epoch:04d}.pth"))   # a copy every save_every
        ema_state = {"model_ema": ema.module.state_dict()} if ema else {}
        save_training_state(paths, model_without_ddp, optimizer, scaler, args, world_size=world_size, epoch=epoch,
                            batch_in_epoch=batch_in_epoch, best=best, **ema_state)
        if epoch_done:
            print(json.dumps({"epoch": epoch, **record}), file=log_file, flush=True)
            log(f"epoch {epoch}/{args.epochs} | {line} | {args.output_dir}")
    if stopping:
        log(f"{'Ctrl-C' if stop.received == signal.SIGINT else 'SIGTERM'}: saved {path_last} at epoch {epoch}, "
            f"batch {batch_in_epoch}; continue with --resume auto")

    # 10. teardown
    if distributed:
        dist.destroy_process_group()
    return 130 if stop.received == signal.SIGINT else 0


if __name__ == "__main__":
    sys.exit(main(get_args()))
