"""Make tests/golden/simmim_{vit,swin}_tiny.pt: reference outputs from the official SimMIM code.

Builds tiny SimMIM models (ViT and Swin encoders) from a microsoft/SimMIM checkout, runs each on
fixed images with a fixed mask, and saves the initial weights (buffers included: relative
position indices, Swin's shifted-window masks), inputs, and the loss, reconstruction and
selected parameter gradients. tests/test_simmim.py loads these files and compares.

The official code needs an old timm, so run this in a scratch venv that reuses the system torch::

    python3 -m venv --system-site-packages scratch-venv
    scratch-venv/bin/pip install --no-deps timm==0.3.2
    git clone https://github.com/microsoft/SimMIM path/to/SimMIM
    scratch-venv/bin/python tests/golden/make_simmim_golden.py path/to/SimMIM

CI does not run this script; it only reads the committed fixtures.
"""
import argparse
import math
import os
import sys
from functools import partial

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from official import git_head, import_official  # noqa: E402  (tests/official.py)

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH, MASK_PATCH, MASK_RATIO = 4, 8, 0.6
CONFIGS = {   # official constructor arguments (configs/*.yaml + models/simmim.py build_simmim), tiny
    "vit": dict(img_size=32, patch_size=4, in_chans=3, num_classes=0, embed_dim=64, depth=2, num_heads=4,
                mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0, drop_path_rate=0.0, init_values=0.1,
                use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                use_mean_pooling=False),
    "swin": dict(img_size=32, patch_size=2, in_chans=3, num_classes=0, embed_dim=32, depths=[2, 2],
                 num_heads=[2, 4], window_size=4, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0,
                 drop_path_rate=0.0, ape=False, patch_norm=True),
}
GRAD_PARAMS = {
    "vit": ["encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.mask_token",
            "encoder.rel_pos_bias.relative_position_bias_table", "encoder.blocks.0.attn.qkv.weight",
            "encoder.blocks.0.attn.q_bias", "encoder.blocks.1.gamma_1", "encoder.blocks.1.mlp.fc2.weight",
            "encoder.norm.weight", "decoder.0.weight", "decoder.0.bias"],
    "swin": ["encoder.patch_embed.proj.weight", "encoder.patch_embed.norm.weight", "encoder.mask_token",
             "encoder.layers.0.blocks.1.attn.relative_position_bias_table", "encoder.layers.0.blocks.1.attn.qkv.weight",
             "encoder.layers.0.downsample.reduction.weight", "encoder.layers.1.blocks.1.mlp.fc2.weight",
             "encoder.norm.bias", "decoder.0.weight", "decoder.0.bias"],
}


def make(simmim, kind, out):
    torch.manual_seed(0)
    cfg = CONFIGS[kind]
    if kind == "vit":
        encoder = simmim.VisionTransformerForSimMIM(**cfg, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        stride = cfg["patch_size"]
    else:
        encoder = simmim.SwinTransformerForSimMIM(**cfg)
        stride = cfg["patch_size"] * 2 ** (len(cfg["depths"]) - 1)
    model = simmim.SimMIM(encoder=encoder, encoder_stride=stride)
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    imgs = torch.randn(BATCH, 3, cfg["img_size"], cfg["img_size"])
    units = cfg["img_size"] // MASK_PATCH
    mask = torch.zeros(BATCH, units * units)
    for n in range(BATCH):                                              # data_simmim.py's rule: ceil(L * ratio) hidden
        mask[n, torch.randperm(units * units)[:math.ceil(units * units * MASK_RATIO)]] = 1
    mask = mask.view(BATCH, units, units)
    r = MASK_PATCH // cfg["patch_size"]
    patch_mask = mask.repeat_interleave(r, 1).repeat_interleave(r, 2)   # what data_simmim.py hands the model
    loss = model(imgs, patch_mask)
    loss.backward()
    with torch.no_grad():
        pred = model.decoder(model.encoder(imgs, patch_mask))
    params = dict(model.named_parameters())
    fixture = {"kind": kind, "config": cfg, "mask_patch_size": MASK_PATCH, "state_dict": state_dict,
               "imgs": imgs, "mask": mask, "loss": loss.detach().clone(), "pred": pred.clone(),
               "grads": {n: params[n].grad.detach().clone() for n in GRAD_PARAMS[kind]},
               "made_with": {"torch": str(torch.__version__), "official_commit": git_head(simmim.__file__)}}
    torch.save(fixture, out)
    torch.load(out, weights_only=True)
    print(f"wrote {out} ({os.path.getsize(out) / 1024:.1f} KiB): loss = {loss.item():.8f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="path to a microsoft/SimMIM checkout")
    args = parser.parse_args()
    simmim = import_official(args.checkout, "models.simmim")
    simmim.__file__ = args.checkout                                     # for git_head
    for kind in ("vit", "swin"):
        make(simmim, kind, os.path.join(HERE, f"simmim_{kind}_tiny.pt"))


if __name__ == "__main__":
    main()
