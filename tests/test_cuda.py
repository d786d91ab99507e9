"""The CUDA paths of every method file: the official numbers on the GPU (fp32, TF32 off), bf16
autocast, SimMIM's fused attention against its explicit one, and the training loop as a user
runs it on a GPU (bf16, fp16 with a GradScaler, --compile, SIGTERM and --resume auto).

Skipped as a whole without CUDA (CI is CPU-only). On one H100: about 4.5 minutes run serially (the
five training tests, 40-55 s each, are most of it), 2 min 10 s with pytest -n 6 (pytest-xdist)."""
import math
import signal
import types

import pytest
import torch
import torch.nn.functional as F

import convmae
import convnextv2_fcmae
import fastconvmae
import mae
import simmim
from helpers import (assert_matches_golden, kill, load_golden, log_lines, run, shapes_batch, start, wait_for, weights)
from test_convmae import our_config
from test_simmim import our_kwargs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def to(obj, device):
    """A fixture (nested dicts and lists of tensors) with every tensor moved to `device`."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to(v, device) for v in obj)
    return obj


@pytest.fixture
def fp32():
    """Full fp32 on the GPU: cuDNN convolutions default to TF32 (operands rounded to a 10-bit
    mantissa, ~5e-4 relative), too coarse for the 1e-5 bar on the official CPU numbers."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# --- the official numbers, computed on the GPU (the fixtures were made on CPU) ---

def mae_config(g):
    return {k: v for k, v in g["config"].items() if k not in ("norm_eps", "in_chans")}    # as test_mae.py


GOLDEN_BUILDS = {"mae_tiny.pt": lambda g: mae.MaskedAutoencoderViT(**mae_config(g)),
                 "convmae_tiny.pt": lambda g: convmae.MaskedAutoencoderConvViT(**our_config(g)),
                 "fastconvmae_tiny.pt": lambda g: fastconvmae.MaskedAutoencoderConvViT(**our_config(g))}


@pytest.mark.parametrize("fixture", list(GOLDEN_BUILDS))
@pytest.mark.parametrize("case, norm_pix", [("pix", False), ("norm_pix", True)])
def test_official_loss_pred_grads_and_latent_on_cuda(fp32, fixture, case, norm_pix):
    """The same bars as on CPU (helpers.assert_matches_golden): the GPU kernels (SDPA's fused
    attention, cuDNN convolutions) differ from the official CPU run by float rounding only."""
    g, imgs = load_golden(fixture)
    g = to(g, CUDA)
    model = GOLDEN_BUILDS[fixture](g).to(CUDA)
    model.norm_pix_loss = norm_pix
    model.load_state_dict(g["state_dict"], strict=True)
    assert_matches_golden(model, g, imgs.to(CUDA), case)
    latent = model.forward_encoder(imgs.to(CUDA), g["mask_ratio"], g["noise"])[0]
    torch.testing.assert_close(latent, g["latent"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_simmim_official_loss_reconstruction_and_grads_on_cuda(fp32, kind):
    g = to(load_golden(f"simmim_{kind}_tiny.pt")[0], CUDA)
    model = simmim.SimMIM(**our_kwargs(g)).to(CUDA)
    model.load_state_dict(g["state_dict"], strict=True)
    loss, pred, mask = model(g["imgs"], mask=g["mask"])                           # CUDA: the SDPA path
    loss.backward()
    assert abs(loss.item() / g["loss"].item() - 1) <= 1e-5, (loss.item(), g["loss"].item())
    torch.testing.assert_close(pred, g["pred"], rtol=1e-4, atol=1e-5)
    assert torch.equal(mask, g["mask"].flatten(1))
    params = dict(model.named_parameters())
    for name, grad in g["grads"].items():
        torch.testing.assert_close(params[name].grad, grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_convnextv2_official_block_and_grn_on_cuda(fp32):
    g = to(load_golden("convnextv2_block.pt")[0], CUDA)
    block = convnextv2_fcmae.Block(16).to(CUDA)
    block.load_state_dict(g["block"], strict=True)
    x = g["x"].clone().requires_grad_()
    y = block(x)
    y.pow(2).mean().backward()
    torch.testing.assert_close(y, g["y"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, g["x_grad"], rtol=1e-4, atol=1e-7)
    for name, p in block.named_parameters():
        torch.testing.assert_close(p.grad, g["grads"][name], rtol=1e-4, atol=1e-4 * g["grads"][name].abs().max().item())
    grn = convnextv2_fcmae.GRN(16).to(CUDA)
    grn.load_state_dict(g["grn"])
    torch.testing.assert_close(grn(g["grn_in"]), g["grn_out"], rtol=1e-5, atol=1e-6)


# --- bf16 autocast, as the training loop runs it on CUDA by default ---

# (builder, image size, mask units, mask ratio)
TINY = {"mae_vit_tiny": (mae.MODELS["mae_vit_tiny"], 32, 64, 0.75),
        "convmae_convvit_tiny": (convmae.MODELS["convmae_convvit_tiny"], 32, 16, 0.75),
        "fastconvmae_convvit_tiny": (fastconvmae.MODELS["fastconvmae_convvit_tiny"], 32, 16, 0.75),
        "simmim_vit_tiny": (simmim.MODELS["simmim_vit_tiny"], 32, 16, 0.6),
        "simmim_swin_tiny": (simmim.MODELS["simmim_swin_tiny"], 32, 16, 0.6),
        "convnextv2_fcmae_test": (convnextv2_fcmae.MODELS["convnextv2_fcmae_test"], 64, 4, 0.6)}


def loss_and_grads(model, imgs, ratio, noise, dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss, pred, mask = model(imgs, ratio, noise)
    loss.backward()
    return loss, pred, mask, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(TINY))
def test_bf16_autocast_forward_backward_is_close_to_fp32(fp32, name):
    build, size, units, ratio = TINY[name]
    torch.manual_seed(0)
    model = build(**({} if name.startswith("simmim") else {"norm_pix_loss": True})).to(CUDA)
    imgs, noise = shapes_batch(8, size).to(CUDA), torch.rand(8, units, device=CUDA)
    ref, _, ref_mask, _ = loss_and_grads(model, imgs, ratio, noise)
    loss, pred, mask, grads = loss_and_grads(model, imgs, ratio, noise, torch.bfloat16)
    # the mask normalises the loss (a count in bf16 rounds above 256): both stay fp32
    assert loss.dtype == torch.float32 and mask.dtype == torch.float32 and pred.is_cuda
    assert torch.equal(mask, ref_mask)                                              # same noise, same mask
    assert math.isfinite(loss.item()) and abs(loss.item() / ref.item() - 1) < 0.03, (loss.item(), ref.item())
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum().item() for g in grads.values()) > 0
    with torch.no_grad():
        _, _, drawn = model(imgs)                                                   # noise drawn on the GPU
    assert drawn.is_cuda and drawn.sum().item() == mask.sum().item()


# --- SimMIM: on CUDA, attention with the learned bias runs through SDPA ---

def explicit_sdpa(q, k, v, attn_mask):
    """softmax(q k^T / sqrt(d) + bias) v, written out: what simmim.attention computes on CPU."""
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + attn_mask).softmax(dim=-1) @ v


@pytest.mark.parametrize("name", ["simmim_vit_tiny", "simmim_swin_tiny"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_simmim_sdpa_path_equals_the_explicit_attention(fp32, monkeypatch, name, dtype):
    """The same model, weights, images and mask through the fused kernel (with the bias as its
    attn_mask, shifted-window masks included) and through the written-out softmax."""
    build, size, units, ratio = TINY[name]
    torch.manual_seed(0)
    model = build().to(CUDA)
    with torch.no_grad():                                      # the bias tables start at 0 (ViT) or near it
        for n, p in model.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_(std=1.0)
    imgs, noise = shapes_batch(4, size).to(CUDA), torch.rand(4, units, device=CUDA)
    fused = loss_and_grads(model, imgs, ratio, noise, dtype)
    monkeypatch.setattr(simmim, "F", types.SimpleNamespace(**{**vars(F), "scaled_dot_product_attention": explicit_sdpa}))
    explicit = loss_and_grads(model, imgs, ratio, noise, dtype)
    # fp32: only the order of summation differs. bf16: both round operands to bf16 but at other
    # points (the fused kernel keeps the softmax in fp32 and rounds P for P v; the explicit one
    # rounds q k^T + bias and the softmax's output), so a single entry of a gradient that sums
    # many terms of both signs can differ by much of itself (seen on an H100: a LayerNorm weight's
    # gradient entry off by 56 % of itself, 2.2 % of that gradient's largest entry): bf16 is
    # compared tensor by tensor, ||fused - explicit|| / ||explicit|| (bf16 rounding: 1e-3 to 1e-2).
    assert abs(fused[0].item() / explicit[0].item() - 1) < (1e-5 if dtype is None else 1e-2)
    tensors = {"pred": (fused[1].float(), explicit[1].float()), **{n: (fused[3][n], g) for n, g in explicit[3].items()}}
    for n, (a, b) in tensors.items():
        if dtype is None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=lambda m: f"{n}: {m}")
        else:
            assert (a - b).norm() <= 2e-2 * b.norm(), f"{n}: relative error {((a - b).norm() / b.norm()).item():.3g}"


# --- the training loop on CUDA, as a user runs it ---

# (script, tiny model, flags that make the runs comparable, whether fp16 fits the model's range).
# FCMAE in fp16 overflows: the official init it keeps (std-1 weights in the decoder's proj and pred
# convolutions) gives outputs past fp16's largest value, 65504, at the visible units that the loss
# never trains (measured at init, max |pred|: 4.6e6 for convnextv2_fcmae_base, 6.9e5 for atto; 3.4e4
# for the test model, which crossed 65504 at step 119 of this test's fp16 run on an H100). inf there
# times the mask's 0 makes the loss NaN; convnextv2_fcmae.py therefore refuses --amp fp16 (one line).
# The official FCMAE trains in fp32; --amp bf16 (the default) has the range.
SCRIPTS = [("mae.py", "mae_vit_tiny", [], True),
           ("convmae.py", "convmae_convvit_tiny", [], True),
           ("fastconvmae.py", "fastconvmae_convvit_tiny", [], True),
           ("fastconvmae_mor.py", "fastconvmae_convvit_tiny", [], True),                  # + EMA teacher, branch
           ("simmim.py", "simmim_vit_tiny", ["--schedule", "cosine", "--warmup_lr", 0, "--min_lr", 0], True),
           ("convnextv2_fcmae.py", "convnextv2_fcmae_test", [], False)]


@pytest.fixture
def background():
    """Processes a test started; any still running when it ends (a failed check) are killed."""
    procs = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def finished(proc, failed, what):
    """stdout of a run that exited 0; else its error goes into `failed` and this returns None."""
    out, err = proc.communicate(timeout=400)
    if proc.returncode != 0:
        failed.append(f"{what} run exited {proc.returncode}: {err[-1500:]}")
        return None
    return out


@pytest.mark.parametrize("script, model, extra, fp16_fits", SCRIPTS,
                         ids=[s[0] + (" --mor" if "--mor" in s[2] else "") for s in SCRIPTS])
def test_training_on_cuda_bf16_fp16_compile_and_resume(script, model, extra, fp16_fits, tmp_path, background):
    """Four runs at once on one GPU, all seeing the same batches (same data, seed and batch size):
    2 epochs in bf16 (the CUDA default); the same stopped by SIGTERM in epoch 1, then resumed;
    epoch 0 in fp16 through a GradScaler (not FCMAE: see SCRIPTS); epoch 0 compiled. 128 steps per epoch, so that
    SIGTERM lands well inside one."""
    args = ["--model", model, "--num_workers", 0, "--warmup_epochs", 1, *extra, "--builtin_images", 1024,
            "--batch_size", 8, "--lr", "1e-3", "--log_every", 1]
    out = {k: tmp_path / k for k in ("bf16", "stopped", "fp16", "compiled")}
    procs = {"bf16": start(script, *args, "--epochs", 2, "--output_dir", out["bf16"]),
             "stopped": start(script, *args, "--epochs", 2, "--output_dir", out["stopped"]),
             "compiled": start(script, *args, "--epochs", 1, "--compile", "--output_dir", out["compiled"])}
    if fp16_fits:
        procs["fp16"] = start(script, *args, "--epochs", 1, "--amp", "fp16", "--output_dir", out["fp16"])
    background.extend(procs.values())

    # SIGTERM mid-epoch: saved where it stopped, exit 0; resumed, it ends where the full run ends
    wait_for(lambda: any(e["epoch"] == 1 and e["step"] >= 3 for e in log_lines(out["stopped"])), procs["stopped"])
    code, _, err = kill(procs["stopped"], signal.SIGTERM)
    assert code == 0, err[-3000:]
    ckpt = torch.load(out["stopped"] / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and 0 < ckpt["batch_in_epoch"] < 128
    r = run(script, *args, "--epochs", 2, "--output_dir", out["stopped"], "--resume", "auto")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]

    # the checks below collect what fails and print what they measured (pytest -rP shows it)
    failed, seen = [], []

    def check(ok, what):
        if not ok:
            failed.append(what)

    stdout = finished(procs["bf16"], failed, "bf16")
    assert stdout is not None, failed
    check("amp bf16 | cuda:0" in stdout, "bf16 is not the CUDA default")
    full = torch.load(out["bf16"] / "checkpoint-last.pth", map_location="cpu", weights_only=True)
    check(full["epoch"] == 2 and full["scaler"] == {}, "bf16 run: epoch or scaler state")   # bf16: no loss scaling
    resumed = weights(out["stopped"] / "checkpoint-last.pth")
    diffs = {k: (resumed[k].float() - v.float()).abs().max().item() for k, v in full["model"].items()}
    worst = max(diffs, key=diffs.get)
    seen.append(f"resumed vs uninterrupted: largest weight difference {diffs[worst]:.3g} ({worst})")
    check(diffs[worst] == 0, f"resume is not bit-identical: {worst} differs by {diffs[worst]:.3g}")
    bf16 = [e["loss"] for e in log_lines(out["bf16"])]
    check(len(bf16) == 256 and all(math.isfinite(x) for x in bf16), "bf16 log")
    check(sum(bf16[-32:]) < sum(bf16[:32]), "bf16 run does not learn")
    mean0 = sum(bf16[:128]) / 128                                                   # epoch 0

    # fp16: the GradScaler's state is saved; same first batch and weights, so the first loss is bf16's
    stdout = finished(procs["fp16"], failed, "fp16") if fp16_fits else None
    if stdout is not None:
        check("amp fp16 | cuda:0" in stdout, "fp16 run: amp")
        scaler = torch.load(out["fp16"] / "checkpoint-last.pth", weights_only=True)["scaler"]
        check(scaler.get("scale", 0) > 0 and "_growth_tracker" in scaler, f"fp16 scaler state {scaler}")
        fp16 = [e["loss"] for e in log_lines(out["fp16"])]
        check(len(fp16) == 128 and all(math.isfinite(x) for x in fp16), "fp16 log")
        seen.append(f"fp16: scale {scaler.get('scale')}, first loss {fp16[0] / bf16[0] - 1:+.2e} and epoch mean "
                    f"{sum(fp16) / len(fp16) / mean0 - 1:+.2e} relative to bf16")
        check(abs(fp16[0] / bf16[0] - 1) < 1e-2, "fp16 first loss")
        check(abs(sum(fp16) / len(fp16) / mean0 - 1) < 0.05, "fp16 epoch mean loss")  # no run of skipped steps

    # compiled: plain keys in the checkpoint, and the eager run's losses up to bf16 rounding of fused kernels
    if finished(procs["compiled"], failed, "compiled") is not None:
        check(weights(out["compiled"] / "checkpoint-last.pth").keys() == full["model"].keys(), "compiled keys")
        compiled = [e["loss"] for e in log_lines(out["compiled"])]
        check(len(compiled) == 128, "compiled log")
        seen.append(f"compiled: first loss {compiled[0] / bf16[0] - 1:+.2e} and epoch mean "
                    f"{sum(compiled) / len(compiled) / mean0 - 1:+.2e} relative to eager")
        check(abs(compiled[0] / bf16[0] - 1) < 1e-2, "compiled first loss")
        check(abs(sum(compiled) / len(compiled) / mean0 - 1) < 0.02, "compiled epoch mean loss")
    print(f"{script}: " + "; ".join(seen))
    assert not failed, "; ".join(failed) + " | " + "; ".join(seen)


def test_the_fine_tuning_emas_update_never_waits_for_the_gpu():
    """ModelEma.update after each optimizer step: foreach kernels on the device, no host sync (sync debug mode raises
    on any) and the average of timm's rule."""
    import finetune
    model = finetune.build_classifier("convnextv2_fcmae_test", 10).to(CUDA)
    ema = finetune.ModelEma(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    after, live = ema.module.state_dict(), model.state_dict()
    for k, v in before.items():
        if v.is_floating_point():
            torch.testing.assert_close(after[k], 0.9 * v + 0.1 * live[k], rtol=1e-6, atol=1e-6)
