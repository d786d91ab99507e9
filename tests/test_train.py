"""The method files' training loops, run as a user runs them: outputs, DDP, resume, SIGTERM, NaN,
bad input. The loops are copies of one shape (STYLE §4), so each test runs on every method file
except where noted; a copy that drifts fails here."""
import importlib
import math
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
import torch
from PIL import Image

from common import cosine_lr
from helpers import ROOT
from helpers import (StopAtStep, assert_same_weights, free_port, kill, last_line, log_lines, one_line_error_failures,
                     rank_env, run, run_main, run_on_terminal, start, wait_for, weights, without_key_bias, write_images)

# pixels: the flags for plain-pixel targets; schedule: the flags that make the file's lr schedule
# a cosine from a warmup that starts at 0 (SimMIM's default is a step decay from a nonzero warmup start)
# learns: 2 short epochs give a reconstruction better than grey. Not FCMAE's: the official init it
# keeps leaves std-1 weights (README), which AdamW needs far more steps to shrink.
# per_image: the loss of a batch depends on the batch (FCMAE's encoder GRN takes statistics over
# all images of a forward pass, as the official): the DDP test then uses micro-batches of 1 image.
Method = namedtuple("Method", "script tiny base pixels schedule size learns per_image", defaults=[32, True, False])
METHODS = [Method("mae.py", "mae_vit_tiny", "mae_vit_base_patch16", ["--no-norm_pix_loss"], []),
           Method("convmae.py", "convmae_convvit_tiny", "convmae_convvit_base_patch16", ["--no-norm_pix_loss"], []),
           Method("fastconvmae.py", "fastconvmae_convvit_tiny", "fastconvmae_convvit_base_patch16",
                  ["--no-norm_pix_loss"], []),
           Method("simmim.py", "simmim_vit_tiny", "simmim_vit_base_patch16", [],
                  ["--schedule", "cosine", "--warmup_lr", 0, "--min_lr", 0]),
           Method("convnextv2_fcmae.py", "convnextv2_fcmae_test", "convnextv2_fcmae_base", ["--no-norm_pix_loss"], [],
                  size=64, learns=False, per_image=True)]
SIMMIM_SWIN = Method("simmim.py", "simmim_swin_tiny", "simmim_swin_base_w6", [],
                     ["--schedule", "cosine", "--warmup_lr", 0, "--min_lr", 0])
MAE_ONLY = [METHODS[0]]                 # loop features checked once: the copies share the code line for line


@pytest.fixture(params=METHODS, ids=[m.script for m in METHODS])
def m(request):
    return request.param


def expected_lr(m, epoch, lr, warmup_epochs, epochs):
    """common.cosine_lr; SimMIM's cosine (timm's) spans the warmup epochs too (tests/test_simmim.py)."""
    if m.script == "simmim.py" and epoch >= warmup_epochs:
        return lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    return cosine_lr(epoch, lr, 0.0, warmup_epochs, epochs)


def tiny(m):
    return ["--model", m.tiny, "--num_workers", "0", "--warmup_epochs", "1", *m.schedule]


@pytest.mark.parametrize("m", METHODS + [SIMMIM_SWIN], ids=[m.tiny for m in METHODS + [SIMMIM_SWIN]])
def test_two_epochs_on_builtin_data_write_checkpoint_log_and_a_useful_picture(m, tmp_path):
    out = tmp_path / "run"
    r = run_main(m.script, *tiny(m), "--epochs", 2, "--builtin_images", 512, "--batch_size", 16, "--lr", "2e-3",
                 *m.pixels, "--log_every", 8, "--output_dir", out)   # pixel targets: no per-patch help
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["model"] == m.tiny and "optimizer" in ckpt
    assert (out / "checkpoint-0002.pth").exists()                                 # the end is always kept
    log = log_lines(out)
    assert [(e["epoch"], e["step"]) for e in log] == [(0, 8), (0, 16), (0, 24), (0, 32), (1, 8), (1, 16), (1, 24), (1, 32)]
    for e in log:                                     # the lr of the step logged, set per step (warmup 1, cosine)
        assert e["lr"] == pytest.approx(expected_lr(m, e["epoch"] + (e["step"] - 1) / 32, 2e-3, 1, 2))
    assert all(np.isfinite(e["loss"]) and e["img_per_s"] > 0 for e in log)
    assert log[-1]["loss"] < log[0]["loss"]
    printed = [line for line in r.stdout.splitlines() if line.startswith("epoch ") and " step " in line]
    assert len(printed) == len(log) and printed[-1].startswith("epoch 1 step 32/32 | loss ")  # and one print line
    assert f"loss {log[-1]['loss']:.4f}" in printed[-1]
    grid = np.asarray(Image.open(out / "recon-epoch002.png"), np.float32) / 255    # 8 rows x 4 columns, pad 1
    scale = -(-256 // (4 * m.size))                              # upscaled (nearest): a row is >= 256 px wide
    s = m.size * scale + 1                                                     # a cell and its padding
    cell = lambda r, c: grid[1 + s * r: s * (r + 1), 1 + s * c: s * (c + 1)]
    err = lambda c: np.mean([((cell(r, c) - cell(r, 0)) ** 2).mean() for r in range(8)])
    assert grid.shape == (8 * s + 1, 4 * s + 1, 3) and grid.shape[1] >= 256
    if m.learns:
        assert err(3) < 0.8 * err(1), (err(3), err(1))                              # recon beats grey patches


def test_ddp_two_processes_with_accumulation_equal_one_process_with_the_same_global_batch(m, tmp_path):
    common = [*tiny(m), "--epochs", 1, "--builtin_images", 64, "--lr", "1e-3", "--log_every", 1]
    (b1, a1), (b2, a2) = ((1, 16), (1, 8)) if m.per_image else ((16, 1), (4, 2))
    one = run_main(m.script, *common, "--batch_size", b1, "--accum_iter", a1, "--output_dir", tmp_path / "one")
    two = run(m.script, *common, "--batch_size", b2, "--accum_iter", a2, "--output_dir", tmp_path / "two", torchrun=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert f"eff. batch 16 = {b2} x {a2} x 2" in two.stdout
    assert "Warning" not in two.stderr, two.stderr[-2000:]                          # e.g. DDP's on grad strides
    # same samples, crops and masks; only float summation order differs (threads, all-reduce)
    assert_same_weights(without_key_bias(weights(tmp_path / "one" / "checkpoint-last.pth")),
                        without_key_bias(weights(tmp_path / "two" / "checkpoint-last.pth")), atol=1e-5)
    l1, l2 = log_lines(tmp_path / "one"), log_lines(tmp_path / "two")
    assert len(l1) == len(l2) == 4
    assert [e["loss"] for e in l1] == pytest.approx([e["loss"] for e in l2], rel=1e-4)


@pytest.mark.parametrize("m", MAE_ONLY, ids=["mae.py"])
def test_gradient_accumulation_equals_the_big_batch(m, tmp_path):
    common = [*tiny(m), "--epochs", 1, "--builtin_images", 32, "--lr", "1e-3"]
    big = run_main(m.script, *common, "--batch_size", 8, "--output_dir", tmp_path / "big")
    acc = run_main(m.script, *common, "--batch_size", 4, "--accum_iter", 2, "--output_dir", tmp_path / "acc")
    assert big.returncode == 0 and acc.returncode == 0, acc.stderr[-2000:]
    assert_same_weights(without_key_bias(weights(tmp_path / "big" / "checkpoint-last.pth")),
                        without_key_bias(weights(tmp_path / "acc" / "checkpoint-last.pth")), atol=1e-5)


# --- a run loses nothing ---

def long(m):
    return [*tiny(m), "--epochs", 3, "--builtin_images", 256, "--batch_size", 8, "--lr", "1e-3", "--log_every", 1]


@pytest.fixture(scope="module")
def uninterrupted_runs(tmp_path_factory):
    """The final weights of an uninterrupted long(m) run, one run per method, made when first asked."""
    runs = {}

    def get(m):
        if m.script not in runs:
            out = tmp_path_factory.mktemp("uninterrupted")
            r = run_main(m.script, *long(m), "--output_dir", out)
            assert r.returncode == 0, r.stderr[-2000:]
            runs[m.script] = weights(out / "checkpoint-last.pth")
        return runs[m.script]
    return get


def test_sigkill_mid_epoch_then_resume_auto_is_bit_identical(m, tmp_path, uninterrupted_runs):
    proc = start(m.script, *long(m), "--output_dir", tmp_path)
    wait_for(lambda: any(e["epoch"] == 1 and e["step"] >= 5 for e in log_lines(tmp_path)), proc)
    code, _, _ = kill(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL                                                  # it was still running
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["epoch"] == 1
    r = run_main(m.script, *long(m), "--output_dir", tmp_path, "--resume", "auto")   # in a new process: as here
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    assert_same_weights(weights(tmp_path / "checkpoint-last.pth"), uninterrupted_runs(m))


def test_sigterm_saves_mid_epoch_exits_0_and_resumes_bit_identical(m, tmp_path, uninterrupted_runs):
    proc = start(m.script, *long(m), "--output_dir", tmp_path)
    wait_for(lambda: any(e["epoch"] == 1 and e["step"] >= 3 for e in log_lines(tmp_path)), proc)
    code, _, err = kill(proc, signal.SIGTERM)
    assert code == 0, err[-2000:]
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and 0 < ckpt["batch_in_epoch"] < 32                   # saved mid-epoch
    shutil.copy(tmp_path / "checkpoint-last.pth", tmp_path / "mid-epoch.pth")
    r = run_main(m.script, *long(m), "--output_dir", tmp_path, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_weights(weights(tmp_path / "checkpoint-last.pth"), uninterrupted_runs(m))
    # another batch size: the saved position means other samples, so epoch 1 starts over
    r = run_main(m.script, *long(m), "--batch_size", 16, "--output_dir", tmp_path / "other",
                 "--resume", tmp_path / "mid-epoch.pth")
    assert r.returncode == 0 and "restarting epoch 1 from its start" in r.stdout, r.stderr[-2000:]
    assert [(e["epoch"], e["step"]) for e in log_lines(tmp_path / "other")][0] == (1, 1)


@pytest.mark.parametrize("m", MAE_ONLY, ids=["mae.py"])
@pytest.mark.parametrize("sig, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_sigterm_or_ctrl_c_under_torchrun_stops_every_rank_and_resumes_bit_identical(m, sig, name, tmp_path):
    args = [*tiny(m), "--epochs", 2, "--builtin_images", 256, "--batch_size", 4, "--lr", "1e-3", "--log_every", 1]
    ref = run(m.script, *args, "--output_dir", tmp_path / "ref", torchrun=2)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = start(m.script, *args, "--output_dir", tmp_path / "run", torchrun=2)
    wait_for(lambda: any(e["epoch"] == 0 and e["step"] >= 4 for e in log_lines(tmp_path / "run")), proc)
    _, out, err = kill(proc, sig)                           # to the launcher, which passes it to both ranks
    assert f"{name}: saved" in out and "continue with --resume auto" in out, err[-2000:]
    ckpt = torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 0 and 0 < ckpt["batch_in_epoch"] < 32 and ckpt["world_size"] == 2, err[-2000:]
    r = run(m.script, *args, "--output_dir", tmp_path / "run", "--resume", "auto", torchrun=2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_weights(weights(tmp_path / "run" / "checkpoint-last.pth"), weights(tmp_path / "ref" / "checkpoint-last.pth"))


def test_nan_loss_stops_and_leaves_the_last_checkpoint_untouched(m, tmp_path):
    args = [*tiny(m), "--builtin_images", 64, "--batch_size", 8, "--log_every", 1, "--output_dir", tmp_path]
    assert run_main(m.script, *args, "--epochs", 1).returncode == 0
    before = (tmp_path / "checkpoint-last.pth").read_bytes()
    r = run_main(m.script, *args, "--epochs", 2, "--resume", "auto", "--lr", "1e30", "--warmup_epochs", 0)
    assert r.returncode != 0
    assert last_line(r.stderr).startswith("error: loss is") and "Traceback" not in r.stderr
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == before
    torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)                # still loadable


def test_weights_that_turn_non_finite_in_the_last_step_of_an_epoch_are_not_saved(m, tmp_path):
    """A step's loss is checked, but it is computed before the update: when the epoch's last update
    diverges, the loss was finite and the epoch's save finds non-finite weights. It must stop
    instead, leaving the last good checkpoint as it was."""
    args = [*tiny(m), "--builtin_images", 8, "--batch_size", 8, "--output_dir", tmp_path]   # one step per epoch
    assert run_main(m.script, *args, "--epochs", 1).returncode == 0
    before = (tmp_path / "checkpoint-last.pth").read_bytes()
    r = run_main(m.script, *args, "--epochs", 2, "--resume", "auto", "--lr", "1e39")    # past fp32's range: inf
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert last_line(r.stderr).startswith("error: the weights are not finite"), r.stderr[-2000:]
    assert (tmp_path / "checkpoint-last.pth").read_bytes() == before


@pytest.mark.parametrize("m", MAE_ONLY, ids=["mae.py"])
def test_a_checkpoint_only_some_ranks_can_see_stops_every_rank_with_one_line(m, tmp_path):
    """Two "nodes", each with its own disk: the default --output_dir is relative, and each rank runs
    in its own directory. Only rank 0 writes checkpoints, so only node 0 has one to resume. The
    ranks must not go on from different states (or hang): every rank stops with the same line."""
    args = [*tiny(m), "--builtin_images", 16, "--batch_size", 8, "--output_dir", "out"]
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    assert run(m.script, *args, "--epochs", 1, cwd=nodes[0]).returncode == 0
    port = free_port()
    procs = [start(m.script, *args, "--epochs", 2, "--resume", "auto", cwd=node, env=rank_env(rank, 2, port))
             for rank, node in enumerate(nodes)]
    try:
        ends = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, ends):
        assert p.returncode == 1 and "Traceback" not in err, err[-2000:]
        assert last_line(err).startswith("error: --resume out/checkpoint-last.pth exists for 1 of 2 processes"), err


# --- bad input: a clear one-line error naming the culprit, never a traceback ---

def test_a_stop_at_an_epochs_last_step_saves_the_next_epochs_start_and_resume_does_nothing_twice(m, tmp_path, monkeypatch,
                                                                                                  uninterrupted_runs):
    """A SIGTERM that lands on epoch 0's last step (32 of 32): the epoch is whole, so its end work is done then (the
    picture) and the position saved is epoch 1's start; the resumed run starts at epoch 1, step 1."""
    module = importlib.import_module(m.script[:-3])
    monkeypatch.setattr(module, "StopSignals", lambda: StopAtStep(32))
    r = run_main(m.script, *long(m), "--output_dir", tmp_path)
    assert r.returncode == 0 and "SIGTERM: saved" in r.stdout and "continue with --resume auto" in r.stdout, r.stdout
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (1, 0) and (tmp_path / "recon-epoch001.png").exists()
    monkeypatch.undo()
    before = len(log_lines(tmp_path))
    r = run_main(m.script, *long(m), "--output_dir", tmp_path, "--resume", "auto")
    assert r.returncode == 0 and "at epoch 1, batch 0" in r.stdout, r.stderr[-2000:]
    assert (log_lines(tmp_path)[before]["epoch"], log_lines(tmp_path)[before]["step"]) == (1, 1)
    assert_same_weights(weights(tmp_path / "checkpoint-last.pth"), uninterrupted_runs(m))


@pytest.mark.parametrize("m", MAE_ONLY, ids=["mae.py"])
def test_ctrl_c_saves_mid_epoch_says_how_to_go_on_exits_130_and_resumes_bit_identical(m, tmp_path, uninterrupted_runs):
    proc = start(m.script, *long(m), "--output_dir", tmp_path)
    wait_for(lambda: any(e["epoch"] == 1 and e["step"] >= 3 for e in log_lines(tmp_path)), proc)
    code, out, err = kill(proc, signal.SIGINT)
    assert code == 130 and "Traceback" not in err, err[-2000:]
    assert last_line(out).startswith("Ctrl-C: saved ") and last_line(out).endswith("continue with --resume auto")
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and 0 < ckpt["batch_in_epoch"] < 32
    r = run_main(m.script, *long(m), "--output_dir", tmp_path, "--resume", "auto")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_weights(weights(tmp_path / "checkpoint-last.pth"), uninterrupted_runs(m))


def test_a_second_ctrl_c_aborts_at_once_but_torchruns_echo_of_the_first_does_not():
    """The handler alone, in a process of its own: the first SIGINT only asks to stop; one within a second is the
    launcher passing it on; one later ends the process by SIGINT's default, with no traceback."""
    code = ("import os, signal, time, mae\n"
            "stop = mae.StopSignals()\n"
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.1); os.kill(os.getpid(), signal.SIGINT)\n"
            "print('asked', stop.received == signal.SIGINT, flush=True)\n"
            "time.sleep(1.2); os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
            "print('not aborted', flush=True)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == -signal.SIGINT and r.stdout == "asked True\n" and "Traceback" not in r.stderr, r


@pytest.mark.parametrize("m", MAE_ONLY, ids=["mae.py"])
def test_progress_bars_show_on_a_terminal_only_and_leave_the_log_lines_as_they_are(m, tmp_path):
    data = tmp_path / "data"
    for label in ("a", "b"):
        write_images(data / "train" / label, 16, seed=ord(label))
    args = [*tiny(m), "--data", data, "--epochs", 1, "--batch_size", 8, "--lr", "1e-3", "--log_every", 1]
    code, out, terminal = run_on_terminal(m.script, *args, "--output_dir", tmp_path / "tty")
    piped = run(m.script, *args, "--output_dir", tmp_path / "pipe")
    assert code == 0 and piped.returncode == 0, terminal[-2000:] + piped.stderr[-2000:]
    assert f"scanning {data / 'train'}" in terminal and "epoch 0" in terminal and "step/s" in terminal
    assert "loss=" in terminal and "img_s=" in terminal                 # the epoch bar's loss, lr and img/s
    assert "step/s" not in piped.stderr and "scanning" not in piped.stderr and "\r" not in piped.stderr
    lines = [[line.split(" | ")[:3] for line in o.splitlines() if " step " in line] for o in (out, piped.stdout)]
    assert lines[0] == lines[1] and len(lines[0]) == 4                   # the same log lines (but for img/s)
    logs = [[{k: v for k, v in e.items() if k != "img_per_s"} for e in log_lines(tmp_path / d)] for d in ("tty", "pipe")]
    assert logs[0] == logs[1] and len(logs[0]) == 4


def _bad_input_cases(m, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    for i in range(6):
        (tmp_path / "broken" / f"bad{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "a_file").write_text("x")
    torch.save({"model": {}, "args": {"model": m.base}}, tmp_path / "base.pth")
    module = importlib.import_module(m.script[:-3])
    torch.save({"model": module.MODELS[m.tiny]().state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "args": {"model": m.tiny}}, tmp_path / "other_optimizer.pth")   # weights that fit, an optimizer not
    (tmp_path / "garbage.pth").write_bytes(os.urandom(100))
    cases = [  # (extra args, what the one line must name)
        (["--data", tmp_path / "missing"], "missing"),
        (["--data", tmp_path / "empty"], "no images"),
        (["--data", tmp_path / "broken"], "could be read"),
        (["--model", m.tiny.rsplit("_", 1)[0] + "_gigantic"], m.tiny),
        (["--batch_size", 0], "--batch_size"),
        (["--batch_size", -4], "--batch_size"),
        (["--epochs", 0], "--epochs"),
        (["--accum_iter", 0], "--accum_iter"),
        (["--input_size", 30], "--input_size 30"),
        (["--mask_ratio", 1.0], "--mask_ratio"),
        (["--mask_ratio", 0], "--mask_ratio"),
        (["--mask_ratio", "nan"], "--mask_ratio must be a finite number in (0, 1), got nan"),
        (["--blr", "nan"], "--blr must be a finite number at least 0, got nan"),
        (["--lr", "inf"], "--lr must be a finite number at least 0, got inf"),
        (["--min_lr=-1e-6"], "--min_lr"),
        (["--weight_decay", -0.05], "--weight_decay must be a finite number at least 0"),
        (["--clip_grad", -1], "--clip_grad"),
        (["--warmup_epochs", -1], "--warmup_epochs"),
        (["--resume", tmp_path / "nothing.pth"], "nothing.pth: no such file"),
        (["--resume", tmp_path / "other_optimizer.pth"], "does not fit"),
        (["--resume", tmp_path / "base.pth"], m.base),
        (["--resume", tmp_path / "garbage.pth"], "garbage.pth"),
        (["--output_dir", tmp_path / "a_file" / "out"], "--output_dir"),
        (["--batch_size", 4096], "--batch_size 4096"),
    ]
    if m.script == "fastconvmae.py":                     # four equal complementary views only
        cases += [(["--mask_ratio", 0.6], "--mask_ratio 0.6"), (["--input_size", 40], "--input_size 40")]
    if m.script == "simmim.py":                          # Swin's windows must tile every stage
        cases += [(["--model", "simmim_swin_tiny", "--input_size", 40], "--input_size 40"),
                  (["--warmup_lr=-inf"], "--warmup_lr"), (["--milestones", 5, -1], "--milestones are epochs")]
    return cases


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_bad_input_gives_one_line_naming_the_culprit(m, tmp_path):
    """Each case runs in this process (main() exits through sys.exit with the line it prints; any
    other exception fails the test); the first also runs as a real command, to see the one line."""
    cases = _bad_input_cases(m, tmp_path)
    argv = [*tiny(m), "--builtin_images", 16, "--batch_size", 4, "--epochs", 1, "--output_dir", tmp_path / "out"]
    r = run(m.script, *argv, *cases[0][0])
    assert r.returncode == 1 and "Traceback" not in r.stderr and last_line(r.stderr).startswith("error:"), r.stderr
    assert cases[0][1] in last_line(r.stderr)
    module = importlib.import_module(m.script[:-3])
    failures = one_line_error_failures(module, argv, cases)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("m", MAE_ONLY, ids=["mae.py"])
def test_unreadable_and_odd_images_are_handled_in_a_real_run(m, tmp_path):
    data = tmp_path / "data"
    write_images(data, 15)                                  # 20 files, batch 4: every file is read
    (data / "corrupt.jpg").write_bytes(b"\xff\xd8 broken")
    good = (data / "img000.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(data / "grey.png")
    Image.fromarray(rgb).convert("CMYK").save(data / "cmyk.jpg")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(data / "rgba.png")
    r = run(m.script, *tiny(m), "--data", data, "--batch_size", 4, "--epochs", 1, "--output_dir", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "corrupt.jpg" in r.stderr and "truncated.png" in r.stderr and "Traceback" not in r.stderr
    for name in ("grey.png", "cmyk.jpg", "rgba.png"):
        assert name not in r.stderr                                                 # read, not skipped


def test_mixed_precision_on_cpu_and_switching_it_on_resume(m, tmp_path):
    """bf16 autocast needs no loss scaling; fp16 runs through a GradScaler, whose state is saved.
    A bf16 checkpoint (no scaler state) resumes under fp16."""
    args = [*tiny(m), "--builtin_images", 32, "--batch_size", 8, "--log_every", 1, "--output_dir", tmp_path]
    r = run_main(m.script, *args, "--epochs", 1, "--amp", "bf16")
    assert r.returncode == 0, r.stderr[-2000:]
    assert torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)["scaler"] == {}
    r = run_main(m.script, *args, "--epochs", 2, "--amp", "fp16", "--resume", "auto")
    if m.script == "convnextv2_fcmae.py":        # its official init overflows fp16 at real sizes: refused
        assert r.returncode == 1 and last_line(r.stderr).startswith("error: --amp fp16 overflows"), r.stderr
        return
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["scaler"]["scale"] > 0
    assert all(np.isfinite(e["loss"]) for e in log_lines(tmp_path)) and len(log_lines(tmp_path)) == 8


def test_compile_trains_like_eager_and_saves_plain_keys(m, tmp_path):
    args = [*tiny(m), "--epochs", 1, "--builtin_images", 16, "--batch_size", 8, "--lr", "1e-3", "--log_every", 1]
    eager = run_main(m.script, *args, "--output_dir", tmp_path / "eager")
    compiled = run(m.script, *args, "--compile", "--output_dir", tmp_path / "compiled")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-2000:]
    a, b = weights(tmp_path / "eager" / "checkpoint-last.pth"), weights(tmp_path / "compiled" / "checkpoint-last.pth")
    assert a.keys() == b.keys()                                                     # no "_orig_mod." prefixes
    # fused kernels round differently: the losses agree closely, not bit for bit
    assert [e["loss"] for e in log_lines(tmp_path / "compiled")] == \
        pytest.approx([e["loss"] for e in log_lines(tmp_path / "eager")], rel=1e-4)


def test_clip_grad_0_is_off_and_a_positive_value_clips(m, tmp_path):
    """--clip_grad 0 means no clipping, as in finetune.py: the weights equal a run clipped at a norm never reached
    (clip_grad_norm_ then multiplies by exactly 1.0), bit for bit; clipping to norm 0 would zero every gradient.
    A tiny positive norm does change them (AdamW's update is nearly scale-free: the norm must put the
    gradients below its eps to show)."""
    args = [*tiny(m), "--epochs", 1, "--builtin_images", 16, "--batch_size", 8, "--lr", "1e-3"]
    runs = {"off": ["--clip_grad", "1e30"], "zero": ["--clip_grad", 0], "tiny": ["--clip_grad", "1e-9"]}
    for name, extra in runs.items():
        r = run_main(m.script, *args, *extra, "--output_dir", tmp_path / name)
        assert r.returncode == 0, r.stderr[-2000:]
    w = {name: weights(tmp_path / name / "checkpoint-last.pth") for name in runs}
    assert_same_weights(w["off"], w["zero"])
    assert any(not torch.equal(w["off"][k], w["tiny"][k]) for k in w["off"])
