"""Make tests/golden/{convmae,fastconvmae}_tiny.pt: reference outputs from the official code.

Builds a tiny ConvMAE from an Alpha-VL/ConvMAE checkout and a tiny FastConvMAE from an
Alpha-VL/FastConvMAE checkout, runs each on fixed images with a fixed masking noise, and saves
the initial weights, inputs, encoder latent, and (for norm_pix_loss False and True) the loss,
part of the prediction, the mask and selected parameter gradients. Our re-implementations'
tests (tests/test_convmae.py, tests/test_fastconvmae.py) load these files and compare.

The official models hard-code the 14/28/56 grids of 224 px images, so the fixtures are at
224 px with narrow stages (widths 16/24/32). To stay small the images are stored as uint8
(both sides use imgs = (uint8 / 255 - 0.5) / 0.25) and the prediction of every 28th unit only.

Both repositories need timm==0.3.2, so run this in a scratch venv that reuses the system torch::

    python3 -m venv --system-site-packages scratch-venv
    scratch-venv/bin/pip install --no-deps timm==0.3.2
    git clone https://github.com/Alpha-VL/ConvMAE path/to/ConvMAE
    git clone https://github.com/Alpha-VL/FastConvMAE path/to/FastConvMAE
    scratch-venv/bin/python tests/golden/make_convmae_golden.py path/to/ConvMAE path/to/FastConvMAE

CI does not run this script; it only reads the committed fixtures.
"""
import argparse
import os
import sys
from functools import partial

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from official import fixed_masking_noise, git_head, import_official, run_case  # noqa: E402  (tests/official.py)

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = dict(img_size=[224, 56, 28], patch_size=[4, 2, 2], in_chans=3, embed_dim=[16, 24, 32], depth=[2, 1, 2],
              num_heads=2, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, mlp_ratio=[4, 4, 4],
              norm_pix_loss=False)
NORM_EPS = 1e-6                    # blocks3, norm, decoder (the conv stages' LayerNorms keep 1e-5)
BATCH = 2
MASK_RATIO = 0.75
PRED_UNITS = slice(None, None, 28)
GRAD_PARAMS = [
    "patch_embed1.proj.weight", "patch_embed1.norm.weight", "blocks1.0.conv1.weight", "blocks1.1.attn.weight",
    "blocks1.1.mlp.fc2.weight", "patch_embed2.proj.weight", "blocks2.0.attn.bias", "patch_embed3.proj.weight",
    "patch_embed4.weight", "stage1_output_decode.weight", "stage2_output_decode.bias", "blocks3.0.attn.qkv.weight",
    "blocks3.1.mlp.fc2.weight", "norm.weight", "decoder_embed.weight", "mask_token",
    "decoder_blocks.1.attn.proj.weight", "decoder_pred.bias",
]
MAX_BYTES = 2 * 1024 * 1024


def make(checkout, module_name, class_name, out):
    module = import_official(checkout, module_name)
    import timm

    torch.manual_seed(0)
    model = getattr(module, class_name)(**CONFIG, norm_layer=partial(nn.LayerNorm, eps=NORM_EPS)).float()
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    imgs_uint8 = torch.randint(0, 256, (BATCH, 3, 224, 224), dtype=torch.uint8)
    imgs = (imgs_uint8 / 255 - 0.5) / 0.25
    noise = torch.rand(BATCH, 196)
    with torch.no_grad(), fixed_masking_noise(module, noise):
        latent, _, _ = model.forward_encoder(imgs, MASK_RATIO)
    cases = {name: run_case(model, module, imgs, noise, MASK_RATIO, norm_pix, GRAD_PARAMS, PRED_UNITS)
             for name, norm_pix in (("pix", False), ("norm_pix", True))}
    config = {**CONFIG, "decoder_depth": len(model.decoder_blocks)}    # FastConvMAE forces 8
    fixture = {"config": config, "norm_eps": NORM_EPS, "state_dict": state_dict, "imgs_uint8": imgs_uint8, "noise": noise,
               "mask_ratio": MASK_RATIO, "pred_units": [PRED_UNITS.start, PRED_UNITS.stop, PRED_UNITS.step],
               "latent": latent.clone(), "cases": cases,
               # str(): torch.__version__ is a TorchVersion, which weights_only rejects
               "made_with": {"torch": str(torch.__version__), "timm": str(timm.__version__),
                             "official_commit": git_head(checkout)}}
    torch.save(fixture, out)
    torch.load(out, weights_only=True)                                  # tests load it this way
    size = os.path.getsize(out)
    print(f"wrote {out} ({size / 1024:.1f} KiB)")
    for name, case in cases.items():
        print(f"  {name}: loss = {case['loss'].item():.8f}")
    if size >= MAX_BYTES:
        sys.exit(f"fixture is {size} bytes, over the {MAX_BYTES}-byte budget")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("convmae", help="path to an Alpha-VL/ConvMAE checkout")
    parser.add_argument("fastconvmae", help="path to an Alpha-VL/FastConvMAE checkout")
    args = parser.parse_args()
    make(args.convmae, "models_convmae", "MaskedAutoencoderConvViT", os.path.join(HERE, "convmae_tiny.pt"))
    make(args.fastconvmae, "models_fastconvmae", "MaskedAutoencoderViT", os.path.join(HERE, "fastconvmae_tiny.pt"))


if __name__ == "__main__":
    main()
