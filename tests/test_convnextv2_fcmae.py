"""convnextv2_fcmae.py: the dense model equals the sparse one on visible positions, the official
dense block and GRN, the official checkpoint layout (converted on load), masking and learning."""

import pytest
import torch
import torch.nn.functional as F

from common import unpatchify
from convnextv2_fcmae import GRN, MODELS, Block, from_sparse_layout, load_pretrained, random_masking
from fcmae_dense import dense_emulation
from helpers import load_golden, shapes_batch, train_on_one_batch


# --- the official dense block and GRN (tests/golden/make_convnextv2_golden.py) ---

@pytest.fixture(scope="module")
def golden():
    return load_golden("convnextv2_block.pt")[0]


def test_block_and_grn_equal_the_official_dense_ones(golden):
    block = Block(16)
    block.load_state_dict(golden["block"], strict=True)
    x = golden["x"].clone().requires_grad_()
    y = block(x)
    y.pow(2).mean().backward()
    torch.testing.assert_close(y, golden["y"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, golden["x_grad"], rtol=1e-4, atol=1e-7)
    for name, p in block.named_parameters():
        torch.testing.assert_close(p.grad, golden["grads"][name], rtol=1e-4, atol=1e-4 * golden["grads"][name].abs().max().item())
    grn = GRN(16)
    grn.load_state_dict(golden["grn"])
    torch.testing.assert_close(grn(golden["grn_in"]), golden["grn_out"], rtol=1e-5, atol=1e-6)


# --- sparse equivalence: a reference that only ever touches visible positions ---

def sparse_reference(encoder, imgs, mask):
    """The FCMAE encoder as the official sparse network computes it, written over the list of
    visible sites: per-site ops on [P, C] rows; the depthwise conv fills a zero canvas with
    the visible sites only; GRN's statistics over all visible sites of the batch
    (MinkowskiGRN); the 2x2 downsampling gathers each output site's four inputs."""
    x = encoder.downsample_layers[0](imgs)                              # the stem runs densely
    N, C, H, W = x.shape
    g = int(mask.shape[1] ** 0.5)
    vis = (1 - mask).view(N, g, g).repeat_interleave(H // g, 1).repeat_interleave(W // g, 2).bool()
    sites = vis.nonzero()                                               # [P, 3]: (n, h, w)
    feats = x.permute(0, 2, 3, 1)[vis]                                  # [P, C]
    for i, stage in enumerate(encoder.stages):
        if i > 0:
            norm, conv = encoder.downsample_layers[i]
            feats = F.layer_norm(feats, (feats.shape[1],), norm.weight, norm.bias, norm.eps)
            vis = vis[:, ::2, ::2]
            out_sites = vis.nonzero()
            w = conv.weight                                             # [C_out, C_in, 2, 2]
            lookup = {tuple(s.tolist()): j for j, s in enumerate(sites)}
            rows = []
            for n, h, ww in out_sites.tolist():
                acc = conv.bias.clone()
                for dy in range(2):
                    for dx in range(2):
                        acc = acc + w[:, :, dy, dx] @ feats[lookup[(n, 2 * h + dy, 2 * ww + dx)]]
                rows.append(acc)
            feats, sites = torch.stack(rows), out_sites
            H, W = H // 2, W // 2
        for blk in stage:
            canvas = feats.new_zeros(N, H, W, feats.shape[1])
            canvas[sites[:, 0], sites[:, 1], sites[:, 2]] = feats
            h = blk.dwconv(canvas.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)[sites[:, 0], sites[:, 1], sites[:, 2]]
            h = blk.act(blk.pwconv1(blk.norm(h)))                        # [P, 4C]
            gx = h.norm(dim=0, keepdim=True)                             # over every visible site of the batch
            h = blk.grn.gamma.view(1, -1) * (h * gx / (gx.mean() + 1e-6)) + blk.grn.beta.view(1, -1) + h
            feats = feats + blk.pwconv2(h)
    out = feats.new_zeros(N, H, W, feats.shape[1])
    out[sites[:, 0], sites[:, 1], sites[:, 2]] = feats
    return out.permute(0, 3, 1, 2)


def randomised(model):
    """GRN's gamma/beta and biases start at zero: give them values, so that the test sees them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma", "beta", "bias")):
                p.normal_(std=0.3)
    return model


def test_dense_encoder_equals_the_sparse_reference_on_visible_positions():
    """In float64, so that only the computation, not fp32 rounding of values in the hundreds
    (the official init's std-1 weights), could make them differ. (In fp32: 4.6e-7 of the scale.)"""
    torch.manual_seed(0)
    model = randomised(MODELS["convnextv2_fcmae_test"](img_size=96)).double()      # a 3 x 3 unit grid
    imgs, noise = torch.randn(2, 3, 96, 96, dtype=torch.float64), torch.rand(2, 9)
    latent, mask = model.forward_encoder(imgs, 0.6, noise)
    with torch.no_grad():
        ref = sparse_reference(model.encoder, imgs, mask)
    torch.testing.assert_close(latent, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())
    assert (latent.flatten(2).transpose(1, 2)[mask.bool()] == 0).all()             # hidden units: zero


def loss_pred_grads(model, imgs, noise, seed):
    torch.manual_seed(seed)                                                        # drop path's draws
    loss, pred, _ = model(imgs, 0.6, noise)
    loss.backward()
    return loss, pred, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_visible_units_path_equals_the_dense_emulation(dtype, tol):
    """The encoder computes the visible units only, as tiles; tests/fcmae_dense.py computes every position
    and re-applies the mask. Same loss, prediction and every gradient, in training mode with drop path (one
    draw per image in both). Only summation order differs: float64 within 1e-12 of each tensor's scale
    (measured 7e-15); float32 within 2e-5 (measured 5e-6: the std-1 init makes values in the hundreds)."""
    torch.manual_seed(0)
    ours = randomised(MODELS["convnextv2_fcmae_test"](img_size=96, drop_path_rate=0.5, norm_pix_loss=True))
    dense = dense_emulation("convnextv2_fcmae_test", img_size=96, drop_path_rate=0.5, norm_pix_loss=True)
    dense.load_state_dict(ours.state_dict())
    ours, dense = ours.to(dtype), dense.to(dtype)
    imgs, noise = torch.randn(4, 3, 96, 96, dtype=dtype), torch.rand(4, 9)
    loss, pred, grads = loss_pred_grads(ours, imgs, noise, seed=1)
    ref_loss, ref_pred, ref_grads = loss_pred_grads(dense, imgs, noise, seed=1)
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=0)
    torch.testing.assert_close(pred, ref_pred, rtol=tol, atol=tol * ref_pred.abs().max().item())
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=tol, atol=tol * ref.abs().max().item(), msg=name)
    ours.zero_grad()
    assert not torch.allclose(loss_pred_grads(ours, imgs, noise, seed=2)[0], loss)  # drop path did drop


def test_grn_statistics_span_the_whole_batch_in_the_encoder_and_each_image_in_the_decoder():
    torch.manual_seed(0)
    grn = GRN(8)
    with torch.no_grad():
        grn.gamma.normal_(), grn.beta.normal_()
    x, other = torch.randn(2, 4, 4, 8), torch.randn(4, 4, 8)
    moved = torch.stack([x[0], other])
    assert torch.equal(grn(x)[0], grn(moved)[0])                                   # per image (dense, decoder)
    assert not torch.equal(grn(x, over_batch=True)[0], grn(moved, over_batch=True)[0])   # joint (sparse quirk)


def test_hidden_pixels_do_not_reach_the_encoder_output():
    torch.manual_seed(0)
    model = randomised(MODELS["convnextv2_fcmae_test"](img_size=96)).eval()
    imgs, noise = torch.randn(2, 3, 96, 96), torch.rand(2, 9)
    latent, mask = model.forward_encoder(imgs, 0.6, noise)
    hidden = unpatchify(mask[..., None].expand(-1, -1, 32 * 32 * 3), 32)
    assert torch.equal(model.forward_encoder(imgs + 100 * torch.randn_like(imgs) * hidden, 0.6, noise)[0], latent)
    assert not torch.allclose(model.forward_encoder(imgs + 0.5 * (1 - hidden), 0.6, noise)[0], latent)


@pytest.mark.parametrize("L, ratio", [(49, 0.6), (4, 0.6), (36, 0.75)])
def test_mask_keeps_the_official_count_of_smallest_noise_units(L, ratio):
    noise = torch.randn(3, L)
    ids_keep, mask, _ = random_masking(noise, ratio)
    ids_keep = ids_keep.sort(dim=1).values                                          # as the encoder gets them
    keep = int(L * (1 - ratio))
    assert ((mask == 0).sum(1) == keep).all()
    assert (mask.gather(1, noise.argsort(1)[:, :keep]) == 0).all()
    assert torch.equal(ids_keep, (mask == 0).nonzero()[:, 1].view(3, keep))       # the visible units, row-major


# --- the official checkpoint layout (facts: utils.py remap_checkpoint_keys, fcmae.py) ---

def to_sparse_layout(state):
    """Reference conversion ours -> MinkowskiEngine layout, written from the facts (the inverse
    direction of the file's converter): [C_out, C_in, k, k] -> swap spatial axes -> [k*k, C_in, C_out];
    depthwise -> [k*k, C]; linears and the downsampling LayerNorms wrapped in .linear / .ln;
    GRN [1, C]; sparse biases [1, C]. Stem, decoder, proj, pred stay dense."""
    out = {}
    for k, v in state.items():
        p = k.split(".")
        sparse = k.startswith("encoder.") and not k.startswith("encoder.downsample_layers.0.")
        if sparse and p[-2] == "dwconv":
            out[".".join(p[:-1] + ["kernel"]) if p[-1] == "weight" else k] = \
                v.transpose(3, 2).reshape(v.shape[0], -1).t() if p[-1] == "weight" else v[None]
        elif sparse and p[1] == "downsample_layers" and p[3] == "1":
            out[".".join(p[:-1] + ["kernel"]) if p[-1] == "weight" else k] = \
                v.transpose(3, 2).reshape(v.shape[0], v.shape[1], -1).permute(2, 1, 0) if p[-1] == "weight" else v[None]
        elif sparse and p[1] == "downsample_layers" and p[3] == "0":
            out[".".join(p[:-1] + ["ln", p[-1]])] = v
        elif sparse and p[-2] == "norm":
            out[".".join(p[:-1] + ["ln", p[-1]])] = v
        elif sparse and p[-2] in ("pwconv1", "pwconv2"):
            out[".".join(p[:-1] + ["linear", p[-1]])] = v
        elif sparse and p[-2] == "grn":
            out[k] = v.reshape(1, -1)
        else:
            out[k] = v
    return out


def test_base_maps_one_to_one_onto_the_official_fcmae_layout():
    with torch.device("meta"):
        ours = MODELS["convnextv2_fcmae_base"]().state_dict()
    official = {k: list(v.shape) for k, v in to_sparse_layout(ours).items()}
    assert len(official) == len(ours)
    expected = {  # from ../shared/methods/convnextv2_fcmae.md
        "encoder.downsample_layers.0.0.weight": [128, 3, 4, 4], "encoder.downsample_layers.0.1.weight": [128],
        "encoder.downsample_layers.1.0.ln.weight": [128], "encoder.downsample_layers.1.1.kernel": [4, 128, 256],
        "encoder.downsample_layers.3.1.kernel": [4, 512, 1024], "encoder.downsample_layers.3.1.bias": [1, 1024],
        "encoder.stages.2.26.dwconv.kernel": [49, 512], "encoder.stages.2.26.norm.ln.weight": [512],
        "encoder.stages.2.26.pwconv1.linear.weight": [2048, 512], "encoder.stages.2.26.grn.gamma": [1, 2048],
        "encoder.stages.3.2.pwconv2.linear.bias": [1024], "proj.weight": [512, 1024, 1, 1], "mask_token": [1, 512, 1, 1],
        "decoder.0.dwconv.weight": [512, 1, 7, 7], "decoder.0.grn.gamma": [1, 1, 1, 2048], "decoder.0.pwconv1.weight": [2048, 512],
        "pred.weight": [3072, 512, 1, 1], "pred.bias": [3072]}
    for k, shape in expected.items():
        assert official[k] == shape, k
    back = from_sparse_layout(to_sparse_layout({k: torch.zeros(v.shape) for k, v in ours.items()}))
    assert {k: list(v.shape) for k, v in back.items()} == {k: list(v.shape) for k, v in ours.items()}


def test_an_official_layout_checkpoint_loads_and_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    source = randomised(MODELS["convnextv2_fcmae_test"]())
    torch.save({"model": to_sparse_layout(source.state_dict())}, tmp_path / "official.pt")
    model = MODELS["convnextv2_fcmae_test"]()
    assert load_pretrained(model, str(tmp_path / "official.pt")) == []
    imgs, noise = torch.randn(2, 3, 64, 64), torch.rand(2, 4)
    assert torch.equal(model(imgs, 0.6, noise)[1], source(imgs, 0.6, noise)[1])
    # spatially asymmetric kernels: the axis swap matters (a transposed kernel would differ)
    assert not torch.equal(source.encoder.stages[0][0].dwconv.weight, source.encoder.stages[0][0].dwconv.weight.transpose(2, 3))


def test_fine_tuned_encoder_checkpoints_load_into_the_encoder_and_others_are_refused():
    torch.manual_seed(0)
    source = randomised(MODELS["convnextv2_fcmae_test"]())
    finetuned = {k[len("encoder."):]: v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    finetuned.update({"norm.weight": torch.ones(128), "norm.bias": torch.zeros(128), "head.weight": torch.zeros(10, 128)})
    model = MODELS["convnextv2_fcmae_test"]()
    missing = load_pretrained(model, {"model": finetuned})
    assert set(missing) == {k for k in model.state_dict() if not k.startswith("encoder.")}
    assert torch.equal(model.encoder.stages[3][0].pwconv2.weight, source.encoder.stages[3][0].pwconv2.weight)
    with pytest.raises(ValueError, match="neither the official FCMAE layout nor ours"):
        load_pretrained(MODELS["convnextv2_fcmae_test"](), {"blocks.0.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="other shapes"):                          # another size
        load_pretrained(MODELS["convnextv2_fcmae_test"](), MODELS["convnextv2_fcmae_test"](decoder_embed_dim=32).state_dict())


def test_eight_sizes_and_the_test_model():
    for name, dims in [("convnextv2_fcmae_atto", 320), ("convnextv2_fcmae_huge", 2816)]:
        with torch.device("meta"):
            assert MODELS[name]().proj.weight.shape == (512, dims, 1, 1)
    assert len([n for n in MODELS if n != "convnextv2_fcmae_test"]) == 8
    torch.manual_seed(0)
    model = MODELS["convnextv2_fcmae_test"]()
    loss, pred, mask = model(torch.randn(8, 3, 64, 64))
    assert pred.shape == (8, 4, 3072) and mask.sum().item() == 8 * 3
    with pytest.raises(ValueError, match="total stride, 32"):      # the mask unit is the encoder's output pixel
        MODELS["convnextv2_fcmae_test"](patch_size=16)


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = MODELS["convnextv2_fcmae_test"](img_size=96, norm_pix_loss=False)
    losses = train_on_one_batch(model, shapes_batch(8, 96), torch.rand(8, 9), lr=1e-3)
    assert losses[-1] < 0.5 * losses[0], losses
