#!/usr/bin/env python3
"""Time the reference implementation (transformers RecurrentGemmaForCausalLM, eager, f32) on a
checkpoint folder: prefill of a random prompt, then greedy decode with its cache.

    bench_reference.py MODEL_DIR --threads N --prefill 512 --decode 64 [--device cuda --dtype bf16]

Prints one JSON line: prefill and decode tokens/s, and peak RSS. Run by scripts/bench_cpu.sh;
never in CI.
"""

import argparse
import json
import resource
import time

import torch
from transformers import DynamicCache, RecurrentGemmaForCausalLM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = torch.float32 if a.dtype == "f32" else torch.bfloat16
    dev = torch.device(a.device)
    model = RecurrentGemmaForCausalLM.from_pretrained(a.model, torch_dtype=dtype).to(dev).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, a.prefill), generator=g)
    prompt[0, 0] = model.config.bos_token_id
    prompt = prompt.to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        # Prefill: one pass over the prompt (logits of every position, as our prefill computes).
        if dev.type == "cuda":  # one warm-up pass: kernels load and autotune on first use
            model(prompt[:, :16], use_cache=False)
        sync()
        start = time.perf_counter()
        model(prompt, use_cache=False)
        sync()
        prefill_s = time.perf_counter() - start

        # Decode: a short prompt, then single-token steps through the reference's cache.
        cache = DynamicCache(config=model.config)
        model._setup_cache(model.config, 1, prompt.device, dtype)
        out = model(prompt[:, :2], position_ids=torch.arange(2, device=dev)[None], use_cache=True, cache=cache)
        nxt = out.logits[0, -1].argmax()
        sync()
        start = time.perf_counter()
        for pos in range(2, 2 + a.decode):
            out = model(nxt.view(1, 1), position_ids=torch.tensor([[pos]], device=dev), use_cache=True, cache=cache)
            nxt = out.logits[0, -1].argmax()
        sync()
        decode_s = time.perf_counter() - start

    print(json.dumps({
        "prefill_tokens_per_s": a.prefill / prefill_s,
        "decode_tokens_per_s": a.decode / decode_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else 0,
    }))


if __name__ == "__main__":
    main()
