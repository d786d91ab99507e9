"""fastconvmae_mor.py, FastConvMAE's Mixture of Reconstructors: the partially shared decoder, the EMA and
external teachers, their losses, and the training loop with them (DDP, resume, AMP, errors), and the
checkpoints of `fastconvmae.py --mor` as it was before that file."""
import math
import signal
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convmae
import fastconvmae
import fastconvmae_mor
from common import IMAGENET_MEAN, IMAGENET_STD
from fastconvmae_mor import (CLIP_MEAN, CLIP_STD, MODELS, ViTTeacher, ema_momentum, ema_teacher, load_teacher,
                             teacher_targets, update_ema)
from helpers import (assert_same_weights, kill, last_line, load_golden, log_lines, one_line_error_failures, run,
                     run_main, start, wait_for, without_key_bias)
from test_convmae import official_base_keys

TINY = "fastconvmae_convvit_tiny"
# current torch deprecates TorchScript; users still hold TorchScript teachers (OpenAI's CLIP release is one)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def tiny_mor(**kw):
    """The tiny model with an EMA branch (width 96, its encoder's) and a 'clip' branch of width 5."""
    return MODELS[TINY](reconstructors={"ema": 96, "clip": 5}, branch_depth=1, **kw)


class PatchMean(nn.Module):
    """A teacher whose output is known: the mean of each 8 x 8 patch and channel, [N, 16, 3] at 32 px."""

    def forward(self, x):
        return F.avg_pool2d(x, 8).flatten(2).transpose(1, 2)


class FinerMap(nn.Module):
    """A map on a 2x finer grid than the units, [N, 3, 8, 8] at 32 px: pooled onto the units."""

    def forward(self, x):
        return F.avg_pool2d(x, 4)


class WithCls(nn.Module):
    """Tokens with a leading cls token, [N, 1 + 16, 3]: the cls token is dropped."""

    def forward(self, x):
        tokens = F.avg_pool2d(x, 8).flatten(2).transpose(1, 2)
        return torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)


class Pair(nn.Module):
    """Returns a tuple, not one tensor."""

    def forward(self, x):
        return x, x


class WrongGrid(nn.Module):
    """Five tokens: no square grid of units."""

    def forward(self, x):
        return x.flatten(2)[:, :, :5].transpose(1, 2)


class RandomConv(nn.Module):
    """A fixed random teacher, like a pre-trained one: a strided convolution then GELU, [N, 12, 4, 4]."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 12, 8, stride=8)

    def forward(self, x):
        return F.gelu(self.conv(x))


def script(module, path):
    torch.jit.script(module).save(str(path))
    return str(path)


def batch(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.rand(n, 16, generator=g)


# --- the model: the official one plus branches ---

def test_mor_adds_only_branch_keys_and_its_pixel_path_is_the_official_decoder():
    with torch.device("meta"):
        widths = {"ema": 768, "dino": 768, "clip": 512}
        sd = MODELS["fastconvmae_convvit_base_patch16"](reconstructors=widths).state_dict()
    official = official_base_keys()
    assert {k: list(v.shape) for k, v in sd.items() if k in official} == official
    extra = {k: list(v.shape) for k, v in sd.items() if k not in official}
    assert all(k.startswith(("reconstructors.ema.", "reconstructors.dino.", "reconstructors.clip.")) for k in extra)
    assert extra["reconstructors.clip.pred.weight"] == [512, 512]
    assert extra["reconstructors.ema.pred.weight"] == [768, 512]
    assert {k.split(".")[3] for k in extra if ".blocks." in k} == {"0", "1"}            # default: 2 of the 8 blocks
    # with the official weights the pixel path is unchanged: same loss and prediction as the plain model
    plain, mor = fastconvmae.MODELS[TINY](norm_pix_loss=True), tiny_mor(norm_pix_loss=True)
    mor.load_state_dict(plain.state_dict(), strict=False)
    imgs, noise = batch()
    loss_plain, pred_plain, _ = plain(imgs, 0.75, noise)
    loss_mor, pred_mor, _ = mor(imgs, 0.75, noise)
    assert torch.equal(pred_plain, pred_mor) and torch.equal(loss_plain, loss_mor)


def test_losses_are_the_masked_mse_of_each_branch_and_their_weighted_sum(tmp_path):
    """A teacher whose features are known: the clip branch's loss is the hand formula against them."""
    torch.manual_seed(0)
    model = tiny_mor(loss_weights={"pixel": 0.5, "clip": 2.0})
    teacher = load_teacher(script(PatchMean(), tmp_path / "t.pt"), "clip", grid=4)
    imgs, noise = batch()
    # our inputs are ImageNet-normalised; the CLIP teacher must see CLIP's normalisation
    pixels = imgs * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    expected = F.avg_pool2d((pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1), 8)
    expected = expected.flatten(2).transpose(1, 2)                                   # [2, 16, 3]
    features = teacher(imgs)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    targets = {"ema": torch.randn(2, 16, 96), "clip": F.pad(features, (0, 2))}         # 5 channels
    losses, pred, mask = model(imgs, 0.75, noise, targets)
    latent, _, ids_restore = model.forward_encoder(imgs, 0.75, noise)
    _, branch = model.forward_decoder(latent, ids_restore, ["clip"])
    t = targets["clip"]
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    per_unit = ((branch["clip"] - t.repeat(4, 1, 1)) ** 2).mean(-1)                   # [4N, L]; views share targets
    assert losses["clip"].item() == pytest.approx(((per_unit * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert losses["loss"].item() == pytest.approx(
        0.5 * losses["pixel"].item() + losses["ema"].item() + 2.0 * losses["clip"].item(), rel=1e-6)
    with pytest.raises(ValueError, match="do not match the branches"):
        model(imgs, 0.75, noise, {"ema": targets["ema"]})


@pytest.mark.parametrize("net", [FinerMap(), WithCls()], ids=["finer map", "cls token"])
def test_teacher_outputs_are_brought_onto_the_units(net, tmp_path):
    imgs, _ = batch()
    out = load_teacher(script(net, tmp_path / "t.pt"), "dino", grid=4)(imgs)         # DINO: ImageNet stats as ours
    torch.testing.assert_close(out, F.avg_pool2d(imgs, 8).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_teachers_receive_no_gradient_and_the_branches_train_the_encoder(tmp_path):
    torch.manual_seed(0)
    model = tiny_mor(loss_weights={"pixel": 0.0, "ema": 0.0})                       # only the clip branch counts
    ema = ema_teacher(model)
    clip = load_teacher(script(RandomConv(1), tmp_path / "t.pt"), "clip", grid=4)
    clip.net.conv.weight.requires_grad_(True)                       # even if the file's weights asked for it
    imgs, noise = batch()
    targets = {k: v[..., :5] if k == "clip" else v for k, v in teacher_targets(ema, {"clip": clip}, imgs).items()}
    assert not any(t.requires_grad for t in targets.values())
    losses, _, _ = model(imgs, 0.75, noise, targets)
    losses["loss"].backward()
    assert all(p.grad is None for p in ema.parameters()) and all(p.grad is None for p in clip.parameters())
    assert not any(p.requires_grad for p in ema.parameters())
    assert sorted(k for k, _ in ema.state_dict().items() if k.startswith(fastconvmae_mor.DECODER)) == []
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["blocks1.0.conv1.weight"].abs().sum() > 0                           # through the clip branch
    assert grads["reconstructors.clip.pred.weight"].abs().sum() > 0
    assert "reconstructors.ema.pred.weight" not in grads or grads["reconstructors.ema.pred.weight"].abs().sum() == 0


def test_ema_update_and_momentum_follow_their_formulas():
    torch.manual_seed(0)
    student = tiny_mor()
    teacher = ema_teacher(student)
    for p in teacher.parameters():                                                 # teacher != student
        p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_ema(teacher, student, 0.9)
    s = student.state_dict()
    assert set(before) == {k for k in s if not k.startswith(fastconvmae_mor.DECODER)}   # the encoder, nothing else
    for k, t in teacher.state_dict().items():
        torch.testing.assert_close(t, 0.9 * before[k] + 0.1 * s[k], rtol=1e-6, atol=1e-7)
    assert ema_momentum(0, 0.996, 50) == 0.996 and ema_momentum(50, 0.996, 50) == 1.0
    assert ema_momentum(25, 0.996, 50) == pytest.approx(0.998)
    assert ema_momentum(10, 0.996, 50) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 5) + 1) / 2)


def test_ema_teacher_gives_the_unmasked_encoders_output():
    """Its targets are the encoder's latent with nothing hidden: ConvMAE's (same modules) at mask ratio 0."""
    torch.manual_seed(0)
    model = tiny_mor().eval()
    teacher = ema_teacher(model)
    single = convmae.MODELS["convmae_convvit_tiny"]().eval()
    single.load_state_dict(teacher.state_dict(), strict=False)                     # the encoder: all its keys
    imgs, _ = batch()
    latent = single.forward_encoder(imgs, 0.0, torch.arange(16.0).repeat(2, 1))[0]  # every unit, in order
    torch.testing.assert_close(teacher.forward_unmasked(imgs), latent, rtol=1e-5, atol=1e-6)
    noise, clip = batch()[1], torch.randn(2, 16, 5)
    fp32, _, _ = model(imgs, 0.75, noise, {"ema": teacher.forward_unmasked(imgs), "clip": clip})
    with torch.autocast("cpu", dtype=torch.bfloat16):                              # AMP: bf16 targets, fp32 loss
        bf16, _, _ = model(imgs, 0.75, noise, {"ema": teacher.forward_unmasked(imgs), "clip": clip})
    for name, value in fp32.items():
        assert bf16[name].dtype == torch.float32 and bf16[name].item() == pytest.approx(value.item(), rel=3e-2), name


# --- external teachers from checkpoints: the official DINO and CLIP code's numbers ---

@pytest.fixture(scope="module")
def teachers_golden():
    return load_golden("teachers_tiny.pt")[0]


@pytest.mark.parametrize("kind", ["dino", "clip"])
def test_dino_and_clip_checkpoints_give_the_official_patch_features(teachers_golden, kind, tmp_path):
    g = teachers_golden
    torch.save(g[kind]["state_dict"], tmp_path / "teacher.pth")
    teacher = load_teacher(str(tmp_path / "teacher.pth"), kind, grid=4)
    assert isinstance(teacher.net, ViTTeacher)
    pixels = g["pixels"].float() / 255
    imgs = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(teacher(imgs), g[kind]["tokens"], rtol=1e-4, atol=1e-5)


class Holder(nn.Module):
    """A TorchScript archive holding parameters under given names, as OpenAI's CLIP release does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def holder(state):
    root = Holder()
    for key, value in state.items():
        *path, leaf = key.split(".")
        m = root
        for name in path:
            if not hasattr(m, name):
                m.add_module(name, nn.Module())
            m = getattr(m, name)
        m.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
    return root


def test_openai_clip_release_format_rebuilds_its_image_tower(teachers_golden, tmp_path):
    """OpenAI's released CLIP files are TorchScript archives of the whole model: the image tower
    is rebuilt from their `visual.*` weights, not called (it returns only the pooled embedding)."""
    g = teachers_golden
    teacher = load_teacher(script(holder(g["clip"]["state_dict"]), tmp_path / "ViT-tiny.pt"), "clip", grid=4)
    assert isinstance(teacher.net, ViTTeacher)
    pixels = g["pixels"].float() / 255
    imgs = (pixels - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(teacher(imgs), g["clip"]["tokens"], rtol=1e-4, atol=1e-5)


def test_torch_export_teacher(tmp_path):
    batch_dim = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(PatchMean(), (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch_dim},))
    torch.export.save(program, tmp_path / "teacher.pt2")
    imgs, _ = batch(n=3)
    out = load_teacher(str(tmp_path / "teacher.pt2"), "dino", grid=4)(imgs)
    torch.testing.assert_close(out, F.avg_pool2d(imgs, 8).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)


# --- the training loop of fastconvmae_mor.py ---

def test_each_flag_feeds_its_branch_with_its_normalisation(tmp_path):
    args = fastconvmae_mor.get_args(["--model", TINY, "--teacher_dino", script(PatchMean(), tmp_path / "d.pt"),
                                     "--teacher_clip", script(RandomConv(2), tmp_path / "c.pt")])
    teachers, widths = fastconvmae_mor.build_teachers(args, 4, batch(n=8)[0], torch.device("cpu"))
    assert widths == {"dino": 3, "clip": 12}
    imgs, _ = batch()
    torch.testing.assert_close(teachers["dino"](imgs), F.avg_pool2d(imgs, 8).flatten(2).transpose(1, 2))  # as ours
    pixels = imgs * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    clip_input = (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(teachers["clip"](imgs), RandomConv(2)(clip_input).flatten(2).transpose(1, 2),
                               rtol=1e-5, atol=1e-5)


def mor_args(tmp_path, *extra):
    dino = script(RandomConv(1), tmp_path / "dino.pt")
    clip = script(RandomConv(2), tmp_path / "clip.pt")
    return ["--model", TINY, "--num_workers", 0, "--warmup_epochs", 1, "--teacher_dino", dino,
            "--teacher_clip", clip, *extra]


def test_short_run_lowers_every_loss_component(tmp_path):
    r = run_main("fastconvmae_mor.py", *mor_args(tmp_path, "--epochs", 3, "--builtin_images", 256, "--batch_size", 16,
                                                 "--lr", "2e-3", "--log_every", 4, "--output_dir", tmp_path / "run"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MoR: targets pixel, ema, dino, clip" in r.stdout
    log = log_lines(tmp_path / "run")
    first, last = log[0], log[-1]
    for name in ("pixel", "ema", "dino", "clip"):
        assert last[f"loss_{name}"] < 0.8 * first[f"loss_{name}"], (name, first, last)
    assert last["loss"] == pytest.approx(sum(last[f"loss_{k}"] for k in ("pixel", "ema", "dino", "clip")), rel=1e-5)
    printed = [line for line in r.stdout.splitlines() if " step " in line]
    assert len(printed) == len(log) and f"| clip {last['loss_clip']:.4f}" in printed[-1]   # each target printed
    assert (tmp_path / "run" / "recon-epoch003.png").exists()


def test_sigkill_then_resume_restores_the_ema_teacher_bit_identically(tmp_path):
    args = mor_args(tmp_path, "--epochs", 2, "--builtin_images", 128, "--batch_size", 8, "--lr", "1e-3",
                    "--log_every", 1)
    ref = run_main("fastconvmae_mor.py", *args, "--output_dir", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = start("fastconvmae_mor.py", *args, "--output_dir", tmp_path / "run")
    wait_for(lambda: any(e["epoch"] == 1 and e["step"] >= 5 for e in log_lines(tmp_path / "run")), proc)
    code, _, _ = kill(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    r = run_main("fastconvmae_mor.py", *args, "--output_dir", tmp_path / "run", "--resume", "auto")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / "checkpoint-last.pth", weights_only=True) for d in ("ref", "run"))
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["ema"], b["ema"])
    assert not torch.equal(a["ema"]["blocks3.0.attn.qkv.weight"], a["model"]["blocks3.0.attn.qkv.weight"])


def test_a_checkpoint_of_the_old_fastconvmae_py_mor_resumes_exactly(tmp_path):
    """Before fastconvmae_mor.py, `fastconvmae.py --mor` wrote the same 'model' and 'ema' keys, plus args.mor =
    True and each rank's RNG state under 'rng'. Such a file, built here by hand from the epoch-1 copy of a run,
    resumes to that run's last weights, EMA included; fastconvmae.py refuses it with one line."""
    args = mor_args(tmp_path, "--epochs", 2, "--builtin_images", 64, "--batch_size", 8, "--lr", "1e-3",
                    "--ema_momentum", 0.9)
    ref = run_main("fastconvmae_mor.py", *args, "--save_every", 1, "--output_dir", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    new = torch.load(tmp_path / "ref" / "checkpoint-0001.pth", weights_only=True)
    old = {"model": new["model"], "optimizer": new["optimizer"], "scaler": new["scaler"], "epoch": 1,
           "batch_in_epoch": 0, "world_size": 1, "args": new["args"] | {"mor": True},
           "rng": [{"cpu": torch.get_rng_state(), "cuda": None}], "ema": new["ema"]}
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "checkpoint-last.pth")
    r = run_main("fastconvmae.py", "--model", TINY, "--num_workers", 0, "--epochs", 2, "--builtin_images", 64,
                 "--batch_size", 8, "--output_dir", tmp_path / "old", "--resume", "auto")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert last_line(r.stderr) == (f"error: --resume {tmp_path / 'old' / 'checkpoint-last.pth'} is a "
                                   f"Mixture-of-Reconstructors checkpoint; resume it with fastconvmae_mor.py")
    r = run_main("fastconvmae_mor.py", *args, "--save_every", 1, "--output_dir", tmp_path / "old", "--resume", "auto")
    assert r.returncode == 0 and "resumed from" in r.stdout and "at epoch 1, batch 0" in r.stdout, r.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / "checkpoint-last.pth", weights_only=True) for d in ("ref", "old"))
    assert b["epoch"] == 2 and "rng" not in b and "mor" not in b["args"]                # rewritten in today's layout
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["ema"], b["ema"])


def test_ddp_two_processes_with_accumulation_equal_one_process(tmp_path):
    # momentum 0.5: the EMA moves far in 4 steps, so an update at the wrong time or with the wrong
    # momentum would show (at the default 0.996 it stays within 1e-5 of its start here)
    common = mor_args(tmp_path, "--epochs", 1, "--builtin_images", 64, "--lr", "1e-3", "--log_every", 1,
                      "--ema_momentum", 0.5)
    one = run_main("fastconvmae_mor.py", *common, "--batch_size", 16, "--output_dir", tmp_path / "one")
    two = run("fastconvmae_mor.py", *common, "--batch_size", 4, "--accum_iter", 2, "--output_dir", tmp_path / "two",
              torchrun=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert "Warning" not in two.stderr, two.stderr[-2000:]                          # e.g. DDP's on grad strides
    a, b = (torch.load(tmp_path / d / "checkpoint-last.pth", weights_only=True) for d in ("one", "two"))
    for part in ("model", "ema"):
        assert_same_weights(without_key_bias(a[part]), without_key_bias(b[part]), atol=1e-5)
    torch.manual_seed(0)                                                            # the run's init (seed 0) ...
    start = MODELS[TINY](reconstructors={"ema": 96, "dino": 12, "clip": 12}, branch_depth=1).state_dict()
    # ... which the EMA has left: it is not frozen
    assert (a["ema"]["blocks3.0.attn.qkv.weight"] - start["blocks3.0.attn.qkv.weight"]).abs().max() > 1e-4
    l1, l2 = log_lines(tmp_path / "one"), log_lines(tmp_path / "two")
    for key in ("loss", "loss_pixel", "loss_ema", "loss_dino", "loss_clip"):
        assert [e[key] for e in l1] == pytest.approx([e[key] for e in l2], rel=1e-4)


# --- bad input: one line naming the flag ---

def bad_cases(tmp_path, tiny):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    wrong_grid = script(WrongGrid(), tmp_path / "grid.pt")
    resnet = tmp_path / "RN50.pth"                                  # CLIP's ResNet towers: no class_embedding
    torch.save({"visual.conv1.weight": torch.zeros(8, 3, 3, 3), "visual.attnpool.c_proj.weight": torch.zeros(4, 8)},
               resnet)
    pair = script(Pair(), tmp_path / "pair.pt")
    static = tmp_path / "static.pt2"                                                # exported for batch 2 only
    torch.export.save(torch.export.export(PatchMean(), (torch.randn(2, 3, 32, 32),)), static)
    return [
        ([*tiny, "--teacher_clip", tmp_path / "missing.pt"], "--teacher_clip " + str(tmp_path / "missing.pt")
         + ": no such file"),
        ([*tiny, "--teacher_clip", resnet], "a CLIP ResNet image tower; only CLIP ViTs are supported"),
        ([*tiny, "--teacher_dino", pair], "returns a tuple; it must return one tensor"),
        ([*tiny, "--teacher_dino", static], "--teacher_dino"),
        ([*tiny, "--teacher_dino", garbage], "neither TorchScript nor a readable checkpoint"),
        ([*tiny, "--teacher_dino", wrong_grid], "returns 4 tokens: not a square grid that pools onto"),
        ([*tiny, "--mor_branch_depth", 2], "--mor_branch_depth must be 1 to 1"),
        ([*tiny, "--mor_weights", "dino=2"], "--mor_weights dino=2: dino is not a target"),
        ([*tiny, "--mor_weights", "ema=x"], "--mor_weights ema=x: expected NAME=W, W a finite number at least 0"),
        ([*tiny, "--mor_weights", "ema=-1"], "--mor_weights ema=-1"),
        ([*tiny, "--mor_weights", "pixel=nan"], "--mor_weights pixel=nan"),
        ([*tiny, "--ema_momentum", "nan"], "--ema_momentum"),
        ([*tiny, "--ema_momentum", 1.5], "--ema_momentum must be in [0, 1]"),
    ]


def test_bad_mor_input_gives_one_line_naming_the_flag(tmp_path):
    torch.save({"patch_embed.proj.weight": torch.zeros(8, 3, 8, 8)}, tmp_path / "partial.pth")   # a broken ViT
    tiny = ["--model", TINY, "--num_workers", 0, "--epochs", 1, "--builtin_images", 16, "--batch_size", 8]
    cases = bad_cases(tmp_path, tiny) + [([*tiny, "--teacher_dino", tmp_path / "partial.pth"],
                                          "not a ViT state_dict in DINO's or CLIP's layout")]
    failures = one_line_error_failures(fastconvmae_mor, ["--output_dir", tmp_path / "out"], cases)
    assert not failures, "\n".join(failures)
    # a MoR checkpoint resumed by fastconvmae.py: one line, no traceback, naming the file that resumes it
    assert run_main("fastconvmae_mor.py", *tiny, "--output_dir", tmp_path / "m").returncode == 0
    r = run_main("fastconvmae.py", *tiny, "--epochs", 2, "--output_dir", tmp_path / "m", "--resume", "auto")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert last_line(r.stderr).startswith("error: --resume") and "fastconvmae_mor.py" in last_line(r.stderr)
    # and a plain one resumed by fastconvmae_mor.py does not fit its branches
    assert run_main("fastconvmae.py", *tiny, "--output_dir", tmp_path / "p").returncode == 0
    r = run_main("fastconvmae_mor.py", *tiny, "--epochs", 2, "--output_dir", tmp_path / "p", "--resume", "auto")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert last_line(r.stderr).startswith("error: --resume") and "does not fit" in last_line(r.stderr)
    # a MoR checkpoint resumed with another set of teachers: the line names both sets
    dino = script(RandomConv(1), tmp_path / "dino.pt")
    r = run_main("fastconvmae_mor.py", *tiny, "--epochs", 2, "--teacher_dino", dino, "--output_dir", tmp_path / "m",
                 "--resume", "auto")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "was trained with the teachers ema, this run has ema, dino" in last_line(r.stderr), r.stderr


def test_the_mor_flags_belong_to_fastconvmae_mor_py_only(tmp_path, monkeypatch):
    """fastconvmae.py, the released method, has no MoR flags, and fastconvmae_mor.py no dead `--mor` (it is
    implied): an old command line stops at once, naming the flag."""
    tiny = ["--model", TINY, "--num_workers", 0, "--epochs", 1, "--builtin_images", 16, "--batch_size", 8,
            "--output_dir", tmp_path / "out"]
    dino = script(PatchMean(), tmp_path / "ok.pt")
    for name, flag in [("fastconvmae.py", ["--mor"]), ("fastconvmae.py", ["--teacher_dino", dino]),
                       ("fastconvmae_mor.py", ["--mor"])]:
        monkeypatch.setattr(sys, "argv", [name])                                   # argparse's name for the file
        r = run_main(name, *tiny, *flag)
        line = last_line(r.stderr)                                  # argparse's: unrecognized, or (--mor) ambiguous
        assert r.returncode == 2 and line.startswith(f"{name}: error: ") and flag[0] in line, (name, r.stderr)
    assert not (tmp_path / "out").exists()                                         # stopped before any work


def test_finetune_takes_a_mor_checkpoint_and_reports_the_branches_unused():
    import finetune
    torch.manual_seed(0)
    pretrained = tiny_mor()
    classifier = finetune.build_classifier(TINY, 10)
    missing, unused = finetune.load_weights(classifier, {"model": pretrained.state_dict()}, "--finetune x")
    assert all(k.startswith(("head.", "fc_norm.")) for k in missing)
    assert {k for k in unused if k.startswith("reconstructors.")} == \
        {k for k in pretrained.state_dict() if k.startswith("reconstructors.")}
    torch.testing.assert_close(classifier.state_dict()["blocks3.0.attn.qkv.weight"],
                               pretrained.state_dict()["blocks3.0.attn.qkv.weight"])
