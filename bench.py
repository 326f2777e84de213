"""
Benchmarks, side by side in one run (DESIGN 10). Figures are printed, never asserted.

    python bench.py --what memory     # chunked vs naive token divergence at vocab 151,936 (~2 min, CPU)
    python bench.py --what cpu_step   # on-policy reverse-KL step: ours vs TRL GKDTrainer (needs `pip install trl`)
    python bench.py --what all        # everything that applies on this machine

memory: a random-weight Qwen3 config with the real 151,936-token vocabulary (hidden 64, 1 layer:
the trunk is negligible, the logits are what matter). Each variant runs in its own subprocess and
reports its peak RSS above the RSS just before the call, so the numbers don't contaminate each
other. The naive variant materializes (B, L, V) fp32 logits of both models: at 16 x 1024 tokens
that is 2 x 10 GB before any softmax, more than this 24 GB machine has, so it is measured at
smaller sizes and its 16 x 1024 figure is the linear extrapolation (it is exactly linear in tokens).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

import common as C

p = argparse.ArgumentParser()
p.add_argument("--what", default="all", help="memory | cpu_step | all")
p.add_argument("--vocab", type=int, default=151_936)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--length", type=int, default=1024)
p.add_argument("--naive_batches", default="1,2", help="naive sizes actually run (x length)")
p.add_argument("--chunk", type=int, default=512, help="positions per chunk")
p.add_argument("--_mem", default=None, help=argparse.SUPPRESS)  # internal: run one variant
args = C.parse_args(p)


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def mem_variant(variant, batch, length, vocab, chunk):
    """One measurement in this process: peak RSS above the pre-call RSS, and the divergence values."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=length + 8, tie_word_embeddings=True)
    s, t = Qwen3ForCausalLM(Qwen3Config(**cfg)).eval(), Qwen3ForCausalLM(Qwen3Config(**cfg)).eval()
    ids = torch.randint(0, vocab, (batch, length))
    am, cm = torch.ones_like(ids), torch.ones_like(ids)
    cm[:, 0] = 0
    base = rss_mb()
    t0 = time.time()
    with torch.no_grad():
        if variant == "naive":
            d = C.naive_token_divergence(s, t, ids, am, cm, beta=1.0)
        else:
            d = C.chunked_token_divergence(s, t, ids, am, cm, beta=1.0, chunk=chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "tokens": batch * length, "peak_mb": peak - base, "seconds": time.time() - t0,
            "values": d[:4096].tolist()}


if args._mem:
    v, b = args._mem.split(":")
    print(json.dumps(mem_variant(v, int(b), args.length, args.vocab, args.chunk)))
    sys.exit(0)


def run_sub(variant, batch):
    out = subprocess.run([sys.executable, __file__, "--_mem", f"{variant}:{batch}", "--length", str(args.length),
                          "--vocab", str(args.vocab), "--chunk", str(args.chunk)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"variant": variant, "tokens": batch * args.length, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_memory():
    print(f"## memory: token RKL at vocab {args.vocab:,}, fp32, CPU, chunk {args.chunk} positions")
    rows = []
    for b in [int(x) for x in args.naive_batches.split(",")]:
        rows.append((run_sub("naive", b), run_sub("chunked", b)))
    big = run_sub("chunked", args.batch)
    print("| tokens | naive peak MB | chunked peak MB | chunked/naive | max abs diff | naive s | chunked s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    per_tok = []
    for n, c in rows:
        diff = max(abs(a - b) for a, b in zip(n["values"], c["values"]))
        per_tok.append(n["peak_mb"] / n["tokens"])
        print(f"| {n['tokens']:,} | {n['peak_mb']:.0f} | {c['peak_mb']:.0f} | {c['peak_mb'] / n['peak_mb']:.3f} | {diff:.1e} | {n['seconds']:.1f} | {c['seconds']:.1f} |")
    est = max(per_tok) * big["tokens"]
    print(f"| {big['tokens']:,} | {est:.0f} (extrapolated: {max(per_tok):.3f} MB/token) | {big['peak_mb']:.0f} | {big['peak_mb'] / est:.3f} | - | - | {big['seconds']:.1f} |")
    return {"rows": rows, "big": big, "naive_extrapolated_mb": est}


if args.what in ("memory", "all"):
    bench_memory()
if args.what in ("cpu_step", "all"):
    print("## cpu_step: see issue 10 (needs 03_distill.py and trl)")
