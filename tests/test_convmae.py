"""convmae.py's model: official layout, golden numbers from the official code, masked convolution."""
import pytest
import torch

from common import patchify, unpatchify
from convmae import MODELS, MaskedAutoencoderConvViT, cut_tiles, gather, load_pretrained, paste_tiles, random_masking
from helpers import (assert_init_is_official, assert_matches_golden, load_golden, shapes_batch, train_on_one_batch,
                     vit_block_keys)


def conv_block(prefix, C):
    return {f"{prefix}.norm1.weight": [C], f"{prefix}.norm1.bias": [C],
            f"{prefix}.conv1.weight": [C, C, 1, 1], f"{prefix}.conv1.bias": [C],
            f"{prefix}.conv2.weight": [C, C, 1, 1], f"{prefix}.conv2.bias": [C],
            f"{prefix}.attn.weight": [C, 1, 5, 5], f"{prefix}.attn.bias": [C],
            f"{prefix}.norm2.weight": [C], f"{prefix}.norm2.bias": [C],
            f"{prefix}.mlp.fc1.weight": [4 * C, C, 1, 1], f"{prefix}.mlp.fc1.bias": [4 * C],
            f"{prefix}.mlp.fc2.weight": [C, 4 * C, 1, 1], f"{prefix}.mlp.fc2.bias": [C]}


def official_base_keys():
    """Keys and shapes of the official convmae_convvit_base_patch16 (models_convmae.py), from
    ../shared/methods/convmae.md; fastconvmae_convvit_base_patch16 has the same."""
    keys = {}
    for i, (c_in, D, p) in enumerate([(3, 256, 4), (256, 384, 2), (384, 768, 2)], start=1):
        keys.update({f"patch_embed{i}.proj.weight": [D, c_in, p, p], f"patch_embed{i}.proj.bias": [D],
                     f"patch_embed{i}.norm.weight": [D], f"patch_embed{i}.norm.bias": [D]})
    keys.update({"patch_embed4.weight": [768, 768], "patch_embed4.bias": [768],
                 "stage1_output_decode.weight": [768, 256, 4, 4], "stage1_output_decode.bias": [768],
                 "stage2_output_decode.weight": [768, 384, 2, 2], "stage2_output_decode.bias": [768],
                 "pos_embed": [1, 196, 768], "norm.weight": [768], "norm.bias": [768],
                 "mask_token": [1, 1, 512], "decoder_pos_embed": [1, 196, 512],
                 "decoder_embed.weight": [512, 768], "decoder_embed.bias": [512],
                 "decoder_norm.weight": [512], "decoder_norm.bias": [512],
                 "decoder_pred.weight": [768, 512], "decoder_pred.bias": [768]})
    for i in range(2):
        keys.update(conv_block(f"blocks1.{i}", 256))
        keys.update(conv_block(f"blocks2.{i}", 384))
    for i in range(11):
        keys.update(vit_block_keys(f"blocks3.{i}", 768))
    for i in range(8):
        keys.update(vit_block_keys(f"decoder_blocks.{i}", 512))
    return keys


def test_base_state_dict_is_the_official_layout():
    with torch.device("meta"):
        sd = MODELS["convmae_convvit_base_patch16"]().state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == official_base_keys()


# --- golden: the official code's numbers (tests/golden/make_convmae_golden.py made them) ---

def our_config(g):
    """The fixture's official constructor arguments, as our builder takes them."""
    c = g["config"]
    assert g["norm_eps"] == 1e-6 and c["img_size"] == [224, 56, 28] and c["in_chans"] == 3
    return dict(img_size=224, patch_size=tuple(c["patch_size"]), embed_dim=tuple(c["embed_dim"]),
                depth=tuple(c["depth"]), num_heads=c["num_heads"], decoder_embed_dim=c["decoder_embed_dim"],
                decoder_depth=c["decoder_depth"], decoder_num_heads=c["decoder_num_heads"],
                mlp_ratio=tuple(float(r) for r in c["mlp_ratio"]))


@pytest.fixture(scope="module")
def golden():
    return load_golden("convmae_tiny.pt")


def test_init_is_the_official_init_bit_for_bit(golden):
    """Same seed, same construction order: every tensor equals the official model's."""
    g, _ = golden
    assert_init_is_official(lambda: MaskedAutoencoderConvViT(**our_config(g)), g)


@pytest.mark.parametrize("case, norm_pix", [("pix", False), ("norm_pix", True)])
def test_loss_pred_and_grads_equal_the_official(golden, case, norm_pix):
    g, imgs = golden
    model = MaskedAutoencoderConvViT(**our_config(g), norm_pix_loss=norm_pix)
    model.load_state_dict(g["state_dict"], strict=True)
    assert_matches_golden(model, g, imgs, case)


def test_encoder_latent_equals_the_official(golden):
    g, imgs = golden
    model = MaskedAutoencoderConvViT(**our_config(g))
    model.load_state_dict(g["state_dict"])
    latent, _, _ = model.forward_encoder(imgs, g["mask_ratio"], g["noise"])
    torch.testing.assert_close(latent, g["latent"], rtol=1e-4, atol=1e-5)


# --- masking (§3.2) ---

@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.9, 0.33])
def test_masking_keeps_exactly_the_official_count(ratio):
    torch.manual_seed(0)
    noise = torch.rand(3, 196)
    ids_keep, mask, ids_restore = random_masking(noise, ratio)
    len_keep = int(196 * (1 - ratio))
    assert torch.equal(ids_keep, noise.argsort(1)[:, :len_keep])                   # the official rule
    assert (mask == 0).sum(1).tolist() == [len_keep] * 3
    assert torch.equal(mask.gather(1, ids_keep), torch.zeros(3, len_keep))
    assert torch.equal(torch.gather(noise.argsort(1), 1, ids_restore), torch.arange(196).expand(3, 196))


def test_tiles_are_the_units_of_the_mask_grid_in_image_layout():
    x = torch.arange(2 * 12 * 12 * 3, dtype=torch.float).view(2, 12, 12, 3)        # [N, H, W, C], a 3 x 3 grid
    ids = torch.tensor([[5, 0], [8, 3]])                                            # units (1, 2), (0, 0); (2, 2), (1, 0)
    tiles = cut_tiles(x, ids, 3)
    assert tiles.shape == (4, 4, 4, 3)
    assert torch.equal(tiles[0], x[0, 4:8, 8:12]) and torch.equal(tiles[1], x[0, 0:4, 0:4])
    assert torch.equal(tiles[2], x[1, 8:12, 8:12]) and torch.equal(tiles[3], x[1, 4:8, 0:4])
    canvas = paste_tiles(tiles, ids, 3)
    kept = torch.zeros(2, 12, 12, 1)
    kept[0, 4:8, 8:12] = kept[0, 0:4, 0:4] = kept[1, 8:12, 8:12] = kept[1, 4:8, 0:4] = 1
    assert torch.equal(canvas, x * kept)                                            # the rest is zero


def test_hidden_pixels_do_not_reach_any_visible_token():
    """Masked convolution: 5x5 depthwise kernels span unit borders, yet no hidden pixel reaches a
    visible token through any stage, nor through the multi-scale fusion."""
    torch.manual_seed(0)
    model = MODELS["convmae_convvit_tiny"]().eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)
    hidden = unpatchify(mask[..., None].expand(-1, -1, 8 * 8 * 3), 8)              # [N, 3, H, W], 1 = hidden
    changed = imgs + 100 * torch.randn_like(imgs) * hidden
    assert torch.equal(model.forward_encoder(changed, 0.75, noise)[0], latent)
    visible_change = imgs + 0.5 * (1 - hidden)                                     # the test can fail
    assert not torch.allclose(model.forward_encoder(visible_change, 0.75, noise)[0], latent)
    # the check can fail: through unmasked convolutions the same change does reach visible units
    ids_keep = noise.argsort(1)[:, :4]
    dense = lambda im: gather(model._conv_stages(im)[0], ids_keep)                # all units, then the visible ones
    assert not torch.allclose(dense(changed), dense(imgs), atol=1e-3)


def test_loss_counts_hidden_units_only_and_pred_to_pixels_inverts_norm_pix():
    torch.manual_seed(0)
    model = MODELS["convmae_convvit_tiny"](norm_pix_loss=False)
    imgs = torch.randn(2, 3, 32, 32)
    target = patchify(imgs, 8)
    mask = (torch.rand(2, 16) > 0.5).float()
    assert model.forward_loss(imgs, target + 3 * mask[..., None], mask).item() == pytest.approx(9.0)
    assert model.forward_loss(imgs, target + 3 * (1 - mask[..., None]), mask).item() == 0.0
    model.norm_pix_loss = True
    normalised = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert model.forward_loss(imgs, normalised, torch.ones(2, 16)).item() < 1e-10
    torch.testing.assert_close(model.pred_to_pixels(imgs, normalised), imgs, rtol=1e-4, atol=1e-4)


def test_any_size_divisible_by_the_total_stride():
    """The official code hard-codes the 14/28/56 grids of 224 px; ours follows img_size."""
    torch.manual_seed(0)
    model = MODELS["convmae_convvit_tiny"](img_size=48)                            # a 6 x 6 grid
    loss, pred, mask = model(torch.randn(2, 3, 48, 48))
    assert pred.shape == (2, 36, 192) and mask.sum().item() == 2 * (36 - 9)
    with pytest.raises(ValueError, match="48 px"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="not a multiple"):
        MODELS["convmae_convvit_tiny"](img_size=36)


def test_forward_features_sees_all_units():
    torch.manual_seed(0)
    model = MODELS["convmae_convvit_tiny"]().eval()
    imgs = torch.randn(2, 3, 32, 32)
    out = model.forward_features(imgs)
    assert out.shape == (2, 16, 96)
    changed = imgs.clone()
    changed[:, :, :8, :8] += 1                                                     # one unit reaches every token
    assert (model.forward_features(changed) - out).abs().amax(dim=-1).min() > 0


def test_tiny_is_tiny_and_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = MODELS["convmae_convvit_tiny"](norm_pix_loss=False)
    assert sum(p.numel() for p in model.parameters()) < 5e6
    imgs, noise = shapes_batch(8, 32), torch.rand(8, 16)
    losses = train_on_one_batch(model, imgs, noise)
    assert losses[-1] < 0.5 * losses[0], losses


def test_load_pretrained_full_and_encoder_only_checkpoints(tmp_path):
    torch.manual_seed(0)
    full = {k: v + 1 for k, v in MODELS["convmae_convvit_tiny"]().state_dict().items()}
    model = MODELS["convmae_convvit_tiny"]()
    torch.save({"model": full}, tmp_path / "full.pth")
    assert load_pretrained(model, str(tmp_path / "full.pth")) == []
    assert torch.equal(model.blocks1[0].attn.weight, full["blocks1.0.attn.weight"])
    encoder = {k: v for k, v in full.items() if not k.startswith(("decoder_", "mask_token"))}
    missing = load_pretrained(MODELS["convmae_convvit_tiny"](), {"model": encoder})
    assert "mask_token" in missing and len(missing) == len(full) - len(encoder)
    with pytest.raises(ValueError, match="head.weight"):
        load_pretrained(MODELS["convmae_convvit_tiny"](), {**encoder, "head.weight": torch.zeros(10, 96)})


def test_mask_and_loss_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = MODELS["convmae_convvit_tiny"]()(torch.randn(2, 3, 32, 32))
    assert mask.dtype == torch.float32 and loss.dtype == torch.float32
