"""A method file plus common.py, copied into another folder, trains there as it does here."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, log_lines

COPIES = [(["mae.py"], "mae_vit_tiny"), (["convmae.py"], "convmae_convvit_tiny"),
          (["fastconvmae.py"], "fastconvmae_convvit_tiny"), (["simmim.py"], "simmim_swin_tiny"),
          (["convnextv2_fcmae.py"], "convnextv2_fcmae_test"),
          (["fastconvmae_mor.py", "fastconvmae.py"], "fastconvmae_convvit_tiny")]   # the extension and its method


@pytest.mark.parametrize("files, model", COPIES, ids=[files[0] for files, _ in COPIES])
def test_a_copied_file_trains_on_its_own(files, model, tmp_path):
    for name in files + ["common.py"]:
        shutil.copy(os.path.join(ROOT, name), tmp_path)
    env = dict(os.environ, PYTHONPATH="")                                   # nothing of this checkout is importable
    args = [files[0], "--model", model, "--epochs", 1, "--builtin_images", 16, "--batch_size", 8,
            "--num_workers", 0, "--log_every", 1]
    r = subprocess.run([sys.executable] + [str(a) for a in args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "output" / model
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 1
    assert [e["step"] for e in log_lines(out)] == [1, 2]
