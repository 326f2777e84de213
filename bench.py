"""
Benchmarks, side by side in one run (DESIGN 10). Figures are printed, never asserted.

    python bench.py --what memory     # chunked vs naive token divergence at vocab 151,936 (~2 min, CPU)
    python bench.py --what cpu_step   # on-policy reverse-KL step: ours vs TRL GKDTrainer and DistillationTrainer
                                      # (needs `pip install trl`; ~1 min)
    python bench.py --what gpu        # one H100: Qwen3-1.7B/8B-architecture random weights, 512-token completions, ours
                                      # (colocated vLLM) vs TRL DistillationTrainer (colocated vLLM) and GKDTrainer,
                                      # vLLM in the loop vs standalone (~10 min)
    python bench.py --what gpu --gpu_arch tiny   # the same code on CPU with tiny Qwen3 configs (vLLM's CPU build when installed): a dry run
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

import numpy as np
import torch

import common as C

p = argparse.ArgumentParser()
p.add_argument("--what", default="all", help="memory | cpu_step | gpu | all")
p.add_argument("--vocab", type=int, default=151_936)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--length", type=int, default=1024)
p.add_argument("--naive_batches", default="1,2", help="naive sizes actually run (x length)")
p.add_argument("--chunk", type=int, default=512, help="positions per chunk")
p.add_argument("--step_batch", type=int, default=16, help="cpu_step: prompts per step")
p.add_argument("--new_tokens", type=int, default=64, help="cpu_step: max new tokens per completion")
p.add_argument("--lr", type=float, default=1e-3, help="cpu_step: AdamW lr, both sides")
p.add_argument("--warmup", type=int, default=2, help="cpu_step: untimed steps")
p.add_argument("--iters", type=int, default=12, help="cpu_step: timed steps (median)")
p.add_argument("--threads", type=int, default=0, help="cpu_step: torch threads (0 = torch's default)")
p.add_argument("--trl_shipped_iters", type=int, default=6, help="cpu_step: timed steps of TRL as shipped (gradient checkpointing on; 0 = skip)")
p.add_argument("--gpu_arch", default="qwen3", help="gpu: qwen3 (1.7B student, 8B teacher) | tiny (a CPU dry run)")
p.add_argument("--gpu_batch", type=int, default=8, help="gpu: prompts per step (16 needs ~85 GB with fp32 AdamW state)")
p.add_argument("--gpu_prompt_len", type=int, default=128, help="gpu: prompt tokens")
p.add_argument("--gpu_new_tokens", type=int, default=512, help="gpu: completion tokens (random weights: eos is ~never sampled)")
p.add_argument("--gpu_iters", type=int, default=6, help="gpu: timed steps per side (median), after --warmup")
p.add_argument("--gpu_mem_util", type=float, default=0.15, help="gpu: the colocated engine's share of GPU memory")
p.add_argument("--gpu_dir", default="runs/bench_gpu", help="gpu: where the random-weight student folder is written")
p.add_argument("--_mem", default=None, help=argparse.SUPPRESS)  # internal: run one variant
p.add_argument("--_standalone", default=None, help=argparse.SUPPRESS)  # internal: standalone vLLM timing
p.add_argument("--_trl_distill", default=None, help=argparse.SUPPRESS)  # internal: TRL DistillationTrainer timing
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



# ----------------------------------------------------------------------------- cpu_step
# One on-policy reverse-KL step of 03_distill.py (--method rkl) against TRL's GKDTrainer (lmbda 1, beta 1) on
# the DESIGN-10 setup, and our step's floor: its parts (generation, teacher forward, student update) each
# timed alone. Both sides: same initial weights, prompts, batch, max_new_tokens, temperature 1, fp32, AdamW
# (same lr, no weight decay), grad clip 1. Wall time on a shared machine is noisy, so the load is printed.

def load_avg():
    return "load avg %.1f / %.1f / %.1f (1/5/15 min)" % os.getloadavg()


def char_tokenizer():
    """The tests' character-level tokenizer (no toy world, no hub needed): 1 character = 1 token."""
    return C.char_tokenizer()


def toy_setup():
    """Tokenizer A, student (Llama h128/l2), teacher (h192/l4), prompts. The trained toy world if runs/toy
    has one; else random-weight Llamas with 00_toy_world.py's configs (a step's cost depends on shapes,
    not weights) and the tokenizer of any toy world here, or the tests' char tokenizer."""
    import glob
    from transformers import LlamaConfig, LlamaForCausalLM
    toy, data = "runs/toy/00_toy_world", None
    if os.path.exists(f"{toy}/summary.json"):
        tok, data = C.load_tokenizer(f"{toy}/student"), f"{toy}/data"
        return tok, C.load_model(f"{toy}/student", "cpu", trainable=True), C.load_model(f"{toy}/teacher", "cpu"), data
    found = sorted(glob.glob("runs/*/00_toy_world/student"))
    if found:
        tok, data = C.load_tokenizer(found[0]), os.path.join(os.path.dirname(found[0]), "data")
    else:
        tok = char_tokenizer()

    def llama(h, layers, seed):  # 00_toy_world.py's train_model config, untrained
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=h, num_hidden_layers=layers, intermediate_size=int(h * 8 / 3) // 8 * 8,
            num_attention_heads=max(2, h // 64), num_key_value_heads=max(2, h // 64), max_position_embeddings=512,
            tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return tok, llama(128, 2, 1).train(), llama(192, 4, 2).eval().requires_grad_(False), data


def timed(fn, i):
    t0 = time.perf_counter()
    fn(i)
    return time.perf_counter() - t0


def ours_step(student, teacher, opt, tok, prompts, vocab, step):
    """03_distill.py's rkl step, call for call (minus eval, logging, checkpoints); each phase timed."""
    t = [time.perf_counter()]
    comps = C.generate(student, tok, prompts, max_new_tokens=args.new_tokens, temperature=1.0, seed=step)
    t.append(time.perf_counter())
    student.train()
    ids, am, cm = C.make_batch(tok, prompts, [c["ids"] for c in comps])
    t.append(time.perf_counter())
    loss = C.chunked_token_divergence(student, teacher, ids, am, cm, beta=1.0, chunk=args.chunk, vocab=vocab).mean()
    t.append(time.perf_counter())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    t.append(time.perf_counter())
    return np.diff(t), cm.sum(1).float().mean().item()


def trl_trainer(student, teacher, tok, prompts, times, lens, between=lambda i: None, grad_ckpt=False, iters=None,
                new_tokens=None, lr=None, bf16=False, sync=lambda: None, kind="gkd", vllm_mem=None):
    """One of TRL's on-policy distillation trainers on the same prompts (a B-row dataset: every step
    sees the same prompts, as ours does). kind "gkd": GKDTrainer (lmbda 1, beta 1); "distill":
    DistillationTrainer (beta 1: always on-policy, chunked loss over the lm_head, vLLM colocate if
    vllm_mem is given), which TRL 1.16 names as GKDTrainer-with-lmbda-1's successor.
    times / lens collect each step's seconds and trained completion length. between(i) runs after
    TRL's step i, outside its timing: on CPU our measurements interleave with TRL's, so a shared
    machine's changing load hits both sides alike. sync() waits for the GPU before each clock read.
    gradient_checkpointing off by default: GKDConfig (an SFTConfig) ships with it on, which also
    turns the KV cache off in its generation, i.e. not the same work; grad_ckpt=True measures a
    trainer as shipped (DistillationTrainer switches checkpointing off while it generates).
    GKDTrainer's training loss divides its token sum by the dataset's label count (here one
    placeholder token per row), not by the generated tokens: a scale (AdamW is invariant to it up
    to its epsilon) that costs no time; its fixed-batch loss (no count passed) equals ours.
    None if TRL is not installed."""
    try:
        if kind == "gkd":
            from trl.experimental.gkd import GKDConfig as Config, GKDTrainer as Trainer  # TRL >= 1.0 keeps it here
        else:
            from trl import DistillationConfig as Config, DistillationTrainer as Trainer  # TRL >= 1.16
    except ImportError:
        return None
    import tempfile
    from datasets import Dataset
    from transformers import TrainerCallback

    class Clock(TrainerCallback):  # TRL's step: from the end of between() to its next step's end (data loading included)
        def on_train_begin(self, *a, **k):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            times.append(time.perf_counter() - self.t0)
            between(len(times) - 1)
            self.t0 = time.perf_counter()

    class Timed(Trainer):  # records the completion length TRL actually trained on
        def compute_loss(self, model, inputs, **kw):
            n = inputs["labels"][:, 1:] != -100 if kind == "gkd" else inputs["completion_mask"]
            lens.append(n.sum(1).float().mean().item())
            return super().compute_loss(model, inputs, **kw)

    on_cpu = next(student.parameters()).device.type == "cpu"
    common = dict(output_dir=tempfile.mkdtemp(), beta=1.0, temperature=1.0, per_device_train_batch_size=len(prompts),
                  max_steps=args.warmup + (iters or args.iters), learning_rate=lr or args.lr, lr_scheduler_type="constant",
                  weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", bf16=bf16, gradient_checkpointing=grad_ckpt,
                  use_cpu=on_cpu, eval_strategy="no", save_strategy="no", report_to="none", logging_steps=10**6,
                  disable_tqdm=True, seed=0)
    if kind == "gkd":  # pre-tokenized rows (prompt ids + a placeholder eos): the collator's prompts are exactly our prompt ids
        pids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        ds = Dataset.from_list([{"prompt": t, "input_ids": p + [tok.eos_token_id], "completion_mask": [0] * len(p) + [1]}
                                for t, p in zip(prompts, pids)])
        cfg = Config(lmbda=1.0, max_new_tokens=new_tokens or args.new_tokens, **common)
    else:  # text prompts, tokenized by the trainer (the same ids as ours: these tokenizers add no special tokens)
        ds = Dataset.from_list([{"prompt": t} for t in prompts])
        vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=vllm_mem, vllm_max_model_length=2048) if vllm_mem else {}
        cfg = Config(max_completion_length=new_tokens or args.new_tokens, shuffle_dataset=False, **vllm, **common)
    return Timed(model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Clock()])


def trl_fixed_loss(trainer, kind, model, tok, prompts, comps):
    """TRL's own loss on one fixed batch of completions, in its own input layout."""
    if kind == "gkd":
        ids, am, cm = C.make_batch(tok, prompts, [c["ids"] for c in comps])
        return trainer.compute_loss(model, {"input_ids": ids, "attention_mask": am, "labels": ids.masked_fill(cm == 0, -100)}).item()
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    L = max(len(c["ids"]) for c in comps)
    cids = torch.tensor([c["ids"] + [tok.pad_token_id] * (L - len(c["ids"])) for c in comps])
    cmask = torch.tensor([[1] * len(c["ids"]) + [0] * (L - len(c["ids"])) for c in comps])
    return trainer.compute_loss(model, {"prompt_ids": enc["input_ids"], "prompt_mask": enc["attention_mask"],
                                        "completion_ids": cids, "completion_mask": cmask}).item()


def bench_cpu_step():
    import copy
    import torch.nn.functional as F
    if args.threads:
        torch.set_num_threads(args.threads)
    tok, s_ours, teacher, data = toy_setup()
    tok.padding_side = "left"
    rows = (C.load_task("toy_math", "train", data=data, n=args.step_batch) if data else  # else fixed short prompts
            [{"prompt": f"Ann has {i + 3} eggs. She buys {i % 4 + 2} more. How many eggs does she have now?"} for i in range(args.step_batch)])
    prompts = [C.build_prompt(tok, "toy_math", r) for r in rows]
    s_f0, vocab, B = copy.deepcopy(s_ours), C.shared_vocab(s_ours, teacher, tok, tok), len(prompts)  # s_f0: every TRL run starts here
    print(f"## cpu_step: on-policy reverse-KL step, student {C.n_params(s_ours) / 1e6:.2f}M / teacher {C.n_params(teacher) / 1e6:.2f}M "
          f"params, vocab {vocab}, batch {B}, {args.new_tokens} new tokens, T=1, fp32, {torch.get_num_threads()} torch threads; "
          f"median of {args.iters} steps after {args.warmup} warm-up")
    # one fixed batch of student samples (same weights on both sides): both losses on it, and the floor's parts
    comps = C.generate(s_ours, tok, prompts, max_new_tokens=args.new_tokens, temperature=1.0, seed=12345)
    ids, am, cm = C.make_batch(tok, prompts, [c["ids"] for c in comps])
    # ours: the step, and the floor's parts alone on a copy of the student and the fixed batch
    opt = torch.optim.AdamW(s_ours.parameters(), lr=args.lr, weight_decay=0.0)
    s_f = copy.deepcopy(s_ours)
    opt_f = torch.optim.AdamW(s_f.parameters(), lr=args.lr, weight_decay=0.0)
    pred, enc = cm[:, 1:].bool(), tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)

    def student_update(i):
        F.cross_entropy(s_f(input_ids=ids, attention_mask=am).logits[:, :-1][pred], ids[:, 1:][pred]).backward()
        opt_f.step()
        opt_f.zero_grad(set_to_none=True)
    parts = {"generation alone (common.generate)": lambda i: C.generate(s_f, tok, prompts, max_new_tokens=args.new_tokens, seed=i),
             "teacher forward alone (no grad)": lambda i: torch.no_grad()(teacher)(input_ids=ids, attention_mask=am),
             "student fwd + bwd + AdamW alone (CE loss)": student_update,
             "reference: HF model.generate, same prompts": lambda i: s_f.generate(
                 **enc, do_sample=True, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)}
    steps, lens_ours, part_s = [], [], {k: [] for k in parts}

    def one_round(i):  # one of everything of ours, in turn; step i < --warmup is not counted
        ph, ln = ours_step(s_ours, teacher, opt, tok, prompts, vocab, i)
        if i >= args.warmup:
            steps.append(ph), lens_ours.append(ln)
        for k, fn in parts.items():
            t = timed(fn, i)
            if i >= args.warmup:
                part_s[k].append(t)

    # TRL's trainers, each on its own copy of the student; each drives its own loop and one round of ours runs
    # in its step-end callback, so ours and TRL share the machine's load. (name, kind, grad_ckpt, timed steps)
    variants = [("GKDTrainer, tuned (lmbda 1, beta 1; gradient checkpointing off: KV-cached generation)", "gkd", False, args.iters),
                ("DistillationTrainer, tuned (beta 1; gradient checkpointing off)", "distill", False, args.iters),
                ("DistillationTrainer as shipped (checkpointing on while training, off while generating)", "distill", True, args.iters),
                ("GKDTrainer as shipped (GKDConfig's gradient checkpointing on, which turns the KV cache off)", "gkd", True,
                 args.trl_shipped_iters)]
    trl_rows, losses = [], {}
    with torch.no_grad():
        l_ours = C.chunked_token_divergence(s_ours, teacher, ids, am, cm, beta=1.0, chunk=args.chunk, vocab=vocab).mean().item()
    loads = [load_avg()]
    for name, kind, ckpt, iters in variants:
        if not iters:
            continue
        s_trl, times, lens = copy.deepcopy(s_f0), [], []
        s_ours.load_state_dict(s_f0.state_dict())  # ours restarts beside each TRL run: same start, same number of steps
        opt = torch.optim.AdamW(s_ours.parameters(), lr=args.lr, weight_decay=0.0)
        trainer = trl_trainer(s_trl, teacher, tok, prompts, times, lens, one_round, grad_ckpt=ckpt, iters=iters, kind=kind)
        if trainer is None:
            break
        if kind not in losses:
            with torch.no_grad():
                losses[kind] = trl_fixed_loss(trainer, kind, s_trl, tok, prompts, comps)
        lens.clear()
        trainer.train()
        trl_rows.append((name, float(np.median(times[args.warmup:])), float(np.mean(lens[args.warmup:])), iters))
        del trainer, s_trl
    if not trl_rows:  # TRL not installed: our rounds alone
        for i in range(args.warmup + args.iters):
            one_round(i)
    loads.append(load_avg())
    phases, L = np.array(steps), float(np.mean(lens_ours))
    floor = {k: float(np.median(v)) for k, v in part_s.items()}
    hf_gen = floor.pop("reference: HF model.generate, same prompts")

    step_s, floor_s, gen_s = float(np.median(phases.sum(1))), sum(floor.values()), list(floor.values())[0]
    table = [(f"**ours step** (03 rkl: generate, make_batch, chunked RKL, backward, clip, AdamW; median of {len(phases)})", step_s,
              B * L / step_s, f"{step_s / floor_s:.2f}x floor")]
    table += [(f"&nbsp; ours: {n}", s, None, f"{s / step_s:.0%} of step") for n, s in zip(
        ["generate", "make_batch", "divergence forward (both trunks, chunked heads)", "backward (incl. checkpointed head recompute)",
         "clip + AdamW"], np.median(phases, 0))]
    table += [("**ours floor** (sum of the parts alone)", floor_s, B * L / floor_s, "1.00")]
    table += [(f"&nbsp; floor: {n}", s, None, f"{s / floor_s:.0%} of floor") for n, s in floor.items()]
    table += [("&nbsp; reference: HF model.generate, same prompts", hf_gen, None, f"{hf_gen / gen_s:.2f}x common.generate")]
    for name, s, Lt, iters in trl_rows:
        table += [(f"**TRL {name}**, median of {iters}", s, B * Lt / s, f"{s / floor_s:.2f}x floor"),
                  ("&nbsp; speedup ours vs this: seconds/step, tokens/s", None, None, f"**{s / step_s:.2f}x**, {L / step_s / (Lt / s):.2f}x")]
    print("| what | seconds/step (median) | tokens/s | ratio |\n|---|---:|---:|---:|")
    for what, s, tps, r in table:
        print(f"| {what} | {'' if s is None else f'{s:.3f}'} | {'' if tps is None else f'{tps:,.0f}'} | {r} |")
    if not trl_rows:
        print("\nTRL not installed: `pip install trl` (a benchmark-only dependency) for the TRL rows and losses")
        return
    print(f"\ntokens/s = completion tokens per second; mean completion length: ours {L:.1f}, TRL "
          + ", ".join(f"{Lt:.1f}" for _, _, Lt, _ in trl_rows) + f" (cap {args.new_tokens})")
    print(f"fixed-batch loss ({int(cm.sum())} completion tokens): ours {l_ours:.9g}, "
          + ", ".join(f"TRL {'GKDTrainer' if k == 'gkd' else 'DistillationTrainer'} {v:.9g} (abs diff {abs(l_ours - v):.1e})"
                      for k, v in losses.items()))
    print("; ".join(loads))


# ----------------------------------------------------------------------------- gpu
# One H100 (DESIGN 10): a Qwen3-1.7B-architecture student and a Qwen3-8B-architecture teacher with random
# weights built from configs (no hub), bf16, a batch of random-text prompts, 512-token completions. Four
# measurements in this order, so each has the GPU to itself: (1) standalone vLLM on the student folder and
# (2) TRL's DistillationTrainer, each in a subprocess that exits; (3) TRL's GKDTrainer (lmbda 1, beta 1,
# gradient checkpointing off so its HF generate keeps the KV cache); (4) ours: 03_distill.py's rkl step
# with its colocated engine, the student's weights pushed into it after every optimizer step.
QWEN3 = {  # the hub configs' shapes (Qwen/Qwen3-1.7B, Qwen/Qwen3-8B), vocab 151,936
    "student": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "teacher": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)}
TINY = {"student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=32, tie_word_embeddings=True),
        "teacher": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=32, tie_word_embeddings=False)}


def gpu_prompts(tok):
    """--gpu_batch random-text prompts of exactly --gpu_prompt_len tokens (the tests' char tokenizer: 1 char = 1 token)."""
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz ")
    return ["".join(rng.choice(letters, args.gpu_prompt_len)) for _ in range(args.gpu_batch)]


def gpu_model(role, seed, dtype, tok, dev):
    """Random weights straight on the device, in their final dtype (an 8B in fp32 on CPU is 32 GB)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=151_936, max_position_embeddings=4096, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None, **(QWEN3 if args.gpu_arch == "qwen3" else TINY)[role])
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        m = Qwen3ForCausalLM(cfg)
    torch.set_default_dtype(old)
    return m


def gpu_sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpu_trl_distill(path):
    """TRL's DistillationTrainer in its own process (its colocated vLLM engine and ours would share vLLM's
    global state in one process): the student from the folder, the same random teacher (same seed)."""
    from transformers import Qwen3ForCausalLM
    dev = C.get_device("auto")
    bf16 = dev.type == "cuda"
    use_vllm = bf16 and C.vllm_available()  # TRL's colocated vLLM: CUDA only
    tok, times, lens = char_tokenizer(), [], []
    teacher = gpu_model("teacher", 2, torch.bfloat16 if bf16 else torch.float32, tok, dev).eval().requires_grad_(False)
    student = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
    trainer = trl_trainer(student, teacher, tok, gpu_prompts(tok), times, lens, iters=args.gpu_iters, new_tokens=args.gpu_new_tokens,
                          lr=1e-6, bf16=bf16, sync=gpu_sync, kind="distill", vllm_mem=args.gpu_mem_util if use_vllm else None)
    if trainer is None:
        return None
    if bf16:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {"s": float(np.median(times[args.warmup:])), "len": float(np.mean(lens[args.warmup:])), "vllm": use_vllm,
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if bf16 else None}


def gpu_standalone(path):
    """Best-case vLLM: its own process, most of the GPU, nothing else loaded. Median seconds per generate call."""
    share = 0.85 if torch.cuda.is_available() else args.gpu_mem_util  # vLLM's CPU build reads it as a share of RAM
    tok, eng = char_tokenizer(), C.make_vllm_engine(path, seed=0, gpu_memory_utilization=share, max_model_len=2048)
    prompts, ts, lens = gpu_prompts(tok), [], []
    for i in range(args.warmup + args.gpu_iters):
        t0 = time.perf_counter()
        outs = C.generate(None, tok, prompts, max_new_tokens=args.gpu_new_tokens, seed=i, backend="vllm", engine=eng)
        ts.append(time.perf_counter() - t0)
        lens.append(np.mean([len(o["ids"]) for o in outs]))
    return {"gen_s": float(np.median(ts[args.warmup:])), "len": float(np.mean(lens))}


if args._standalone:
    print(json.dumps(gpu_standalone(args._standalone)))
    sys.exit(0)
if args._trl_distill:
    print(json.dumps(gpu_trl_distill(args._trl_distill)))
    sys.exit(0)


def sub(flag, path):
    """Run this script's --_standalone / --_trl_distill in a fresh process; its last stdout line is JSON."""
    out = subprocess.run([sys.executable, __file__, flag, path, "--gpu_arch", args.gpu_arch, "--gpu_batch", str(args.gpu_batch),
                          "--gpu_prompt_len", str(args.gpu_prompt_len), "--gpu_new_tokens", str(args.gpu_new_tokens),
                          "--gpu_iters", str(args.gpu_iters), "--warmup", str(args.warmup), "--gpu_mem_util", str(args.gpu_mem_util)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        print(f"{flag} failed:\n" + out.stderr[-3000:])
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_gpu():
    from transformers import Qwen3ForCausalLM
    dev = C.get_device("auto")
    real = args.gpu_arch == "qwen3"
    if real and dev.type != "cuda":
        C.die("bench.py --what gpu needs CUDA (a device machine); on CPU run --what gpu --gpu_arch tiny for a dry run")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    use_vllm = C.vllm_available()
    tok, t0 = char_tokenizer(), time.time()
    # as 03_distill.py: fp32 master weights for the trained student (bf16 autocast), the teacher in bf16. The
    # student goes to a folder (vLLM and TRL load it from there) and off the GPU while the subprocesses run.
    student = gpu_model("student", 1, torch.float32, tok, dev)
    path, n_student = os.path.join(args.gpu_dir, "student"), C.n_params(student)
    student.save_pretrained(path)
    tok.save_pretrained(path)
    del student
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    prompts, B, table = gpu_prompts(tok), args.gpu_batch, []
    # (1) standalone vLLM and (2) TRL DistillationTrainer, each in a process of its own with the GPU to itself
    alone = sub("--_standalone", path) if use_vllm else None
    if alone:
        where = "85% of the GPU" if dev.type == "cuda" else "CPU build"
        table.append((f"standalone vLLM generate (own process, {where})", alone["gen_s"], B * alone["len"] / alone["gen_s"], ""))
    dist = sub("--_trl_distill", path)
    teacher = gpu_model("teacher", 2, dtype, tok, dev).eval().requires_grad_(False)
    print(f"## gpu: student {n_student / 1e9:.2f}B / teacher {C.n_params(teacher) / 1e9:.2f}B params ({args.gpu_arch}, random "
          f"weights; teacher {str(dtype)[6:]}, student fp32 + autocast), vocab 151,936, batch {B}, {args.gpu_prompt_len}-token prompts, "
          f"{args.gpu_new_tokens} new tokens, T=1; median of {args.gpu_iters} steps after {args.warmup}; {time.time() - t0:.0f}s to here; "
          f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}")

    def peak_reset():
        gpu_sync()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def peak_gb():
        return f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GB" if dev.type == "cuda" else "peak: CPU, not measured"

    # (3) TRL GKDTrainer, on its own copy of the student
    trl_rows, times, trl_lens = [], [], []
    if dist:
        trl_rows.append((f"**TRL DistillationTrainer step** ({'colocated vLLM at ' + format(args.gpu_mem_util, '.0%') if dist['vllm'] else 'HF generate'}"
                         f", {str(dtype)[6:]}, own process)", dist["s"], B * dist["len"] / dist["s"],
                         f"peak {dist['peak_gb']:.1f} GB" if dist["peak_gb"] else "peak: CPU, not measured", dist["len"]))
    s_trl = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
    trainer = trl_trainer(s_trl, teacher, tok, prompts, times, trl_lens, iters=args.gpu_iters, new_tokens=args.gpu_new_tokens,
                          lr=1e-6, bf16=dtype == torch.bfloat16, sync=gpu_sync)
    if trainer is not None:
        peak_reset()
        try:  # in this process: an OOM (its loss takes full-vocabulary logits) must not cost the rows still to come
            trainer.train()
            trl_s, trl_len = float(np.median(times[args.warmup:])), float(np.mean(trl_lens[args.warmup:]))
            trl_rows.append((f"**TRL GKDTrainer step** (HF generate with KV cache, {str(dtype)[6:]}, gradient checkpointing off)", trl_s,
                             B * trl_len / trl_s, peak_gb(), trl_len))
        except torch.OutOfMemoryError:
            table.append((f"TRL GKDTrainer step: out of GPU memory at batch {B} (after {len(times)} steps)", None, None, ""))
    del trainer, s_trl
    C.release_memory()
    student = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
    # (4) ours: 03_distill.py's rkl step, its colocated engine and per-step weight push
    engine = C.make_vllm_engine(path, seed=0, gpu_memory_utilization=args.gpu_mem_util, max_model_len=2048) if use_vllm else None
    backend = "vllm" if use_vllm else "hf"
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6, weight_decay=0.0, fused=dev.type == "cuda")  # as 03
    ph, lens = [], []
    peak_reset()
    for i in range(args.warmup + args.gpu_iters):
        t = [time.perf_counter()]
        comps = C.generate(student, tok, prompts, max_new_tokens=args.gpu_new_tokens, seed=i, backend=backend, engine=engine)
        gpu_sync(); t.append(time.perf_counter())
        ids, am, cm = C.make_batch(tok, prompts, [c["ids"] for c in comps], device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = C.chunked_token_divergence(student, teacher, ids, am, cm, beta=1.0, chunk=args.chunk).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        gpu_sync(); t.append(time.perf_counter())
        if engine is not None:
            C.vllm_sync_weights(engine, student)
        gpu_sync(); t.append(time.perf_counter())
        ph.append(np.diff(t)), lens.append(cm.sum(1).float().mean().item())
    ph, L = np.array(ph[args.warmup:]), float(np.mean(lens[args.warmup:]))
    ours_s = float(np.median(ph.sum(1)))
    mem = peak_gb()
    if dev.type == "cuda":
        mem += f" (torch tensors, the in-process engine's {args.gpu_mem_util:.0%} share included)" if engine else " (torch tensors)"
    table.insert(0, (f"**ours step** (03 rkl, {backend} generation in the loop, chunked RKL, AdamW, weight push)", ours_s,
                     B * L / ours_s, mem))
    gen_s, train_s, push_s = np.median(ph, 0)
    table.insert(1, (f"&nbsp; ours: generate ({backend}, in the loop)", gen_s, B * L / gen_s,
                     f"{alone['gen_s'] / gen_s:.0%} of standalone vLLM speed" if alone else ""))
    table.insert(2, ("&nbsp; ours: divergence + backward + AdamW", train_s, None, ""))
    table.insert(3, ("&nbsp; ours: weight push into the engine", push_s, None, ""))
    for row in trl_rows:
        table += [row[:4], ("&nbsp; speedup ours vs this (tokens/s)", None, None, f"**{(B * L / ours_s) / row[2]:.2f}x**")]
    print("| what | seconds (median) | tokens/s | note |\n|---|---:|---:|---|")
    for what, sec, tps, note in table:
        print(f"| {what} | {'' if sec is None else f'{sec:.3f}'} | {'' if tps is None else f'{tps:,.0f}'} | {note} |")
    print(f"mean completion length: ours {L:.1f}" + "".join(f", TRL {r[4]:.1f}" for r in trl_rows)
          + (f", standalone {alone['len']:.1f}" if alone else ""))
    if not trl_rows:
        print("TRL not installed: `pip install trl` (a benchmark-only dependency) for the TRL rows")


if args.what in ("memory", "all"):
    bench_memory()
if args.what in ("cpu_step", "all"):
    bench_cpu_step()
if args.what == "gpu" or (args.what == "all" and torch.cuda.is_available()):
    bench_gpu()
