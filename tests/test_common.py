"""common.py: patchify order, schedule, the built-in data, folder loading, the seeded loader."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_images
from common import (BuiltinShapes, ImageFiles, cosine_lr, load_images, patchify, pretrain_loader, set_lr,
                    unpatchify)


# --- patches ---

def test_patchify_matches_official_channel_order():
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 8, 12)
    p = 4
    # the official einsum: [N, c, h, p, w, q] -> [N, h, w, p, q, c]
    ref = torch.einsum("nchpwq->nhwpqc", imgs.reshape(2, 3, 2, p, 3, p)).reshape(2, 6, p * p * 3)
    assert torch.equal(patchify(imgs, p), ref)
    assert torch.equal(unpatchify(patchify(imgs, p), p, (2, 3)), imgs)
    square = torch.randn(2, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(square, 4), 4), square)
    # patch 1 of row 0 is pixels [0:4, 4:8]; its first value is channel 0 at (0, 4), then channel 1
    assert patchify(imgs, p)[0, 1, 0] == imgs[0, 0, 0, 4] and patchify(imgs, p)[0, 1, 1] == imgs[0, 1, 0, 4]


# --- schedule ---

def test_cosine_schedule_warmup_then_half_cosine():
    lr, min_lr, warm, epochs = 1.0, 0.1, 4, 20
    assert cosine_lr(0, lr, min_lr, warm, epochs) == 0
    assert cosine_lr(2, lr, min_lr, warm, epochs) == pytest.approx(0.5)            # linear warmup
    assert cosine_lr(warm, lr, min_lr, warm, epochs) == pytest.approx(lr)
    assert cosine_lr(12, lr, min_lr, warm, epochs) == pytest.approx(0.55)          # half way down
    assert cosine_lr(epochs, lr, min_lr, warm, epochs) == pytest.approx(min_lr)
    values = [cosine_lr(e / 10, lr, min_lr, warm, epochs) for e in range(40, 200)]
    assert all(a >= b for a, b in zip(values, values[1:]))                         # monotone after warmup


def test_set_lr_respects_lr_scale():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.25}], lr=1)
    set_lr(opt, 0.8)
    assert [g["lr"] for g in opt.param_groups] == [0.8, 0.2]


# --- the built-in data set ---

def test_builtin_is_deterministic_labelled_and_any_size():
    d = BuiltinShapes(length=30, size=48)
    img, label = d[13]
    assert img.size == (48, 48) and img.mode == "RGB" and label == 3
    assert np.array_equal(np.asarray(d[13][0]), np.asarray(BuiltinShapes(30, 48)[13][0]))
    assert not np.array_equal(np.asarray(d[13][0]), np.asarray(d[23][0]))          # same class, other draw
    assert sorted({d[i][1] for i in range(30)}) == list(range(10))
    assert BuiltinShapes(4, 224)[0][0].size == (224, 224)
    train, val = load_images(None, "train", 32, 8), load_images(None, "val", 32, 8)
    assert not np.array_equal(np.asarray(train[0][0]), np.asarray(val[0][0]))      # disjoint splits


def test_builtin_classes_are_told_apart_by_their_spectra():
    """The classes differ in structure, not only in label: a nearest-centroid classifier on each
    image's radial power spectrum, fitted on 200 images, labels 200 others at twice chance or better."""
    d = BuiltinShapes(400, 32)
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(32), np.fft.fftfreq(32), indexing="ij"))
    rings = np.digitize(f, np.linspace(0, 0.71, 9))

    def spectrum(img):
        g = np.asarray(img, np.float32).mean(2)
        power = np.abs(np.fft.fft2(g - g.mean()))
        return np.log(np.array([power[rings == b].mean() for b in range(1, 9)]) + 1e-3)

    x, y = np.stack([spectrum(d[i][0]) for i in range(400)]), np.arange(400) % 10
    centroids = np.stack([x[:200][y[:200] == c].mean(0) for c in range(10)])
    predicted = ((x[200:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == y[200:]).mean() >= 0.2                                     # chance: 0.1


# --- folder data sets ---

def test_folder_layouts(tmp_path):
    for c in ("cat", "dog"):
        write_images(tmp_path / "imnet" / "train" / c, 3)
    (tmp_path / "imnet" / "val").mkdir()
    d = load_images(str(tmp_path / "imnet"), "train")                  # DIR/train/<class>
    assert len(d) == 6 and d.classes == ["cat", "dog"] and d[4][1] == 1
    d = ImageFiles(str(tmp_path / "imnet" / "train"))                  # DIR/<class>
    assert len(d) == 6
    write_images(tmp_path / "flat", 5, fmt="jpg")
    d = load_images(str(tmp_path / "flat"))                            # flat folder
    assert len(d) == 5 and d[0][1] == 0 and d[0][0].mode == "RGB"


def test_missing_and_empty_folders_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match="nope"):
        load_images(str(tmp_path / "nope"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="empty.*no images"):
        load_images(str(tmp_path / "empty"))


def test_any_pil_mode_becomes_rgb(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.dstack([rgb, np.full((8, 8), 128, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(tmp_path / "grey16.png")   # 16-bit PNG
    Image.fromarray(rgb[..., 1].astype(np.uint16)).save(tmp_path / "dark16.png")   # 16-bit, all below 256
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.gif")
    Image.fromarray(rgb[..., 2].astype(np.float32) / 255).save(tmp_path / "float.tiff")      # mode F in [0, 1]
    d = ImageFiles(str(tmp_path))
    assert len(d) == 7
    for i in range(7):
        img, _ = d[i]
        assert img.mode == "RGB" and img.size == (8, 8), d.samples[i]
    by_name = {os.path.basename(p): d[i][0] for i, (p, _) in enumerate(d.samples)}
    assert np.array_equal(np.asarray(by_name["grey.png"])[..., 1], rgb[..., 0])
    assert np.array_equal(np.asarray(by_name["grey16.png"])[..., 0], rgb[..., 0])    # rescaled, not clipped
    assert np.asarray(by_name["dark16.png"]).max() == 0                           # near black, as in 16 bits
    assert np.abs(np.asarray(by_name["float.tiff"])[..., 0].astype(int) - rgb[..., 2]).max() <= 1
    assert np.array_equal(np.asarray(by_name["rgba.png"]), rgb)


def test_corrupt_and_truncated_images_are_skipped_with_a_warning(tmp_path):
    paths = write_images(tmp_path, 4, size=64)
    (tmp_path / "img001.png").write_bytes(b"not an image at all")
    data = open(paths[2], "rb").read()
    (tmp_path / "img002.png").write_bytes(data[: len(data) // 2])
    d = ImageFiles(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [d[i] for i in range(4)]
    messages = " ".join(str(w.message) for w in caught)
    assert "img001.png" in messages and "img002.png" in messages
    assert all(img.size == (64, 64) for img, _ in got)
    assert np.array_equal(np.asarray(got[1][0]), np.asarray(Image.open(paths[3])))  # next readable file


# --- the seeded pre-training loader ---

def _batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(x.clone(), n.clone()) for x, n in loader]


def test_loader_is_a_function_of_seed_and_epoch_not_workers():
    images = BuiltinShapes(16, 32)
    a = pretrain_loader(images, 32, 4, mask_units=64, seed=1, num_workers=0)
    b = pretrain_loader(images, 32, 4, mask_units=64, seed=1, num_workers=2)
    ea, eb = _batches(a, 3), _batches(b, 3)
    assert len(ea) == 4 and ea[0][0].shape == (4, 3, 32, 32) and ea[0][1].shape == (4, 64)
    for (xa, na), (xb, nb) in zip(ea, eb):
        assert torch.equal(xa, xb) and torch.equal(na, nb)
    assert not torch.equal(_batches(a, 4)[0][0], ea[0][0])                         # a new epoch, new draws
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    _batches(a, 3)
    assert torch.equal(torch.rand(1), before)                                      # caller's RNG untouched


def test_two_ranks_split_the_same_global_batches():
    images = BuiltinShapes(16, 32)
    one = _batches(pretrain_loader(images, 32, 4, 64, seed=0, num_workers=0), 1)
    ranks = [_batches(pretrain_loader(images, 32, 2, 64, seed=0, rank=r, world_size=2, num_workers=0), 1)
             for r in (0, 1)]
    as_set = lambda x, n: sorted(zip(x.flatten(1).sum(1).tolist(), n.sum(1).tolist()))  # order-free
    for k, (x, noise) in enumerate(one):
        global_x = torch.cat([ranks[0][k][0], ranks[1][k][0]])
        global_noise = torch.cat([ranks[0][k][1], ranks[1][k][1]])
        assert np.allclose(as_set(global_x, global_noise), as_set(x, noise), atol=1e-4)  # images and masks


def test_skip_batches_resumes_mid_epoch():
    loader = pretrain_loader(BuiltinShapes(16, 32), 32, 4, 64, seed=0, num_workers=0)
    full = _batches(loader, 2)
    loader.sampler.skip_batches = 3
    rest = _batches(loader, 2)
    assert len(rest) == 1 and torch.equal(rest[0][0], full[3][0]) and torch.equal(rest[0][1], full[3][1])
    loader.sampler.skip_batches = 9                                                 # past the end: empty
    assert len(loader.sampler) == 0 and _batches(loader, 2) == []


def test_batch_larger_than_data_is_an_error():
    with pytest.raises(ValueError, match="--batch_size 32"):
        pretrain_loader(BuiltinShapes(16, 32), 32, 32, 64)


def test_the_folder_walk_visits_each_real_folder_once_through_a_loop_and_follows_a_mounted_class(tmp_path):
    """train/cat/up -> .. is a loop (os.walk with followlinks never notices); train/bird links to a folder elsewhere,
    as a data set mounted from another disk."""
    write_images(tmp_path / "train" / "cat", 10)
    write_images(tmp_path / "train" / "dog", 10, seed=1)
    write_images(tmp_path / "disk" / "birds", 5, seed=2)
    os.symlink("..", tmp_path / "train" / "cat" / "up")
    os.symlink(tmp_path / "disk" / "birds", tmp_path / "train" / "bird")
    ds = ImageFiles(str(tmp_path / "train"))
    assert ds.classes == ["bird", "cat", "dog"] and len(ds) == 25
    assert len({os.path.realpath(p) for p, _ in ds.samples}) == 25
    for path, label in ds.samples:                                      # each image under its own class
        assert os.path.relpath(path, tmp_path / "train").split(os.sep)[0] == ds.classes[label]
