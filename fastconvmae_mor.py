"""FastConvMAE's Mixture of Reconstructors (MoR): the part of the method its authors did not release.

The decoder's last blocks branch, one branch per target: besides the pixels (the official decoder's
last blocks, unchanged, are the pixel branch) the branches predict the features of teachers at the
hidden units of all four views: an EMA copy of the encoder, and DINO and CLIP from user-supplied
files. The official README's figure (figures/FastConvMAE.png) is our source for it; docs/MOR.md lists
what is our reading where that figure is silent. The model, the masking and the loop are
fastconvmae.py's, which this file imports; checkpoints written by `fastconvmae.py --mor` (where MoR
used to live) resume here.
Copy it with fastconvmae.py and common.py; inside a package, make the `from fastconvmae import` and
`from common import` lines relative. The model needs only torch and fastconvmae.py.

    python fastconvmae_mor.py --model fastconvmae_convvit_tiny --epochs 5 --warmup_epochs 1   # CPU demo: + EMA
    torchrun --nproc_per_node=8 fastconvmae_mor.py --data /imagenet \
        --teacher_dino dino_vitbase16_pretrain.pth --teacher_clip ViT-B-16.pt                  # + DINO and CLIP
"""
import copy
import json
import math
import os
import signal
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import fastconvmae
from common import IMAGENET_MEAN, IMAGENET_STD, cosine_lr, load_images, pretrain_loader, progress, say, set_lr
from fastconvmae import (Block, MaskedAutoencoderConvViT, StopSignals, count_ranks, masked_mse, param_groups, restore,
                         resume_file, save_reconstruction, save_training_state, setup_distributed)

# Conventions as fastconvmae.py's: N batch, L mask units, V = 4 views, rows view by view [V*N, ...];
# mask: 1 = hidden. A target is 'pixel' or a teacher: 'ema', 'dino', 'clip'.


# --- the model: the official one, its decoder's last blocks one branch per target (Partially-Shared Decoder) ---
class Reconstructor(nn.Module):
    """One branch of the Partially-Shared Decoder: blocks of its own on top of the shared decoder
    blocks, a norm and a linear head that predicts one teacher's feature per unit."""

    def __init__(self, dim, num_heads, depth, out_dim, mlp_ratio=4.0):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        for m in self.modules():                                        # the decoder's init; norms start at (1, 0)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):                                               # [V*N, L, Dd]
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))                                  # [V*N, L, C]


def feature_loss(pred, target, mask):
    """A branch's loss: the teacher's feature of each unit, normalised over its channels (zero mean, unit
    variance: teachers' scales differ), scored as the pixels are. pred [V*N, L, C], target [N, L, C]."""
    target = F.layer_norm(target.float(), target.shape[-1:], eps=1e-6)
    return masked_mse(pred, target, mask)


class MaskedAutoencoderMoR(MaskedAutoencoderConvViT):
    """FastConvMAE with `reconstructors` {target name: feature width}: the last `branch_depth` decoder
    blocks, decoder_norm and decoder_pred are the pixel branch, and each target gets a Reconstructor fed
    by the shared blocks below; `loss_weights` weighs each target's loss ('pixel' included; 1 where
    absent). The official keys are unchanged (and initialised as the official model's); the branches
    add `reconstructors.<target>.*`."""

    def __init__(self, reconstructors, branch_depth=2, loss_weights=None, **kwargs):
        super().__init__(**kwargs)
        depth, dim = len(self.decoder_blocks), self.decoder_embed.out_features
        if not 0 < branch_depth < depth:
            raise ValueError(f"branch_depth {branch_depth} must leave 1 to {depth - 1} of the {depth} decoder "
                             f"blocks shared")
        first = self.decoder_blocks[0]                                  # the branches' blocks are the decoder's
        heads, mlp_ratio = first.attn.num_heads, first.mlp.fc1.out_features / dim
        self.branch_depth = branch_depth
        self.reconstructors = nn.ModuleDict({name: Reconstructor(dim, heads, branch_depth, width, mlp_ratio)
                                             for name, width in reconstructors.items()})
        self.loss_weights = {name: 1.0 for name in ["pixel", *reconstructors]} | dict(loss_weights or {})

    def forward_unmasked(self, imgs):
        """The encoder on every unit, computed as the pre-training latent is (multi-scale fusion,
        norm): what the EMA teacher gives as targets. imgs [N, 3, H, W] -> [N, L, D]."""
        x, stage1, stage2 = self._conv_stages(imgs)
        for blk in self.blocks3:
            x = blk(x)
        return self.norm(x + self._fused(stage1, stage2))

    def forward_decoder(self, latent, ids_restore, branches=()):
        """latent [V*N, L_keep, D] -> pred [V*N, L, p*p*3] (the pixel branch, in image order) and
        {name: [V*N, L, C]} from the branches named in `branches`."""
        x = self._decoder_tokens(latent, ids_restore)                   # [V*N, L, Dd]
        shared = len(self.decoder_blocks) - self.branch_depth
        for blk in self.decoder_blocks[:shared]:
            x = blk(x)
        features = {name: self.reconstructors[name](x) for name in branches}
        for blk in self.decoder_blocks[shared:]:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x)), features

    def forward(self, imgs, mask_ratio=0.75, noise=None, targets=None):
        """-> loss, pred [V*N, L, p*p*3], mask [V*N, L], as fastconvmae's model. With `targets` ({name:
        teacher features [N, L, C]} for every branch) the first output is a dict of losses instead:
        'pixel', one per target, and 'loss', their sum weighted by loss_weights."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        if targets is not None and set(targets) != set(self.reconstructors):
            raise ValueError(f"targets {sorted(targets)} do not match the branches {sorted(self.reconstructors)}")
        pred, features = self.forward_decoder(latent, ids_restore, targets or ())
        loss = self.forward_loss(imgs, pred, mask)
        if targets is None:
            return loss, pred, mask
        losses = {"pixel": loss} | {name: feature_loss(features[name], targets[name], mask) for name in targets}
        losses["loss"] = sum(self.loss_weights[name] * value for name, value in losses.items())
        return losses, pred, mask


# fastconvmae.py's sizes, with branches: MODELS[name](reconstructors={...}, branch_depth=..., ...)
MODELS = {name: partial(MaskedAutoencoderMoR, **builder.keywords) for name, builder in fastconvmae.MODELS.items()}


# --- the teachers whose features the branches predict (the README figure's Mixture of Tokenizers) ---
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
    for name, p in teacher.named_parameters():
        p.lerp_(student[name], 1.0 - momentum)


def ema_momentum(epoch, base, epochs):
    """BYOL's and DINO's schedule: from `base` at the start to 1 at the end, half a cosine."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * epoch / epochs) + 1) / 2


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def teacher_block(dim, clip):
    """fastconvmae's Block as a DINO ViT has it (LayerNorm eps 1e-6, GELU) or CLIP's (eps 1e-5, QuickGELU).
    Heads are 64 wide, as in every DINO and CLIP ViT."""
    blk = Block(dim, dim // 64)
    if clip:
        blk.norm1.eps = blk.norm2.eps = 1e-5
        blk.mlp.act = QuickGELU()
    return blk


class ViTTeacher(nn.Module):
    """A plain ViT returning the patch tokens of its last layer after the final norm: a DINO ViT
    (timm's names) or, with clip=True, CLIP's image tower (ln_pre, QuickGELU, LayerNorm eps 1e-5,
    and the projection into CLIP's joint space)."""

    def __init__(self, patch_size, dim, depth, tokens, clip=False, out_dim=None):
        super().__init__()
        eps = 1e-5 if clip else 1e-6
        self.patch_size = patch_size
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size, bias=not clip)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.ln_pre = nn.LayerNorm(dim, eps=eps) if clip else nn.Identity()
        self.blocks = nn.ModuleList([teacher_block(dim, clip) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, out_dim, bias=False) if clip else nn.Identity()

    def forward(self, x):                                               # [N, 3, H, W]
        x = self.patch_embed(x).flatten(2).transpose(1, 2)              # [N, T, D]
        g = math.isqrt(self.pos_embed.shape[1] - 1)
        pos = self.pos_embed
        if x.shape[1] != g * g:                                         # another image size: resize the grid
            side = math.isqrt(x.shape[1])
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
        if "visual.conv1.weight" not in state:                          # DINO's
            ours = {k.replace("patch_embed.proj.", "patch_embed."): t for k, t in state.items()
                    if not k.startswith("head.")}
            depth = len({k.split(".")[1] for k in ours if k.startswith("blocks.")})
            w = ours["patch_embed.weight"]
            teacher = cls(w.shape[-1], w.shape[0], depth, ours["pos_embed"].shape[1])
        else:
            ours, depth = from_clip(state)
            v = ours["patch_embed.weight"]
            teacher = cls(v.shape[-1], v.shape[0], depth, ours["pos_embed"].shape[1], clip=True,
                          out_dim=ours["proj.weight"].shape[0])
        teacher.load_state_dict(ours)
        return teacher


CLIP_BLOCK_NAMES = {"attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
                    "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
                    "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias", "ln_2.weight": "norm2.weight",
                    "ln_2.bias": "norm2.bias", "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
                    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}


def from_clip(state):
    """OpenAI CLIP's image tower (`visual.*`) in ViTTeacher's names -> (state_dict, depth)."""
    if "visual.class_embedding" not in state:
        raise ValueError("a CLIP ResNet image tower; only CLIP ViTs are supported")
    v = {k[len("visual."):]: t for k, t in state.items() if k.startswith("visual.")}
    depth = len({k.split(".")[2] for k in v if k.startswith("transformer.resblocks.")})
    ours = {"patch_embed.weight": v["conv1.weight"], "cls_token": v["class_embedding"].view(1, 1, -1),
            "pos_embed": v["positional_embedding"][None], "ln_pre.weight": v["ln_pre.weight"],
            "ln_pre.bias": v["ln_pre.bias"], "norm.weight": v["ln_post.weight"],
            "norm.bias": v["ln_post.bias"], "proj.weight": v["proj"].t()}
    for i in range(depth):
        for theirs, mine in CLIP_BLOCK_NAMES.items():
            ours[f"blocks.{i}.{mine}"] = v[f"transformer.resblocks.{i}.{theirs}"]
    return ours, depth


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


# --- arguments: fastconvmae.py's, and the mixture's (docs/MOR.md: the paper's and our reading) ---
def get_args(argv=None):
    p = fastconvmae.parser()
    p.description = "FastConvMAE pre-training with a Mixture of Reconstructors"
    p.add_argument("--teacher_dino", default=None, metavar="FILE", help="a DINO teacher: a ViT state_dict in DINO's "
                   "layout, or a .pt2 (torch.export) or TorchScript file mapping images to patch features; fed "
                   "ImageNet-normalised images")
    p.add_argument("--teacher_clip", default=None, metavar="FILE", help="a CLIP teacher: OpenAI's ViT release file, "
                   "or a .pt2 (torch.export) or TorchScript file mapping images to patch features; fed "
                   "CLIP-normalised images")
    p.add_argument("--mor_branch_depth", type=int, default=None, help="decoder blocks of each branch, the others "
                   "shared; default: a quarter of the decoder (base: 2 of 8), at least 1")
    p.add_argument("--ema_momentum", type=float, default=0.996, help="EMA teacher momentum at the start (cosine to 1)")
    p.add_argument("--mor_weights", nargs="*", default=[], metavar="NAME=W",
                   help="loss weights, e.g. pixel=1 ema=0.5 clip=2 (default 1 each)")
    args = fastconvmae.check_args(p.parse_args(argv))
    check_mor_args(args)
    return args


def check_mor_args(args):
    """Bad input -> one line naming the flag and the fix (sys.exit), before any work starts."""
    decoder_depth = MODELS[args.model].keywords.get("decoder_depth", 8)
    for kind in ("dino", "clip"):
        path = getattr(args, f"teacher_{kind}")
        if path and not os.path.isfile(path):
            sys.exit(f"error: --teacher_{kind} {path}: no such file")
    if args.mor_branch_depth is None:
        args.mor_branch_depth = max(decoder_depth // 4, 1)
    if not 0 < args.mor_branch_depth < decoder_depth:
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
            weights[name] = math.nan
        if not (math.isfinite(weights[name]) and weights[name] >= 0):
            sys.exit(f"error: --mor_weights {item}: expected NAME=W, W a finite number at least 0, e.g. ema=0.5")
        if name not in targets:
            sys.exit(f"error: --mor_weights {item}: {name} is not a target of this run (targets: {', '.join(targets)})")
    args.mor_weights = weights                                          # {target: weight}


# --- training: fastconvmae.py's loop, with the teachers' targets, the EMA update and a loss per target ---
def teachers_of(flags):
    """The teachers a run's flags (a dict) name: 'ema' always, 'dino' and 'clip' when given a file."""
    return ", ".join(["ema"] + [kind for kind in ("dino", "clip") if flags.get(f"teacher_{kind}")])


def resume(args, model, ema, optimizer, scaler, world_size, host_group, log):
    """fastconvmae.py's resume, and the EMA teacher; returns (epoch, batch in epoch), (0, 0) for a fresh start.
    Checkpoints of `fastconvmae.py --mor` (before this file) have the same keys and resume here."""
    path, ckpt = resume_file(args, world_size, host_group)
    if ckpt is not None and teachers_of(ckpt["args"]) != teachers_of(vars(args)):   # each has its branch's weights
        sys.exit(f"error: --resume {path} was trained with the teachers {teachers_of(ckpt['args'])}, this run has "
                 f"{teachers_of(vars(args))}; pass the same --teacher_dino / --teacher_clip, or a new --output_dir")
    position = restore(path, ckpt, args, model, optimizer, scaler, world_size, log)
    if ckpt is not None:
        ema.load_state_dict(ckpt["ema"])
        for kind in ("dino", "clip"):
            if ckpt["args"].get(f"teacher_{kind}") != getattr(args, f"teacher_{kind}"):
                log(f"warning: --teacher_{kind} is {getattr(args, f'teacher_{kind}')}; {path} was trained "
                    f"with {ckpt['args'].get(f'teacher_{kind}')}")
    return position


def build_model(args, grid, demo_imgs, device, log):
    """Step 4 of main: the teachers first (their widths size the branches), then the model with a branch per
    teacher and one for 'ema', optionally compiled, then wrapped in DDP, and the EMA teacher, a copy of its
    encoder. -> model, model_without_ddp, EMA teacher, {kind: FeatureTeacher}."""
    batch = demo_imgs[:1].expand(args.batch_size, -1, -1, -1)           # a batch of the training size
    teachers, widths = build_teachers(args, grid, batch, device)
    branches = {"ema": MODELS[args.model].keywords["embed_dim"][-1]} | widths
    model = MODELS[args.model](img_size=args.input_size, norm_pix_loss=args.norm_pix_loss, reconstructors=branches,
                               branch_depth=args.mor_branch_depth, loss_weights=args.mor_weights).to(device)
    weights = " ".join(f"{k}={v:g}" for k, v in model.loss_weights.items())
    log(f"MoR: targets {', '.join(model.loss_weights)} | weights {weights} | {args.mor_branch_depth} of "
        f"{len(model.decoder_blocks)} decoder blocks per branch | EMA momentum {args.ema_momentum} -> 1")
    model_without_ddp = model
    if args.compile:
        model = torch.compile(model)
    if dist.is_initialized():                                           # DDP warns on any grad whose strides differ
        for w in (p for p in model.parameters() if p.requires_grad):   # from the weight's, as 1x1 and depthwise conv
            w.register_hook(lambda g: g.flatten().view_as(g))           # grads do in size-1 dims: restrided, no copy
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ema = ema_teacher(model_without_ddp)                                # after DDP: rank 0's weights everywhere
    return model, model_without_ddp, ema, teachers


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

    # 4. model: the teachers, the model with their branches (optionally compiled, then in DDP), the EMA teacher
    model, model_without_ddp, ema, teachers = build_model(args, math.isqrt(L), demo_imgs, device, log)
    names = ["loss", *model_without_ddp.loss_weights]                   # logged: the weighted sum, then each target

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

    # 8. resume: weights, EMA teacher, optimizer, scaler and the position (epoch, batch in epoch)
    epoch, batch_in_epoch = resume(args, model_without_ddp, ema, optimizer, scaler, world_size, host_group, log)

    # 9. loop: steps of accum_iter micro-batches, each followed by the EMA teacher; SIGTERM or Ctrl-C ends it after a
    # step, its position saved
    stop, stopping = StopSignals(), False
    while epoch < args.epochs and not stopping:
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip_batches = batch_in_epoch
        batches, first = iter(loader), batch_in_epoch // args.accum_iter + 1
        steps = progress(range(first, steps_per_epoch + 1), initial=first - 1, total=steps_per_epoch,
                         desc=f"epoch {epoch}", unit="step")
        loss_sum, n_summed, t_log = torch.zeros(len(names), device=device), 0, time.time()
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
                    losses, _, _ = model(imgs, args.mask_ratio, noise, teacher_targets(ema, teachers, imgs))
                scaler.scale(losses["loss"] / args.accum_iter).backward()
                loss_sum += torch.stack([losses[k].detach().float() for k in names])   # a NaN stays in the sum
                n_summed += 1
            if args.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            momentum = ema_momentum(epoch + batch_in_epoch / batches_per_epoch, args.ema_momentum, args.epochs)
            update_ema(ema, model_without_ddp, momentum)                # also after a step fp16 skipped, as DINO's
            stopping = count_ranks(stop.received is not None, host_group) > 0   # any rank? a CPU float: no GPU sync
            if step % args.log_every == 0 or step == steps_per_epoch or stopping:
                if distributed:
                    dist.all_reduce(loss_sum)
                loss, *each = (loss_sum / n_summed / world_size).tolist()  # the only GPU sync: at log steps
                if not math.isfinite(loss):
                    sys.exit(f"error: loss is {loss} at epoch {epoch} step {step}; stopping without saving. The last "
                             f"good checkpoint is {path_last}; resume from it with a lower --blr or --amp none")
                ips = n_summed * args.batch_size * world_size / (time.time() - t_log)
                log(f"epoch {epoch} step {step}/{steps_per_epoch} | loss {loss:.4f} | lr {lr:.2e} | {ips:.0f} img/s"
                    + "".join(f" | {k} {v:.4f}" for k, v in zip(names[1:], each)))   # and each target's
                record = {"epoch": epoch, "step": step, "loss": loss, "lr": lr, "img_per_s": round(ips, 1)}
                print(json.dumps(record | {f"loss_{k}": v for k, v in zip(names[1:], each)}), file=log_file, flush=True)
                steps.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.0f}")
                loss_sum, n_summed, t_log = torch.zeros(len(names), device=device), 0, time.time()
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
                            batch_in_epoch=batch_in_epoch, ema=ema.state_dict())
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
