"""Why fine-tuning from a short FCMAE pre-training trails scratch (docs/STUDY.md). For the classifier finetune.py
builds for convnextv2_fcmae_test, started from FCMAE's own init (std 1), from each checkpoint given, and from the
scratch init (std .02), it prints the scale of the encoder's weights, of each block's residual branch against the
block's input, and of the gradients of one cross-entropy step, on 128 built-in validation images (64 px).

    python tests/fcmae_scale.py output/pretrain_vs_scratch/convnextv2_fcmae_test/seed*/pretrain/checkpoint-last.pth
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import finetune  # noqa: E402
from common import load_images  # noqa: E402

NAME, SIZE, LAYERS = "convnextv2_fcmae_test", 64, ("dwconv", "pwconv1", "pwconv2")


def rms(t):
    return t.pow(2).mean().sqrt().item()


def scales(model, imgs, labels):
    """Weight RMS per layer kind (mean over blocks), branch / input RMS per block, |grad| / |w| per layer kind."""
    model.eval()                                                        # no drop path: the branches as they are
    model.zero_grad()
    blocks = [blk for stage in model.stages for blk in stage]
    ratios = []
    hooks = [blk.register_forward_hook(lambda m, i, o: ratios.append(rms(o - i[0]) / rms(i[0]))) for blk in blocks]
    F.cross_entropy(model(imgs), labels).backward()
    for h in hooks:
        h.remove()
    mean = lambda f: {k: sum(f(getattr(b, k).weight) for b in blocks) / len(blocks) for k in LAYERS}
    return mean(rms), ratios, mean(lambda w: (w.grad.norm() / w.norm()).item())


def main(paths):
    torch.manual_seed(0)
    val, transform = load_images(None, "val", SIZE, 1024), finetune.eval_transform(SIZE)
    images, labels = zip(*(val[i] for i in range(128)))                # each image drawn once
    imgs, labels = torch.stack([transform(img) for img in images]), torch.tensor(labels)
    print("| start | weight RMS: dwconv / pwconv1 / pwconv2 | branch / input RMS, blocks 1-4 | "
          "grad / weight: dwconv / pwconv1 / pwconv2 |\n|---|---|---|---|")
    for start in ["FCMAE init", *paths, "scratch init"]:
        model = finetune.build_classifier(NAME, 10, SIZE)               # as built: FCMAE's init
        if start == "scratch init":
            model.init_for_scratch()
        elif start != "FCMAE init":
            finetune.load_weights(model, finetune.read_checkpoint(start, "checkpoint"), start)   # one-line errors
        w, ratios, g = scales(model, imgs, labels)
        print(f"| {start} | {' / '.join(f'{w[k]:.3f}' for k in LAYERS)} | {' '.join(f'{r:.1f}' for r in ratios)} | "
              f"{' / '.join(f'{g[k]:.1e}' for k in LAYERS)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
