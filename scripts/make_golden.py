#!/usr/bin/env python3
"""Make a golden case: a small random RecurrentGemma checkpoint and the reference answers.

Run by hand, never in CI (needs torch + transformers from PyPI, ~3 GB):

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers safetensors numpy
    /tmp/ref/bin/python scripts/make_golden.py tests/golden/my-case --seed 7 --dtype bf16 --shards 2

The folder gets a checkpoint laid out like a published one (config.json, model.safetensors or
shards with model.safetensors.index.json, optionally tokenizer.json copied from --tokenizer-from)
and, from `RecurrentGemmaForCausalLM` run in float64 on exactly the stored weights:

  expected.safetensors
    input_ids      i64 [T]     the prompt, BOS first
    logits         f32 [T, V]  one pass over all T tokens
    decode_logits  f32 [S, V]  the last S positions: prefill(T-S) then S single-token steps
    generated_ids  i64 [G]     plain greedy continuation (argmax each step, EOS not special)
    min_margin     f32 [1]     smallest top-1/top-2 gap on that greedy path
  case.json        T, S, G, the prompt (with a tokenizer), and how far the reference's cached
                   decode path is from its full pass.
"""

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import DynamicCache, RecurrentGemmaConfig, RecurrentGemmaForCausalLM


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["f32", "bf16", "f16"], default="f32")
    p.add_argument("--shards", type=int, default=1, help="number of safetensors files")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--block-types", default="recurrent,recurrent,attention")
    p.add_argument("--intermediate", type=int, default=192)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--conv-width", type=int, default=4)
    p.add_argument("--tokens", type=int, default=24, help="T: prompt length (ignored with --prompt)")
    p.add_argument("--decode-steps", type=int, default=10, help="S")
    p.add_argument("--generate", type=int, default=16, help="G")
    p.add_argument("--tokenizer-from", type=Path, help="folder whose tokenizer.json to copy")
    p.add_argument("--prompt", help="prompt text (needs --tokenizer-from)")
    p.add_argument("--legacy-config", action="store_true",
                   help="write rope_theta/partial_rotary_factor at top level, as published checkpoints do")
    return p.parse_args()


def make_config(a):
    return RecurrentGemmaConfig(
        hidden_size=a.hidden,
        lru_width=a.hidden,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        num_hidden_layers=a.layers,
        block_types=a.block_types.split(","),
        intermediate_size=a.intermediate,
        vocab_size=a.vocab,
        attention_window_size=a.window,
        conv1d_width=a.conv_width,
        logits_soft_cap=30.0,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def randomize(model, seed):
    """Random weights with non-zero biases and norm weights, so every term is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
            elif name.endswith("recurrent_param"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in))


def save_checkpoint(model, config, a):
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    state = {k: v.to(torch_dtype).contiguous() for k, v in model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to the embedding: not stored
    names = sorted(state)
    if a.shards <= 1:
        save_file(state, a.out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        per = math.ceil(len(names) / a.shards)
        for i in range(a.shards):
            part = names[i * per:(i + 1) * per]
            file = f"model-{i + 1:05d}-of-{a.shards:05d}.safetensors"
            save_file({n: state[n] for n in part}, a.out / file, metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": weight_map}
        (a.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg = config.to_dict()
    cfg["torch_dtype"] = str(torch_dtype).replace("torch.", "")
    if a.legacy_config:
        rope = cfg.pop("rope_parameters", None) or {}
        cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        cfg["partial_rotary_factor"] = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))
    (a.out / "config.json").write_text(json.dumps(cfg, indent=2))
    # The answers are computed on exactly the stored (possibly rounded) weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in state:
                p.copy_(state[name].to(torch.float64))


def full_logits(model, ids):
    with torch.no_grad():
        return model(ids[None], use_cache=False).logits[0]


def stepwise_logits(model, ids, steps):
    """prefill(T-S) through the reference's cache, then S single-token steps."""
    t = ids.shape[0]
    rows = []
    with torch.no_grad():
        # The recurrent layers keep their state inside the modules; passing a cache object
        # keeps the model from resetting it between calls.
        cache = DynamicCache(config=model.config)
        model._setup_cache(model.config, 1, ids.device, torch.float64)
        prefix = torch.arange(t - steps)[None]
        model(ids[None, : t - steps], position_ids=prefix, use_cache=True, cache=cache)
        for p in range(t - steps, t):
            out = model(ids[None, p:p + 1], position_ids=torch.tensor([[p]]), use_cache=True, cache=cache)
            rows.append(out.logits[0, -1])
    return torch.stack(rows)


def greedy(model, ids, n):
    seq = ids.clone()
    new, margins = [], []
    for _ in range(n):
        logits = full_logits(model, seq)[-1]
        top = torch.topk(logits, 2).values
        margins.append(float(top[0] - top[1]))
        nxt = int(torch.argmax(logits))
        new.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
    return new, min(margins)


def main():
    a = parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    config = make_config(a)
    model = RecurrentGemmaForCausalLM(config).to(torch.float64).eval()
    randomize(model, a.seed)
    save_checkpoint(model, config, a)

    prompt = None
    if a.tokenizer_from:
        from transformers import AutoTokenizer
        shutil.copy(a.tokenizer_from / "tokenizer.json", a.out / "tokenizer.json")
        for extra in ["tokenizer_config.json", "special_tokens_map.json"]:
            if (a.tokenizer_from / extra).exists():
                shutil.copy(a.tokenizer_from / extra, a.out / extra)
    if a.prompt is not None:
        from tokenizers import Tokenizer
        prompt = a.prompt
        enc = Tokenizer.from_file(str(a.out / "tokenizer.json")).encode(prompt).ids
        if not enc or enc[0] != config.bos_token_id:
            enc = [config.bos_token_id] + enc
        ids = torch.tensor(enc, dtype=torch.long)
    else:
        g = torch.Generator().manual_seed(a.seed + 1)
        body = torch.randint(3, a.vocab, (a.tokens - 1,), generator=g)
        ids = torch.cat([torch.tensor([config.bos_token_id]), body])

    t = ids.shape[0]
    steps = min(a.decode_steps, t - 1)
    logits = full_logits(model, ids)
    decode = stepwise_logits(model, ids, steps)
    decode_gap = float((decode - logits[t - steps:]).abs().max())
    generated, margin = greedy(model, ids, a.generate)

    save_file({
        "input_ids": ids.to(torch.int64),
        "logits": logits.to(torch.float32).contiguous(),
        "decode_logits": decode.to(torch.float32).contiguous(),
        "generated_ids": torch.tensor(generated, dtype=torch.int64),
        "min_margin": torch.tensor([margin], dtype=torch.float32),
    }, a.out / "expected.safetensors")
    case = {
        "case": a.out.name,
        "T": t,
        "decode_steps": steps,
        "generated": a.generate,
        "weights_dtype": a.dtype,
        "hf_decode_vs_full_max_abs_diff": decode_gap,
        "greedy_min_margin": margin,
        "reference": "transformers RecurrentGemmaForCausalLM, float64",
    }
    if prompt is not None:
        case["prompt"] = prompt
    (a.out / "case.json").write_text(json.dumps(case, indent=2))
    print(json.dumps(case))


if __name__ == "__main__":
    main()
