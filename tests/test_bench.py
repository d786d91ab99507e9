"""tests/bench.py stays runnable and counts what it claims to count."""
import subprocess
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

import mae
from bench import CPU_SDPA_FLOPS
from helpers import ROOT


def _fwd_bwd_flops(model, custom_mapping=None):
    torch.manual_seed(0)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    with FlopCounterMode(display=False, custom_mapping=custom_mapping or {}) as counter:
        model(imgs, 0.75, noise)[0].backward()
    return counter.get_total_flops()


class ExplicitAttention(mae.Attention):
    """The same attention as explicit matmuls, which FlopCounterMode counts on its own."""

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self.qkv(x).reshape(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (D // self.num_heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(N, T, D))


def test_cpu_attention_flops_equal_the_explicit_matmuls():
    model = mae.MODELS["mae_vit_tiny"]()
    ours = _fwd_bwd_flops(model, CPU_SDPA_FLOPS)
    for module in model.modules():
        if isinstance(module, mae.Attention):
            module.__class__ = ExplicitAttention
    assert ours == _fwd_bwd_flops(model)


def test_bench_prints_a_row_per_model():
    r = subprocess.run([sys.executable, "tests/bench.py", "--models", "mae_vit_tiny", "--device", "cpu",
                        "--steps", "1", "--rounds", "1", "--warmup", "1"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = [line for line in r.stdout.splitlines() if line.startswith("| mae_vit_tiny |")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[1:5] == ["cpu", "fp32", "8", "32"] and float(cells[5]) > 0 and float(cells[8]) > 0
