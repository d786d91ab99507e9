"""Make tests/golden/convnextv2_block.pt: the official dense ConvNeXt V2 block and GRN at work.

The official FCMAE encoder needs MinkowskiEngine (CUDA-only), so the full pre-training model
cannot run here; its dense building blocks can. This builds the official `Block` and `GRN`
(models/convnextv2.py, models/utils.py of facebookresearch/ConvNeXt-V2) with random weights,
GRN's zero-initialised gamma and beta included (at zero, GRN is the identity and tests
nothing), runs them on a fixed input, and saves weights, input, output and gradients.
tests/test_convnextv2_fcmae.py loads this file and compares.

    python3 -m venv --system-site-packages scratch-venv
    scratch-venv/bin/pip install --no-deps timm==0.3.2
    git clone https://github.com/facebookresearch/ConvNeXt-V2 path/to/ConvNeXt-V2
    scratch-venv/bin/python tests/golden/make_convnextv2_golden.py path/to/ConvNeXt-V2

CI does not run this script; it only reads the committed fixture.
"""
import argparse
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from official import git_head, import_official  # noqa: E402  (tests/official.py)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "convnextv2_block.pt")
DIM = 16


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="path to a facebookresearch/ConvNeXt-V2 checkout")
    args = parser.parse_args()
    # models/utils.py imports MinkowskiEngine at the top for its sparse classes; the dense GRN and
    # Block never touch it, so an empty stand-in lets the module import
    sys.modules["MinkowskiEngine"] = types.SimpleNamespace(SparseTensor=None)
    convnextv2 = import_official(args.checkout, "models.convnextv2")
    utils = sys.modules["models.utils"]
    torch.manual_seed(0)
    block = convnextv2.Block(DIM)
    with torch.no_grad():                                               # GRN's gamma/beta start at 0: make them matter
        block.grn.gamma.normal_(std=0.5)
        block.grn.beta.normal_(std=0.5)
    x = torch.randn(2, DIM, 9, 9, requires_grad=True)
    y = block(x)
    y.pow(2).mean().backward()
    grn = utils.GRN(DIM)
    with torch.no_grad():
        grn.gamma.normal_(std=0.5)
        grn.beta.normal_(std=0.5)
    g_in = torch.randn(2, 5, 5, DIM)
    fixture = {"block": {k: v.detach().clone() for k, v in block.state_dict().items()}, "x": x.detach(),
               "y": y.detach(), "x_grad": x.grad.clone(),
               "grads": {n: p.grad.clone() for n, p in block.named_parameters()},
               "grn": {k: v.detach().clone() for k, v in grn.state_dict().items()}, "grn_in": g_in,
               "grn_out": grn(g_in).detach(),
               "made_with": {"torch": str(torch.__version__), "official_commit": git_head(args.checkout)}}
    torch.save(fixture, OUT)
    torch.load(OUT, weights_only=True)
    print(f"wrote {OUT} ({os.path.getsize(OUT) / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
