"""Import modules from an official research checkout on current torch/numpy.

Official MAE-family repos (facebookresearch/mae, ConvMAE, ...) pin timm==0.3.2
and older numpy. Two things break on today's stack:

* timm 0.3.2 does ``from torch._six import container_abcs``; ``torch._six``
  was removed in torch 2.0.
* the repos use numpy aliases like ``np.float`` that were removed in
  numpy 1.24.

``import_official`` installs minimal stand-ins for both, then imports a module
from the checkout. It only adds what is missing, so it is a no-op on an old
stack. Used by the golden-fixture scripts, never by the library itself.
"""

import collections.abc
import importlib
import math
import os
import subprocess
import sys
import types
from contextlib import contextmanager

import numpy as np
import torch

# numpy aliases removed in 1.24, mapped to the builtins they always meant.
_NUMPY_ALIASES = {"float": float, "int": int, "bool": bool,
                  "object": object, "complex": complex, "str": str}


def _install_torch_six():
    """Register a fake ``torch._six`` with the names old timm imports."""
    if "torch._six" in sys.modules:
        return
    try:
        import torch._six  # noqa: F401  (present on torch < 2.0)
        return
    except ImportError:
        pass
    import torch

    six = types.ModuleType("torch._six")
    six.container_abcs = collections.abc
    six.string_classes = (str, bytes)
    six.int_classes = int
    six.inf = math.inf
    sys.modules["torch._six"] = six
    torch._six = six


def _install_numpy_aliases():
    for name, value in _NUMPY_ALIASES.items():
        # Check the module dict, not hasattr: numpy serves removed aliases
        # through a module __getattr__ that raises or warns.
        if name not in vars(np):
            setattr(np, name, value)


def _forget_modules_from(checkout_dir):
    """Drop cached modules that share a top-level name with the checkout's.

    Official repos use generic package names (``util``, ``models_mae``); if
    another checkout was imported earlier in this process, its ``util`` would
    otherwise shadow this one's.
    """
    names = set()
    for entry in os.listdir(checkout_dir):
        path = os.path.join(checkout_dir, entry)
        if entry.endswith(".py"):
            names.add(entry[:-3])
        elif os.path.isdir(path) and any(f.endswith(".py") for f in os.listdir(path)):
            names.add(entry)  # package, possibly namespace (mae's util/ has no __init__)
    for mod in list(sys.modules):
        if mod.split(".")[0] in names:
            del sys.modules[mod]


def import_official(checkout_dir, module_name):
    """Import and return ``module_name`` from the official ``checkout_dir``.

    Applies the torch/numpy shims, puts the checkout first on ``sys.path``
    and imports the module (e.g. ``"models_mae"``).
    """
    checkout_dir = os.path.abspath(checkout_dir)
    if not os.path.isdir(checkout_dir):
        raise FileNotFoundError(f"no official checkout at {checkout_dir}")
    _install_torch_six()
    _install_numpy_aliases()
    _forget_modules_from(checkout_dir)
    if checkout_dir in sys.path:
        sys.path.remove(checkout_dir)
    sys.path.insert(0, checkout_dir)
    return importlib.import_module(module_name)


class _TorchWithFixedRand:
    """Stands in for ``torch`` inside an official model module; only ``rand`` differs."""

    def __init__(self, noise):
        self._noise = noise

    def rand(self, *size, device=None, **kwargs):
        # random_masking calls torch.rand(N, L, device=...); nothing else in
        # the forward pass does (MAE, ConvMAE, FastConvMAE), so any other
        # shape means the code changed.
        assert tuple(size) == tuple(self._noise.shape), size
        return self._noise.clone().to(device)

    def __getattr__(self, name):
        return getattr(torch, name)


@contextmanager
def fixed_masking_noise(module, noise):
    """Make the official random_masking argsort ``noise`` instead of fresh rand.

    Only the module's global ``torch`` name is swapped, so the official
    algorithm runs unchanged and the real torch.rand is untouched elsewhere.
    """
    real = module.torch
    module.torch = _TorchWithFixedRand(noise)
    try:
        yield
    finally:
        module.torch = real


def git_head(path):
    try:
        return subprocess.check_output(["git", "-C", path, "rev-parse", "HEAD"],
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_case(model, module, imgs, noise, mask_ratio, norm_pix_loss, grad_params, pred_units=slice(None)):
    """One official forward + backward on fixed noise: loss, pred (the units kept), mask, and
    the gradients of `grad_params`. For the golden-fixture scripts."""
    model.norm_pix_loss = norm_pix_loss
    model.zero_grad(set_to_none=True)
    with fixed_masking_noise(module, noise):
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio)
    loss.backward()
    params = dict(model.named_parameters())
    return {"loss": loss.detach().clone(), "pred": pred[:, pred_units].detach().clone(),
            "mask": mask.detach().clone(), "grads": {n: params[n].grad.detach().clone() for n in grad_params}}
