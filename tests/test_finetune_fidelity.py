"""finetune.py against the official fine-tuning computation: timm 0.3.2's RandAugment, MAE's probe crop (golden fixtures
from tests/golden/make_finetune_golden.py), SimMIM's relative position tables (scipy's interp2d) and schedule, the
evaluation resize of each method, ConvNeXt V2's EMA of the weights, and the best top-1 kept with its checkpoint."""
import math
import os
import signal
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms

import augment
import finetune as ft
from helpers import ROOT, assert_same_weights, kill, log_lines, run, run_main, start, wait_for, weights

GOLDEN = torch.load(os.path.join(ROOT, "tests", "golden", "finetune_official.pt"), weights_only=True)


def pil(array):
    return Image.fromarray(array.numpy())


def as_tensor(img):
    return torch.from_numpy(np.asarray(img).copy())


# --- RandAugment: timm 0.3.2's rand-m9-mstd0.5-inc1 ---

def test_every_randaugment_operation_equals_timms_byte_for_byte_at_each_magnitude_and_sign():
    g = GOLDEN["randaugment"]
    assert {name for name, _, _ in g["cases"]} == set(augment.RAND_OPS) and len(augment.RAND_OPS) == 15
    bad = [(name, m, negated) for (name, m, negated), out in zip(g["cases"], g["outputs"])
           if not torch.equal(as_tensor(augment.rand_op(pil(g["image"]), name, m, negated)), out)]
    assert not bad, f"differ from timm: {bad}"
    black = augment.rand_op(pil(g["image"]), "PosterizeIncreasing", 10.0)           # 0 bits kept, as on Pillow < 10
    assert not as_tensor(black).any()


def test_randaugment_draws_two_ops_with_replacement_each_at_p_half_and_magnitude_n9_half_clipped():
    torch.manual_seed(0)
    ra, n = augment.RandAugment(), 20000
    draws = [ra.draw() for _ in range(n)]
    ops = [op for d in draws for op in d]
    assert abs(len(ops) / (2 * n) - 0.5) < 0.01                                 # each of the two at p 0.5
    counts = Counter(name for name, _, _ in ops)
    assert set(counts) == set(augment.RAND_OPS) and max(abs(c / len(ops) - 1 / 15) for c in counts.values()) < 0.006
    pairs = [d for d in draws if len(d) == 2]
    assert abs(sum(a[0] == b[0] for a, b in pairs) / len(pairs) - 1 / 15) < 0.01   # with replacement
    m = np.array([m for _, m, _ in ops])
    clipped = np.clip(np.random.default_rng(0).normal(9, 0.5, 10 ** 6), 0, 10)   # mean 8.996, std 0.488
    assert abs(m.mean() - clipped.mean()) < 0.012 and abs(m.std() - clipped.std()) < 0.008   # 3.5 sigma
    assert abs(sum(neg for _, _, neg in ops) / len(ops) - 0.5) < 0.01
    high = torch.tensor([m for _ in range(4000) for _, m, _ in augment.RandAugment(9.9).draw()])
    assert high.max() == 10.0 and abs((high == 10.0).double().mean() - 0.42) < 0.03   # P(N(9.9, .5) > 10) = 0.42


def test_the_recipe_transform_leaves_about_a_quarter_of_images_unaugmented_as_timm():
    """timm's rand-m9-mstd0.5-inc1 leaves an image as it was when both ops are skipped (1/4) or do nothing;
    over 300 seeded draws on one image, 27.7 % (torchvision's RandAugment, which always applies both: 1 %)."""
    img, ra = pil(GOLDEN["randaugment"]["image"]), augment.RandAugment()
    unchanged = 0
    for seed in range(300):
        torch.manual_seed(seed)
        unchanged += torch.equal(as_tensor(ra(img.copy())), as_tensor(img))
    assert 0.22 < unchanged / 300 < 0.34, unchanged


def test_the_recipes_randaugment_draws_from_each_samples_seeded_stream():
    """common.SeededSamples seeds torch's generator per (seed, epoch, index): a resumed run augments as the first."""
    transform = ft.train_transform(32, 0.0)
    assert isinstance(transform.transforms[2], augment.RandAugment)
    ds = ft.pretrain_loader(ft.load_images(None, "train", 32, 16), 32, 4, 0, seed=3, num_workers=0,
                            transform=transform).dataset
    assert torch.equal(ds[(2, 5)][0], ds[(2, 5)][0]) and not torch.equal(ds[(2, 5)][0], ds[(3, 5)][0])


# --- the linear probe's crop, the evaluation resize ---

def test_probe_crop_draws_as_maes_util_crop():
    big = Image.new("RGB", (500, 333))
    drawn = []
    for seed in range(200):
        torch.manual_seed(seed)
        drawn.append(augment.ProbeCrop.get_params(big, (0.08, 1.0), (3 / 4, 4 / 3)))
    assert torch.equal(torch.tensor(drawn), GOLDEN["probe_crop"]["params"])
    area = torch.tensor(drawn)[:, 2:].prod(dim=1).double().mean() / (500 * 333)
    assert 0.47 < area < 0.55, area                                           # torchvision's: 0.38
    torch.manual_seed(0)
    crop = augment.ProbeCrop(24, interpolation=ft.BICUBIC)(pil(GOLDEN["randaugment"]["image"]))
    assert torch.equal(as_tensor(crop), GOLDEN["probe_crop"]["crop24_seed0"])


def official_eval(size, method):
    """The official scripts' evaluation transforms, as they write them (torchvision v1, PIL bicubic)."""
    if method == "convnextv2" and size >= 384:
        resize = [transforms.Resize((size, size), interpolation=ft.BICUBIC)]
    elif method == "simmim":
        resize = [transforms.Resize(int((256 / 224) * size), interpolation=ft.BICUBIC), transforms.CenterCrop(size)]
    else:
        crop_pct = 224 / 256 if size <= 224 or method == "convnextv2" else 1.0
        resize = [transforms.Resize(int(size / crop_pct), interpolation=ft.BICUBIC), transforms.CenterCrop(size)]
    return transforms.Compose(resize + [transforms.ToTensor(), transforms.Normalize(ft.IMAGENET_MEAN, ft.IMAGENET_STD)])


@pytest.mark.parametrize("method, size", [("mae", 224), ("mae", 384), ("convmae", 448), ("simmim", 192),
                                          ("simmim", 384), ("convnextv2", 224), ("convnextv2", 288),
                                          ("convnextv2", 384), ("convnextv2", 512)])
def test_evaluation_resize_and_crop_are_each_methods_official_rule(method, size):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (333, 500, 3), dtype=np.uint8))
    ours = ft.eval_transform(size, method)(img)
    assert ours.shape == (3, size, size) and torch.equal(ours, official_eval(size, method)(img))


@pytest.mark.parametrize("model, linprobe, short", [("simmim_vit_tiny", False, 292), ("mae_vit_tiny", False, 256),
                                                    ("simmim_vit_tiny", True, 256)])
def test_fine_tuning_gets_its_methods_transforms_and_the_probe_maes(model, linprobe, short):
    """At 256 px MAE's evaluation resizes to 256 (crop_pct 1), SimMIM's to 256 / 224 x 256 = 292."""
    args = ft.get_args(["--model", model, "--input_size", "256", "--builtin_images", "64", "--num_workers", "0",
                        "--batch_size", "8"] + ["--linprobe"] * linprobe)
    _, loader, _, val = ft.data(args, 0, 1)
    first = loader.dataset.transform.transforms[0]
    assert isinstance(first, augment.ProbeCrop) if linprobe else isinstance(loader.dataset.transform.transforms[2],
                                                                       augment.RandAugment)
    assert val.dataset.transform.transforms[0].size == [short]


# --- SimMIM: relative position tables and the schedule ---

@pytest.mark.parametrize("case, side, extra", [("swin_w6_to_w7", 13, 0), ("vit_14_to_16", 31, 3)])
def test_relative_position_tables_resize_as_simmims_interp2d(case, side, extra):
    before, after = GOLDEN["rel_pos"][case]
    ours = ft.interpolate_rel_pos_table(before, side, extra)
    torch.testing.assert_close(ours, after, rtol=0, atol=1e-6)
    assert torch.equal(ours[side * side:], before[-extra:] if extra else before[:0])   # the cls rows kept


def test_the_spline_is_not_a_knot_it_reproduces_any_cubic_and_clamps_outside():
    x = torch.tensor([-4.2, -2.5, -1.0, 0.0, 1.0, 2.5, 4.2], dtype=torch.float64)
    u = torch.linspace(-4.2, 4.2, 29, dtype=torch.float64)
    cubic = lambda t: 0.3 * t ** 3 - t ** 2 + 2 * t - 1                      # noqa: E731
    torch.testing.assert_close(ft.cubic_spline_matrix(x, u) @ cubic(x), cubic(u), rtol=0, atol=1e-12)
    outside = ft.cubic_spline_matrix(x, torch.tensor([-9.0, 9.0], dtype=torch.float64)) @ cubic(x)
    torch.testing.assert_close(outside, cubic(x[[0, -1]]), rtol=0, atol=1e-12)


class TimmCosine:
    """timm's CosineLRScheduler(t_initial=total, lr_min, warmup_lr_init, warmup_t, cycle_limit=1, t_in_epochs=False),
    written from its rule: groups start at warmup_lr_init; step_update(t) sets each group's lr from its base."""

    def __init__(self, groups, total, lr_min, warmup_lr, warmup):
        self.groups, self.total, self.lr_min, self.warmup_lr, self.warmup = groups, total, lr_min, warmup_lr, warmup
        self.base = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = warmup_lr

    def step_update(self, t):
        for g, base in zip(self.groups, self.base):
            if t < self.warmup:
                g["lr"] = self.warmup_lr + t * (base - self.warmup_lr) / self.warmup
            elif t < self.total:
                g["lr"] = self.lr_min + 0.5 * (base - self.lr_min) * (1 + math.cos(math.pi * t / self.total))
            else:
                g["lr"] = self.lr_min


def simmim_official_lrs(scales, lr, floor, epochs, warmup_epochs, num_steps, accum):
    """Every optimizer step's lrs as SimMIM's main_finetune.py gets them: groups at lr x scale, the scheduler stepped
    after each optimizer step at (epoch * num_steps + idx), idx the step's last micro-batch."""
    groups = [{"lr": lr * s, "lr_scale": s} for s in scales]
    sched = TimmCosine(groups, epochs * num_steps, floor, floor, warmup_epochs * num_steps)
    lrs = []
    for epoch in range(epochs):
        for idx in range(num_steps):
            if (idx + 1) % accum == 0:
                lrs.append([g["lr"] for g in groups])
                sched.step_update(epoch * num_steps + idx)
    return lrs


def test_simmims_schedule_is_the_official_step_by_step():
    scales, B = [0.65 ** i for i in (3, 1, 0)], 2048
    args = ft.get_args(["--model", "simmim_vit_base_patch16"])
    args.lr, args.min_lr = 1.25e-3 * B / 512, 2.5e-7 * B / 512
    args.epochs, args.warmup_epochs, accum, batches = 10, 2, 2, 6
    optimizer = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "lr_scale": s} for s in scales])
    ours = []
    for step in range(args.epochs * batches // accum):
        head = ft.set_step_lr(optimizer, args, step * accum, batches)
        ours.append([g["lr"] for g in optimizer.param_groups])
        assert head == ours[-1][-1]
    official = simmim_official_lrs(scales, args.lr, args.min_lr, args.epochs, args.warmup_epochs, batches, accum)
    assert len(ours) == len(official) and ours[0] == [args.min_lr] * 3
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(official), rtol=1e-12, atol=0)
    args.epochs, args.warmup_epochs = 100, 20                                  # the recipe: the head at epoch 60
    assert ft.set_step_lr(optimizer, args, 60 * 1000 + 1, 1000) == pytest.approx(1.73e-3, abs=5e-6)


def test_simmims_floor_and_warmup_start_are_2_5e_7_per_512_images_and_other_methods_keep_maes(tmp_path):
    for model, floor in (("simmim_swin_tiny", 2.5e-7 * 8 / 512), ("mae_vit_tiny", 1e-6)):
        r = run_main("finetune.py", "--model", model, "--epochs", 1, "--builtin_images", 32, "--batch_size", 8,
                     "--num_workers", 0, "--output_dir", tmp_path / model)
        assert r.returncode == 0, r.stderr[-2000:]
        saved = torch.load(tmp_path / model / "checkpoint-last.pth", weights_only=True)["args"]
        assert saved["min_lr"] == floor and saved["schedule"] == ("simmim" if "simmim" in model else "mae")


# --- EMA (ConvNeXt V2's recipe) and the best top-1 ---

def test_ema_follows_timms_rule_and_copies_integer_buffers():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = ft.ModelEma(model, decay=0.9)
    expected = {k: v.clone().double() for k, v in model.state_dict().items()}
    for _ in range(3):
        model(torch.randn(8, 4)).sum().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad
        ema.update()
        for k, v in model.state_dict().items():
            expected[k] = expected[k] * 0.9 + 0.1 * v.double() if v.is_floating_point() else v.double()
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v.double(), expected[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert ema.module.state_dict()["1.num_batches_tracked"] == 3 and not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_the_ema_is_on_in_convnext_v2s_recipes_only_and_off_for_eval():
    on = {m: ft.get_args(["--model", m]).model_ema for m in ft.MODELS}
    assert {m for m, v in on.items() if v} == {m for m in ft.MODELS if m.startswith("convnextv2")}
    assert ft.get_args(["--model", "convnextv2_fcmae_test", "--eval", "--resume", __file__]).model_ema is False


def ema_args(*extra):
    return ["--model", "mae_vit_tiny", "--num_workers", 0, "--builtin_images", 64, "--batch_size", 8, "--lr", "1e-3",
            "--warmup_epochs", 1, "--log_every", 1, "--model_ema", "--model_ema_decay", 0.9, *extra]


def test_ema_and_best_top1_are_logged_kept_in_checkpoints_and_evaluated_by_eval(tmp_path):
    r = run_main("finetune.py", *ema_args("--epochs", 3, "--output_dir", tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    evals = [e for e in log_lines(tmp_path) if "acc1" in e]
    assert [e["epoch"] for e in evals] == [1, 2, 3]
    for who in ("", "ema_"):
        accs = [e[who + "acc1"] for e in evals]
        assert [e[f"best_{who}acc1"] for e in evals] == [max(accs[:i + 1]) for i in range(3)]
        best = torch.load(tmp_path / f"checkpoint-best{'-ema' * bool(who)}.pth", weights_only=True)
        assert best["epoch"] == 1 + accs.index(max(accs)) and best["best"][who + "acc1"] == max(accs)
    assert f"EMA top-1 {evals[-1]['ema_acc1']:.2f} % (best {evals[-1]['best_ema_acc1']:.2f})" in r.stdout
    last = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert last["model_ema"].keys() == last["model"].keys()
    assert not torch.equal(last["model_ema"]["head.weight"], last["model"]["head.weight"])
    for flag, key in (("--model_ema", "ema_acc1"), ("--no-model_ema", "acc1")):
        r = run_main("finetune.py", *ema_args("--eval", "--resume", tmp_path / "checkpoint-last.pth", flag))
        assert r.returncode == 0 and f"top-1 {evals[-1][key]:.2f} %" in r.stdout, r.stdout + r.stderr[-2000:]


def test_ema_and_best_resume_bit_identically_after_sigterm_under_torchrun(tmp_path):
    args = ema_args("--epochs", 3, "--batch_size", 4)                     # 2 processes x 4: 8 steps per epoch
    whole = run("finetune.py", *args, "--output_dir", tmp_path / "whole", torchrun=2)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "term"
    proc = start("finetune.py", *args, "--output_dir", out, torchrun=2)
    wait_for(lambda: any(e.get("epoch") == 1 and e.get("step", 0) >= 3 for e in log_lines(out)), proc)
    _, printed, err = kill(proc, signal.SIGTERM)                # to the launcher, which passes it to both ranks
    assert "SIGTERM: saved" in printed, err[-2000:]
    r = run("finetune.py", *args, "--output_dir", out, "--resume", "auto", torchrun=2)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    for key in ("model", "model_ema"):
        assert_same_weights(weights(out / "checkpoint-last.pth", key),
                            weights(tmp_path / "whole" / "checkpoint-last.pth", key))
    evals = [[e for e in log_lines(d) if "acc1" in e] for d in (out, tmp_path / "whole")]
    assert evals[0][-1] == evals[1][-1]                                        # top-1s and the best so far
