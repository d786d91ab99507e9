"""fastconvmae.py's model: official layout and numbers, complementary masks, each view a ConvMAE."""
import pytest
import torch

import convmae
from common import patchify, unpatchify
from fastconvmae import MODELS, MaskedAutoencoderConvViT, complementary_masking
from helpers import assert_init_is_official, assert_matches_golden, load_golden, shapes_batch, train_on_one_batch
from test_convmae import official_base_keys, our_config


def test_base_state_dict_is_the_official_layout():
    with torch.device("meta"):
        sd = MODELS["fastconvmae_convvit_base_patch16"]().state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == official_base_keys()


# --- golden: the official code's numbers (tests/golden/make_convmae_golden.py made them) ---

@pytest.fixture(scope="module")
def golden():
    return load_golden("fastconvmae_tiny.pt")


def test_init_is_the_official_init_bit_for_bit(golden):
    g, _ = golden
    assert g["config"]["decoder_depth"] == 8                                        # the official forces 8
    assert_init_is_official(lambda: MaskedAutoencoderConvViT(**our_config(g)), g)


@pytest.mark.parametrize("case, norm_pix", [("pix", False), ("norm_pix", True)])
def test_loss_pred_and_grads_equal_the_official(golden, case, norm_pix):
    g, imgs = golden
    model = MaskedAutoencoderConvViT(**our_config(g), norm_pix_loss=norm_pix)
    model.load_state_dict(g["state_dict"], strict=True)
    assert_matches_golden(model, g, imgs, case)                                    # pred, mask: [4N, L, ...]


def test_encoder_latent_equals_the_official(golden):
    g, imgs = golden
    model = MaskedAutoencoderConvViT(**our_config(g))
    model.load_state_dict(g["state_dict"])
    latent, _, _ = model.forward_encoder(imgs, g["mask_ratio"], g["noise"])
    assert latent.shape == (4 * 2, 49, 32)
    torch.testing.assert_close(latent, g["latent"], rtol=1e-4, atol=1e-5)


# --- complementary masking (§3.1) ---

def test_four_masks_are_disjoint_and_cover_every_unit_once():
    torch.manual_seed(0)
    noise = torch.rand(3, 196)
    ids_keep, mask, ids_restore = complementary_masking(noise, 0.75)
    assert ids_keep.shape == (4, 3, 49) and mask.shape == (4, 3, 196)
    assert torch.equal((1 - mask).sum(0), torch.ones(3, 196))                      # each unit visible in one view
    assert ((1 - mask).sum(2) == 49).all()
    order = noise.argsort(1)                                                        # the official rule
    for k in range(4):
        assert torch.equal(ids_keep[k], order[:, 49 * k: 49 * (k + 1)])
        assert torch.equal(mask[k].gather(1, ids_keep[k]), torch.zeros(3, 49))
    with pytest.raises(ValueError, match="0.75"):
        complementary_masking(noise, 0.6)
    with pytest.raises(ValueError, match="divisible by 4"):
        complementary_masking(torch.rand(3, 25), 0.75)


def noise_for_view(noise, k):
    """Noise under which ConvMAE keeps exactly view k's units, in view k's order."""
    L = noise.shape[1]
    rank = noise.argsort(1).argsort(1)
    return ((rank - k * (L // 4)) % L).float()


def test_each_view_is_exactly_convmae_on_that_views_mask():
    """Same weights: view k's latent, prediction and mask equal ConvMAE's with view k's visible
    set. This checks the per-view masked convolution and the decoder's alignment (the official
    torch.roll) independently of the fixture; the loss is the mean of the four views' losses."""
    torch.manual_seed(0)
    fast = MODELS["fastconvmae_convvit_tiny"](norm_pix_loss=True).eval()
    single = convmae.MODELS["convmae_convvit_tiny"](norm_pix_loss=True).eval()
    single.load_state_dict(fast.state_dict(), strict=True)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    loss, pred, mask = fast(imgs, 0.75, noise)
    latent = fast.forward_encoder(imgs, 0.75, noise)[0]
    losses = []
    for k in range(4):
        rows = slice(2 * k, 2 * k + 2)
        loss_k, pred_k, mask_k = single(imgs, 0.75, noise_for_view(noise, k))
        assert torch.equal(mask[rows], mask_k)
        torch.testing.assert_close(latent[rows], single.forward_encoder(imgs, 0.75, noise_for_view(noise, k))[0],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pred[rows], pred_k, rtol=1e-5, atol=1e-5)
        losses.append(loss_k)
    torch.testing.assert_close(loss, torch.stack(losses).mean(), rtol=1e-5, atol=0)


def test_a_views_visible_tokens_ignore_the_pixels_that_view_hides():
    torch.manual_seed(0)
    model = MODELS["fastconvmae_convvit_tiny"]().eval()
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    latent, mask, _ = model.forward_encoder(imgs, 0.75, noise)
    for k in range(4):
        rows = slice(2 * k, 2 * k + 2)
        hidden = unpatchify(mask[rows, :, None].expand(-1, -1, 8 * 8 * 3), 8)       # view k hides these pixels
        changed = model.forward_encoder(imgs + 100 * torch.randn_like(imgs) * hidden, 0.75, noise)[0]
        assert torch.equal(changed[rows], latent[rows]), k
        others = [r for r in range(8) if r // 2 != k]
        assert not torch.allclose(changed[others], latent[others])                 # they see those pixels


def test_tiny_is_tiny_and_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = MODELS["fastconvmae_convvit_tiny"](norm_pix_loss=False)
    assert sum(p.numel() for p in model.parameters()) < 5e6
    imgs, noise = shapes_batch(8, 32), torch.rand(8, 16)
    losses = train_on_one_batch(model, imgs, noise)
    assert losses[-1] < 0.5 * losses[0], losses


def test_pred_to_pixels_inverts_norm_pix_for_every_view():
    torch.manual_seed(0)
    model = MODELS["fastconvmae_convvit_tiny"](norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    t = patchify(imgs, 8)
    normalised = ((t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5).repeat(4, 1, 1)
    assert model.forward_loss(imgs, normalised, torch.ones(8, 16)).item() < 1e-10
    torch.testing.assert_close(model.pred_to_pixels(imgs, normalised), imgs.repeat(4, 1, 1, 1), rtol=1e-4, atol=1e-4)


def test_mask_and_loss_stay_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, mask = MODELS["fastconvmae_convvit_tiny"]()(torch.randn(2, 3, 32, 32))
    assert mask.dtype == torch.float32 and loss.dtype == torch.float32 and pred.shape[0] == 8
