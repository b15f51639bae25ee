#!/usr/bin/env python3
"""Time the reference implementation (transformers RecurrentGemmaForCausalLM, eager, f32) on a
checkpoint folder: prefill of a random prompt, then greedy decode with its cache.

    bench_reference.py MODEL_DIR --threads N --prefill 512 --decode 64

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
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = RecurrentGemmaForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, a.prefill), generator=g)
    prompt[0, 0] = model.config.bos_token_id

    with torch.no_grad():
        # Prefill: one pass over the prompt (logits of every position, as our prefill computes).
        start = time.perf_counter()
        model(prompt, use_cache=False)
        prefill_s = time.perf_counter() - start

        # Decode: a short prompt, then single-token steps through the reference's cache.
        cache = DynamicCache(config=model.config)
        model._setup_cache(model.config, 1, prompt.device, torch.float32)
        out = model(prompt[:, :2], position_ids=torch.arange(2)[None], use_cache=True, cache=cache)
        nxt = out.logits[0, -1].argmax()
        start = time.perf_counter()
        for pos in range(2, 2 + a.decode):
            out = model(nxt.view(1, 1), position_ids=torch.tensor([[pos]]), use_cache=True, cache=cache)
            nxt = out.logits[0, -1].argmax()
        decode_s = time.perf_counter() - start

    print(json.dumps({
        "prefill_tokens_per_s": a.prefill / prefill_s,
        "decode_tokens_per_s": a.decode / decode_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


if __name__ == "__main__":
    main()
