"""Make tests/golden/teachers_tiny.pt: frozen-teacher reference outputs from the official DINO and CLIP code.

Builds a tiny DINO ViT from a facebookresearch/dino checkout (``vision_transformer.VisionTransformer``)
and a tiny ViT CLIP from an openai/CLIP checkout (``clip/model.py``'s ``CLIP``), gives every parameter a
random non-trivial value (no zero biases, no identity LayerNorms), runs both on two fixed 32 px images
and saves the state_dicts, the images and the patch tokens a teacher must produce. Our re-implementation
of the frozen teacher (fastconvmae.py) loads these state_dicts and is compared against the tokens.

* DINO tokens: ``get_intermediate_layers(x, n=1)[0][:, 1:]`` (last block, final norm, cls dropped),
  x = (pixels - IMAGENET_MEAN) / IMAGENET_STD, shape [2, 16, 128].
* CLIP tokens: ``model.visual`` run step by step as its ``VisionTransformer.forward`` does up to the
  transformer, then ``ln_post(x[:, 1:]) @ proj``, x = (pixels - CLIP_MEAN) / CLIP_STD, shape [2, 16, 64].
  ``cls_embed`` is the official ``encode_image(x)`` [2, 64], checked here against ``ln_post(x[:, 0]) @ proj``.
* pixels: uint8 [2, 3, 32, 32]; both sides use pixels = uint8 / 255.
* CLIP is kept float32 (``convert_weights`` is not called).

Size: the configs hold ~860k parameters (3.4 MB as plain float32), far over this fixture's 300 KB
budget (300 KiB). So every parameter is a contiguous window of one of two shared random vectors (``BASE``,
std 0.1, for weights/biases/embeddings; ``LN_BASE``, 1 + 0.1 noise, for LayerNorm weights and
CLIP's logit_scale), at a random offset per tensor, and torch.save stores each shared vector once.
The saved tensors are ordinary contiguous float32 tensors, but tensors of one file share memory:
``load_state_dict`` copies them and is unaffected; clone one before changing it in place.

Shims: none needed by the model files themselves. ``vision_transformer.py`` imports dino's
``utils.py`` (needs PIL, present); CLIP's ``clip/__init__.py`` (which imports ftfy/regex and the
tokenizer) is skipped by putting ``<clip_path>/clip`` on sys.path and importing ``model`` directly.
``tests/official.py``'s ``import_official`` is used for the imports; its torch._six / numpy-alias
stand-ins are installed but neither repository uses them.

    git clone https://github.com/facebookresearch/dino path/to/dino
    git clone https://github.com/openai/CLIP path/to/CLIP
    python tests/golden/make_teacher_golden.py path/to/dino path/to/CLIP

CI does not run this script; it only reads the committed fixture.
"""
import argparse
import os
import sys
from functools import partial

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from official import git_head, import_official  # noqa: E402  (tests/official.py)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "teachers_tiny.pt")
MAX_BYTES = 300 * 1024
BATCH, IMG = 2, 32

DINO_CONFIG = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2)
DINO_EPS = 1e-6
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

CLIP_CONFIG = dict(embed_dim=64, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
                   context_length=8, vocab_size=64, transformer_width=32, transformer_heads=2, transformer_layers=1)
CLIP_EPS = 1e-5                    # clip/model.py's LayerNorm keeps torch's default
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

WEIGHT_STD = 0.1                   # large enough that attention is far from uniform
SLACK = 64                         # extra BASE length: room for distinct offsets of the largest tensors


def normalize(pixels, mean, std):
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def randomize(model, base, ln_base):
    """Set every parameter to a random window of `base` (LayerNorm weights, logit_scale: `ln_base`) and
    return the state_dict made of those windows (views, so torch.save stores `base` once)."""
    ln_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    assert not list(model.buffers()), "the official models hold no buffers"
    used = set()
    state_dict = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            src, tag = (ln_base, "ln") if name in ln_weights or name == "logit_scale" else (base, "base")
            n = p.numel()
            while True:                # no two same-sized tensors get the same window
                off = int(torch.randint(0, src.numel() - n + 1, ()))
                if (tag, off, n) not in used:
                    used.add((tag, off, n))
                    break
            window = src[off:off + n].view(p.shape)
            p.copy_(window)
            state_dict[name] = window
    model_sd = model.state_dict()
    assert list(state_dict) == list(model_sd)
    assert all(torch.equal(state_dict[k], model_sd[k]) for k in model_sd)
    return state_dict


def make_dino(checkout, pixels, base, ln_base):
    vit = import_official(checkout, "vision_transformer")
    model = vit.VisionTransformer(img_size=[DINO_CONFIG["img_size"]], patch_size=DINO_CONFIG["patch_size"],
                                  embed_dim=DINO_CONFIG["embed_dim"], depth=DINO_CONFIG["depth"],
                                  num_heads=DINO_CONFIG["num_heads"], mlp_ratio=4, qkv_bias=True,
                                  norm_layer=partial(nn.LayerNorm, eps=DINO_EPS))
    state_dict = randomize(model, base, ln_base)
    model.eval()
    x = normalize(pixels, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        tokens = model.get_intermediate_layers(x, n=1)[0][:, 1:].clone()
    return dict(state_dict=state_dict, tokens=tokens, config=dict(DINO_CONFIG), norm_eps=DINO_EPS,
                mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))


def make_clip(checkout, pixels, base, ln_base):
    clip_model = import_official(os.path.join(checkout, "clip"), "model")   # skips clip/__init__.py
    model = clip_model.CLIP(**CLIP_CONFIG).float()
    state_dict = randomize(model, base, ln_base)
    model.eval()
    x = normalize(pixels, CLIP_MEAN, CLIP_STD)
    v = model.visual
    with torch.no_grad():
        # clip/model.py VisionTransformer.forward, step by step, keeping every token
        h = v.conv1(x)
        h = h.reshape(h.shape[0], h.shape[1], -1)
        h = h.permute(0, 2, 1)
        h = torch.cat([v.class_embedding.to(h.dtype) + torch.zeros(h.shape[0], 1, h.shape[-1], dtype=h.dtype), h],
                      dim=1)
        h = h + v.positional_embedding.to(h.dtype)
        h = v.ln_pre(h)
        h = h.permute(1, 0, 2)
        h = v.transformer(h)
        h = h.permute(1, 0, 2)
        tokens = (v.ln_post(h[:, 1:, :]) @ v.proj).clone()
        cls_steps = v.ln_post(h[:, 0, :]) @ v.proj
        cls_embed = model.encode_image(x).clone()
    assert cls_embed.shape == (BATCH, CLIP_CONFIG["embed_dim"])
    torch.testing.assert_close(cls_steps, cls_embed, rtol=0, atol=1e-5)
    return dict(state_dict=state_dict, tokens=tokens, cls_embed=cls_embed, config=dict(CLIP_CONFIG),
                vision_heads=v.transformer.resblocks[0].attn.num_heads, norm_eps=CLIP_EPS,
                mean=list(CLIP_MEAN), std=list(CLIP_STD))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dino", help="path to a facebookresearch/dino checkout")
    parser.add_argument("clip", help="path to an openai/CLIP checkout")
    args = parser.parse_args()

    torch.manual_seed(0)
    pixels_uint8 = torch.randint(0, 256, (BATCH, 3, IMG, IMG), dtype=torch.uint8)
    pixels = pixels_uint8 / 255
    w = CLIP_CONFIG["vision_width"]
    base = torch.randn(max(w * 4 * w, w * 3 * w) + SLACK) * WEIGHT_STD       # largest tensor: mlp fc1/fc2
    ln_base = 1 + 0.1 * torch.randn(2 * w)

    fixture = dict(pixels=pixels_uint8,
                   dino=make_dino(args.dino, pixels, base, ln_base),
                   clip=make_clip(args.clip, pixels, base, ln_base),
                   made_with=dict(dino=git_head(args.dino), clip=git_head(args.clip), torch=str(torch.__version__)))
    torch.save(fixture, OUT)
    torch.load(OUT, weights_only=True)                                  # tests load it this way
    size = os.path.getsize(OUT)
    print(f"wrote {OUT} ({size} bytes, {size / 1024:.1f} KiB)")
    for name in ("dino", "clip"):
        t = fixture[name]["tokens"]
        print(f"  {name}: tokens {tuple(t.shape)}, std {t.std().item():.4f}, {len(fixture[name]['state_dict'])} params")
    if size >= MAX_BYTES:
        sys.exit(f"fixture is {size} bytes, over the {MAX_BYTES}-byte budget")


if __name__ == "__main__":
    main()
