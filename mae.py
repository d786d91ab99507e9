"""MAE: masked autoencoders pre-train a ViT by reconstructing the pixels of hidden patches.

The encoder sees only the ~25 % of patches left visible (no mask tokens); a light decoder adds a shared mask token at
every hidden position and predicts the pixels of each patch; the loss is the MSE on hidden patches only (§3).

Paper: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
https://arxiv.org/abs/2111.06377. Official code: https://github.com/facebookresearch/mae.
This file rebuilds the official pre-training model in plain PyTorch: same state_dict, same numbers (tests/test_mae.py
checks it against fixtures made by the official code). Copy it with common.py and it runs as here; in a package, make
the `from common import` line relative. The model needs only torch, torchvision and common's (un)patchify.

    python mae.py --model mae_vit_tiny --epochs 5 --warmup_epochs 1     # CPU demo, built-in data
    torchrun --nproc_per_node=8 mae.py --data /imagenet --accum_iter 8  # paper recipe: 64 x 8 x 8 = 4096
    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR \
        --master_port=29500 mae.py --data /imagenet --accum_iter 4      # 2 nodes, run on each
"""
import argparse
import itertools
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
                    set_lr, unpatchify)

# Conventions: N batch, L patches, D width, p patch size. mask: 1 = hidden, 0 = visible.


# --- transformer blocks (ViT; parameter names as in timm 0.3.2, which the official code uses) ---
class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                               # [N, T, D]
        N, T, D = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)   # [N, heads, T, D/heads]
        x = F.scaled_dot_product_attention(q, k, v)                     # softmax(q k^T / sqrt(D/heads)) v
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


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


def sincos_pos_embed(dim, grid_size):
    """Fixed 2-D sin-cos position embedding [1 + g*g, dim], row 0 (cls) zeros. The first dim/2 channels encode
    the column, the last dim/2 the row, each as [sin(pos omega), cos(pos omega)], omega_i = 10000^(-4i/dim) (§A.1)."""
    assert dim % 4 == 0, f"sin-cos embedding needs a width divisible by 4, got {dim}"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    row, col = torch.meshgrid(*[torch.arange(grid_size, dtype=torch.float64)] * 2, indexing="ij")
    angles = [pos.flatten()[:, None] * omega for pos in (col, row)]    # 2 x [g*g, dim/4]
    emb = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)   # [g*g, dim]
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb]).float()


# --- masking (MAE §3: random sampling without replacement, uniform over patches) ---
def random_masking(x, mask_ratio, noise=None):
    """Keep the L_keep = int(L * (1 - mask_ratio)) tokens with the smallest noise: x [N, L, D] -> kept [N, L_keep, D]
    (by increasing noise), mask [N, L] (1 = hidden), ids_restore [N, L] (gathering with it puts [kept, hidden]
    tokens back in image order)."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(N, L, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)                           # ascending: small = keep
    ids_restore = torch.argsort(ids_shuffle, dim=1)                     # rank of each patch
    kept = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].expand(-1, -1, D))
    mask = (ids_restore >= len_keep).float()                            # hidden: ranked past L_keep (fp32 under amp)
    return kept, mask, ids_restore


# --- the model: encoder on visible patches, light decoder, pixel loss (MAE §3) ---
class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_pix_loss=False, drop_path_rate=0.0):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.patch_size, self.grid = img_size, patch_size, img_size // patch_size
        self.norm_pix_loss = norm_pix_loss

        # encoder; the sin-cos pos embeds are fixed (requires_grad=False) but in the state_dict, as in the official
        self.patch_embed = nn.Sequential(OrderedDict(proj=nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.grid)[None], requires_grad=False)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]   # stochastic depth rule
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        # decoder (§3, Table 1a-b: 8 blocks of width 512, <10 % of the encoder's compute per token)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed(decoder_embed_dim, self.grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio)
                                             for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans)

        # the official init: xavier-uniform linears (JAX ViT), the patch conv too, normal(.02) tokens, LayerNorms (1, 0)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.data.view(embed_dim, -1))   # the conv as a linear layer
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def _embed(self, imgs):
        if imgs.shape[-2:] != (self.img_size,) * 2:
            raise ValueError(f"images are {tuple(imgs.shape[-2:])}; this model takes {self.img_size} px (its img_size)")
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2)          # [N, L, D]
        return x + self.pos_embed[:, 1:]                                # position before masking

    def _encode(self, x):
        """Embedded tokens [N, T, D] -> with cls, through the blocks: [N, 1 + T, D]."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        """imgs [N, 3, H, W] -> latent [N, 1 + L_keep, D], mask [N, L], ids_restore [N, L]."""
        x, mask, ids_restore = random_masking(self._embed(imgs), mask_ratio, noise)   # [N, L_keep, D]
        return self._encode(x), mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        """latent [N, 1 + L_keep, D] -> pred [N, L, p*p*3]: pixels of every patch, in image order."""
        x = self.decoder_embed(latent)                                  # [N, 1 + L_keep, Dd]
        N, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(N, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)                  # [N, L, Dd], shuffled order
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))  # image order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed   # [N, 1 + L, Dd]
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]           # drop cls: [N, L, p*p*3]

    def forward_loss(self, imgs, pred, mask):
        """MSE over hidden patches; norm_pix_loss: each target patch normalised by its mean and variance (Table 1c)."""
        target = patchify(imgs, self.patch_size)                        # [N, L, p*p*3]
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)                      # [N, L] per patch
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def forward_features(self, imgs):
        """The encoder on all patches, for fine-tuning: [N, 1 + L, D] after `norm`."""
        return self._encode(self._embed(imgs))

    def pred_to_pixels(self, imgs, pred):
        """pred [N, L, p*p*3] -> images [N, 3, H, W] as the input is normalised (norm_pix_loss undone), for pictures."""
        if self.norm_pix_loss:
            target = patchify(imgs, self.patch_size)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        return unpatchify(pred, self.patch_size)


# --- model builders (MAE Table 1 / models_mae.py; decoder 512-d, 8 blocks, 16 heads) ---
MODELS = {
    "mae_vit_base_patch16": partial(MaskedAutoencoderViT, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "mae_vit_large_patch16": partial(MaskedAutoencoderViT, patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "mae_vit_huge_patch14": partial(MaskedAutoencoderViT, patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # for tests and CPU demos: ViT-Ti width, 32 px images in 8x8 patches of 4 px
    "mae_vit_tiny": partial(MaskedAutoencoderViT, img_size=32, patch_size=4, embed_dim=192, depth=4, num_heads=3,
                            decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4),
}


def load_pretrained(model, checkpoint):
    """Load an official (or our) MAE pre-training checkpoint, a path or a state_dict. The official
    mae_pretrain_vit_*.pth hold the encoder only: returns the decoder keys it lacks (they keep their init)."""
    state = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    state = state.get("model", state)
    unexpected = sorted(set(state) - set(model.state_dict()))
    missing = sorted(set(model.state_dict()) - set(state))
    encoder_missing = [k for k in missing if not k.startswith(("decoder_", "mask_token"))]
    if unexpected or encoder_missing:
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: unexpected {unexpected[:5]}, "
                         f"missing {encoder_missing[:5]} (a fine-tuned classifier? use finetune.py)")
    model.load_state_dict(state, strict=not missing)
    return missing


# --- arguments (defaults: the paper's ViT-B recipe, PRETRAIN.md) ---
def get_args(argv=None):
    p = argparse.ArgumentParser(description="MAE pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mae_vit_base_patch16", help=f"one of: {', '.join(MODELS)}")
    p.add_argument("--data", default=None, help="images: DIR/train/<class>/*, DIR/<class>/* or flat; none: built-in")
    p.add_argument("--builtin_images", type=int, default=4096, help="size of the built-in data set (no --data)")
    p.add_argument("--input_size", type=int, default=None, help="image size; default: the model's (224, tiny: 32)")
    p.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of patches hidden (§4: 75 %%)")
    p.add_argument("--norm_pix_loss", action=argparse.BooleanOptionalAction, default=True,
                   help="targets: each patch normalised by its own mean and std (§3, the recipe)")
    # optimisation (MAE Table 8: AdamW, blr 1.5e-4, batch 4096, wd 0.05, cosine, 40 warmup epochs)
    p.add_argument("--epochs", type=int, default=800)
    p.add_argument("--warmup_epochs", type=int, default=40)
    p.add_argument("--batch_size", type=int, default=64, help="per process (effective: x accum_iter x processes)")
    p.add_argument("--accum_iter", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--blr", type=float, default=1.5e-4, help="base lr: lr = blr x effective batch / 256")
    p.add_argument("--lr", type=float, default=None, help="absolute lr; overrides --blr")
    p.add_argument("--min_lr", type=float, default=0.0)
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--clip_grad", type=float, default=None, help="max grad norm; 0 or none: off (MAE clips none)")
    # system
    p.add_argument("--output_dir", default=None, help="default: output/<model>")
    p.add_argument("--resume", default="", help="a checkpoint, or 'auto': output_dir/checkpoint-last.pth if present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1), help="data workers per process")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--save_every", type=int, default=20, help="keep a copy of the checkpoint every N epochs")
    p.add_argument("--log_every", type=int, default=20, help="optimizer steps between log lines")
    return check_args(p.parse_args(argv))


def check_args(args):
    """Bad input -> one line naming the flag and the fix (sys.exit), before any work starts; returns args."""
    if args.model not in MODELS:
        sys.exit(f"error: --model {args.model} is unknown; choose one of: {', '.join(MODELS)}")
    ranges = {"at least 1": (lambda v: v >= 1, "epochs batch_size accum_iter save_every log_every builtin_images"),
              "at least 0": (lambda v: v >= 0, "warmup_epochs num_workers blr lr min_lr weight_decay clip_grad"),
              "in (0, 1)": (lambda v: 0 < v < 1, "mask_ratio")}
    for allowed, (ok, flags) in ranges.items():
        for flag in flags.split():                                      # None: a default computed later
            value = getattr(args, flag)
            if value is not None and not (math.isfinite(value) and ok(value)):
                sys.exit(f"error: --{flag} must be a finite number {allowed}, got {value}")
    defaults = MODELS[args.model].keywords
    patch = defaults["patch_size"]
    args.input_size = defaults.get("img_size", 224) if args.input_size is None else args.input_size
    if args.input_size <= 0 or args.input_size % patch:
        sys.exit(f"error: --input_size {args.input_size} is not a positive multiple of {args.model}'s patch size "
                 f"{patch}; try {max(args.input_size // patch, 1) * patch}")
    args.output_dir = args.output_dir or os.path.join("output", args.model)
    return args


# --- training (MAE §4 / main_pretrain.py + engine_pretrain.py) ---
def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases, norms (1-D) and the cls and mask tokens. The official decays the
    tokens (3-D, while timm's rule skips 1-D only); we keep one rule for the five methods: it is 2 x D values."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:                                             # fixed pos embeds are not trained
            (no_decay if p.ndim <= 1 or name.endswith("_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def setup_distributed():
    """torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; plain python is rank 0 of 1. Returns rank, world size,
    device, and a gloo group on which the ranks agree on host-side flags without waiting for the GPU."""
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


def save_training_state(paths, model, optimizer, scaler, args, **position):
    """Rank 0 writes the state to each of `paths` atomically (temp file, fsync, rename). Weights that are not finite
    (a step diverged after its loss was checked) stop every rank instead: the files keep the last good state."""
    if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():
        sys.exit(f"error: the weights are not finite (the last step diverged); not saving. "
                 f"The last good checkpoint is {paths[0]}; resume from it with a lower --blr or --amp none")
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
    if seen < world_size:                                               # e.g. --output_dir on each node's disk
        sys.exit(f"error: --resume {path} exists for {seen} of {world_size} processes; give a file that every "
                 f"process can read (on a file system that all nodes share)")
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
    layout = (ckpt["world_size"], ckpt["args"]["batch_size"], ckpt["args"]["accum_iter"])
    if ckpt["batch_in_epoch"] and layout != (world_size, args.batch_size, args.accum_iter):
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
    hidden = unpatchify(mask[..., None].expand_as(pred), model.patch_size).cpu()   # [N, 3, H, W], 1 = hidden
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    orig = imgs.cpu() * std + mean                                     # back to [0, 1] pixels
    recon = model.pred_to_pixels(imgs, pred.float()).cpu() * std + mean
    columns = [orig, orig * (1 - hidden) + 0.5 * hidden, recon, orig * (1 - hidden) + recon * hidden]
    grid = torch.stack(columns, dim=1).flatten(0, 1)                    # [4N, 3, H, W], row by row
    scale = -(-256 // (4 * grid.shape[-1]))                             # nearest upscaling: rows >= 256 px
    save_image(F.interpolate(grid.clamp(0, 1), scale_factor=scale, mode="nearest"), path, nrow=4, padding=1)


def main(args):
    # 1. setup distributed; only rank 0 prints
    rank, world_size, device, host_group = setup_distributed()
    distributed, is_main = world_size > 1, rank == 0
    log = partial(print, flush=True) if is_main else (lambda *a: None)
    amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    if amp != "none" and device.type == "cpu":
        log(f"warning: --amp {amp} on CPU is fast only on CPUs with native {amp} matmuls; --amp none is the default")

    # 2. seed: per rank, for what is drawn outside the data pipeline (model init: DDP copies rank 0's)
    torch.manual_seed(args.seed + rank)

    # 3. data: batches of (imgs [B, 3, H, W], noise [B, L]). The data set is indexed by (epoch, i) and draws each
    # sample's crop, flip and masking noise from a stream seeded by (seed, epoch, i): the same samples whatever
    # the number of processes, and `sampler.skip_batches` resumes mid-epoch on exactly the batches to come.
    try:                                                                # the run's first write: fails early
        os.makedirs(args.output_dir, exist_ok=True)
        log_file = open(os.path.join(args.output_dir, "log.jsonl") if is_main else os.devnull, "a")
    except OSError as e:
        sys.exit(f"error: --output_dir {args.output_dir} is not writable ({e.strerror})")
    L = (args.input_size // MODELS[args.model].keywords["patch_size"]) ** 2
    try:
        images = load_images(args.data, "train", args.input_size, args.builtin_images)
        loader = pretrain_loader(images, args.input_size, args.batch_size, L, args.seed, rank, world_size,
                                 args.num_workers)
        demo = [loader.dataset[(0, i)] for i in range(0, len(images), max(len(images) // 8, 1))][:8]
    except ValueError as e:
        sys.exit(f"error: {e}")
    demo_imgs, demo_noise = (torch.stack(t).to(device) for t in zip(*demo))   # 8 images across the data set
    batches_per_epoch = len(loader) // args.accum_iter * args.accum_iter   # whole optimizer steps only
    if batches_per_epoch == 0:
        sys.exit(f"error: --accum_iter {args.accum_iter} exceeds the {len(loader)} batches per epoch; lower it")
    steps_per_epoch = batches_per_epoch // args.accum_iter

    # 4. model: build, optionally compile, then wrap in DDP
    model = MODELS[args.model](img_size=args.input_size, norm_pix_loss=args.norm_pix_loss).to(device)
    model_without_ddp = model
    if args.compile:
        model = torch.compile(model)
    if distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # 5. param groups: no weight decay on biases, norms (1-D) and tokens
    groups = param_groups(model_without_ddp, args.weight_decay)

    # 6. optimizer: linear lr scaling rule (MAE §A.1: lr = blr x batch / 256), betas (0.9, 0.95)
    eff_batch = args.batch_size * args.accum_iter * world_size
    args.lr = args.lr if args.lr is not None else args.blr * eff_batch / 256
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")  # bf16 needs no loss scaling
    autocast = torch.autocast(device.type, torch.bfloat16 if amp == "bf16" else torch.float16, amp != "none")
    log(f"{args.model} | {sum(p.numel() for p in model_without_ddp.parameters()) / 1e6:.1f} M params | "
        f"eff. batch {eff_batch} = {args.batch_size} x {args.accum_iter} x {world_size} | lr {args.lr:.3g} | "
        f"{steps_per_epoch} steps/epoch | amp {amp} | {device}")

    # 7. schedule: warmup + cosine, the lr set at every optimizer step from the fractional epoch (in 9)
    # 8. resume: weights, optimizer, scaler and the position (epoch, batch in epoch)
    epoch, batch_in_epoch = resume(args, model_without_ddp, optimizer, scaler, world_size, host_group, log)
    path_last = os.path.join(args.output_dir, "checkpoint-last.pth")
    stop = []                                                           # SIGTERM: save at the next step, exit 0
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))

    # 9. loop: one optimizer step per accum_iter micro-batches
    stopping, loss_sum, n_summed, t_log = False, torch.zeros((), device=device), 0, time.time()
    while epoch < args.epochs and not stopping:
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip_batches = batch_in_epoch
        for imgs, noise in itertools.islice(loader, batches_per_epoch - batch_in_epoch):
            imgs, noise = imgs.to(device, non_blocking=True), noise.to(device, non_blocking=True)
            batch_in_epoch += 1
            last_micro = batch_in_epoch % args.accum_iter == 0
            # DDP all-reduces gradients on every backward unless told not to: only the last micro-step syncs
            with (model.no_sync() if distributed and not last_micro else nullcontext()), autocast:
                loss, _, _ = model(imgs, args.mask_ratio, noise)
            scaler.scale(loss / args.accum_iter).backward()
            loss_sum += loss.detach().float()                           # on the device: a NaN stays in the sum
            n_summed += 1
            if not last_micro:
                continue
            lr = cosine_lr(epoch + (batch_in_epoch - args.accum_iter) / batches_per_epoch, args.lr, args.min_lr,
                           args.warmup_epochs, args.epochs)                   # at the step's first micro-batch
            set_lr(optimizer, lr)
            if args.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step = batch_in_epoch // args.accum_iter
            # per step, the ranks all-reduce one CPU float (has any had a SIGTERM?) on the gloo group: no GPU sync
            stopping = count_ranks(bool(stop), host_group) > 0
            if step % args.log_every == 0 or batch_in_epoch == batches_per_epoch or stopping:
                if distributed:
                    dist.all_reduce(loss_sum)
                loss = loss_sum.item() / n_summed / world_size           # the only GPU sync: at log steps
                if not math.isfinite(loss):
                    sys.exit(f"error: loss is {loss} at epoch {epoch} step {step}; stopping without saving. The last "
                             f"good checkpoint is {path_last}; resume from it with a lower --blr or --amp none")
                ips = n_summed * args.batch_size * world_size / (time.time() - t_log)
                log(f"epoch {epoch} step {step}/{steps_per_epoch} | loss {loss:.4f} | lr {lr:.2e} | {ips:.0f} img/s")
                record = {"epoch": epoch, "step": step, "loss": loss, "lr": lr, "img_per_s": round(ips, 1)}
                print(json.dumps(record), file=log_file, flush=True)
                loss_sum, n_summed, t_log = torch.zeros((), device=device), 0, time.time()
            if stopping:
                break
        if not stopping:
            epoch, batch_in_epoch = epoch + 1, 0
        keep = not stopping and (epoch % args.save_every == 0 or epoch == args.epochs)   # a copy every save_every
        save_training_state([path_last] + [os.path.join(args.output_dir, f"checkpoint-{epoch:04d}.pth")] * keep,
                            model_without_ddp, optimizer, scaler, args, world_size=world_size, epoch=epoch,
                            batch_in_epoch=batch_in_epoch)
        if stopping:
            log(f"SIGTERM: saved {path_last} at epoch {epoch}, batch {batch_in_epoch}; exiting")
        elif is_main:
            save_reconstruction(model_without_ddp, demo_imgs, demo_noise, args.mask_ratio,
                                os.path.join(args.output_dir, f"recon-epoch{epoch:03d}.png"))
            log(f"epoch {epoch}/{args.epochs} done | checkpoint and picture in {args.output_dir}")

    # 10. teardown
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args())
