"""finetune.py: the classifier of every method, checkpoint loading, layer-decay ids, interpolation,
the linear probe and its lr rule, MixUp/CutMix, evaluation, k-NN, and the loop (DDP, resume, bad input)."""
import math
import signal

import pytest
import torch
import torch.nn as nn
from PIL import Image

import finetune as ft
from common import ImageFiles, cosine_lr, load_images, set_lr
from helpers import (StopAtStep, assert_same_weights, kill, last_line, log_lines, one_line_error_failures, run,
                     run_main, start, vit_block_keys, wait_for, weights)

TINY = ["mae_vit_tiny", "convmae_convvit_tiny", "fastconvmae_convvit_tiny", "simmim_vit_tiny", "simmim_swin_tiny",
        "convnextv2_fcmae_test"]
SIZE = {"convnextv2_fcmae_test": 64}


def pretraining_checkpoint(name, seed=0):
    """What our pre-training loop writes: {"model": the pre-training state_dict, "args": {"model": name}}."""
    torch.manual_seed(seed)
    return {"model": ft.METHODS[ft.MODELS[name]].MODELS[name]().state_dict(), "args": {"model": name}}


def prefixed(state, *prefixes):
    return sorted(k for k in state if k.startswith(prefixes))


# what loading our own pre-training checkpoint must report, per method: (missing, unused)
def expected_report(name, pre):
    if name.startswith("mae"):
        return (["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"],
                prefixed(pre, "decoder_", "mask_token", "norm."))
    if "convmae" in name:
        return (["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"],
                prefixed(pre, "decoder_", "mask_token", "norm.", "stage1_output_decode", "stage2_output_decode"))
    if name.startswith("simmim_vit"):
        return (["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"],
                ["decoder.0.bias", "decoder.0.weight", "mask_token", "norm.bias", "norm.weight"])
    if name.startswith("simmim_swin"):
        return ["head.bias", "head.weight"], ["decoder.0.bias", "decoder.0.weight", "mask_token"]
    return (["head.bias", "head.weight", "norm.bias", "norm.weight"],
            prefixed(pre, "decoder.", "mask_token", "pred.", "proj."))


@pytest.mark.parametrize("name", TINY)
def test_our_pretraining_checkpoint_loads_with_exactly_the_expected_missing_and_unused_keys(name):
    ckpt = pretraining_checkpoint(name)
    model = ft.build_classifier(name, 10)
    missing, unused = ft.load_weights(model, ckpt, "--finetune x")
    assert (missing, sorted(unused)) == expected_report(name, ckpt["model"])
    pre, ours = ckpt["model"], model.state_dict()
    for k in ours:                                  # every encoder tensor is the checkpoint's
        src = k if k in pre else "encoder." + k
        if k.endswith("attn.relative_position_bias_table") and name.startswith("simmim_vit"):
            src = "encoder.rel_pos_bias.relative_position_bias_table"        # the shared table, copied per block
        if src in pre and not k.endswith("relative_position_index"):
            assert torch.equal(ours[k], pre[src]), k
    size = SIZE.get(name, 32)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_the_official_encoder_only_mae_release_loads_with_only_the_new_keys_missing():
    pre = pretraining_checkpoint("mae_vit_tiny")["model"]
    encoder = {k: v for k, v in pre.items() if not k.startswith(("decoder_", "mask_token"))}   # mae_pretrain_vit_*.pth
    missing, unused = ft.load_weights(ft.build_classifier("mae_vit_tiny", 10), {"model": encoder}, "--finetune x")
    assert missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert unused == ["norm.bias", "norm.weight"]                  # the fine-tuning model pools, then fc_norm
    missing, unused = ft.load_weights(ft.build_classifier("mae_vit_tiny", 10, linprobe=True), {"model": encoder},
                                      "--finetune x")
    assert (missing, unused) == (["head.bias", "head.weight"], [])   # linear probe: cls token after norm


def test_an_official_convnextv2_fcmae_checkpoint_in_the_sparse_layout_loads():
    pre = pretraining_checkpoint("convnextv2_fcmae_test")["model"]
    sparse = {}                                     # the MinkowskiEngine names and shapes of utils.py
    for k, v in pre.items():
        if k.startswith("encoder.stages") and k.endswith("dwconv.weight"):
            sparse[k.replace("weight", "kernel")] = v.transpose(2, 3).reshape(v.shape[0], -1).T
        elif k.startswith("encoder.stages") and (".pwconv" in k):
            sparse[k.replace("pwconv1.", "pwconv1.linear.").replace("pwconv2.", "pwconv2.linear.")] = v
        elif k.startswith("encoder.stages") and ".norm." in k:
            sparse[k.replace(".norm.", ".norm.ln.")] = v
        else:
            sparse[k] = v
    model = ft.build_classifier("convnextv2_fcmae_test", 10)
    missing, _ = ft.load_weights(model, {"model": sparse}, "--finetune x")
    assert missing == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert torch.equal(model.stages[0][0].dwconv.weight, pre["encoder.stages.0.0.dwconv.weight"])


# --- the official fine-tuned layouts (names and shapes from ../shared/methods/*.md and the official models) ---

def mae_finetuned_keys():
    keys = {"cls_token": [1, 1, 768], "pos_embed": [1, 197, 768], "patch_embed.proj.weight": [768, 3, 16, 16],
            "patch_embed.proj.bias": [768], "fc_norm.weight": [768], "fc_norm.bias": [768],
            "head.weight": [1000, 768], "head.bias": [1000]}
    for i in range(12):
        keys.update(vit_block_keys(f"blocks.{i}", 768))
    return keys


def convmae_finetuned_keys():
    keys = {"pos_embed": [1, 196, 768], "patch_embed4.weight": [768, 768], "patch_embed4.bias": [768],
            "fc_norm.weight": [768], "fc_norm.bias": [768], "head.weight": [1000, 768], "head.bias": [1000]}
    for i, (c_in, c, p) in enumerate([(3, 256, 4), (256, 384, 2), (384, 768, 2)], start=1):
        keys.update({f"patch_embed{i}.proj.weight": [c, c_in, p, p], f"patch_embed{i}.proj.bias": [c],
                     f"patch_embed{i}.norm.weight": [c], f"patch_embed{i}.norm.bias": [c]})
    for s, c in ((1, 256), (2, 384)):
        for b in range(2):
            pre = f"blocks{s}.{b}"
            keys.update({f"{pre}.norm1.weight": [c], f"{pre}.norm1.bias": [c], f"{pre}.norm2.weight": [c],
                         f"{pre}.norm2.bias": [c], f"{pre}.conv1.weight": [c, c, 1, 1], f"{pre}.conv1.bias": [c],
                         f"{pre}.conv2.weight": [c, c, 1, 1], f"{pre}.conv2.bias": [c],
                         f"{pre}.attn.weight": [c, 1, 5, 5], f"{pre}.attn.bias": [c],
                         f"{pre}.mlp.fc1.weight": [4 * c, c, 1, 1], f"{pre}.mlp.fc1.bias": [4 * c],
                         f"{pre}.mlp.fc2.weight": [c, 4 * c, 1, 1], f"{pre}.mlp.fc2.bias": [c]})
    for i in range(11):
        keys.update(vit_block_keys(f"blocks3.{i}", 768))
    return keys


def simmim_vit_finetuned_keys():
    keys = {"cls_token": [1, 1, 768], "patch_embed.proj.weight": [768, 3, 16, 16], "patch_embed.proj.bias": [768],
            "fc_norm.weight": [768], "fc_norm.bias": [768], "head.weight": [1000, 768], "head.bias": [1000]}
    for i in range(12):
        block = vit_block_keys(f"blocks.{i}", 768)
        del block[f"blocks.{i}.attn.qkv.bias"]
        keys.update(block)
        keys.update({f"blocks.{i}.gamma_1": [768], f"blocks.{i}.gamma_2": [768], f"blocks.{i}.attn.q_bias": [768],
                     f"blocks.{i}.attn.v_bias": [768], f"blocks.{i}.attn.relative_position_bias_table": [732, 12],
                     f"blocks.{i}.attn.relative_position_index": [197, 197]})
    return keys


def swin_finetuned_keys():
    """Swin-B at 224 px, window 7: stages at 56, 28, 14, 7; the last is one window (no shift)."""
    keys = {"patch_embed.proj.weight": [128, 3, 4, 4], "patch_embed.proj.bias": [128], "patch_embed.norm.weight": [128],
            "patch_embed.norm.bias": [128], "norm.weight": [1024], "norm.bias": [1024],
            "head.weight": [1000, 1024], "head.bias": [1000]}
    for s, (depth, heads) in enumerate(zip((2, 2, 18, 2), (4, 8, 16, 32))):
        c, res = 128 * 2 ** s, 56 // 2 ** s
        for b in range(depth):
            pre = f"layers.{s}.blocks.{b}"
            block = vit_block_keys(pre, c)
            keys.update(block)
            keys.update({f"{pre}.attn.relative_position_bias_table": [169, heads],
                         f"{pre}.attn.relative_position_index": [49, 49]})
            if b % 2 and res > 7:
                keys[f"{pre}.attn_mask"] = [(res // 7) ** 2, 49, 49]
        if s < 3:
            keys.update({f"layers.{s}.downsample.reduction.weight": [2 * c, 4 * c],
                         f"layers.{s}.downsample.norm.weight": [4 * c], f"layers.{s}.downsample.norm.bias": [4 * c]})
    return keys


def convnextv2_finetuned_keys():
    dims, depths = (128, 256, 512, 1024), (3, 3, 27, 3)
    keys = {"downsample_layers.0.0.weight": [128, 3, 4, 4], "downsample_layers.0.0.bias": [128],
            "downsample_layers.0.1.weight": [128], "downsample_layers.0.1.bias": [128],
            "norm.weight": [1024], "norm.bias": [1024], "head.weight": [1000, 1024], "head.bias": [1000]}
    for i in range(1, 4):
        keys.update({f"downsample_layers.{i}.0.weight": [dims[i - 1]], f"downsample_layers.{i}.0.bias": [dims[i - 1]],
                     f"downsample_layers.{i}.1.weight": [dims[i], dims[i - 1], 2, 2],
                     f"downsample_layers.{i}.1.bias": [dims[i]]})
    for s, (c, depth) in enumerate(zip(dims, depths)):
        for b in range(depth):
            pre = f"stages.{s}.{b}"
            keys.update({f"{pre}.dwconv.weight": [c, 1, 7, 7], f"{pre}.dwconv.bias": [c], f"{pre}.norm.weight": [c],
                         f"{pre}.norm.bias": [c], f"{pre}.pwconv1.weight": [4 * c, c], f"{pre}.pwconv1.bias": [4 * c],
                         f"{pre}.grn.gamma": [1, 1, 1, 4 * c], f"{pre}.grn.beta": [1, 1, 1, 4 * c],
                         f"{pre}.pwconv2.weight": [c, 4 * c], f"{pre}.pwconv2.bias": [c]})
    return keys


OFFICIAL_FINETUNED = [("mae_vit_base_patch16", {}, mae_finetuned_keys),
                      ("convmae_convvit_base_patch16", {}, convmae_finetuned_keys),
                      ("fastconvmae_convvit_base_patch16", {}, convmae_finetuned_keys),
                      ("simmim_vit_base_patch16", {}, simmim_vit_finetuned_keys),
                      ("simmim_swin_base_w6", {"img_size": 224, "window_size": 7}, swin_finetuned_keys),
                      ("convnextv2_fcmae_base", {"layer_decay_type": "group"}, convnextv2_finetuned_keys)]


@pytest.mark.parametrize("name, kwargs, keys", OFFICIAL_FINETUNED, ids=[o[0] for o in OFFICIAL_FINETUNED])
def test_a_checkpoint_in_the_official_finetuned_layout_loads_strict(name, kwargs, keys):
    torch.manual_seed(0)
    fake = {k: torch.randn(shape) if not k.endswith("index") else torch.zeros(shape, dtype=torch.long)
            for k, shape in keys().items()}
    model = ft.build_classifier(name, 1000, **kwargs)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {k: list(v.shape) for k, v in fake.items()}
    missing, unused = ft.load_weights(model, {"model": fake}, "--resume x", strict=True)
    assert missing == [] and unused == []
    ours = model.state_dict()
    for k in fake:
        if not k.endswith(("relative_position_index", "attn_mask")):    # buffers that follow from the geometry
            assert torch.equal(ours[k], fake[k]), k


@pytest.mark.parametrize("wrong, name", [("simmim_vit_tiny", "mae_vit_tiny"), ("mae_vit_base_patch16", "mae_vit_tiny"),
                                         ("convnextv2_fcmae_test", "convmae_convvit_tiny")])
def test_a_checkpoint_of_another_method_or_size_is_a_one_line_error_saying_what_it_is(wrong, name, capsys):
    ckpt = pretraining_checkpoint(wrong)
    del ckpt["args"]                                               # as an official file: no name to read
    with pytest.raises(SystemExit) as e:
        ft.load_weights(ft.build_classifier(name, 10), ckpt, "--finetune f.pth")
    msg = str(e.value)
    assert msg.startswith("error: --finetune f.pth does not fit") and "\n" not in msg
    assert ft.describe(ckpt["model"]) in msg


# --- layer-wise lr decay: each method's official layer-id rule ---

LAYER_IDS = {  # name -> {parameter: layer id}, with the top id (its lr is unscaled)
    "mae_vit_tiny": (5, {"cls_token": 0, "pos_embed": 0, "patch_embed.proj.weight": 0, "blocks.0.norm1.weight": 1,
                         "blocks.3.mlp.fc2.weight": 4, "fc_norm.weight": 5, "head.weight": 5}),
    "convmae_convvit_tiny": (4, {"patch_embed1.proj.weight": 0, "blocks1.0.attn.weight": 0, "blocks2.0.conv1.weight": 0,
                                 "patch_embed4.weight": 0, "pos_embed": 0, "blocks3.0.attn.qkv.weight": 1,
                                 "blocks3.2.norm2.bias": 3, "fc_norm.bias": 4, "head.weight": 4}),
    "simmim_vit_tiny": (5, {"cls_token": 0, "patch_embed.proj.weight": 0, "blocks.0.attn.relative_position_bias_table": 1,
                            "blocks.3.gamma_2": 4, "fc_norm.weight": 5, "head.bias": 5}),
    "simmim_swin_tiny": (5, {"patch_embed.norm.weight": 0, "layers.0.blocks.0.attn.qkv.weight": 1,
                             "layers.0.blocks.1.norm1.weight": 2, "layers.0.downsample.reduction.weight": 2,
                             "layers.1.blocks.0.mlp.fc1.weight": 3, "layers.1.blocks.1.attn.proj.bias": 4,
                             "norm.weight": 5, "head.weight": 5}),
    "convnextv2_fcmae_test": (5, {"downsample_layers.0.0.weight": 1, "stages.0.0.dwconv.weight": 1,
                                  "downsample_layers.1.1.weight": 2, "stages.1.0.grn.gamma": 2,
                                  "stages.3.0.pwconv2.weight": 4, "norm.weight": 5, "head.weight": 5}),
}


@pytest.mark.parametrize("name", list(LAYER_IDS))
def test_layer_decay_ids_and_scales_follow_the_official_rule(name):
    top, ids = LAYER_IDS[name]
    model = ft.build_classifier(name, 10)
    groups = model.param_groups(0.05, 0.65)
    group_of = {n: g for g in groups for n in g["names"]}
    assert set(group_of) == {n for n, _ in model.named_parameters()}              # every parameter, once
    assert model.num_layers == top
    for param, layer in ids.items():
        assert group_of[param]["layer_id"] == layer, param
        assert group_of[param]["lr_scale"] == pytest.approx(0.65 ** (top - layer)), param


def test_convnextv2_group_rule_puts_stage_3_blocks_in_threes():
    model = ft.build_classifier("convnextv2_fcmae_test", 10, layer_decay_type="group")
    ids = {"downsample_layers.0.0.weight": 0, "stages.0.2.dwconv.weight": 1, "downsample_layers.1.0.weight": 2,
           "stages.1.0.norm.weight": 2, "downsample_layers.2.1.weight": 3, "stages.2.2.grn.beta": 3,
           "stages.2.3.grn.beta": 4, "stages.2.26.dwconv.bias": 11, "downsample_layers.3.1.bias": 12,
           "stages.3.2.pwconv1.weight": 12, "head.weight": 13, "norm.bias": 13}
    assert {n: model.layer_id(n) for n in ids} == ids and model.num_layers == 13


@pytest.mark.parametrize("name, no_decay, decay", [
    ("mae_vit_tiny", ["cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"],
     ["blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"]),
    ("simmim_vit_tiny", ["cls_token", "blocks.0.gamma_1", "blocks.0.attn.q_bias"],
     ["blocks.0.attn.relative_position_bias_table", "blocks.0.mlp.fc1.weight"]),     # the official ViT decays it
    ("simmim_swin_tiny", ["layers.0.blocks.0.attn.relative_position_bias_table", "norm.bias"], ["head.weight"]),
    ("convnextv2_fcmae_test", ["stages.0.0.grn.gamma", "stages.0.0.grn.beta", "norm.weight"],
     ["stages.0.0.dwconv.weight", "stages.0.0.pwconv1.weight"])])
def test_weight_decay_exemptions_follow_the_official_rule(name, no_decay, decay):
    model = ft.build_classifier(name, 10)
    wd = {n: g["weight_decay"] for g in model.param_groups(0.05, 0.75) for n in g["names"]}
    assert [wd[n] for n in no_decay] == [0.0] * len(no_decay)
    assert [wd[n] for n in decay] == [0.05] * len(decay)


def test_from_scratch_the_encoder_gets_the_official_finetuning_init_not_fcmaes_std_1():
    model = ft.build_classifier("convnextv2_fcmae_test", 10)
    head = model.head.weight.clone()
    assert model.stages[0][0].pwconv1.weight.std() > 0.5                     # FCMAE's pre-training init
    model.init_for_scratch()
    for w in (model.stages[0][0].pwconv1.weight, model.stages[1][0].dwconv.weight, model.downsample_layers[0][0].weight):
        assert 0.01 < w.std() < 0.025
    assert torch.equal(model.head.weight, head)                                # head init kept (x 0.001)


def test_at_fcmaes_std_1_init_each_residual_branch_dwarfs_its_input_and_at_the_scratch_init_not():
    from fcmae_scale import scales                                              # docs/STUDY.md's measurement
    model, imgs, labels = ft.build_classifier("convnextv2_fcmae_test", 10), torch.randn(8, 3, 64, 64), torch.arange(8)
    weights, ratios, _ = scales(model, imgs, labels)
    assert min(weights.values()) > 0.8 and min(ratios) > 10
    model.init_for_scratch()
    weights, ratios, _ = scales(model, imgs, labels)
    assert max(weights.values()) < 0.025 and max(ratios) < 1


# --- position embeddings and relative position tables at another resolution ---

def test_interpolation_at_the_same_resolution_returns_the_embeddings_unchanged():
    pos, table = torch.randn(1, 1 + 64, 16), torch.randn(15 * 15 + 3, 4)
    assert ft.interpolate_pos_embed(pos, 8, 1) is pos
    assert ft.interpolate_rel_pos_table(table, 15, extra=3) is table
    bigger = ft.interpolate_pos_embed(pos, 12, 1)
    assert bigger.shape == (1, 1 + 144, 16) and torch.equal(bigger[:, 0], pos[:, 0])     # cls row kept
    wider = ft.interpolate_rel_pos_table(table, 23, extra=3)
    assert wider.shape == (23 * 23 + 3, 4) and torch.equal(wider[-3:], table[-3:])      # SimMIM's resize: elsewhere


@pytest.mark.parametrize("name, kwargs", [("mae_vit_tiny", {"img_size": 48}), ("convmae_convvit_tiny", {"img_size": 48}),
                                          ("simmim_vit_tiny", {"img_size": 48}),
                                          ("simmim_swin_tiny", {"img_size": 64, "window_size": 8})])
def test_pretrained_weights_load_at_another_resolution_and_window_and_the_model_runs(name, kwargs):
    model = ft.build_classifier(name, 10, **kwargs)
    missing, _ = ft.load_weights(model, pretraining_checkpoint(name), "--finetune x")
    assert all(k.startswith(("head.", "fc_norm.")) for k in missing)
    out = model(torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"]))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_same_size_load_keeps_the_position_embedding_exactly():
    ckpt = pretraining_checkpoint("mae_vit_tiny")
    model = ft.build_classifier("mae_vit_tiny", 10)
    ft.load_weights(model, ckpt, "--finetune x")
    assert torch.equal(model.pos_embed, ckpt["model"]["pos_embed"]) and model.pos_embed.requires_grad


# --- linear probe, LARS, MixUp / CutMix, evaluation ---

def test_linear_probe_step_changes_only_the_head_and_its_batchnorm():
    model = ft.build_classifier("mae_vit_tiny", 10, linprobe=True)
    model.make_linear_probe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = ft.LARS(model.head.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32)), torch.arange(8))
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed == ["head.0.num_batches_tracked", "head.0.running_mean", "head.0.running_var",
                       "head.1.bias", "head.1.weight"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]


def test_lars_step_equals_its_formula():
    w, b = torch.randn(4, 3), torch.randn(4)
    gw, gb = torch.randn(4, 3), torch.randn(4)
    pw, pb = nn.Parameter(w.clone()), nn.Parameter(b.clone())
    pw.grad, pb.grad = gw.clone(), gb.clone()
    opt = ft.LARS([pw, pb], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    opt.step()
    d = gw + 0.1 * w
    assert torch.allclose(pw, w - 0.5 * d * (0.001 * w.norm() / d.norm()))       # weights: trust ratio, decay
    assert torch.allclose(pb, b - 0.5 * gb)                                       # 1-D: plain SGD
    pw.grad, pb.grad = gw.clone(), gb.clone()
    opt.step()                                                                    # momentum: mu = 0.9 mu + d
    assert torch.allclose(pb, b - 0.5 * gb - 0.5 * (0.9 * gb + gb))


def separable_features(n, seed):
    """n features [n, 192] of 10 classes: a class mean (std 0.15 per dimension; the same for every seed) plus unit
    noise, off-centre by 3 (the probe's BatchNorm removes that): a linear classifier gets about 60 % right."""
    means = torch.randn(10, 192, generator=torch.Generator().manual_seed(0)) * 0.15
    labels = torch.arange(n) % 10
    return means[labels] + torch.randn(n, 192, generator=torch.Generator().manual_seed(seed)) + 3.0, labels


def train_probe(lr, batch, epochs=20):
    """The probe as main trains it (make_linear_probe's head, its param groups, LARS, 2 warmup epochs + cosine set
    per step) on 2048 features; returns the last epoch's mean loss and top-1 (%) on 1000 others."""
    torch.manual_seed(0)
    model = ft.build_classifier("mae_vit_tiny", 10, linprobe=True)
    model.make_linear_probe()
    optimizer = ft.LARS(model.param_groups(0.0, 1.0))
    x, y = separable_features(2048, seed=1)
    steps = len(x) // batch
    for epoch in range(epochs):
        order, loss_sum = torch.randperm(len(x)), 0.0
        for i in range(steps):
            set_lr(optimizer, cosine_lr(epoch + i / steps, lr, 0.0, 2, epochs))
            batch_ids = order[i * batch:(i + 1) * batch]
            loss = nn.functional.cross_entropy(model.head(x[batch_ids]), y[batch_ids])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            loss_sum += loss.detach()
    x_val, y_val = separable_features(1000, seed=2)
    model.head.eval()
    with torch.no_grad():
        return loss_sum.item() / steps, 100 * (model.head(x_val).argmax(dim=1) == y_val).float().mean().item()


def test_probe_lr_rule_is_maes_at_batch_16384_and_at_batch_64_the_probe_learns():
    assert ft.scaled_lr(0.1, 16384, linprobe=True) == pytest.approx(6.4)        # main_linprobe.py: 0.1 x 16384 / 256
    assert ft.scaled_lr(0.1, 32768, linprobe=True) == pytest.approx(12.8)       # above: MAE's linear rule
    assert ft.scaled_lr(5e-4, 64, linprobe=False) == pytest.approx(1.25e-4)     # fine-tuning: linear at any batch
    assert ft.scaled_lr(0.1, 64, linprobe=True) == pytest.approx(6.4)           # below: MAE's lr, 0.1 x 16384 / 256
    loss, acc = train_probe(0.1 * 64 / 256, 64)                                 # the linear rule: lr 0.025
    assert loss > 2.2 and acc < 20, (loss, acc)                                 # LARS barely moves the head
    loss, acc = train_probe(0.1 * (16384 * 64) ** 0.5 / 256, 64)               # a square-root rule: lr 0.4
    assert acc < 40, (loss, acc)                                                # moves it, too little
    loss, acc = train_probe(ft.scaled_lr(0.1, 64, linprobe=True), 64)
    assert loss < 1.0 and acc > 50, (loss, acc)


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixup_and_cutmix_targets_are_distributions(mixup, cutmix):
    torch.manual_seed(0)
    mix = ft.mix_and_smooth(mixup, cutmix, 0.1, 10)
    for _ in range(5):
        imgs, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        mixed, soft = mix(imgs, labels)
        assert mixed.shape == imgs.shape and soft.shape == (8, 10)
        assert torch.allclose(soft.sum(dim=1), torch.ones(8)) and (soft >= 0.01 - 1e-7).all()   # smoothing 0.1 / 10
        assert not torch.equal(mixed, imgs)                                       # mixed with another image
    assert ft.mix_and_smooth(0.0, 0.0, 0.1, 10) is None


class MeanColour(nn.Module):
    """A 'classifier' with known answers: logits rank class c first for images whose dominant
    channel is c % 3, then the other classes in a fixed order."""

    def forward(self, imgs):
        channel = imgs.mean(dim=(2, 3)).argmax(dim=1)                   # 0, 1, 2
        logits = -torch.arange(6.0).repeat(len(imgs), 1)                # class 0 > 1 > ... > 5
        logits[torch.arange(len(imgs)), channel] = 10.0
        return logits


def test_evaluation_top1_and_top5_equal_a_hand_count(tmp_path):
    colours = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255), "d": (255, 0, 0), "e": (0, 0, 255),
               "f": (255, 0, 0)}
    counts = {"a": 3, "b": 2, "c": 1, "d": 2, "e": 1, "f": 2}
    for cls, colour in colours.items():
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(counts[cls]):
            Image.new("RGB", (40, 40), colour).save(tmp_path / "val" / cls / f"{i}.png")
    # by hand: the dominant channel picks class 0 (red), 1 (green), 2 (blue) first, then 0 > 1 > 2 > 3 > 4 > 5.
    # a (0, red): top-1 yes. b (1, green): yes. c (2, blue): yes. d (3, red): no, rank 4 -> top-5 yes.
    # e (4, blue): no, ranks 2 > 0 > 1 > 3 > 4 -> top-5 yes. f (5, red): no, rank 6 -> top-5 no.
    top1, top5 = (3 + 2 + 1) / 11 * 100, (11 - 2) / 11 * 100
    images = ImageFiles(str(tmp_path / "val"))
    loader = torch.utils.data.DataLoader(ft.Transformed(images, ft.eval_transform(32), range(len(images))), 4)
    acc1, acc5 = ft.evaluate(MeanColour(), loader, torch.device("cpu"), torch.autocast("cpu", enabled=False), False)
    assert (acc1, acc5) == (pytest.approx(top1), pytest.approx(top5))


# --- the loop, run as a user runs it ---

def ft_args(*extra):
    return ["--model", "mae_vit_tiny", "--num_workers", 0, "--builtin_images", 64, "--batch_size", 8, "--lr", "1e-3",
            "--warmup_epochs", 1, "--log_every", 2, *extra]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    r = run_main("mae.py", "--model", "mae_vit_tiny", "--epochs", 1, "--builtin_images", 64, "--batch_size", 16,
                 "--num_workers", 0, "--output_dir", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out / "checkpoint-last.pth"


def test_finetune_run_logs_accuracy_and_eval_of_its_checkpoint_agrees(pretrained, tmp_path):
    out = tmp_path / "ft"
    r = run_main("finetune.py", *ft_args("--epochs", 2, "--finetune", pretrained, "--output_dir", out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not in it (trained from their init): fc_norm.* (2), head.* (2)" in r.stdout
    assert "in it, not used: decoder_blocks.*" in r.stdout
    log = log_lines(out)
    evals = [e for e in log if "acc1" in e]
    assert [e["epoch"] for e in evals] == [1, 2] and all(0 <= e["acc5"] <= 100 for e in evals)
    assert all(math.isfinite(e["loss"]) for e in log if "loss" in e)
    ckpt = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["linprobe"] is False and "head.weight" in ckpt["model"]
    r = run_main("finetune.py", *ft_args("--eval", "--resume", out / "checkpoint-last.pth"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"top-1 {evals[-1]['acc1']:.2f} %" in r.stdout


def test_linprobe_run_keeps_the_pretrained_encoder_bit_identical(pretrained, tmp_path):
    args = ft_args("--epochs", 1, "--linprobe", "--finetune", pretrained, "--output_dir", tmp_path)
    del args[args.index("--lr"):args.index("--lr") + 2]                         # the lr from --blr's rule
    r = run_main("finetune.py", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eff. batch 8 = 8 x 1 x 1 | lr 6.4 |" in r.stdout                    # 0.1 x 16384 / 256
    pre, probe = weights(pretrained), weights(tmp_path / "checkpoint-last.pth")
    encoder = [k for k in probe if not k.startswith("head.")]
    assert len(encoder) > 40 and all(torch.equal(probe[k], pre[k]) for k in encoder)
    assert not torch.equal(probe["head.0.running_mean"], torch.zeros_like(probe["head.0.running_mean"]))
    r = run_main("finetune.py", *ft_args("--knn", "--eval", "--resume", tmp_path / "checkpoint-last.pth"))
    assert r.returncode == 0 and f"k-NN, {tmp_path / 'checkpoint-last.pth'}: top-1 " in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("model", ["mae_vit_tiny", "convmae_convvit_tiny"])          # convmae: 1x1 convolutions
def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(model, tmp_path):
    common = ft_args("--epochs", 1, "--mixup", 0, "--cutmix", 0, "--drop_path", 0, "--log_every", 1, "--model", model)
    one = run_main("finetune.py", *common, "--batch_size", 16, "--output_dir", tmp_path / "one")
    two = run("finetune.py", *common, "--batch_size", 4, "--accum_iter", 2, "--output_dir", tmp_path / "two",
              torchrun=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert "eff. batch 16 = 4 x 2 x 2" in two.stdout and "Warning" not in two.stderr, two.stderr[-2000:]
    assert_same_weights(weights(tmp_path / "one" / "checkpoint-last.pth"),
                        weights(tmp_path / "two" / "checkpoint-last.pth"), atol=1e-5)
    (one_acc,), (two_acc,) = ([e["acc1"] for e in log_lines(tmp_path / d) if "acc1" in e] for d in ("one", "two"))
    per_image = 100 / 16                                               # 16 validation images, each counted once
    assert round(two_acc / per_image, 6).is_integer() and abs(one_acc - two_acc) <= per_image


def test_sigkill_then_resume_and_sigterm_then_resume_are_bit_identical(whole_run, tmp_path):
    args = ft_args("--epochs", 3, "--log_every", 1)              # 8 steps per epoch; MixUp, CutMix, drop path on
    whole = weights(whole_run / "checkpoint-last.pth")
    for sig, out in ((signal.SIGKILL, tmp_path / "kill"), (signal.SIGTERM, tmp_path / "term")):
        proc = start("finetune.py", *args, "--output_dir", out)
        wait_for(lambda: any(e.get("epoch") == 1 and e.get("step", 0) >= 5 for e in log_lines(out)), proc)
        code, _, err = kill(proc, sig)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), err[-2000:]
        r = run_main("finetune.py", *args, "--output_dir", out, "--resume", "auto")
        assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
        assert_same_weights(weights(out / "checkpoint-last.pth"), whole)


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """An uninterrupted 3-epoch fine-tuning (8 steps an epoch; MixUp, CutMix, drop path on): its directory."""
    out = tmp_path_factory.mktemp("whole")
    r = run_main("finetune.py", *ft_args("--epochs", 3, "--log_every", 1), "--output_dir", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_a_stop_at_an_epochs_last_step_evaluates_it_saves_the_next_start_and_resumes_exactly(whole_run, tmp_path,
                                                                                            monkeypatch):
    """A SIGTERM on epoch 0's last step: the epoch is evaluated and its position saved as epoch 1's start. A
    checkpoint that an earlier version saved at that position (epoch 0, batch 8 of 8) resumes too."""
    monkeypatch.setattr(ft, "StopSignals", lambda: StopAtStep(8))
    r = run_main("finetune.py", *ft_args("--epochs", 3, "--log_every", 1), "--output_dir", tmp_path)
    assert r.returncode == 0 and "SIGTERM: saved" in r.stdout, r.stderr[-2000:]
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (1, 0) and [e["epoch"] for e in log_lines(tmp_path)
                                                                  if "acc1" in e] == [1]
    monkeypatch.undo()
    torch.save({**ckpt, "epoch": 0, "batch_in_epoch": 8}, tmp_path / "epoch-end.pth")   # the old position
    for out, resume in ((tmp_path, "auto"), (tmp_path / "old", tmp_path / "epoch-end.pth")):
        r = run_main("finetune.py", *ft_args("--epochs", 3, "--log_every", 1), "--output_dir", out, "--resume", resume)
        assert r.returncode == 0, r.stderr[-2000:]
        assert_same_weights(weights(out / "checkpoint-last.pth"), weights(whole_run / "checkpoint-last.pth"))
        assert [e["acc1"] for e in log_lines(out) if "acc1" in e][-1] == \
            [e["acc1"] for e in log_lines(whole_run) if "acc1" in e][-1]


def test_ctrl_c_saves_says_how_to_go_on_exits_130_and_resumes_bit_identical(whole_run, tmp_path):
    args = ft_args("--epochs", 3, "--log_every", 1)
    proc = start("finetune.py", *args, "--output_dir", tmp_path)
    wait_for(lambda: any(e.get("epoch") == 1 and e.get("step", 0) >= 3 for e in log_lines(tmp_path)), proc)
    code, out, err = kill(proc, signal.SIGINT)
    assert code == 130 and "Traceback" not in err, err[-2000:]
    assert last_line(out).startswith("Ctrl-C: saved ") and last_line(out).endswith("continue with --resume auto")
    r = run_main("finetune.py", *args, "--output_dir", tmp_path, "--resume", "auto")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    assert_same_weights(weights(tmp_path / "checkpoint-last.pth"), weights(whole_run / "checkpoint-last.pth"))


def probe_features(model, split, n):
    """The features [n, D] and labels [n] of the built-in split's first n images, evaluation transform."""
    images, transform = load_images(None, split, 32, n), ft.eval_transform(32)
    with torch.no_grad():
        imgs = torch.stack([transform(images[i][0]) for i in range(n)])
        return model.features(imgs), torch.tensor([images[i][1] for i in range(n)])


def hand_knn(train, val, k=20, T=0.07, weighted=True):
    """DINO's k-NN written out: each validation feature's k training features of largest cosine similarity vote
    for their labels, exp(similarity / T) each (1 if not weighted). Returns top-1 %, top-5 % and how many images
    have a top-5 that depends on the order of ties (the true class without votes, fewer than 5 classes with)."""
    (f_train, y_train), (f_val, y_val) = train, val
    sims = nn.functional.normalize(f_val.double(), dim=1) @ nn.functional.normalize(f_train.double(), dim=1).T
    top1 = top5 = ties = 0
    for row, label in zip(sims.tolist(), y_val.tolist()):
        score = [0.0] * 10
        for j in sorted(range(len(row)), key=lambda j: -row[j])[:k]:
            score[y_train[j]] += math.exp(row[j] / T) if weighted else 1.0
        ranked = sorted(range(10), key=lambda c: -score[c])
        top1 += ranked[0] == label
        top5 += label in ranked[:5]
        ties += score[label] == 0 and sum(s > 0 for s in score) < 5
    return 100 * top1 / len(y_val), 100 * top5 / len(y_val), ties


@pytest.mark.parametrize("processes, train_images", [(1, 400), (2, 401)])     # 2: shares of 201 and 200 images
def test_knn_logs_the_weighted_vote_of_the_20_nearest_training_images_as_by_hand(processes, train_images, tmp_path):
    """--knn's log line equals DINO's rule written out on the same checkpoint's features; under torchrun, where
    each rank embeds a share of unequal size, too. The images are such that a wrong k, T or weighting shows."""
    ckpt, out = tmp_path / "pre.pth", tmp_path / "knn"
    torch.save(pretraining_checkpoint("mae_vit_tiny", seed=1), ckpt)
    argv = ["--model", "mae_vit_tiny", "--knn", "--finetune", ckpt, "--builtin_images", train_images, "--batch_size",
            32, "--num_workers", 0, "--output_dir", out]
    if processes == 1:
        ft.main(ft.get_args([str(a) for a in argv]))                          # in this process: seconds
    else:
        r = run("finetune.py", *argv, torchrun=processes)
        assert r.returncode == 0, r.stderr[-3000:]
    (logged,) = log_lines(out)
    model = ft.build_classifier("mae_vit_tiny", 10, linprobe=True)           # the probe's: cls token after norm
    ft.load_weights(model, torch.load(ckpt, weights_only=True), "--finetune x")
    model.eval()
    train, val = probe_features(model, "train", train_images), probe_features(model, "val", train_images // 4)
    top1, top5, ties = hand_knn(train, val)
    assert ties == 0
    assert logged == {"knn_acc1": pytest.approx(top1), "knn_acc5": pytest.approx(top5)}
    for wrong in ({"weighted": False}, {"k": 10}, {"k": 21}, {"T": 0.5}):    # on these images, other numbers
        assert hand_knn(train, val, **wrong)[:2] != (top1, top5), wrong


# --- bad input: one line naming the culprit, no traceback ---

def bad_cases(tmp_path, pretrained):
    flat, no_val = tmp_path / "flat", tmp_path / "no_val"
    for folder in (flat / "train", flat / "val", no_val / "train" / "cat"):
        folder.mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(folder / "a.png")
    torch.save({"model": {"w": torch.zeros(1)}, "args": {"model": "mae_vit_tiny"}}, tmp_path / "odd.pth")
    return [
        (["--model", "mae_vit_nano"], "--model mae_vit_nano is unknown"),
        (["--eval"], "--eval needs --resume"),
        (["--finetune", tmp_path / "none.pth"], "--finetune"),
        (["--input_size", 30], "--input_size 30"),
        (["--layer_decay", 0], "--layer_decay"),
        (["--reprob", 1.5], "--reprob"),
        (["--randaug", 11], "--randaug"),
        (["--mixup", -0.8], "--mixup must be a finite number at least 0, got -0.8"),
        (["--cutmix", "nan"], "--cutmix"),
        (["--blr", "inf"], "--blr"),
        (["--weight_decay", -1], "--weight_decay"),
        (["--drop_path", "nan"], "--drop_path must be a finite number in [0, 1)"),
        (["--epochs", 0], "--epochs"),
        (["--data", flat], "no class folders"),
        (["--data", no_val], f"--data {no_val} has no val/ folder; fine-tuning reads DIR/train/<class>/*"),
        (["--data", tmp_path / "missing"], "no such folder"),
        (["--resume", pretrained, "--output_dir", tmp_path / "o"], "is not a mae_vit_tiny finetune checkpoint"),
        (["--resume", tmp_path / "typo.pth"], "--resume " + str(tmp_path / "typo.pth") + ": no such file"),
        (["--finetune", tmp_path / "odd.pth"], "does not fit"),
        (["--model", "simmim_vit_tiny", "--finetune", pretrained], "it holds mae_vit_tiny's weights"),
        (["--output_dir", "/proc/no-such-dir"], "--output_dir"),
    ]


def test_bad_input_is_one_line_naming_the_culprit(pretrained, tmp_path):
    """In this process (main() exits through sys.exit with its one line; any other exception
    fails the test), the first case also as a real command, to see the line and no traceback."""
    cases = bad_cases(tmp_path, pretrained)
    argv = ft_args("--epochs", 1, "--output_dir", tmp_path / "out")
    r = run("finetune.py", *argv, *cases[0][0])
    assert r.returncode == 1 and "Traceback" not in r.stderr and cases[0][1] in last_line(r.stderr), r.stderr
    failures = one_line_error_failures(ft, argv, cases)
    assert not failures, "\n".join(failures)
