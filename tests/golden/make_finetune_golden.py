"""Make tests/golden/finetune_official.pt: fine-tuning fixtures from the libraries the official scripts use.

- RandAugment: each of the 15 operations of timm 0.3.2's `rand-m9-mstd0.5-inc1` (the augmentation of MAE's, ConvMAE's,
  SimMIM's and ConvNeXt V2's fine-tuning) applied by timm's own functions to one fixed image, at several magnitudes
  and both signs, with the arguments timm's create_transform gives them (bicubic, fill = the ImageNet mean pixel).
- The linear probe's crop: MAE's util/crop.py RandomResizedCrop, its (top, left, height, width) on a 500 x 333 image
  for 200 seeds, and one crop resized to 24 px (bicubic), as main_linprobe.py calls it.
- Relative position bias tables resized by SimMIM's utils.py (remap_pretrained_keys_swin / _vit: a geometric grid,
  scipy's interp2d cubic): Swin window 6 -> 7 (192 -> 224 px) and ViT 14 -> 16 patches (224 -> 256 px).

Run it once in a scratch environment; CI only reads the fixture. timm 0.3.2's package does not import on today's
torch, so its auto_augment.py (which needs only Pillow and numpy) is loaded as a file; interp2d left scipy in 1.14:

    python3 -m venv --system-site-packages scratch-venv
    scratch-venv/bin/pip install --no-deps timm==0.3.2 "scipy<1.14" "numpy<2.3"
    scratch-venv/bin/pip install --target old-pillow pillow==9.5.0      # a Pillow of timm's time: posterize(img, 0)
    git clone https://github.com/microsoft/SimMIM path/to/SimMIM
    git clone https://github.com/facebookresearch/mae path/to/mae
    PYTHONPATH=old-pillow scratch-venv/bin/python tests/golden/make_finetune_golden.py path/to/SimMIM path/to/mae
"""
import argparse
import importlib.util
import logging
import os
import sys
from types import SimpleNamespace

import numpy as np
import PIL
import scipy
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from official import git_head, import_official  # noqa: E402  (tests/official.py)

HERE = os.path.dirname(os.path.abspath(__file__))
MAGNITUDES = (0.0, 3.3, 9.0, 9.6, 10.0)     # 9 +- 0.5 clipped to [0, 10] is what the recipe draws
IMAGENET_MEAN = (0.485, 0.456, 0.406)


def test_image(w=40, h=32, seed=0):
    """A non-square RGB image with gradients, a disk and noise, in a narrow range (so that autocontrast, equalize
    and solarize all have something to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = 60 + 90 * np.stack([x / w, y / h, (x + y) / (w + h)], axis=-1)
    img[(x - 25) ** 2 + (y - 14) ** 2 < 64] = (170, 40, 120)
    img = img + rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def randaugment_cases(auto_augment):
    """(image uint8 [H, W, 3], [(op name, magnitude, negated)], outputs uint8 [cases, H, W, 3]): timm's level
    functions and ops; both signs only for the operations whose level function draws one."""
    hparams = dict(translate_const=int(224 * 0.45), img_mean=tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN),
                   interpolation=Image.BICUBIC, magnitude_std=0.5)   # transforms_factory.py, interpolation='bicubic'
    img, cases, outputs = test_image(), [], []
    for name in auto_augment._RAND_INCREASING_TRANSFORMS:
        op = auto_augment.AugmentOp(name, prob=1.0, magnitude=9, hparams=hparams)
        for m in MAGNITUDES:
            args = {}
            for negated in (False, True):
                draw = 1.0 if negated else 0.0                        # _randomly_negate: -v if random() > 0.5
                auto_augment.random = SimpleNamespace(random=lambda: draw)
                args[negated] = op.level_fn(m, op.hparams) if op.level_fn is not None else ()
            for negated in (False, True) if args[True] != args[False] else (False,):
                cases.append((name, m, negated))
                outputs.append(np.asarray(op.aug_fn(img.copy(), *args[negated], **dict(op.kwargs))))
    return torch.from_numpy(np.asarray(img).copy()), cases, torch.from_numpy(np.stack(outputs))


def probe_crop_cases(crop):
    """MAE's crop draws: [(seed, (i, j, h, w))] on a 500 x 333 image, and one bicubic crop of test_image() to 24 px."""
    from torchvision.transforms import functional as F
    if not hasattr(F, "_get_image_size"):                                   # renamed in torchvision 0.15
        crop.F._get_image_size = F.get_image_size
    big = Image.new("RGB", (500, 333))
    params = []
    for seed in range(200):
        torch.manual_seed(seed)
        params.append(crop.RandomResizedCrop.get_params(big, (0.08, 1.0), (3 / 4, 4 / 3)))
    torch.manual_seed(0)
    out = crop.RandomResizedCrop(24, interpolation=3)(test_image())       # main_linprobe.py: interpolation=3
    return {"params": torch.tensor(params), "crop24_seed0": torch.from_numpy(np.asarray(out).copy())}


def rel_pos_cases(utils, seed=0):
    """{kind: (table before, table after)}: SimMIM's remapping of a random pre-trained table."""
    g = torch.Generator().manual_seed(seed)
    log = logging.getLogger("simmim")
    key = "layers.0.blocks.0.attn.relative_position_bias_table"
    swin_in = torch.randn(11 * 11, 4, generator=g)                            # window 6, 4 heads
    swin = SimpleNamespace(state_dict=lambda: {key: torch.zeros(13 * 13, 4)})   # window 7
    swin_out = utils.remap_pretrained_keys_swin(swin, {key: swin_in.clone()}, log)[key]
    vit_in = torch.randn(27 * 27 + 3, 4, generator=g)                         # 14 x 14 patches, 3 extra (cls) rows
    key = "blocks.0.attn.relative_position_bias_table"
    vit = SimpleNamespace(get_num_layers=lambda: 1, patch_embed=SimpleNamespace(patch_shape=(16, 16)),
                          state_dict=lambda: {key: torch.zeros(31 * 31 + 3, 4)})
    ckpt = {"rel_pos_bias.relative_position_bias_table": vit_in.clone()}
    vit_out = utils.remap_pretrained_keys_vit(vit, ckpt, log)[key]
    return {"swin_w6_to_w7": (swin_in, swin_out), "vit_14_to_16": (vit_in, vit_out)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("simmim", help="a microsoft/SimMIM checkout")
    p.add_argument("mae", help="a facebookresearch/mae checkout")
    p.add_argument("--timm", default=None, help="timm 0.3.2's data/auto_augment.py (default: the installed timm's)")
    args = p.parse_args()
    path = args.timm or os.path.join(importlib.util.find_spec("timm").submodule_search_locations[0],
                                     "data", "auto_augment.py")
    spec = importlib.util.spec_from_file_location("timm_auto_augment", path)
    auto_augment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auto_augment)
    image, cases, outputs = randaugment_cases(auto_augment)
    utils = import_official(args.simmim, "utils")
    crop = import_official(args.mae, "util.crop")
    out = {"randaugment": {"image": image, "cases": cases, "outputs": outputs}, "rel_pos": rel_pos_cases(utils),
           "probe_crop": probe_crop_cases(crop),
           "made_with": {"pillow": PIL.__version__, "scipy": scipy.__version__, "numpy": np.__version__,
                         "timm": "0.3.2 data/auto_augment.py", "simmim": git_head(args.simmim),
                         "mae": git_head(args.mae)}}
    torch.save(out, os.path.join(HERE, "finetune_official.pt"))
    print(out["made_with"], f"{len(cases)} RandAugment cases")


if __name__ == "__main__":
    main()
