"""Checkpoint files as the official training scripts write them load in every `load_pretrained` and in finetune.py
(common.load_checkpoint), and nothing in a file runs: a pickle that would call a function is refused in one line."""
import argparse
import os
import pickle
import sys
import types

import pytest
import torch

import finetune as ft
from helpers import last_line, one_line_error_failures, run

TINY = ["mae_vit_tiny", "convmae_convvit_tiny", "fastconvmae_convvit_tiny", "simmim_vit_tiny", "simmim_swin_tiny",
        "convnextv2_fcmae_test"]


class CfgNode(dict):
    """yacs.config.CfgNode's pickled shape: a dict subclass whose instance __dict__ holds a flag."""

    def __init__(self, entries):
        super().__init__(entries)
        self.__dict__["__immutable__"] = True


def official_file(path, name):
    """A pre-training checkpoint as the official script of `name`'s method saves it, holding `name`'s weights:
    MAE, ConvMAE and FastConvMAE util/misc.py save_model and ConvNeXt V2 utils.py save_model store the
    argparse.Namespace of the run; SimMIM utils.py save_checkpoint stores its yacs config, timm's scheduler
    state, max_accuracy and apex's amp state. The config's class exists while saving, not while loading."""
    torch.manual_seed(0)
    model = ft.METHODS[ft.MODELS[name]].MODELS[name]()
    optimizer = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95))
    model(torch.randn(2, 3, 64, 64) if "fcmae" in name else torch.randn(2, 3, 32, 32))[0].backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 799}
    if name.startswith("simmim"):
        sys.modules["yacs"], sys.modules["yacs.config"] = types.ModuleType("yacs"), types.ModuleType("yacs.config")
        sys.modules["yacs.config"].CfgNode, CfgNode.__module__ = CfgNode, "yacs.config"
        try:
            config = CfgNode({"MODEL": CfgNode({"TYPE": name.split("_")[1], "NAME": "simmim_pretrain"}),
                              "TRAIN": CfgNode({"EPOCHS": 800, "BASE_LR": 1e-4}), "AMP_OPT_LEVEL": "O1"})
            torch.save({**state, "lr_scheduler": {"t_initial": 800, "lr_min": 5e-6, "base_values": [8e-4]},
                        "max_accuracy": 0.0, "config": config, "amp": {"loss_scaler0": {"loss_scale": 65536.0}}},
                       path)
        finally:
            del sys.modules["yacs"], sys.modules["yacs.config"]
            CfgNode.__module__ = __name__
    else:
        args = argparse.Namespace(model=name, batch_size=64, epochs=800, blr=1.5e-4, lr=None, mask_ratio=0.75,
                                  norm_pix_loss=True, data_path="/imagenet", output_dir="./output_dir", world_size=8)
        scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                  "_growth_tracker": 0}
        torch.save({**state, "scaler": scaler, "args": args}, path)
    return model.state_dict()


@pytest.mark.parametrize("name", TINY)
def test_an_official_training_checkpoint_loads_in_load_pretrained_and_finetune(name, tmp_path):
    path = str(tmp_path / "checkpoint-799.pth")
    saved = official_file(path, name)
    assert "yacs" not in sys.modules
    method = ft.METHODS[ft.MODELS[name]]
    torch.manual_seed(1)
    model = method.MODELS[name]()
    assert not method.load_pretrained(model, path)                      # nothing missing
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    classifier = ft.build_classifier(name, 10)
    ckpt = ft.read_checkpoint(path, "--finetune")
    ft.load_weights(classifier, ckpt, "--finetune x")
    block = next(k for k in saved if "blocks" in k or "stages.0.0.dwconv" in k)   # an encoder weight
    assert torch.equal(classifier.state_dict()[block.removeprefix("encoder.")], saved[block])
    if name.startswith("simmim"):                                       # the config's data, as plain dicts
        assert ckpt["config"]["MODEL"]["TYPE"] == name.split("_")[1] and ckpt["config"]["TRAIN"]["EPOCHS"] == 800
    else:
        assert ckpt["args"].model == name and ckpt["args"].blr == 1.5e-4


class Calls:
    """An object whose pickle calls `func(*args)` when loaded: the way a malicious file runs code."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func", [open, exec, os.system])
def test_a_pickle_that_would_run_code_is_refused_in_one_line_and_nothing_runs(func, tmp_path):
    name = f"{func.__module__}.{func.__name__}"                         # as pickle names it: io.open, posix.system
    marker = tmp_path / "ran"
    arg = {open: (str(marker), "w"), exec: (f"open({str(marker)!r}, 'w')",), os.system: (f"touch {marker}",)}[func]
    torch.manual_seed(0)
    model = ft.METHODS["mae"].MODELS["mae_vit_tiny"]()
    path = tmp_path / "evil.pth"
    torch.save({"model": model.state_dict(), "args": Calls(func, *arg)}, path)
    with pytest.raises(pickle.UnpicklingError) as e:
        ft.METHODS["mae"].load_pretrained(model, str(path))
    assert "\n" not in str(e.value) and "refused" in str(e.value) and name in str(e.value), str(e.value)
    if func is open:                                                    # as a user sees it, once
        r = run("finetune.py", "--model", "mae_vit_tiny", "--finetune", path, "--output_dir", tmp_path / "out")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert last_line(r.stderr).startswith(f"error: --finetune {path}: refused") and name in last_line(r.stderr)
    with pytest.raises(SystemExit, match=f"^error: --finetune {path}: refused"):
        ft.read_checkpoint(str(path), "--finetune")
    assert not marker.exists()


def test_an_official_checkpoint_given_to_resume_is_a_one_line_error(tmp_path):
    path = tmp_path / "checkpoint-799.pth"
    official_file(str(path), "mae_vit_tiny")
    argv = ["--model", "mae_vit_tiny", "--epochs", 1, "--batch_size", 8, "--builtin_images", 64, "--num_workers", 0,
            "--output_dir", tmp_path / "out"]
    failures = one_line_error_failures(ft, argv, [(["--resume", path], "is not a mae_vit_tiny finetune checkpoint")])
    assert not failures, failures
