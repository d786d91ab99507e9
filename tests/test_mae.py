"""mae.py's model: official layout, golden numbers from the official code, masking, learning."""
import os

import pytest
import torch

from common import patchify, unpatchify
from helpers import assert_init_is_official, assert_matches_golden, train_on_one_batch, vit_block_keys
from mae import MODELS, MaskedAutoencoderViT, gather, load_pretrained, random_masking

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "mae_tiny.pt")


def official_base_keys():
    """Keys and shapes of the official mae_vit_base_patch16 (models_mae.py), from ../shared/methods/mae.md."""
    keys = {"cls_token": [1, 1, 768], "pos_embed": [1, 197, 768], "patch_embed.proj.weight": [768, 3, 16, 16],
            "patch_embed.proj.bias": [768], "norm.weight": [768], "norm.bias": [768],
            "mask_token": [1, 1, 512], "decoder_pos_embed": [1, 197, 512], "decoder_embed.weight": [512, 768],
            "decoder_embed.bias": [512], "decoder_norm.weight": [512], "decoder_norm.bias": [512],
            "decoder_pred.weight": [768, 512], "decoder_pred.bias": [768]}
    for i in range(12):
        keys.update(vit_block_keys(f"blocks.{i}", 768))
    for i in range(8):
        keys.update(vit_block_keys(f"decoder_blocks.{i}", 512))
    return keys


def test_base_state_dict_is_the_official_layout():
    with torch.device("meta"):                                                      # shapes only, no memory
        sd = MODELS["mae_vit_base_patch16"]().state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == official_base_keys()
    assert len(sd) == 254                                                           # as counted on the official model


@pytest.mark.parametrize("name, D, depth, p", [("mae_vit_large_patch16", 1024, 24, 16),
                                               ("mae_vit_huge_patch14", 1280, 32, 14)])
def test_large_and_huge_sizes(name, D, depth, p):
    with torch.device("meta"):
        sd = MODELS[name]().state_dict()
    assert sd["pos_embed"].shape == (1, (224 // p) ** 2 + 1, D)
    assert sd["patch_embed.proj.weight"].shape == (D, 3, p, p)
    assert f"blocks.{depth - 1}.mlp.fc2.weight" in sd and f"blocks.{depth}.norm1.weight" not in sd
    assert sd["decoder_pred.weight"].shape == (p * p * 3, 512)


# --- golden: the official code's numbers (tests/golden/make_mae_golden.py made them) ---

@pytest.fixture(scope="module")
def golden():
    g = torch.load(GOLDEN, weights_only=True)
    cfg = {k: v for k, v in g["config"].items() if k not in ("norm_eps", "in_chans")}
    assert g["config"]["norm_eps"] == 1e-6
    return g, cfg


def test_init_is_the_official_init_bit_for_bit(golden):
    """Same seed, same construction order: every tensor, pos embeds included, equals the official."""
    g, cfg = golden
    assert_init_is_official(lambda: MaskedAutoencoderViT(**cfg), g)


@pytest.mark.parametrize("case, norm_pix", [("pix", False), ("norm_pix", True)])
def test_loss_pred_and_grads_equal_the_official(golden, case, norm_pix):
    g, cfg = golden
    model = MaskedAutoencoderViT(**{**cfg, "norm_pix_loss": norm_pix})
    model.load_state_dict(g["state_dict"], strict=True)
    assert_matches_golden(model, g, g["imgs"], case)


def test_encoder_latent_equals_the_official(golden):
    g, cfg = golden
    model = MaskedAutoencoderViT(**cfg)
    model.load_state_dict(g["state_dict"])
    latent, _, _ = model.forward_encoder(g["imgs"], g["mask_ratio"], g["noise"])
    torch.testing.assert_close(latent, g["latent"], rtol=1e-4, atol=1e-5)


# --- masking (MAE §3) ---

@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9, 0.1, 0.33])
def test_masking_keeps_exactly_the_official_count(ratio):
    torch.manual_seed(0)
    N, L, D = 3, 49, 5
    x = torch.randn(N, L, D)
    noise = torch.rand(N, L)
    ids_keep, mask, ids_restore = random_masking(noise, ratio)
    kept = gather(x, ids_keep)
    len_keep = int(L * (1 - ratio))
    assert kept.shape == (N, len_keep, D)
    assert (mask == 0).sum(1).tolist() == [len_keep] * N
    smallest = noise.argsort(1)[:, :len_keep]                                      # the official rule
    assert torch.equal(kept, torch.gather(x, 1, smallest[..., None].expand(-1, -1, D)))
    for n in range(N):
        assert set(torch.nonzero(mask[n] == 0).flatten().tolist()) == set(smallest[n].tolist())
    assert torch.equal(torch.gather(noise.argsort(1), 1, ids_restore), torch.arange(L).expand(N, L))


def test_hidden_pixels_do_not_reach_the_encoder():
    torch.manual_seed(0)
    model = MODELS["mae_vit_tiny"]().eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)
    hidden = unpatchify(mask[..., None].expand(-1, -1, 48), 4)                      # [N, 3, H, W], 1 = hidden
    changed = imgs + 100 * torch.randn_like(imgs) * hidden
    latent2, _, _ = model.forward_encoder(changed, 0.75, noise)
    assert torch.equal(latent, latent2)
    visible_change = imgs + 0.5 * (1 - hidden)                                     # the test can fail
    assert not torch.allclose(model.forward_encoder(visible_change, 0.75, noise)[0], latent)


def test_loss_counts_hidden_patches_only():
    torch.manual_seed(0)
    model = MODELS["mae_vit_tiny"](norm_pix_loss=False)
    imgs = torch.randn(2, 3, 32, 32)
    target = patchify(imgs, 4)
    mask = (torch.rand(2, 64) > 0.5).float()
    pred = target + 3 * mask[..., None]                                            # wrong only where hidden
    assert model.forward_loss(imgs, pred, mask).item() == pytest.approx(9.0)
    pred = target + 3 * (1 - mask[..., None])                                      # wrong only where visible
    assert model.forward_loss(imgs, pred, mask).item() == 0.0


def test_pred_to_pixels_inverts_norm_pix():
    torch.manual_seed(0)
    model = MODELS["mae_vit_tiny"](norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    t = patchify(imgs, 4)
    normalised = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert model.forward_loss(imgs, normalised, torch.ones(2, 64)).item() < 1e-10
    torch.testing.assert_close(model.pred_to_pixels(imgs, normalised), imgs, rtol=1e-4, atol=1e-4)


def test_forward_features_sees_all_patches():
    torch.manual_seed(0)
    model = MODELS["mae_vit_tiny"]().eval()
    imgs = torch.randn(2, 3, 32, 32)
    out = model.forward_features(imgs)
    assert out.shape == (2, 65, 192)
    for r, c in [(0, 0), (3, 5), (7, 7)]:                                          # any patch reaches every token
        changed = imgs.clone()
        changed[:, :, 4 * r: 4 * r + 4, 4 * c: 4 * c + 4] += 1
        assert (model.forward_features(changed) - out).abs().amax(dim=-1).min() > 0
    with pytest.raises(ValueError, match="32 px"):
        model.forward_features(torch.randn(2, 3, 48, 48))


def test_tiny_is_tiny():
    model = MODELS["mae_vit_tiny"]()
    imgs = torch.randn(8, 3, 32, 32)
    loss, pred, mask = model(imgs)                                                 # noise drawn inside
    assert pred.shape == (8, 64, 48) and mask.shape == (8, 64) and mask.sum().item() == 8 * 48
    assert sum(p.numel() for p in model.parameters()) < 5e6


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = MODELS["mae_vit_tiny"](norm_pix_loss=True)
    imgs, noise = torch.randn(8, 3, 32, 32), torch.rand(8, 64)
    losses = train_on_one_batch(model, imgs, noise)
    assert losses[-1] < 0.5 * losses[0], losses


def test_load_pretrained_full_and_encoder_only_checkpoints(tmp_path):
    torch.manual_seed(0)
    source = MODELS["mae_vit_tiny"]()
    full = {k: v + 1 for k, v in source.state_dict().items()}
    model = MODELS["mae_vit_tiny"]()
    torch.save({"model": full}, tmp_path / "full.pth")
    assert load_pretrained(model, str(tmp_path / "full.pth")) == []
    assert torch.equal(model.decoder_pred.weight, full["decoder_pred.weight"])
    # the official mae_pretrain_vit_*.pth layout: encoder only, under "model"
    encoder = {k: v for k, v in full.items() if not k.startswith(("decoder_", "mask_token"))}
    model = MODELS["mae_vit_tiny"]()
    fresh_decoder = model.decoder_pred.weight.clone()
    missing = load_pretrained(model, {"model": encoder})
    assert "mask_token" in missing and "decoder_pred.weight" in missing and len(missing) == len(full) - len(encoder)
    assert torch.equal(model.blocks[3].mlp.fc2.weight, full["blocks.3.mlp.fc2.weight"])
    assert torch.equal(model.decoder_pred.weight, fresh_decoder)
    # a fine-tuned classifier (fc_norm, head, no norm) is refused by name
    classifier = {**{k: v for k, v in encoder.items() if not k.startswith("norm.")},
                  "fc_norm.weight": torch.ones(192), "head.weight": torch.zeros(10, 192)}
    with pytest.raises(ValueError, match="fc_norm.weight"):
        load_pretrained(MODELS["mae_vit_tiny"](), classifier)


def test_mask_and_loss_stay_fp32_under_bf16_autocast():
    """mask.sum() normalises the loss: in bf16 it would round (bf16 counts exactly only to 256)."""
    torch.manual_seed(0)
    model = MODELS["mae_vit_tiny"]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = model(torch.randn(2, 3, 32, 32))
    assert mask.dtype == torch.float32 and loss.dtype == torch.float32
