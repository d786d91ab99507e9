"""Make tests/golden/mae_tiny.pt: reference outputs from the official MAE code.

Builds a tiny ``MaskedAutoencoderViT`` from a facebookresearch/mae checkout,
runs it on fixed images with a fixed masking noise, and saves the initial
weights, inputs, encoder latent, and (for ``norm_pix_loss`` False and True)
the loss, prediction, mask and selected parameter gradients. Our
re-implementation's tests load this file and compare against it.

The official code needs timm==0.3.2, so run this in a scratch venv that reuses
the system torch::

    python3 -m venv --system-site-packages scratch-venv
    scratch-venv/bin/pip install --no-deps timm==0.3.2
    git clone https://github.com/facebookresearch/mae path/to/mae
    scratch-venv/bin/python tests/golden/make_mae_golden.py path/to/mae

CI does not run this script; it only reads the committed fixture.
"""

import argparse
import os
import sys
from functools import partial

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from official import fixed_masking_noise, git_head, import_official, run_case  # noqa: E402  (tests/official.py)

CONFIG = dict(img_size=32, patch_size=4, in_chans=3, embed_dim=64, depth=2,
              num_heads=4, decoder_embed_dim=32, decoder_depth=2,
              decoder_num_heads=4, mlp_ratio=4.0, norm_pix_loss=False)
NORM_EPS = 1e-6
BATCH = 4
MASK_RATIO = 0.75

GRAD_PARAMS = [
    "patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight",
    "blocks.1.mlp.fc2.bias", "norm.weight", "decoder_embed.weight",
    "mask_token", "decoder_blocks.1.attn.proj.weight", "decoder_pred.weight",
    "decoder_pred.bias",
]
MAX_BYTES = 2 * 1024 * 1024


def main():
    default_out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mae_tiny.pt")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="path to a facebookresearch/mae checkout")
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args()

    models_mae = import_official(args.checkout, "models_mae")
    import timm

    torch.manual_seed(0)
    model = models_mae.MaskedAutoencoderViT(
        **CONFIG, norm_layer=partial(nn.LayerNorm, eps=NORM_EPS)).float()
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}

    side = CONFIG["img_size"] // CONFIG["patch_size"]
    imgs = torch.randn(BATCH, CONFIG["in_chans"], CONFIG["img_size"], CONFIG["img_size"])
    noise = torch.rand(BATCH, side * side)

    with torch.no_grad(), fixed_masking_noise(models_mae, noise):
        latent, _, _ = model.forward_encoder(imgs, MASK_RATIO)

    cases = {
        "pix": run_case(model, models_mae, imgs, noise, MASK_RATIO, False, GRAD_PARAMS),
        "norm_pix": run_case(model, models_mae, imgs, noise, MASK_RATIO, True, GRAD_PARAMS),
    }

    fixture = {
        "config": {**CONFIG, "norm_eps": NORM_EPS},
        "state_dict": state_dict,
        "imgs": imgs,
        "noise": noise,
        "mask_ratio": MASK_RATIO,
        "latent": latent.clone(),
        "cases": cases,
        # str(): torch.__version__ is a TorchVersion, which weights_only rejects.
        "made_with": {"torch": str(torch.__version__), "timm": str(timm.__version__),
                      "official_commit": git_head(args.checkout)},
    }
    torch.save(fixture, args.out)
    torch.load(args.out, weights_only=True)  # tests load it this way; fail here, not there

    size = os.path.getsize(args.out)
    print(f"wrote {args.out} ({size / 1024:.1f} KiB)")
    for name, case in cases.items():
        print(f"  {name}: loss = {case['loss'].item():.8f}")
    if size >= MAX_BYTES:
        sys.exit(f"fixture is {size} bytes, over the {MAX_BYTES}-byte budget")


if __name__ == "__main__":
    main()
