"""simmim.py's models: official layouts and numbers (ViT and Swin), mask rule, shifted windows, loss."""
import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import assert_init_is_official, load_golden, shapes_batch, train_on_one_batch, vit_block_keys  # noqa: F401
from simmim import MODELS, SimMIM, random_mask, shifted_window_mask, window_partition


def our_kwargs(g):
    """The fixture's official constructor arguments, as SimMIM(...) takes them."""
    c = g["config"]
    common = dict(img_size=c["img_size"], patch_size=c["patch_size"], embed_dim=c["embed_dim"],
                  mlp_ratio=c["mlp_ratio"], drop_path_rate=c["drop_path_rate"], mask_patch_size=g["mask_patch_size"])
    if g["kind"] == "vit":
        assert not c["use_abs_pos_emb"] and c["use_shared_rel_pos_bias"] and not c["use_mean_pooling"]
        return dict(encoder="vit", depth=c["depth"], num_heads=c["num_heads"], init_values=c["init_values"], **common)
    assert c["patch_norm"] and not c["ape"] and c["qkv_bias"]
    return dict(encoder="swin", depths=tuple(c["depths"]), num_heads=tuple(c["num_heads"]),
                window_size=c["window_size"], **common)


@pytest.fixture(scope="module", params=["vit", "swin"])
def golden(request):
    return load_golden(f"simmim_{request.param}_tiny.pt")[0]


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_init_is_the_official_init_bit_for_bit(kind):
    """Same seed, same construction order: every tensor and buffer (indices, window masks) bit for bit.
    The truncated normal goes through fp32 erfinv, which torch computes with MKL's vector math; MKL picks a
    code path per CPU, and its AVX-512 path rounds a few hundred of these draws 1 ulp away from the path the
    fixture was made on. So the comparison runs in a process with MKL's path pinned (MKL_CBWR=COMPATIBLE)."""
    code = (f"from test_simmim import *; g = load_golden('simmim_{kind}_tiny.pt')[0]; "
            "assert_init_is_official(lambda: SimMIM(**our_kwargs(g)), g)")
    r = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(__file__), capture_output=True, text=True,
                       env=dict(os.environ, MKL_CBWR="COMPATIBLE"), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_loss_reconstruction_and_grads_equal_the_official(golden):
    model = SimMIM(**our_kwargs(golden))
    model.load_state_dict(golden["state_dict"], strict=True)
    loss, pred, mask = model(golden["imgs"], mask=golden["mask"])
    loss.backward()
    # fp32 with other kernels (SDPA vs explicit softmax): ~1e-7 relative; the bar is 1e-5 / 1e-4
    assert abs(loss.item() / golden["loss"].item() - 1) <= 1e-5, (loss.item(), golden["loss"].item())
    torch.testing.assert_close(pred, golden["pred"], rtol=1e-4, atol=1e-5)
    assert torch.equal(mask, golden["mask"].flatten(1))
    params = dict(model.named_parameters())
    for name, grad in golden["grads"].items():
        torch.testing.assert_close(params[name].grad, grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


# --- layouts of the base models (keys and shapes of the official pre-training models) ---

def official_vit_base_keys():
    keys = {"encoder.cls_token": [1, 1, 768], "encoder.mask_token": [1, 1, 768],
            "encoder.patch_embed.proj.weight": [768, 3, 16, 16], "encoder.patch_embed.proj.bias": [768],
            "encoder.rel_pos_bias.relative_position_bias_table": [732, 12],
            "encoder.rel_pos_bias.relative_position_index": [197, 197],
            "encoder.norm.weight": [768], "encoder.norm.bias": [768],
            "decoder.0.weight": [768, 768, 1, 1], "decoder.0.bias": [768]}
    for i in range(12):
        block = vit_block_keys(f"encoder.blocks.{i}", 768)
        del block[f"encoder.blocks.{i}.attn.qkv.bias"]                              # q_bias and v_bias instead
        keys.update(block)
        keys.update({f"encoder.blocks.{i}.attn.q_bias": [768], f"encoder.blocks.{i}.attn.v_bias": [768],
                     f"encoder.blocks.{i}.gamma_1": [768], f"encoder.blocks.{i}.gamma_2": [768]})
    return keys


def official_swin_base_keys():
    keys = {"encoder.mask_token": [1, 1, 128], "encoder.patch_embed.proj.weight": [128, 3, 4, 4],
            "encoder.patch_embed.proj.bias": [128], "encoder.patch_embed.norm.weight": [128],
            "encoder.patch_embed.norm.bias": [128], "encoder.norm.weight": [1024], "encoder.norm.bias": [1024],
            "decoder.0.weight": [3072, 1024, 1, 1], "decoder.0.bias": [3072]}
    resolution, window = 48, 6
    for s, (depth, heads) in enumerate(zip((2, 2, 18, 2), (4, 8, 16, 32))):
        D, w = 128 * 2 ** s, min(window, resolution)
        for b in range(depth):
            p = f"encoder.layers.{s}.blocks.{b}"
            block = vit_block_keys(p, D)
            block[f"{p}.attn.relative_position_bias_table"] = [(2 * w - 1) ** 2, heads]
            block[f"{p}.attn.relative_position_index"] = [w * w, w * w]
            if b % 2 and resolution > window:                                        # shifted: a saved mask
                block[f"{p}.attn_mask"] = [(resolution // w) ** 2, w * w, w * w]
            keys.update(block)
        if s < 3:
            keys.update({f"encoder.layers.{s}.downsample.reduction.weight": [2 * D, 4 * D],
                         f"encoder.layers.{s}.downsample.norm.weight": [4 * D],
                         f"encoder.layers.{s}.downsample.norm.bias": [4 * D]})
        resolution //= 2
    return keys


@pytest.mark.parametrize("name, keys", [("simmim_vit_base_patch16", official_vit_base_keys),
                                        ("simmim_swin_base_w6", official_swin_base_keys)])
def test_base_state_dicts_are_the_official_layouts(name, keys):
    with torch.device("meta"):
        sd = MODELS[name]().state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == keys()


# --- masking (data_simmim.py) ---

@pytest.mark.parametrize("L, ratio", [(49, 0.6), (36, 0.6), (16, 0.6), (49, 0.75)])
def test_mask_hides_exactly_the_official_count_the_units_with_the_largest_noise(L, ratio):
    torch.manual_seed(0)
    noise = torch.rand(5, L)
    mask = random_mask(noise, ratio)
    count = math.ceil(L * ratio)                                                    # np.ceil(token_count * ratio)
    assert (mask.sum(1) == count).all()
    assert torch.equal(mask.gather(1, noise.argsort(1)[:, :L - count]), torch.zeros(5, L - count))  # kept: smallest


def test_model_draws_masks_on_the_32px_grid_and_takes_explicit_ones():
    torch.manual_seed(0)
    model = MODELS["simmim_vit_tiny"]()
    imgs = torch.randn(2, 3, 32, 32)
    _, _, mask = model(imgs)                                                        # drawn inside: 16 units, 10 hidden
    assert mask.shape == (2, 16) and (mask.sum(1) == 10).all()
    explicit = torch.zeros(2, 4, 4)
    explicit[:, 0, 0] = 1
    _, _, mask = model(imgs, mask=explicit)
    assert torch.equal(mask, explicit.flatten(1))
    with pytest.raises(ValueError, match=r"expected \[N, 4, 4\]"):                  # a patch-level mask: 8 x 8
        model(imgs, mask=torch.zeros(2, 8, 8))
    with torch.device("meta"):
        assert MODELS["simmim_vit_base_patch16"]().grid == 7 and MODELS["simmim_swin_base_w6"]().grid == 6


def test_norm_pix_loss_is_not_an_option_and_passing_it_is_a_one_line_error():
    """SimMIM's target is the image itself (§3.4): its builders do not take the other files' norm_pix_loss,
    and the command line names the flag and the reason in one line."""
    from simmim import get_args
    for value in (True, False):
        with pytest.raises(TypeError, match="norm_pix_loss"):
            MODELS["simmim_vit_tiny"](norm_pix_loss=value)
    for flag in ("--norm_pix_loss", "--no-norm_pix_loss"):
        with pytest.raises(SystemExit) as e:
            get_args(["--model", "simmim_vit_tiny", flag])
        line = str(e.value.code)
        assert line.startswith("error: --norm_pix_loss: SimMIM's target is the normalised image") and "\n" not in line
    with pytest.raises(SystemExit) as e:                                            # any other unknown flag: argparse's
        get_args(["--model", "simmim_vit_tiny", "--no_such_flag"])
    assert e.value.code == 2


def test_loss_ignores_visible_pixels():
    torch.manual_seed(0)
    model = MODELS["simmim_swin_tiny"]()
    imgs = torch.randn(2, 3, 32, 32)
    mask = (torch.rand(2, 4, 4) > 0.5).float()
    hidden = mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    assert model.forward_loss(imgs, imgs + 5 * (1 - hidden), mask).item() == 0.0     # wrong only where visible
    loss = model.forward_loss(imgs, imgs + 2 * hidden, mask).item()
    assert loss == pytest.approx(2.0 * hidden.sum().item() * 3 / (hidden.sum().item() * 3 + 1e-5 * 3), rel=1e-6)


# --- Swin: shifted windows ---

def test_shifted_window_mask_separates_regions_rolled_together():
    """Roll an 8x8 map by -2 and cut 4x4 windows: tokens that sit in one window but came from
    different image regions get -100, all others 0 (hand-counted for the 4 windows)."""
    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()                                                     # top-left: one region
    region = torch.zeros(8, 8)
    region[:, 6:] += 1                                                              # rolled-in columns
    region[6:, :] += 2                                                              # rolled-in rows
    windows = window_partition(region[None, ..., None], 4)[..., 0]                  # [4, 16]
    expected = torch.where(windows[:, None, :] == windows[:, :, None], 0.0, -100.0)
    assert torch.equal(mask, expected)
    assert (mask[3] == -100).sum() == 16 * 16 - (4 * 4 + 4 * 4 + 4 * 4 + 4 * 4)      # 4 regions of 4 tokens


def test_tokens_in_other_windows_do_not_interact_in_a_block():
    """One Swin block: changing a token changes only the tokens it shares a window with. Shifted
    (by 2, window 4, 16 x 16 tokens), token (0, 0) rolls to (14, 14), into the bottom-right window
    next to tokens from rows and columns 14-15, but the mask keeps it with its own region: the
    image's top-left 2 x 2 corner."""
    torch.manual_seed(0)
    model = MODELS["simmim_swin_tiny"]().eval()
    for blk, corner in zip(model.encoder.layers[0].blocks, (4, 2)):                # unshifted, shifted
        assert blk.shift == (0 if corner == 4 else 2)
        x = torch.randn(1, 256, 32)
        changed = x.clone()
        changed[0, 0] += torch.randn(32)                                            # token (0, 0)
        moved = (blk(changed) - blk(x)).abs().sum(-1).view(16, 16) > 0
        expected = torch.zeros(16, 16, dtype=torch.bool)
        expected[:corner, :corner] = True
        assert torch.equal(moved, expected), blk.shift


def test_input_sizes_that_do_not_tile_into_windows_are_one_line_errors():
    with pytest.raises(ValueError, match="use a multiple of 192"):
        MODELS["simmim_swin_base_w6"](img_size=224)
    with torch.device("meta"):
        MODELS["simmim_swin_base_w6"](img_size=384)                                 # 96, 48, 24, 12: fine


def test_tiny_models_are_tiny_and_loss_falls_on_a_fixed_batch():
    for name in ("simmim_vit_tiny", "simmim_swin_tiny"):
        torch.manual_seed(0)
        model = MODELS[name]()
        assert sum(p.numel() for p in model.parameters()) < 5e6
        losses = train_on_one_batch(model, shapes_batch(8, 32), torch.rand(8, 16), lr=1e-3)
        assert losses[-1] < 0.7 * losses[0], (name, losses)


def test_forward_features_and_bf16_autocast():
    torch.manual_seed(0)
    vit, swin = MODELS["simmim_vit_tiny"](), MODELS["simmim_swin_tiny"]()
    imgs = torch.randn(2, 3, 32, 32)
    assert vit.forward_features(imgs).shape == (2, 65, 192) and swin.forward_features(imgs).shape == (2, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = swin(imgs)
    assert mask.dtype == torch.float32 and loss.dtype == torch.float32


# --- the recipe's optimizer pieces, against the official rules written out from their code ---

def official_no_decay(model, encoder):
    """optimizer.py get_pretrain_param_groups with SimMIM.no_weight_decay(_keywords): the skip
    names and keywords get an `encoder.` prefix. ViT: {pos_embed, cls_token}; Swin:
    {absolute_pos_embed, mask_token} and the keyword relative_position_bias_table."""
    skip = {"encoder." + n for n in ({"pos_embed", "cls_token"} if encoder == "vit"
                                     else {"absolute_pos_embed", "mask_token"})}
    keywords = {"encoder.relative_position_bias_table"} if encoder == "swin" else set()
    return {name for name, p in model.named_parameters()
            if p.ndim == 1 or name.endswith(".bias") or name in skip or any(k in name for k in keywords)}


@pytest.mark.parametrize("name", ["simmim_vit_base_patch16", "simmim_swin_base_w6"])
def test_weight_decay_groups_are_the_official_ones_but_the_vit_mask_token(name):
    from simmim import param_groups
    model = MODELS[name]()
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({names[id(p)] for p in g["params"]} for g in param_groups(model, 0.05))
    official = official_no_decay(model, "vit" if "vit" in name else "swin")
    assert no_decay - official == ({"encoder.mask_token"} if "vit" in name else set())   # README: on purpose
    assert official <= no_decay and decay | no_decay == set(names.values())
    if "swin" in name:                    # the official's prefixed keyword matches nothing: decayed
        assert any(n.endswith("relative_position_bias_table") for n in decay)


def official_lr(t, schedule, base, warmup_lr, min_lr, warmup_t, total_t, milestones):
    """lr at optimizer step t: timm's CosineLRScheduler (warmup_prefix False, cycle_limit 1) or
    lr_scheduler.py's MultiStepLRScheduler, as build_scheduler sets them up (t_in_epochs=False)."""
    if t < warmup_t:
        return warmup_lr + t * (base - warmup_lr) / warmup_t
    if schedule == "cosine":
        return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / total_t)) if t < total_t else min_lr
    return base * 0.1 ** sum(t >= m for m in milestones)


@pytest.mark.parametrize("schedule", ["cosine", "multistep"])
def test_lr_schedules_follow_the_official_schedulers_step_by_step(schedule):
    from argparse import Namespace
    from simmim import pretrain_lr as lr_at
    steps, epochs, warmup = 7, 100, 10                                  # steps per epoch
    args = Namespace(schedule=schedule, lr=2e-4, warmup_lr=1e-6, min_lr=1e-5, warmup_epochs=warmup, epochs=epochs,
                     milestones=[70])
    for t in range(0, epochs * steps, 3):
        want = official_lr(t, schedule, 2e-4, 1e-6, 1e-5, warmup * steps, epochs * steps, [70 * steps])
        assert lr_at(t / steps, args) == pytest.approx(want, rel=1e-9, abs=1e-15), t
