"""Benchmark one pre-training step per model: forward + backward + AdamW step.

Each step runs as the method file's training loop runs it: the model's loss on a fixed random
batch with fixed masking noise (so masking is timed but identical across runs), loss.backward(),
then a fused AdamW step (lr 1e-4, betas (0.9, 0.95), weight decay 0.05 in the file's
`param_groups`). A model name's prefix names its file: mae_* -> mae.py, convmae_* -> convmae.py.
The script also counts the step's FLOPs and measures the machine's large-matmul
rate, to show how close the step gets to what the hardware does at best.

    python tests/bench.py                                   # mae_vit_tiny and mae_vit_base_patch16
    python tests/bench.py --models mae_vit_tiny convmae_convvit_tiny --device cpu --steps 5
    python tests/bench.py --amp fp16 --compile --channels_last --batch 64
    python tests/bench.py --official mae=path/to/mae        # side by side with facebookresearch/mae
    python tests/bench.py --models fastconvmae_convvit_base_patch16 --mor --batch 4   # with / without MoR
    python tests/bench.py --models convnextv2_fcmae_tiny convnextv2_fcmae_base --dense --batch 4
    python tests/bench.py --models convmae_convvit_base_patch16 fastconvmae_convvit_base_patch16 \
        --official convmae=path/to/ConvMAE fastconvmae=path/to/FastConvMAE --batch 4

--official METHOD=PATH ... benchmarks the official model (a checkout of facebookresearch/mae,
Alpha-VL/ConvMAE or Alpha-VL/FastConvMAE) next to ours: same architecture, norm_pix_loss=True
for both, same batch, amp and --channels_last, run as its main_pretrain.py runs it: eager (it
has no compile option; --compile compiles only ours) and stepped with the default torch AdamW
(the foreach implementation) over timm's `add_weight_decay` groups. It needs timm==0.3.2
importable; tests/official.py patches that old timm and numpy for current torch. The official
forward draws its own masking noise. Timing rounds alternate ours / official so that machine
noise hits both alike. The official ConvMAE/FastConvMAE run only at 224 px with strides 4-2-2,
so their *_tiny models have no official row.

--mor adds, for FastConvMAE models, two rows timed in the same rounds: fastconvmae_mor.py's Mixture of
Reconstructors with the EMA teacher only, and with EMA, DINO and CLIP teachers. The stand-ins for
DINO and CLIP are ViTTeachers of their sizes with random weights (base: ViT-B/16, and CLIP's
projection to 512), since their cost does not depend on the weights. A MoR step includes the
teachers' forward passes (no gradient) and the EMA update, as the training loop runs them.

--dense adds, for FCMAE models, a row for the dense emulation of its encoder (tests/fcmae_dense.py:
every position computed, hidden ones zeroed after each operator), with the same weights, timed in
the same rounds; "vs dense" is its step time divided by ours.

Steps: --warmup untimed steps per model, then --rounds rounds of --steps timed steps, each
step timed on its own (with torch.cuda.synchronize on CUDA); the table shows the median.

Columns:
  step ms (median)   median wall time of one step
  img/s              batch / median step time
  peak mem (MB)      cuda: torch.cuda.max_memory_allocated() over the timed steps, less the
                     tensors the other model (--official) keeps on the GPU; cpu: the process's
                     peak resident set (VmHWM, reset before each round), which includes the
                     Python/torch runtime and, with --official, both models
  GFLOP per step     torch.utils.flop_counter.FlopCounterMode over one forward + backward
                     (matmuls, convolutions, attention; elementwise work and the optimizer
                     step are not counted)
  achieved GFLOP/s   GFLOP per step / median step time
  % of matmul peak   achieved / the best rate of large square matmuls (the "matmul peak"
                     line above the table): fp32 on CPU, the amp dtype on CUDA
  vs official        official step ms / our step ms: above 1 means ours is faster
  vs dense           (--dense) the dense emulation's step ms / ours
  GFLOP vs sparse ideal   FCMAE: GFLOP per step / what the official sparse encoder computes (its stem
                     densely, every later operator at the visible sites only): the dense
                     emulation's count with its blocks and downsamplings scaled by L_keep / L
"""
import argparse
import contextlib
import gc
import inspect
import io
import math
import os
import re
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TESTS))                              # the repo root: mae.py
import convmae  # noqa: E402
import convnextv2_fcmae  # noqa: E402
import fcmae_dense  # noqa: E402
import fastconvmae  # noqa: E402
import fastconvmae_mor  # noqa: E402
import mae  # noqa: E402
import simmim  # noqa: E402

METHODS = {"mae": mae, "convmae": convmae, "fastconvmae": fastconvmae, "simmim": simmim,
           "convnextv2": convnextv2_fcmae}                              # the official FCMAE needs MinkowskiEngine
FILE_OF = {name: module for module in METHODS.values() for name in module.MODELS}   # model name -> method file
# the official class of each method, and its constructor arguments from ours
OFFICIAL = {"mae": ("models_mae", "MaskedAutoencoderViT"),
            "convmae": ("models_convmae", "MaskedAutoencoderConvViT"),
            "fastconvmae": ("models_fastconvmae", "MaskedAutoencoderViT"),
            "simmim": ("models.simmim", "SimMIM")}
MASK_RATIOS = {"simmim": 0.6, "convnextv2": 0.6}                      # the others: 0.75

AMP_DTYPES = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def get_args(argv=None):
    p = argparse.ArgumentParser(description="pre-training step benchmark",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mae_vit_tiny", "mae_vit_base_patch16"], choices=list(FILE_OF))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=list(AMP_DTYPES), default=None, help="default: none on cpu, bf16 on cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (compiled during warmup)")
    p.add_argument("--channels_last", action="store_true", help="channels-last images and conv weight")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds (alternating with --official)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model before timing")
    p.add_argument("--mor", action="store_true", help="FastConvMAE: add rows with the Mixture of Reconstructors")
    p.add_argument("--dense", action="store_true", help="FCMAE: add a row for the dense emulation of its encoder")
    p.add_argument("--official", nargs="+", default=[], metavar="METHOD=PATH",
                   help=f"official checkouts to compare with; METHOD is one of {', '.join(METHODS)}")
    args = p.parse_args(argv)
    try:
        args.official = dict(item.split("=", 1) for item in args.official)
    except ValueError:
        p.error(f"--official takes METHOD=PATH pairs, got {args.official}")
    if set(args.official) - set(METHODS):
        p.error(f"--official: unknown method {sorted(set(args.official) - set(METHODS))}; one of {', '.join(METHODS)}")
    args.amp = args.amp or ("bf16" if args.device == "cuda" else "none")
    return args


# --- measuring: time, memory, FLOPs, the matmul peak ---


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device, dtype, repeats=5):
    """Best rate, in GFLOP/s, of one n x n @ n x n matmul over a few repeats; and n."""
    n = 8192 if device.type == "cuda" else 2048                       # big enough to be compute-bound
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.matmul(a, b)                                                  # library init, kernel choice
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9, n


def _sdpa_flops(q, k, v, *args, out_shape=None, **kwargs):             # shapes [N, heads, T, d]
    return 2 * q[0] * q[1] * q[2] * k[2] * (q[3] + v[3])               # q k^T, then p v


def _sdpa_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    return 2 * _sdpa_flops(q, k, v)                                     # dv, dp, dq, dk: 4 matmuls


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that
# F.scaled_dot_product_attention runs on CPU; without these our attention would count
# 0 FLOPs there, while the official model's explicit q @ k^T matmuls do count.
CPU_SDPA_FLOPS = {getattr(torch.ops.aten, name): fn for name, fn in [
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_flops),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_backward_flops),
] if hasattr(torch.ops.aten, name)}


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, output_mask=None, out_shape=None, **kwargs):
    """Each gradient the backward computes (input, weight) costs what the forward did:
    2 x output elements x (C_in / groups) x kernel area. FlopCounterMode's own formula ignores
    groups here and counts a depthwise convolution's backward C times over."""
    if output_mask is None:                                              # positional, as aten passes it
        output_mask = args[-1]
    forward = 2 * math.prod(grad_out_shape) * math.prod(w_shape[1:])    # w_shape[1] = C_in / groups
    return forward * (int(output_mask[0]) + int(output_mask[1]))


# The counting this benchmark uses: the two fixes above on top of FlopCounterMode's formulas.
FLOP_FORMULAS = {**CPU_SDPA_FLOPS, torch.ops.aten.convolution_backward: _conv_backward_flops}


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:                  # Linux: VmHWM := current RSS
            f.write("5")
    except OSError:
        pass                                                            # elsewhere: lifetime peak


def process_peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024                  # kB
    except OSError:
        pass
    import resource                                                     # not on Windows
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 1024   # bytes on macOS, KiB on Linux


# --- what is benchmarked: a model, how to call it, its optimizer ---


@dataclass
class Contender:
    label: str
    model: nn.Module                            # the one stepped: compiled with --compile
    loss: Callable                              # (model, imgs, noise) -> loss
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    after_step: Callable = None                 # the MoR EMA update
    gflop: float = 0.0
    ideal_gflop: float = 0.0                    # FCMAE: the sparse ideal's count
    times_ms: list = field(default_factory=list)
    peak_mb: float = 0.0

    def resident_bytes(self):
        """GPU bytes it keeps between steps: weights, buffers, grads, optimizer state."""
        params = list(self.model.parameters())
        tensors = params + list(self.model.buffers()) + [p.grad for p in params if p.grad is not None]
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)


def make_contender(label, model, loss, param_groups, args, device, **optimizer_kwargs):
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)            # 4-D conv weights
    groups = param_groups(model, 0.05)                                  # decay / no-decay, trainable only
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), **optimizer_kwargs)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")  # bf16 needs no scaling
    return Contender(label, model, loss, optimizer, scaler)


def method(name):
    return name.split("_")[0]


def arch(name):
    """MODELS[name]'s keyword arguments with our class's defaults filled in (SimMIM: its encoder's)."""
    builder = FILE_OF[name].MODELS[name]
    cls = builder.func
    if method(name) == "simmim":
        cls = {"vit": simmim.VisionTransformerForSimMIM, "swin": simmim.SwinTransformerForSimMIM}[builder.keywords["encoder"]]
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    return {**defaults, "mask_patch_size": 32, **builder.keywords}


def mask_ratio(name):
    return MASK_RATIOS.get(method(name), 0.75)


def units_side(name):
    """Mask units per image side: image size / the mask's unit."""
    a = arch(name)
    if method(name) == "simmim":
        return a["img_size"] // a["mask_patch_size"]
    return a["img_size"] // math.prod(a["patch_size"]) if isinstance(a["patch_size"], tuple) else \
        a["img_size"] // a["patch_size"]


def ours(name, args, device):
    torch.manual_seed(0)
    module = FILE_OF[name]
    model = module.MODELS[name](**({} if method(name) == "simmim" else {"norm_pix_loss": True}))
    fused = device.type in ("cpu", "cuda")                              # as the training loop
    ratio = mask_ratio(name)
    return make_contender(name, model, lambda m, imgs, noise: m(imgs, ratio, noise)[0],
                          module.param_groups, args, device, fused=fused)


def ours_with_mor(name, args, device, external):
    """FastConvMAE with the Mixture of Reconstructors: the EMA teacher, and DINO/CLIP stand-ins if `external`."""
    torch.manual_seed(0)
    a = arch(name)
    grid, dim = units_side(name), a["embed_dim"][-1]
    patch = a["img_size"] // grid                                       # the teachers' patches are the units
    vit = dict(patch_size=patch, dim=dim, depth=12 if dim >= 768 else 2, tokens=grid * grid + 1)
    teachers = {}
    if external:
        mor = fastconvmae_mor
        teachers = {kind: mor.FeatureTeacher(mor.ViTTeacher(**vit, clip=clip, out_dim=dim * 2 // 3).eval(),
                                             mean, std, grid).to(device)
                    for kind, clip, mean, std in [("dino", False, mor.IMAGENET_MEAN, mor.IMAGENET_STD),
                                                  ("clip", True, mor.CLIP_MEAN, mor.CLIP_STD)]}
    widths = {"ema": dim} | {kind: teacher(torch.zeros(1, 3, a["img_size"], a["img_size"], device=device)).shape[-1]
                             for kind, teacher in teachers.items()}
    model = fastconvmae_mor.MODELS[name](norm_pix_loss=True, reconstructors=widths,
                                         branch_depth=max(a["decoder_depth"] // 4, 1)).to(device)
    ema = fastconvmae_mor.ema_teacher(model)

    def loss(m, imgs, noise):
        return m(imgs, 0.75, noise, fastconvmae_mor.teacher_targets(ema, teachers, imgs))[0]["loss"]
    label = f"{name} +MoR ({', '.join(widths)})"
    c = make_contender(label, model, loss, fastconvmae_mor.param_groups, args, device, fused=True)
    c.after_step = partial(fastconvmae_mor.update_ema, ema, model, 0.996)
    return c


def dense(name, args, device):
    """FCMAE with the dense emulation of its encoder (tests/fcmae_dense.py): our weights, every position computed."""
    torch.manual_seed(0)
    model = fcmae_dense.dense_emulation(name, norm_pix_loss=True)
    ratio = mask_ratio(name)
    return make_contender(f"{name} (dense emulation)", model, lambda m, imgs, noise: m(imgs, ratio, noise)[0],
                          convnextv2_fcmae.param_groups, args, device, fused=True)


def sparse_ideal_gflop(name, batch):
    """FCMAE's GFLOP per forward + backward if its encoder ran as the official sparse one: the stem densely,
    every later operator at the visible sites only. Counted on the dense emulation (on the meta device: shapes
    only), whose blocks and downsamplings compute every site: their leaf modules' FLOPs scaled by L_keep / L."""
    L, size = units_side(name) ** 2, arch(name)["img_size"]
    with torch.device("meta"):
        model = fcmae_dense.dense_emulation(name, norm_pix_loss=True)
        imgs, noise = torch.randn(batch, 3, size, size), torch.rand(batch, L)
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        model(imgs, mask_ratio(name), noise)[0].backward()
    after_stem = sum(sum(ops.values()) for module, ops in counter.get_flop_counts().items()
                     if re.search(r"\.encoder\.(stages\.\d+\.\d+|downsample_layers\.[123])\.\w+$", module))
    keep = int(L * (1 - mask_ratio(name))) / L
    return (counter.get_total_flops() - (1 - keep) * after_stem) / 1e9


def official_kwargs(name):
    """The official constructor's arguments for our architecture: where MODELS[name] leaves an
    argument to the class default, our class's default is passed, so the two cannot drift apart.
    None where the official code cannot build it (ConvMAE's grids are hard-coded for 224 px)."""
    a = dict(arch(name))
    if method(name) in ("convmae", "fastconvmae"):
        if a["img_size"] != 224 or tuple(a["patch_size"]) != (4, 2, 2):
            return None
        a["img_size"] = [224, 56, 28]
        a.update({k: list(a[k]) for k in ("patch_size", "embed_dim", "depth", "mlp_ratio")})
    return a


def official_simmim(name, module):
    """The official SimMIM (models/simmim.py) as build_simmim makes it from a config, and its loss
    on the mask our model draws from the same noise (data_simmim.py hands it the patch-level mask)."""
    a = arch(name)
    shared = dict(img_size=a["img_size"], patch_size=a["patch_size"], in_chans=3, num_classes=0,
                  embed_dim=a["embed_dim"], num_heads=a["num_heads"], mlp_ratio=a["mlp_ratio"], qkv_bias=True,
                  drop_path_rate=a["drop_path_rate"])
    if a["encoder"] == "vit":
        encoder = module.VisionTransformerForSimMIM(
            **shared, depth=a["depth"], norm_layer=partial(nn.LayerNorm, eps=1e-6), init_values=a["init_values"],
            use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_mean_pooling=False)
        stride = a["patch_size"]
    else:
        encoder = module.SwinTransformerForSimMIM(**shared, depths=list(a["depths"]), window_size=a["window_size"],
                                                  ape=False, patch_norm=True)
        stride = a["patch_size"] * 2 ** (len(a["depths"]) - 1)
    g, r = units_side(name), a["mask_patch_size"] // a["patch_size"]

    def loss(m, imgs, noise):
        mask = simmim.random_mask(noise, mask_ratio(name)).view(-1, g, g)
        return m(imgs, mask.repeat_interleave(r, 1).repeat_interleave(r, 2))
    return module.SimMIM(encoder=encoder, encoder_stride=stride), loss


def official(name, args, device):
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    from official import import_official                                # tests/official.py
    module_name, class_name = OFFICIAL[method(name)]
    # shims old timm first; quietly, since models_fastconvmae.py's stray `from this import d` prints
    # the Zen of Python into the table
    with contextlib.redirect_stdout(io.StringIO()):
        module = import_official(args.official[method(name)], module_name)
    from timm.optim.optim_factory import add_weight_decay              # what main_pretrain.py uses
    if method(name) == "simmim":
        torch.manual_seed(0)
        model, loss = official_simmim(name, module)
        return make_contender(f"{name} (official)", model, loss, add_weight_decay, args, device)
    cls = getattr(module, class_name)
    theirs = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in official_kwargs(name).items() if k in theirs}   # not our drop_path_rate
    kwargs.update(norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=True)
    torch.manual_seed(0)
    return make_contender(f"{name} (official)", cls(**kwargs), lambda m, imgs, noise: m(imgs, mask_ratio(name))[0],
                          add_weight_decay, args, device)


# --- running ---


def train_step(c, imgs, noise, autocast):
    c.optimizer.zero_grad(set_to_none=True)
    with autocast():
        loss = c.loss(c.model, imgs, noise)
    c.scaler.scale(loss).backward()
    c.scaler.step(c.optimizer)
    c.scaler.update()
    if c.after_step:
        c.after_step()


def count_gflop(c, imgs, noise, autocast):
    """FLOPs of one forward + backward, on the eager model (before any torch.compile)."""
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        with autocast():
            loss = c.loss(c.model, imgs, noise)
        loss.backward()
    c.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def timed_round(c, others, imgs, noise, autocast, args, device):
    reset_peak_memory(device)
    for _ in range(args.steps):
        sync(device)
        t0 = time.perf_counter()
        train_step(c, imgs, noise, autocast)
        sync(device)
        c.times_ms.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":                                           # the other model is not ours
        peak = torch.cuda.max_memory_allocated(device) - sum(o.resident_bytes() for o in others)
        c.peak_mb = max(c.peak_mb, peak / 2 ** 20)
    else:
        c.peak_mb = max(c.peak_mb, process_peak_rss_mb())


def bench_model(name, args, device, autocast):
    """Our model (and the official one) on one fixed batch: FLOPs, warmup, interleaved rounds."""
    img_size = arch(name)["img_size"]
    torch.manual_seed(0)
    imgs = torch.randn(args.batch, 3, img_size, img_size, device=device)
    if args.channels_last:
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    noise = torch.rand(args.batch, units_side(name) ** 2, device=device)
    with_official = method(name) in args.official and official_kwargs(name) is not None
    contenders = [ours(name, args, device)] + ([official(name, args, device)] if with_official else [])
    if args.mor and method(name) == "fastconvmae":
        contenders += [ours_with_mor(name, args, device, external) for external in (False, True)]
    if args.dense and method(name) == "convnextv2":
        contenders.append(dense(name, args, device))
    ideal = sparse_ideal_gflop(name, args.batch) if method(name) == "convnextv2" else 0.0
    for c in contenders:
        c.gflop, c.ideal_gflop = count_gflop(c, imgs, noise, autocast), ideal
        if args.compile and c is contenders[0]:                        # the official code runs eager
            c.model = torch.compile(c.model)
        for _ in range(args.warmup):
            train_step(c, imgs, noise, autocast)
    for _ in range(args.rounds):
        for c in contenders:
            timed_round(c, [o for o in contenders if o is not c], imgs, noise, autocast, args, device)
    return contenders, img_size


# --- reporting ---


def fmt(x):
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def hardware_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else "CPU"
    except OSError:
        return "CPU"


def print_header(args, device, peak_dtype, peak, n):
    print(f"pre-training step (forward + backward + AdamW) | {hardware_name(device)} | "
          f"threads={torch.get_num_threads()} | torch {torch.__version__} | amp {args.amp} | "
          f"compile {args.compile} | channels_last {args.channels_last} | "
          f"{args.warmup} warmup + {args.rounds} x {args.steps} timed steps")
    threads = torch.get_num_threads()
    print(f"matmul peak: {peak:.0f} GFLOP/s ({DTYPE_NAMES[peak_dtype]}, n={n}, threads={threads})\n")
    mem = "peak mem (MB)¹" if device.type == "cuda" else "peak mem (MB, process peak RSS)¹"
    cols = ["model", "device", "dtype", "batch", "img px", "step ms (median)", "img/s", mem,
            "GFLOP per step", "achieved GFLOP/s", "% of matmul peak"] + extra_columns(args)
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))


def extra_columns(args):
    return ((["vs official"] if args.official else []) + (["vs dense"] if args.dense else [])
            + (["GFLOP vs sparse ideal"] if any(method(name) == "convnextv2" for name in args.models) else []))


def print_rows(contenders, img_size, args, device, dtype, peak):
    ms = [statistics.median(c.times_ms) for c in contenders]

    def vs(suffix):                                                     # the other's step time / ours
        other = [j for j, o in enumerate(contenders) if o.label.endswith(suffix)]
        return f"{ms[other[0]] / ms[0]:.2f}x" if other else ""
    for i, c in enumerate(contenders):
        achieved = c.gflop / (ms[i] / 1e3)
        row = [c.label, device.type, DTYPE_NAMES[dtype] + (" amp" if args.amp != "none" else ""), args.batch,
               img_size, fmt(ms[i]), fmt(args.batch / ms[i] * 1e3), fmt(c.peak_mb), fmt(c.gflop), fmt(achieved),
               f"{100 * achieved / peak:.1f}"]
        row += [vs("(official)") if i == 0 else ""] if args.official else []
        row += [vs("(dense emulation)") if i == 0 else ""] if args.dense else []
        if "GFLOP vs sparse ideal" in extra_columns(args):
            row.append(f"{c.gflop / c.ideal_gflop:.2f}x" if c.ideal_gflop else "")
        print("| " + " | ".join(map(str, row)) + " |", flush=True)


def print_footnote(args, device):
    if device.type == "cuda":
        note = "torch.cuda.max_memory_allocated() over the timed steps (less the other model's tensors)"
    else:
        note = ("the process's peak resident set (VmHWM) over the timed steps: includes the Python/torch "
                "runtime" + (" and both models" if args.official else ""))
    print(f"\n¹ {note}. GFLOP: FlopCounterMode over forward + backward (matmul, conv, attention).")


def main(args):
    device = torch.device(args.device)
    dtype = AMP_DTYPES[args.amp]
    autocast = partial(torch.autocast, device.type, dtype=dtype) if args.amp != "none" else nullcontext
    # CPU: fp32, since a CPU's fp16 matmul can be a slow fallback and no useful reference
    peak_dtype = dtype if device.type == "cuda" else torch.float32
    peak, n = matmul_peak(device, peak_dtype)
    print_header(args, device, peak_dtype, peak, n)
    for name in args.models:
        contenders, img_size = bench_model(name, args, device, autocast)
        print_rows(contenders, img_size, args, device, dtype, peak)
        del contenders                                                  # free before the next model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_footnote(args, device)


if __name__ == "__main__":
    main(get_args())
