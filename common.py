"""What the five method files share: data (a folder, or with no --data the built-in `BuiltinShapes`: no download),
patchify/unpatchify, the lr schedule, reading the official scripts' checkpoint files, progress bars where one waits."""
import argparse
import math
import os
import pickle
import signal
import sys
import warnings
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms
from tqdm import tqdm

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
BICUBIC, BILINEAR = transforms.InterpolationMode.BICUBIC, transforms.InterpolationMode.BILINEAR


# --- the built-in data set ---
class BuiltinShapes(Dataset):
    """Ten labelled classes drawn procedurally, sample i a pure function of (offset + i, size): 0-5 a shape over a
    random gradient background, 6-9 a texture seen through a random window. Colours, positions, sizes and angles vary
    per sample, so a masked model has edges, corners and periodic structure to infer from the visible patches."""
    classes = ["disk", "square", "triangle", "ring", "cross", "star", "stripes", "checkerboard", "dots", "waves"]

    def __init__(self, length=4096, size=224, offset=0):
        self.length, self.size, self.offset = length, size, offset  # offset: a disjoint split

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        label = i % 10
        rng = np.random.default_rng([self.offset + i, 0x5EED])
        y, x = np.mgrid[0:self.size, 0:self.size] / (self.size - 1) * 2 - 1   # [s, s] coordinates in [-1, 1]
        bg0, bg1, fg = rng.uniform(0, 1, (3, 3))
        fg = np.where(np.abs(fg - bg0).sum() < 0.6, 1 - fg, fg)   # keep the object visible
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * x + np.sin(angle) * y + 1) / 2
        img = bg0 + (bg1 - bg0) * ramp[..., None]                # [s, s, 3] background gradient
        cx, cy, r, theta = (rng.uniform(lo, hi) for lo, hi in ((-0.4, 0.4), (-0.4, 0.4), (0.3, 0.6), (0, 2 * np.pi)))
        u = ((x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)) / r   # rotated, scaled frame
        v = (-(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)) / r
        rho, phi, au, av = np.hypot(u, v), np.arctan2(v, u), np.abs(u), np.abs(v)
        period = rng.uniform(0.15, 0.4) * r
        su, sv, sr = (np.sin(t * r / period * np.pi) for t in (u, v, rho))   # waves `period` wide
        shapes = [rho < 1, np.maximum(au, av) < 0.8, (v > -0.5) & (v < 1 - 1.7 * au), (rho < 1) & (rho > 0.6),
                  (np.minimum(au, av) < 0.25) & (np.maximum(au, av) < 1), rho < 0.6 + 0.4 * np.cos(5 * phi),
                  su > 0, (su > 0) ^ (sv > 0), np.hypot(su, sv) < 0.5, sr > 0]         # in `classes` order
        inside = shapes[label] & ((rho < 1.6) if label >= 6 else True)
        img = np.where(inside[..., None], fg, img)
        img = img + rng.normal(0, 0.03, img.shape)              # sensor noise: nothing is flat
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
        return Image.fromarray(img), label


# --- folder data sets ---
def _to_rgb(img):
    """Any PIL mode to RGB; 16-bit and float grey is rescaled, not clipped to white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or a.max() > 255:         # 16-bit range (PNG opens as I or I;16)
            a = a / 257
        elif img.mode == "F" and a.max() <= 1:                   # float in [0, 1]
            a = a * 255
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")                                # PIL wants this order
    return img.convert("RGB")


class ImageFiles(Dataset):
    """Images under `root`: `root/<class>/**` (labelled) or a flat folder (label 0). A file PIL cannot read is
    skipped with a warning naming it and the next readable file stands in: one bad JPEG never stops an epoch."""

    def __init__(self, root):
        if not os.path.isdir(root):
            raise ValueError(f"--data {root}: no such folder; give a folder of images or of class folders")
        subdirs = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
        seen = {os.path.realpath(root)}                          # each real folder once: a link to an ancestor ends
        found = {d: _image_paths(os.path.join(root, d), seen=seen) for d in progress(subdirs, desc=f"scanning {root}")}
        self.classes = [d for d in subdirs if found[d]]
        self.samples = [(p, label) for label, d in enumerate(self.classes) for p in found[d]]
        if not self.samples:                                     # flat layout
            self.samples = [(p, 0) for p in _image_paths(root, recursive=False)]
        if not self.samples:
            raise ValueError(f"--data {root}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)}); "
                             "give DIR/train/<class>/*, DIR/<class>/* or a folder of images")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        for j in range(i, i + len(self.samples)):
            path, label = self.samples[j % len(self.samples)]
            try:
                with Image.open(path) as img:
                    return _to_rgb(img), label                   # convert() loads every pixel
            except Exception as e:                               # PIL raises many kinds
                warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=2)
        raise ValueError(f"--data: none of the {len(self.samples)} images could be read")


def _image_paths(folder, recursive=True, seen=None):
    """The images under (or, not recursive, in) `folder`, sorted; symlinks followed, no real folder of `seen` again."""
    paths, seen = [], set() if seen is None else seen
    for d, subdirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(d)
        if real in seen or not recursive:
            subdirs.clear()                                      # nothing below: been here, or the top level only
        if real not in seen:
            seen.add(real)
            paths += [os.path.join(d, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(paths)


def load_images(data, split="train", size=224, builtin_length=4096):
    """The data set a method trains on: `data` is a folder, or None for `BuiltinShapes`."""
    if data is None:
        return BuiltinShapes(builtin_length, size, offset=0 if split == "train" else 10**6)
    sub = os.path.join(data, split)
    return ImageFiles(sub if os.path.isdir(sub) else data)


# --- pre-training input pipeline (MAE §4, main_pretrain.py; SimMIM's crop differs) ---
def pretrain_transform(size, scale=(0.2, 1.0), interpolation=BICUBIC):
    return transforms.Compose([transforms.RandomResizedCrop(size, scale=scale, interpolation=interpolation),
                               transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class SeededSamples(Dataset):
    """Applies `transform` and draws masking noise [L] from a stream seeded by (seed, epoch, i): a sample is the same
    whatever the processes or workers, as a resumed run needs. mask_units=0 (fine-tuning): (image, label) samples."""

    def __init__(self, images, transform, seed, mask_units):
        self.images, self.transform, self.seed, self.mask_units = images, transform, seed, mask_units

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, i = key
        seed = int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1, np.uint64)[0] >> 1)
        img, label = self.images[i]
        with torch.random.fork_rng(devices=[]):                  # leave the caller's stream alone
            torch.default_generator.manual_seed(seed)            # torchvision draws from it (not CUDA's)
            img = self.transform(img)
            noise = torch.rand(self.mask_units)
        return img, noise if self.mask_units else label


class EpochSampler(DistributedSampler):
    """DistributedSampler that yields (epoch, index) and can start `skip_batches` into an epoch."""

    def __init__(self, dataset, world_size, rank, seed, batch_size):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batch_size, self.skip_batches = batch_size, 0

    def __iter__(self):
        indices = list(super().__iter__())[self.skip_batches * self.batch_size:]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self):
        return max(self.num_samples - self.skip_batches * self.batch_size, 0)


def pretrain_loader(images, size, batch_size, mask_units, seed=0, rank=0, world_size=1, num_workers=4, transform=None):
    """This rank's loader of `len(loader)` full batches (imgs [B, 3, size, size], noise [B, mask_units]), or (imgs,
    labels [B]) with mask_units=0; `loader.sampler`: set_epoch each epoch, skip_batches to resume mid-epoch."""
    samples = SeededSamples(images, transform or pretrain_transform(size), seed, mask_units)
    sampler = EpochSampler(samples, world_size, rank, seed, batch_size)
    if len(sampler) < batch_size:
        raise ValueError(f"--batch_size {batch_size}: larger than the {len(sampler)} images each of "
                         f"{world_size} process(es) gets; lower it or add images")
    return DataLoader(samples, batch_size, sampler=sampler, num_workers=num_workers, drop_last=True,
                      pin_memory=torch.cuda.is_available(), worker_init_fn=ignore_stop_signals,
                      generator=torch.Generator().manual_seed(seed))  # its own stream: the caller's is untouched


def ignore_stop_signals(worker_id):
    """A data worker's init: SIGTERM and Ctrl-C reach the whole process group; the trainer saves, its workers follow."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- progress: bars where a person waits, the log lines alone everywhere else ---
def progress(iterable=None, **kwargs):
    """tqdm on stderr for rank 0 where stderr is a terminal; in a file, under a scheduler or in CI it draws nothing."""
    hidden = int(os.environ.get("RANK", 0)) > 0 or not sys.stderr.isatty()
    return tqdm(iterable, disable=hidden, leave=False, dynamic_ncols=True, **kwargs)


def say(*parts):
    """print, flushed, that keeps a bar whole (tqdm lifts it, prints the line, draws it again)."""
    tqdm.write(" ".join(str(p) for p in parts))
    sys.stdout.flush()


# --- patches (MAE §3: the target is the pixels of each patch) ---
def patchify(imgs, p):
    """[N, 3, H, W] -> [N, L, p*p*3], patches in row-major order, channel innermost (official order)."""
    N, C, H, W = imgs.shape
    assert H % p == 0 and W % p == 0, f"image {H}x{W} is not a multiple of patch {p}"
    x = imgs.reshape(N, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(N, (H // p) * (W // p), p * p * C)


def unpatchify(x, p, hw=None):
    """[N, L, p*p*3] -> [N, 3, h*p, w*p]; `hw` = (h, w) patches, square by default."""
    N, L, _ = x.shape
    h, w = hw or (math.isqrt(L),) * 2
    assert h * w == L, f"{L} patches do not form a {h}x{w} grid"
    x = x.reshape(N, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(N, -1, h * p, w * p)


# --- learning rate: linear warmup, then half-cycle cosine (MAE util/lr_sched.py) ---
def cosine_lr(epoch, lr, min_lr, warmup_epochs, epochs):
    """The lr at a fractional `epoch` (epoch + step / steps_per_epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr):
    """Every group gets `lr`, times its `lr_scale` where it has one (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# --- checkpoint files: the official training scripts pickle more than tensors ---
class _StandIn(type):
    """Type of the stand-ins for classes a file names (SimMIM's yacs CfgNode): made as OrderedDicts, never called."""

    def __call__(cls, *args, **kwargs):
        raise pickle.UnpicklingError(f"calls {cls.__name__}")


def load_checkpoint(path, mmap=False):
    """torch.load(path, weights_only=True) that also reads the official scripts' `args`, numpy scalars and classes not
    here (SimMIM's yacs `config`: nested OrderedDicts). No code runs: any other pickled call raises UnpicklingError."""
    scalar = np.float64(0).__reduce__()[0]                       # numpy's scalar constructor, numpy 1 or 2
    harmless = {"argparse.Namespace": argparse.Namespace, "numpy.dtype": np.dtype,
                "numpy.core.multiarray.scalar": scalar, "numpy._core.multiarray.scalar": scalar}
    names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in harmless]
    stand_ins = [(_StandIn(n, (), {"__new__": lambda cls, *a: OrderedDict()}), n) for n in names]
    dtypes = [type(np.dtype(c)) for c in np.typecodes["All"]]    # numpy >= 1.25 has a class per dtype
    try:
        with torch.serialization.safe_globals([(f, n) for n, f in harmless.items()] + stand_ins + dtypes):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:                               # torch's message is a paragraph
        raise pickle.UnpicklingError(f"{path}: refused: loading it would run code from the file "
                                     f"({', '.join(names) or 'an unsupported pickle'})") from None
