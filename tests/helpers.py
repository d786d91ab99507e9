"""Test helpers shared by every method's tests: run a training script, make image folders."""
import contextlib
import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def train_cmd(script, *args, torchrun=0):
    """The command line of a training run: `python script args` or `torchrun --nproc_per_node=N ...`."""
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    return launcher + [os.path.join(ROOT, script)] + [str(a) for a in args]


def run(script, *args, torchrun=0, timeout=600, cwd=ROOT, env=None):
    """Run to completion; returns CompletedProcess with text stdout/stderr. `env` adds variables."""
    return subprocess.run(train_cmd(script, *args, torchrun=torchrun), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=_env(env))


def run_main(script, *args):
    """`run` without a new process (which spends ~5 s importing torch and torchvision): the script's main() on these
    args, here; returns a CompletedProcess of its exit code and what it printed, sys.exit's line on stderr as Python
    prints it. Only for runs of one process that need no signal; other exceptions propagate."""
    module, out, err = importlib.import_module(script[:-3]), io.StringIO(), io.StringIO()
    code, handler = 0, signal.getsignal(signal.SIGTERM)                 # main() installs its own
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main(module.get_args([str(a) for a in args]))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        err.write(f"{e.code}\n" if isinstance(e.code, str) else "")
    finally:
        signal.signal(signal.SIGTERM, handler)
    return subprocess.CompletedProcess(script, code, out.getvalue(), err.getvalue())


def start(script, *args, torchrun=0, cwd=ROOT, env=None):
    """Start in the background (for kill/SIGTERM tests); stdout/stderr go to pipes."""
    return subprocess.Popen(train_cmd(script, *args, torchrun=torchrun), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=_env(env))


def _env(extra=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return env | (extra or {})


def rank_env(rank, world_size, port):
    """What torchrun sets for one process, for launching ranks by hand (one per "node" here)."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": "0",
            "WORLD_SIZE": str(world_size)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, proc, timeout=300):
    """Poll until predicate() is true; fails if the process ends first."""
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"run ended before the condition held:\n{proc.communicate()[1][-2000:]}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def log_lines(output_dir):
    path = os.path.join(output_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def kill(proc, sig=signal.SIGKILL):
    """Send `sig`, wait for the end; returns (exit code, stdout, stderr)."""
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def weights(path, key="model"):
    return torch.load(path, map_location="cpu", weights_only=True)[key]


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k} differs: max {(a[k] - b[k]).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


def without_key_bias(state):
    """Drop the key third of every qkv bias. Softmax ignores a constant added to all keys, so its true
    gradient is 0 and what backward returns is rounding noise; Adam divides that noise by its own
    magnitude and moves these entries by ~lr per step in a direction no two runs share."""
    out = dict(state)
    for k, v in state.items():
        if k.endswith("attn.qkv.bias"):
            d = v.shape[0] // 3
            out[k] = torch.cat([v[:d], v[2 * d:]])
    return out


def write_images(folder, n, size=32, seed=0, fmt="png"):
    """n random RGB images in `folder`; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = os.path.join(folder, f"img{i:03d}.{fmt}")
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def last_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def one_line_error_failures(module, argv, cases):
    """Run `module.main` in-process on argv + extra for each (extra, culprit) case; returns what went
    wrong: a case that did not stop with one line starting 'error: ' and naming the culprit."""
    failures = []
    for extra, culprit in cases:
        try:
            module.main(module.get_args([str(a) for a in argv + extra]))
            failures.append(f"{extra}: no error")
        except SystemExit as e:
            line = str(e.code)
            if "\n" in line or not line.startswith("error: ") or culprit not in line:
                failures.append(f"{extra}: {line}")
    return failures


# --- golden fixtures made by the official code (tests/golden/make_*_golden.py) ---

def load_golden(name):
    """(fixture, images [N, 3, H, W] float32 or None) of tests/golden/<name>."""
    g = torch.load(os.path.join(ROOT, "tests", "golden", name), weights_only=True)
    imgs = g.get("imgs")
    if "imgs_uint8" in g:
        imgs = (g["imgs_uint8"] / 255 - 0.5) / 0.25                     # as the script computed them
    return g, imgs


def assert_matches_golden(model, g, imgs, case):
    """Our model, loaded with the fixture's weights, gives the official loss, mask, pred and grads.

    Tolerances: fp32 with other kernels (SDPA vs explicit softmax, a 1x1 conv as a matmul) and
    another summation order differ by ~1e-7 relative; the issue's bar is 1e-5 (loss), 1e-4 (grads).
    """
    loss, pred, mask = model(imgs, g["mask_ratio"], g["noise"])
    loss.backward()
    ref = g["cases"][case]
    assert abs(loss.item() / ref["loss"].item() - 1) <= 1e-5, (loss.item(), ref["loss"].item())
    assert torch.equal(mask, ref["mask"])
    units = slice(*g["pred_units"]) if "pred_units" in g else slice(None)          # fixture keeps a subset
    torch.testing.assert_close(pred[:, units], ref["pred"], rtol=1e-4, atol=1e-5)
    params = dict(model.named_parameters())
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(params[name].grad, grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def shapes_batch(n, size):
    """n images [n, 3, size, size] of the built-in data set, normalised as in training: a batch
    with structure to learn (random noise leaves norm-pix targets nothing to infer)."""
    from common import IMAGENET_MEAN, IMAGENET_STD, BuiltinShapes
    ds = BuiltinShapes(n, size)
    imgs = torch.stack([torch.from_numpy(np.array(ds[i][0])).permute(2, 0, 1) for i in range(n)]) / 255
    return (imgs - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def train_on_one_batch(model, imgs, noise, steps=30, lr=1e-3):
    """AdamW (the pre-training betas) on one fixed batch and noise; returns the loss of each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    losses = []
    for _ in range(steps):
        loss, _, _ = model(imgs, 0.75, noise)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return losses


def assert_init_is_official(build, g):
    """build() after torch.manual_seed(0), as the fixture script seeded the official model: same
    construction order and init give every tensor, fixed position embeddings included, bit for bit."""
    torch.manual_seed(0)
    ours = build().state_dict()
    assert ours.keys() == g["state_dict"].keys()
    for k in ours:
        assert torch.equal(ours[k], g["state_dict"][k]), k


def vit_block_keys(prefix, D):
    """Keys and shapes of one timm-0.3.2 ViT block (mlp ratio 4), as the official models name them."""
    return {f"{prefix}.norm1.weight": [D], f"{prefix}.norm1.bias": [D],
            f"{prefix}.attn.qkv.weight": [3 * D, D], f"{prefix}.attn.qkv.bias": [3 * D],
            f"{prefix}.attn.proj.weight": [D, D], f"{prefix}.attn.proj.bias": [D],
            f"{prefix}.norm2.weight": [D], f"{prefix}.norm2.bias": [D],
            f"{prefix}.mlp.fc1.weight": [4 * D, D], f"{prefix}.mlp.fc1.bias": [4 * D],
            f"{prefix}.mlp.fc2.weight": [D, 4 * D], f"{prefix}.mlp.fc2.bias": [D]}


class StopAtStep:
    """Stands in for a loop's StopSignals: asked once a step, it reports a SIGTERM from the n-th step on, as if the
    signal had landed exactly there (a real signal cannot be aimed at one step)."""

    def __init__(self, n):
        self.asked, self.n = 0, n

    @property
    def received(self):
        self.asked += 1
        return signal.SIGTERM if self.asked >= self.n else None


def run_on_terminal(script, *args, timeout=300):
    """Run with stderr on a pseudo-terminal (as a person at a terminal sees it) and stdout on a pipe; returns
    (exit code, stdout, what the terminal showed)."""
    import fcntl
    import pty
    import struct
    import termios
    import threading
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))   # 40 x 160, as a terminal window
    proc = subprocess.Popen(train_cmd(script, *args), stdout=subprocess.PIPE, stderr=slave, text=True, cwd=ROOT,
                            env=_env())
    os.close(slave)
    shown = []

    def drain():                                                        # a full terminal buffer would block the run
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:                                             # the run closed its end
                return
            if not chunk:
                return
            shown.append(chunk)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=timeout)
    reader.join(timeout=10)
    os.close(master)
    return proc.returncode, out, b"".join(shown).decode(errors="replace")
