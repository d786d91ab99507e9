"""The fine-tuning scripts' augmentation, rewritten on PIL: timm 0.3.2's RandAugment as `rand-m9-mstd0.5-inc1` (the
recipe of MAE's, ConvMAE's, SimMIM's and ConvNeXt V2's fine-tuning) and the random resized crop of MAE's linear
probe (util/crop.py). tests/test_finetune_fidelity.py checks both against fixtures made by the official code (timm's
operations byte for byte, MAE's crop boxes). Used by finetune.py."""
import math

import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms

from common import IMAGENET_MEAN


# --- RandAugment (timm 0.3.2 data/auto_augment.py) ---
FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)                     # (124, 116, 104): timm's img_mean


def _affine(img, matrix):
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=FILL)


def _lut(img, table):                                                   # the same 256-entry table for every band
    return img.point(table * len(img.getbands()))


# name: (operation(img, argument), the argument at magnitude m of 10 (None: no argument), whether its sign is drawn);
# timm's "increasing" variants: every operation changes the image more as m grows
RAND_OPS = {
    "AutoContrast": (lambda img, _: ImageOps.autocontrast(img), None, False),
    "Equalize": (lambda img, _: ImageOps.equalize(img), None, False),
    "Invert": (lambda img, _: ImageOps.invert(img), None, False),
    "Rotate": (lambda img, deg: img.rotate(deg, resample=Image.BICUBIC, fillcolor=FILL), lambda m: m / 10 * 30.0, True),
    "PosterizeIncreasing": (lambda img, bits: _lut(img, [i & ~(2 ** (8 - bits) - 1) for i in range(256)]),
                            lambda m: 4 - int(m / 10 * 4), False),     # keep 4..0 bits; 0: black, as Pillow < 10 did
    "SolarizeIncreasing": (lambda img, thresh: ImageOps.solarize(img, thresh), lambda m: 256 - int(m / 10 * 256),
                           False),
    "SolarizeAdd": (lambda img, add: _lut(img, [min(255, i + add) if i < 128 else i for i in range(256)]),
                    lambda m: int(m / 10 * 110), False),
    "ColorIncreasing": (lambda img, v: ImageEnhance.Color(img).enhance(1.0 + v), lambda m: m / 10 * 0.9, True),
    "ContrastIncreasing": (lambda img, v: ImageEnhance.Contrast(img).enhance(1.0 + v), lambda m: m / 10 * 0.9, True),
    "BrightnessIncreasing": (lambda img, v: ImageEnhance.Brightness(img).enhance(1.0 + v), lambda m: m / 10 * 0.9,
                             True),
    "SharpnessIncreasing": (lambda img, v: ImageEnhance.Sharpness(img).enhance(1.0 + v), lambda m: m / 10 * 0.9, True),
    "ShearX": (lambda img, v: _affine(img, (1, v, 0, 0, 1, 0)), lambda m: m / 10 * 0.3, True),
    "ShearY": (lambda img, v: _affine(img, (1, 0, 0, v, 1, 0)), lambda m: m / 10 * 0.3, True),
    "TranslateXRel": (lambda img, v: _affine(img, (1, 0, v * img.size[0], 0, 1, 0)), lambda m: m / 10 * 0.45, True),
    "TranslateYRel": (lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.size[1])), lambda m: m / 10 * 0.45, True),
}


def rand_op(img, name, magnitude, negated=False):
    """RAND_OPS[name] on a PIL image at `magnitude` (0..10), its argument negated if the operation has a sign."""
    op, level, signed = RAND_OPS[name]
    arg = level(magnitude) if level else None
    return op(img, -arg if signed and negated else arg)


class RandAugment:
    """timm 0.3.2's `rand-m9-mstd0.5-inc1`: 2 of the 15 RAND_OPS drawn with replacement, each applied with p 0.5 at a
    magnitude from N(9, 0.5) clipped to [0, 10], its argument negated half the time. The draws come from torch's
    generator, which common.SeededSamples seeds per sample: a resumed run augments each image as before."""

    def __init__(self, magnitude=9, std=0.5, num_ops=2, prob=0.5):
        self.magnitude, self.std, self.num_ops, self.prob = magnitude, std, num_ops, prob

    def draw(self):
        """[(name, magnitude, negated)] of the operations to apply, in order (those skipped left out)."""
        names, ops = list(RAND_OPS), []
        for k in torch.randint(len(names), (self.num_ops,)).tolist():
            if torch.rand(()).item() < self.prob:
                m = self.magnitude + self.std * torch.randn((), dtype=torch.float64).item()
                ops.append((names[k], min(10.0, max(0.0, m)), torch.rand(()).item() < 0.5))
        return ops

    def __call__(self, img):
        for name, magnitude, negated in self.draw():
            img = rand_op(img, name, magnitude, negated)
        return img


# --- the linear probe's crop (MAE util/crop.py) ---
class ProbeCrop(transforms.RandomResizedCrop):
    """MAE's util/crop.py RandomResizedCrop (the probe's): one draw of area and log aspect ratio, width and height then
    clamped to the image's (torchvision's tries ten draws, then the centre: smaller crops on images far from square)."""

    @staticmethod
    def get_params(img, scale, ratio):
        W, H = img.size
        area = H * W * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        w, h = min(int(round(math.sqrt(area * aspect))), W), min(int(round(math.sqrt(area / aspect))), H)
        i = torch.randint(0, H - h + 1, size=(1,)).item()
        j = torch.randint(0, W - w + 1, size=(1,)).item()
        return i, j, h, w
