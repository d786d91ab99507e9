"""README.md and docs/*.md stay true to the code: every `--flag` shown with a file's command is in
that file's parser, every other `--flag` in some parser (or torchrun's), and every model name
shown is in the MODELS of the file its prefix names."""
import contextlib
import glob
import importlib
import io
import os
import re
import sys

import pytest

from helpers import ROOT

SCRIPTS = ["mae.py", "simmim.py", "convmae.py", "fastconvmae.py", "fastconvmae_mor.py", "convnextv2_fcmae.py",
           "finetune.py", "tests/bench.py", "tests/pretrain_vs_scratch.py"]
TORCHRUN = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port", "--standalone"}
OTHER_TOOLS = {"--no-deps", "--system-site-packages"}      # pip's and venv's, in docs/FIDELITY.md
PREFIXES = {"fastconvmae": "fastconvmae", "convnextv2_fcmae": "convnextv2_fcmae", "convmae": "convmae",
            "simmim": "simmim", "mae": "mae"}            # model-name prefix -> module; longest first
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def parser_flags(script):
    """The flags `script --help` lists, read in this process (argparse prints the help and exits 0)."""
    module = importlib.import_module(os.path.basename(script)[:-3])
    out, argv = io.StringIO(), sys.argv
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            module.get_args()
    finally:
        sys.argv = argv
    return set(re.findall(r"--[a-z][a-z0-9_-]*", out.getvalue()))


@pytest.fixture(scope="module")
def flags():
    return {s: parser_flags(s) for s in SCRIPTS}


def code_spans(text):
    """Command-like text: fenced and indented code blocks (backslash continuations joined), inline code."""
    text = re.sub(r"```.*?```", lambda m: m.group(0).replace("\\\n", " "), text, flags=re.S)
    text = re.sub(r"\\\n\s+", " ", text)
    spans = re.findall(r"```.*?```", text, flags=re.S)
    spans += [line for line in text.splitlines() if line.startswith("    ")]
    spans += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return spans


def shown_commands(text):
    """(script, [flags]) for every `... script.py --flag ...` shown, up to a comment or cell end."""
    for span in code_spans(text):
        for line in span.splitlines():
            for m in re.finditer(r"((?:tests/)?[a-z0-9_]+\.py)((?:\s+[^\s#|]+)*)", line):
                yield m.group(1), re.findall(r"(?<!\S)(--[a-z][a-z0-9_-]*)", m.group(2))


@pytest.mark.parametrize("doc", DOCS, ids=[os.path.relpath(d, ROOT) for d in DOCS])
def test_every_flag_shown_exists(doc, flags):
    text = open(doc).read()
    bad = [f"{script} {flag}" for script, shown in shown_commands(text) if script in flags
           for flag in shown if flag not in flags[script]]
    every = set().union(*flags.values()) | TORCHRUN | OTHER_TOOLS
    bad += [flag for span in code_spans(text) for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", span)
            if flag not in every]
    assert not bad, f"{os.path.basename(doc)} shows flags the code does not have: {sorted(set(bad))}"


@pytest.mark.parametrize("doc", DOCS, ids=[os.path.relpath(d, ROOT) for d in DOCS])
def test_every_model_name_shown_exists(doc):
    text = open(doc).read()
    pattern = r"(?<![\w/.])((?:%s)_[a-z0-9_]*[a-z0-9])(?![\w.{])" % "|".join(PREFIXES)
    bad = []
    for name in set(re.findall(pattern, text)):
        prefix = next(p for p in PREFIXES if name.startswith(p + "_"))
        if name not in importlib.import_module(PREFIXES[prefix]).MODELS:
            bad.append(name)
    assert not bad, f"{os.path.basename(doc)} names models that do not exist: {sorted(bad)}"


def test_the_checks_catch_a_wrong_flag_and_a_wrong_model(flags):
    """The two checks above, on a made-up text: a flag of another file and an unknown model both show."""
    text = "    python mae.py --model mae_vit_giant --teacher_dino x.pt --epochs 2\n"
    assert ("mae.py", ["--model", "--teacher_dino", "--epochs"]) in list(shown_commands(text))
    assert "--teacher_dino" not in flags["mae.py"] and "--epochs" in flags["mae.py"]
    assert "mae_vit_giant" not in importlib.import_module("mae").MODELS
