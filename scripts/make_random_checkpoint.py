#!/usr/bin/env python3
"""Write a RecurrentGemma checkpoint with random weights, for benchmarks (run by hand).

    make_random_checkpoint.py OUT_DIR --config small|2b [--dtype f32|bf16] [--values normal|hash]

`--values hash` fills every tensor from an integer hash of the element index (exact integer
arithmetic, then one rounding), so any machine and any torch version writes the same bytes: an
executable built here can pack its weights from a checkpoint made on another machine (the GPU
check does this) and the packed-weights hash still matches.

`small`: D=1024, 12 layers, H=4, one KV head, F=3072, V=32000, W=2048.
`2b`: the published 2B shape (D=2560, 26 layers, H=10, F=7680, V=256000, W=2048).
"""

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

SHAPES = {
    "small": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=4, intermediate_size=6144,
                  vocab_size=32000),
    "2b": dict(hidden_size=2560, num_hidden_layers=26, num_attention_heads=10, intermediate_size=15360,
               vocab_size=256000),
}


def hashed(n, salt):
    """n values in [-1.7, 1.7) (unit variance) from a multiplicative hash of (index, salt)."""
    # Every product stays below 2^63: operands are reduced below 2^31 first.
    i = (torch.arange(n, dtype=torch.int64) + salt * 1_000_003) % 2147483648
    h = (i * 2654435761 + 12345) % 4294967296
    h = (h ^ (h >> 15)) % 2147483648 * 2246822519 % 4294967296
    h = h ^ (h >> 13)
    return (h.to(torch.float64) / 4294967296.0 - 0.5).to(torch.float32) * 3.4641016


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--config", choices=SHAPES, default="small")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    p.add_argument("--values", choices=["normal", "hash"], default="normal")
    a = p.parse_args()
    shape = SHAPES[a.config]
    config = RecurrentGemmaConfig(lru_width=shape["hidden_size"], num_key_value_heads=1, attention_window_size=2048,
                                  conv1d_width=4, block_types=["recurrent", "recurrent", "attention"], **shape)
    dtype = torch.float32 if a.dtype == "f32" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device("meta"):
        model = RecurrentGemmaForCausalLM(config)
    state = {}
    g = torch.Generator().manual_seed(0)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        fan_in = t.shape[-1] if t.dim() > 1 else 1
        scale = 0.1 if name.endswith(("bias", "norm.weight")) else 1.0 / math.sqrt(fan_in)
        if a.values == "hash":
            values = hashed(t.numel(), len(state)).reshape(tuple(t.shape))
        else:
            values = torch.randn(tuple(t.shape), generator=g)
        state[name] = (values * scale).to(dtype).contiguous()
    a.out.mkdir(parents=True, exist_ok=True)
    save_file(state, a.out / "model.safetensors", metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["torch_dtype"] = "float32" if a.dtype == "f32" else "bfloat16"
    (a.out / "config.json").write_text(json.dumps(cfg, indent=2))
    print(f"{a.out}: {sum(t.numel() for t in state.values()) / 1e6:.1f} M parameters ({a.dtype})")


if __name__ == "__main__":
    main()
