#!/usr/bin/env python3
"""Train the small demo Griffin model committed in examples/demo-model (run by hand, never in CI).

Corpus: the King James Version of the Bible (1611; public domain), from Debian's packages
`bible-kjv-text` (the text) and `bible-kjv` (the `bible` program that reads it):

    apt-get install bible-kjv
    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install torch transformers safetensors tokenizers
    /tmp/ref/bin/python scripts/train_demo_model.py examples/demo-model --minutes 20

Writes config.json, model.safetensors (bf16), tokenizer.json (BPE with byte fallback and
Gemma's special ids: <pad>=0, <eos>=1, <bos>=2) and training.json (loss curve, sample).
"""

import argparse
import json
import math
import re
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]


def corpus():
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    verses = [re.sub(r"^\S+\d+:\d+ ", "", line).strip() for line in text.splitlines()]
    return [v for v in verses if v]


def train_tokenizer(verses, vocab_size):
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + bytes_, show_progress=False)
    tok.train_from_iterator(verses, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return tok


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)

    verses = corpus()
    tok = train_tokenizer(verses, a.vocab)
    tok.save(str(a.out / "tokenizer.json"))
    ids = []
    for v in verses:
        ids.extend(tok.encode(v).ids)  # each verse starts with <bos>
    data = torch.tensor(ids, dtype=torch.long)
    split = int(len(data) * 0.98)
    train, valid = data[:split], data[split:]
    print(f"{len(verses)} verses, {len(data)} tokens, vocab {tok.get_vocab_size()}")

    config = RecurrentGemmaConfig(
        hidden_size=a.hidden, lru_width=a.hidden, num_attention_heads=2, num_key_value_heads=1,
        num_hidden_layers=a.layers, block_types=["recurrent", "recurrent", "attention"],
        intermediate_size=3 * a.hidden * 2, vocab_size=tok.get_vocab_size(), attention_window_size=a.seq,
        conv1d_width=4, logits_soft_cap=30.0, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    model = RecurrentGemmaForCausalLM(config)
    params = sum(p.numel() for n, p in model.named_parameters() if n != "lm_head.weight")
    print(f"{params / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)

    def batch(source):
        starts = torch.randint(0, len(source) - a.seq - 1, (a.batch,))
        x = torch.stack([source[s:s + a.seq] for s in starts])
        y = torch.stack([source[s + 1:s + a.seq + 1] for s in starts])
        return x, y

    def loss_of(x, y):
        logits = model(x, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    curve = []
    start = time.time()
    step = 0
    deadline = a.minutes * 60
    model.train()
    while time.time() - start < deadline:
        frac = (time.time() - start) / deadline
        for g in opt.param_groups:  # linear warmup, then cosine decay over the time budget
            g["lr"] = a.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * frac))
        x, y = batch(train)
        loss = loss_of(x, y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            model.eval()
            with torch.no_grad():
                v = sum(loss_of(*batch(valid)).item() for _ in range(4)) / 4
            model.train()
            curve.append({"step": step, "seconds": round(time.time() - start), "train_loss": round(loss.item(), 3),
                          "valid_loss": round(v, 3)})
            print(curve[-1], flush=True)
        step += 1

    model.eval()
    prompt = "And God said"
    with torch.no_grad():
        enc = torch.tensor([tok.encode(prompt).ids])
        out = model.generate(enc, max_new_tokens=40, do_sample=False)
    sample = tok.decode(out[0].tolist(), skip_special_tokens=True)
    print("sample:", sample)

    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, a.out / "model.safetensors", metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg["torch_dtype"] = "bfloat16"
    (a.out / "config.json").write_text(json.dumps(cfg, indent=2))
    (a.out / "training.json").write_text(json.dumps({
        "corpus": "King James Version of the Bible (1611), public domain, from Debian's bible-kjv-text 4.38",
        "tokens": len(data), "parameters": params, "steps": step, "batch": a.batch, "seq": a.seq,
        "minutes": a.minutes, "curve": curve, "greedy_sample": {"prompt": prompt, "text": sample},
    }, indent=2))


if __name__ == "__main__":
    main()
