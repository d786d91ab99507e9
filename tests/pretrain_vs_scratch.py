"""Does pre-training help? For each tiny model: pre-train briefly on the built-in data set, fine-tune
the encoder, and fine-tune the same classifier from scratch with the same budget; print a
markdown table of validation top-1 (README, "Fine-tune"). Not collected by pytest.

    python tests/pretrain_vs_scratch.py                       # all six tiny models, about 45 min on 2 CPU cores
    python tests/pretrain_vs_scratch.py --models mae_vit_tiny --pretrain_epochs 2 --finetune_epochs 1
    python tests/pretrain_vs_scratch.py --models fastconvmae_convvit_tiny fastconvmae_convvit_tiny+mor

A name with a suffix (VARIANTS) pre-trains with another script: `+mor` is FastConvMAE's Mixture of
Reconstructors with its EMA teacher (fastconvmae_mor.py); the classifier is the plain name's.

Each command it runs is printed; the runs write under --out (default output/pretrain_vs_scratch).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = {"mae": "mae.py", "convmae": "convmae.py", "fastconvmae": "fastconvmae.py", "simmim": "simmim.py",
          "convnextv2": "convnextv2_fcmae.py"}
TINY = ["mae_vit_tiny", "convmae_convvit_tiny", "fastconvmae_convvit_tiny", "simmim_vit_tiny", "simmim_swin_tiny",
        "convnextv2_fcmae_test"]
VARIANTS = {"fastconvmae_convvit_tiny+mor": "fastconvmae_mor.py"}     # the pre-training script of a variant


def get_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=TINY, choices=TINY + list(VARIANTS))
    p.add_argument("--images", type=int, default=2048, help="built-in training images (validation: a quarter)")
    p.add_argument("--pretrain_epochs", type=int, default=15)
    p.add_argument("--finetune_epochs", type=int, default=12)
    p.add_argument("--finetune_lr", type=float, default=1e-3, help="the same for both classifiers")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--out", default=os.path.join("output", "pretrain_vs_scratch"))
    return p.parse_args()


def run(script, *args):
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"failed:\n{r.stderr[-3000:]}")
    return time.time() - t0


def top1(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        evals = [json.loads(line) for line in f if '"acc1"' in line]
    return evals[-1]["acc1"]


def main(args):
    common = ["--builtin_images", args.images, "--batch_size", args.batch_size, "--num_workers", 2]
    rows = []
    for row in args.models:
        out, name = os.path.join(args.out, row), row.split("+")[0]
        method = next(m for m in ("fastconvmae", "convmae", "mae", "simmim", "convnextv2") if name.startswith(m))
        script = VARIANTS.get(row, SCRIPT[method])
        schedule = ["--schedule", "cosine"] if script == "simmim.py" else []
        t_pre = run(script, "--model", name, "--epochs", args.pretrain_epochs, "--warmup_epochs", 1, *schedule,
                    *common, "--output_dir", os.path.join(out, "pretrain"))
        tune = ["--model", name, "--epochs", args.finetune_epochs, "--warmup_epochs", 1, "--lr", args.finetune_lr,
                "--mixup", 0, "--cutmix", 0, "--reprob", 0, "--randaug", 0, *common]   # short runs: crop + flip only
        t_ft = run("finetune.py", *tune, "--finetune", os.path.join(out, "pretrain", "checkpoint-last.pth"),
                   "--output_dir", os.path.join(out, "finetune"))
        t_sc = run("finetune.py", *tune, "--output_dir", os.path.join(out, "scratch"))
        rows.append((row, top1(os.path.join(out, "finetune")), top1(os.path.join(out, "scratch")), t_pre, t_ft, t_sc))
    print(f"\n{args.images} built-in images, pre-training {args.pretrain_epochs} epochs, fine-tuning "
          f"{args.finetune_epochs} epochs at lr {args.finetune_lr} without RandAugment, MixUp, CutMix and random erasing "
          f"(batch {args.batch_size}; top-1 on "
          f"{max(args.images // 4, 10)} validation images after the last epoch)\n")
    print("| model | fine-tuned from pre-training: top-1 % | from scratch: top-1 % | pre-train s | fine-tune s | scratch s |")
    print("|---|---|---|---|---|---|")
    for name, ft, sc, a, b, c in rows:
        print(f"| {name} | {ft:.1f} | {sc:.1f} | {a:.0f} | {b:.0f} | {c:.0f} |")


if __name__ == "__main__":
    main(get_args())
