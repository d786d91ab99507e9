"""What does pre-training buy? For each tiny model and each seed: pre-train on the built-in data set, then compare
the pre-trained encoder with a randomly initialised one three ways, each at the same budget: the k-NN probe
(finetune.py --knn), the linear probe (--linprobe) and fine-tuning (pre-trained vs from scratch). Prints a markdown
table (docs/STUDY.md). Not collected by pytest.

    python tests/pretrain_vs_scratch.py                                   # every tiny model, seeds 0 and 1
    python tests/pretrain_vs_scratch.py --models mae_vit_tiny --seeds 0   # one model, one seed
    python tests/pretrain_vs_scratch.py --models mae_vit_tiny --pretrain_epochs 1 --probe_epochs 1 \\
        --finetune_epochs 1 --images 256                                  # a smoke run

The small-image preset (32 px; 64 px for convnextv2_fcmae_test), named here and nowhere else:
- pre-training: the method file's recipe but for the schedule (--pretrain_epochs, 1 warmup epoch, SimMIM's cosine)
  and the learning rate: the recipes' blr x batch / 256 rule gives 3.75e-5 at batch 64, which in a few thousand steps
  leaves an encoder where it started, so every method gets --pretrain_lr (default 1.5e-3; the recipes reach 4e-4
  (SimMIM) to 2.4e-3 (MAE, FCMAE) at their own batches); FCMAE at weight decay 1.0 (--fcmae_weight_decay), not
  0.05: its encoder starts at std 1 (the official init), which decay shrinks by exp(-weight decay x the sum of the
  lrs): e^-15 over the official 800 epochs, x 0.91 over 40 epochs here at 0.05, x 0.15 at 1.0; a classifier built
  on weights still near std 1 fine-tunes slowly (docs/STUDY.md);
- linear probe: MAE's protocol (LARS, finetune.py's lr rule at this batch), --probe_epochs;
- fine-tuning: the method's recipe with crop + flip only (RandAugment, MixUp, CutMix and random erasing off: at this
  budget they keep every model at chance), --finetune_lr and --finetune_epochs, 1 warmup epoch.

A name with a suffix (VARIANTS) pre-trains with another script: `+mor` is FastConvMAE's Mixture of Reconstructors
with its EMA teacher (fastconvmae_mor.py); the classifier is the plain name's. Each command is printed; the runs
write under --out (default output/pretrain_vs_scratch/<model>/seed<k>/<run>); a later call reuses every run that
finished with the same command (its study.json), so a study stopped partway goes on where it stopped, and a table
can gather models and seeds run one at a time.
"""
import argparse
import json
import os
import shutil
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=TINY, choices=TINY + list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--images", type=int, default=4096, help="built-in training images (validation: a quarter)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--pretrain_epochs", type=int, default=40)
    p.add_argument("--pretrain_lr", type=float, default=1.5e-3)
    p.add_argument("--fcmae_weight_decay", type=float, default=1.0, help="FCMAE's pre-training (its recipe: 0.05)")
    p.add_argument("--probe_epochs", type=int, default=20)
    p.add_argument("--finetune_epochs", type=int, default=15)
    p.add_argument("--finetune_lr", type=float, default=1e-3, help="the same for both classifiers")
    p.add_argument("--out", default=os.path.join("output", "pretrain_vs_scratch"))
    return p.parse_args()


def run(out, script, *args, again=False):
    """Run a script to the end, writing under out; returns its wall time in seconds and whether it ran. A run that
    finished before with the same command (out/study.json) is not repeated, unless `again`."""
    cmd, done = [script, *map(str, args), "--output_dir", out], os.path.join(out, "study.json")
    if not again and os.path.exists(done):
        with open(done) as f:
            saved = json.load(f)
        if saved["command"] == cmd:
            print("finished before:", " ".join(cmd), flush=True)
            return saved["seconds"], False
    print("$", " ".join(cmd), flush=True)
    shutil.rmtree(out, ignore_errors=True)                              # no log lines of an earlier run
    t0 = time.time()
    r = subprocess.run([sys.executable, os.path.join(ROOT, script), *cmd[1:]], capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        sys.exit(f"failed:\n{r.stderr[-3000:]}")
    seconds = time.time() - t0
    with open(done, "w") as f:
        json.dump({"command": cmd, "seconds": seconds}, f)
    return seconds, True


def evals(out, key="acc1"):
    """The accuracies a finetune.py run logged, in order (one per epoch; one for --knn)."""
    with open(os.path.join(out, "log.jsonl")) as f:
        return [e[key] for e in map(json.loads, f) if key in e]


def study(args, row, seed):
    """One model, one seed: {(kind, start): accuracies} and the seconds each part took."""
    out, name = os.path.join(args.out, row, f"seed{seed}"), row.split("+")[0]
    method = next(m for m in ("fastconvmae", "convmae", "mae", "simmim", "convnextv2") if name.startswith(m))
    script = VARIANTS.get(row, SCRIPT[method])
    common = ["--model", name, "--builtin_images", args.images, "--batch_size", args.batch_size, "--num_workers", 2,
              "--seed", seed]
    preset = ["--schedule", "cosine"] if script == "simmim.py" else []
    preset += ["--weight_decay", args.fcmae_weight_decay] if method == "convnextv2" else []
    seconds, pretrained = {}, os.path.join(out, "pretrain")
    seconds["pre-train"], new = run(pretrained, script, *common, "--epochs", args.pretrain_epochs, "--warmup_epochs", 1,
                                    *preset, "--lr", args.pretrain_lr)
    weights = {"pre-trained": ["--finetune", os.path.join(pretrained, "checkpoint-last.pth")], "random": []}
    tune = ["--epochs", args.finetune_epochs, "--warmup_epochs", 1, "--lr", args.finetune_lr, "--mixup", 0,
            "--cutmix", 0, "--reprob", 0, "--randaug", 0]
    result = {}
    for start, flags in weights.items():
        for kind, extra in (("knn", ["--knn"]), ("probe", ["--linprobe", "--epochs", args.probe_epochs,
                                                           "--warmup_epochs", 1]), ("finetune", tune)):
            run_out = os.path.join(out, f"{kind}-{start}")
            seconds[f"{kind} {start}"], _ = run(run_out, "finetune.py", *common, *flags, *extra,
                                                again=new and start == "pre-trained")   # a new encoder
            result[kind, start] = evals(run_out, "knn_acc1" if kind == "knn" else "acc1")
    return result, seconds


def spread(values):
    return f"{sum(values) / len(values):.1f} ({min(values):.1f}–{max(values):.1f})" if len(values) > 1 \
        else f"{values[0]:.1f}"


def main(args):
    rows = []
    for row in args.models:
        runs = [study(args, row, seed) for seed in args.seeds]
        cell = {}
        for kind, start in runs[0][0]:
            curves = [r[kind, start] for r, _ in runs]
            cell[kind, start] = spread([c[-1] for c in curves])
            if kind == "finetune":
                cell["best", start] = spread([max(c) for c in curves])
                cell["first", start] = " / ".join(spread([c[e] for c in curves]) for e in range(min(3, len(curves[0]))))
        minutes = sum(sum(s.values()) for _, s in runs) / 60
        rows.append((row, cell, minutes))
    print(f"\n{args.images} built-in images; pre-training {args.pretrain_epochs} epochs at lr {args.pretrain_lr}; "
          f"linear probe {args.probe_epochs} epochs; fine-tuning {args.finetune_epochs} epochs at lr "
          f"{args.finetune_lr}, crop + flip only; batch {args.batch_size}; top-1 % on {max(args.images // 4, 10)} "
          f"validation images, mean (min–max) over seeds {' '.join(map(str, args.seeds))}\n")
    print("| model | k-NN pre-trained | k-NN random | probe pre-trained | probe random | fine-tune pre-trained: "
          "final / best / epochs 1-3 | scratch: final / best / epochs 1-3 | minutes |")
    print("|---|---|---|---|---|---|---|---|")
    for row, c, minutes in rows:
        tuned = {s: f"{c['finetune', s]} / {c['best', s]} / {c['first', s]}" for s in ("pre-trained", "random")}
        print(f"| {row} | {c['knn', 'pre-trained']} | {c['knn', 'random']} | {c['probe', 'pre-trained']} | "
              f"{c['probe', 'random']} | {tuned['pre-trained']} | {tuned['random']} | {minutes:.0f} |")


if __name__ == "__main__":
    main(get_args())
