"""
Teacher calibration (paper section 5, Eq. 6-11, Algorithm 1, appendix D): a LoRA on the teacher
trained by hand-written REINFORCE on a composite reward. Per prompt, group_size rollouts from the
teacher+LoRA are scored with
    r_task = grade(completion) in {0, 1}                      (strict: finished, explicit final answer)
    r_cal  = sg(log p_target(y|x) - log p_theta(y|x))      (Eq. 10-11, sequence sums)
each side by its own model on its own tokenization of the same prompt and completion text, so the
target may use a different tokenizer. Advantages A = gn(r_task) + lam * gn(r_cal), each reward
group-normalized separately; loss = REINFORCE on the token-normalized sequence log-prob
+ beta * K3(theta || teacher) per token, where the teacher is the same model with the LoRA
disabled (no second copy in memory). AdamW on the LoRA parameters only, gradient clipping.

The knob (presets):
    --lam  1   distillable teacher: rewards samples the target finds likely (KL to target goes down)
    --lam -1   undistillable teacher: rewards samples the target finds unlikely (KL to target goes up)
    --lam  0   plain REINFORCE on the task reward with the KL anchor

    python 02_calibrate.py --teacher runs/toy/00_toy_world/teacher --target runs/toy/00_toy_world/target \\
        --data runs/toy/00_toy_world/data --lam 1 --out_dir runs/toy/02_calibrate/distillable
    (same with --lam -1 --out_dir runs/toy/02_calibrate/undistillable)

Expected on the toy world (defaults: 30 steps x 6 prompts x 8 rollouts, LoRA rank 8, lr 1e-3, beta 0.5;
50 held-out prompts per task; seed 0, one CPU thread, ~2-3 min): the knob moves the style, not the
accuracy. lam +1: seq KL(theta||target) 21.0 -> 13.5, greedy acc toy_math 0.98 -> 1.00, toy_qa 1.00 ->
1.00, share of samples that open with a self-check 0.52 -> 0.24 (toy_math), mean length 81 -> 55 tokens.
lam -1: seq KL 21.0 -> 95.1, acc 0.98 -> 0.98 / 1.00 -> 0.92, checked 0.52 -> 0.90, length 81 -> 160
(checked twice: longer than the student's context). beta 0.2 let lam -1 run away on seed 0 (garbage
tokens, toy_math 0.96 -> 0.26). Part of the KL change is length (the sequence KL sums over tokens);
--cal_length_norm uses per-token r_cal. All seeds: docs/RESULTS.md.

Writes out_dir/config.json (first), metrics.jsonl (one line per step, `eval` lines before/after), adapter/
(peft), merged/ (LoRA merged, plain HF folder with the teacher's tokenizer: --teacher for 01/03/04), ckpt/
(common.save_checkpoint: adapter, optimizer, step, RNG, data cursor; only in-band steps, so a diverged run
names a good checkpoint; a rerun with the same settings resumes, a new --lr included) and summary.json
(greedy held-out accuracy per task and on-policy sequence KL(theta||target), original vs calibrated, with
the adapter unmerged; merge_lost_share: how much of the LoRA's change a merge into a bf16 teacher rounds
away, with a warning above 10%).

Departures from the paper and why:
- One gradient update per fresh batch of rollouts, purely on-policy: the importance ratio is
  exactly 1, so PPO/GRPO ratio clipping would do nothing and is left out (appendix D used TRL's
  GRPO trainer, whose default is also a single update per batch).
- Rollouts: HF (KV-cached, batched), or one colocated vLLM engine with LoRA enabled, each step's adapter
  passed as a new LoRARequest (no rebuild; CI runs it with vLLM's CPU build).
- --micro_batch k and --grad_ckpt are for real models (PRESET=qwen3/gemma3 pass 8 and on): the
  128 rollouts of a step do not fit one backward pass of an 8B teacher. Advantages come from whole
  groups first, then each slice adds its part divided by the batch's token count, so the gradient
  is the whole batch's (a toy run with --micro_batch 5 --grad_ckpt matches the default to 1e-7).
- The paper's LoRA rank/alpha/lr are for 8B models and not in its text; the toy defaults here were
  chosen on seed 0 of the toy world (docs/RESULTS.md), the real presets' in run_all.sh.
N GPUs on one node: torchrun --standalone --nproc_per_node N 02_calibrate.py ... (data parallel over whole prompt
groups, LoRA gradients summed; --backend vllm: an engine per rank, each step's adapter written by rank 0; the
same steps as one process; CPU/gloo tested, vLLM with its CPU build, CUDA/NCCL not yet run).
"""
import argparse, contextlib, os, shutil, sys, time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

# -----------------------------------------------------------------------------
# config
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
# models and data
p.add_argument("--teacher", required=True, help="HF folder or hub id of the teacher to calibrate")
p.add_argument("--target", required=True, help="calibration target (student or proxy); its tokenizer may differ")
p.add_argument("--tasks", type=common.csv_list, default="toy_math,toy_qa", help="comma list of verifiable tasks")
p.add_argument("--data", default=None, help="toy world data folder (D/data), a folder of <task>/<split>.jsonl, or one .jsonl/.parquet (split 9:1 by prompt hash)")
p.add_argument("--prompt_field", default=None, help="local --data: the prompt column (default: prompt, question, problem, instruction or input)")
p.add_argument("--answer_field", default=None, help="local --data: the answer column (default: answer, solution, output, target or response; '#### 72' reads 72)")
p.add_argument("--choices_field", default=None, help="local --data, multiple choice: the options column (default: choices or options)")
p.add_argument("--out_dir", required=True, help="where everything is written (rerun resumes)")
# the knob and the objective
p.add_argument("--lam", type=float, default=1.0, help="calibration weight: +1 distillable, -1 undistillable")
p.add_argument("--beta", type=float, default=0.5, help="K3 anchor to the original teacher (LoRA off); 0.2 let lam -1 run away on the toy world")
p.add_argument("--cal_length_norm", action="store_true", help="divide each side of r_cal by its own token count")
# rollouts
p.add_argument("--group_size", type=int, default=8, help="rollouts per prompt (the normalization group)")
p.add_argument("--prompts_per_step", type=int, default=6, help="prompts per step (batch = this x group_size)")
p.add_argument("--max_new_tokens", type=int, default=None, help="rollout length limit (default: each task's own, common.TASKS)")
# optimization
p.add_argument("--steps", type=int, default=30, help="updates (one per fresh batch)")
p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of the LoRA")
p.add_argument("--grad_clip", type=float, default=1.0, help="max global grad norm")
p.add_argument("--lora_r", type=int, default=8, help="LoRA rank")
p.add_argument("--lora_alpha", type=int, default=16, help="LoRA scaling numerator (scale = alpha / r)")
p.add_argument("--micro_batch", type=int, default=0, help="sequences per forward/backward, gradients accumulated exactly "
               "(0: the whole batch; real models: a few)")
p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing in the teacher's trunk (real models)")
p.add_argument("--lora_targets", type=common.csv_list, default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
               help="module names that get a LoRA")
# eval, checkpoints, runtime
p.add_argument("--n_eval", type=int, default=50, help="held-out (test) prompts per task for accuracy and KL")
p.add_argument("--eval_every", type=int, default=0, help="held-out eval every N steps (0: only before and after)")
p.add_argument("--save_every", type=int, default=10, help="checkpoint every N steps (and at the end)")
p.add_argument("--sample_every", type=int, default=10, help="print a decoded rollout every N steps")
p.add_argument("--stop_after", type=int, default=0, help="exit after this step as if killed (resume tests)")
p.add_argument("--gen_batch", type=int, default=64, help="sequences per HF generation batch; torchrun spreads the batches "
               "over the ranks: prompts_per_step * group_size / N uses them all (samples depend on this, not on N)")
p.add_argument("--chunk", type=int, default=1024, help="positions per logits chunk when scoring")
p.add_argument("--backend", default="auto", help="rollouts: hf, vllm or auto (vllm on CUDA when installed)")
p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
p.add_argument("--threads", type=int, default=1, help="CPU torch threads (0: torch's default); see below")
p.add_argument("--seed", type=int, default=0, help="LoRA init, data order and rollout seeds")
args = common.parse_args(p)
if isinstance(args.tasks, str):
    args.tasks = common.csv_list(args.tasks)
if isinstance(args.lora_targets, str):
    args.lora_targets = common.csv_list(args.lora_targets)
args.max_new_tokens_per_task = {t: common.task_budget(t, args.max_new_tokens) for t in args.tasks}
budget = args.max_new_tokens_per_task
common.check_flags(args, counts=("group_size", "prompts_per_step", "max_new_tokens", "steps", "lora_r", "lora_alpha", "n_eval",
                                 "save_every", "chunk", "gen_batch"),
                   nonneg=("beta", "grad_clip", "micro_batch", "eval_every", "sample_every", "stop_after", "threads"),
                   positive=("lr",), finite=("lam",))
# torchrun: one rank per GPU (or CPU process), each with whole prompt groups (group normalization stays on one rank)
rank, world, device = common.dist_setup(args.device)
args.world_size = world
if world > 1 and args.prompts_per_step % world:
    common.die(f"torchrun with {world} ranks: --prompts_per_step {args.prompts_per_step} must be a multiple of the {world} ranks "
               "(a group stays on one rank)")
ckpt_dir = os.path.join(args.out_dir, "ckpt")
if common.checkpoint_file(ckpt_dir):
    common.check_resume(args.out_dir, args)  # a resume must be the same run (a new --lr, or another N, is allowed)
if rank == 0:
    common.write_config(args.out_dir, args)

# -----------------------------------------------------------------------------
# seed, device, inputs
common.seed_everything(args.seed)
if device.type == "cpu" and args.threads:
    # the toy models are op-overhead bound: one thread is as fast as two on a quiet machine, and on
    # shared cores two threads spin against each other (measured: a 64-rollout generate took 17 CPU-s
    # with 2 threads vs 1.9 with 1 while other jobs loaded the machine)
    torch.set_num_threads(args.threads)
backend = common.resolve_backend(args.backend)  # torchrun + vllm: an engine per rank (common.vllm_rank_options)
P, G = args.prompts_per_step, args.group_size
MB = args.micro_batch or P * G
for t in args.tasks:
    if common.task_kind(t) == "open":
        common.die(f"task {t} is open-ended (no grader); 02_calibrate needs verifiable tasks (math or mc)")
if G < 2:
    common.die(f"--group_size {G}: group normalization needs at least 2 rollouts per prompt")

from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

tok = common.load_tokenizer(args.teacher)
tok_tgt = common.load_tokenizer(args.target)
base = common.load_model(args.teacher, device)
target = common.load_model(args.target, device)
names = {n.split(".")[-1] for n, _ in base.named_modules()}
missing = [t for t in args.lora_targets if t not in names]
if missing:
    common.die(f"--lora_targets {','.join(missing)} not in the teacher; its linear layers include "
               f"{', '.join(sorted(n for n in names if n.endswith('proj')))}")
if args.grad_ckpt:  # recompute the trunk in backward; HF skips it in eval mode, so rollouts keep their KV cache
    common.enable_grad_ckpt(base)
model = get_peft_model(base, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                        target_modules=args.lora_targets, task_type="CAUSAL_LM"))
lora_params = [q for q in model.parameters() if q.requires_grad]
opt = torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=0.0)
print(f"teacher {common.n_params(base) / 1e6:.2f}M params, LoRA {sum(q.numel() for q in lora_params) / 1e3:.1f}K trainable, "
      f"target {common.n_params(target) / 1e6:.2f}M, backend {backend}, device {device}", flush=True)
if backend == "hf":  # vLLM spreads by prompt, one engine per rank
    common.note_idle_ranks(P * G, max(1, args.gen_batch // G) * G)  # generate() batches whole prompts

# training prompts: all tasks pooled, a fresh seeded permutation per epoch (common.epoch_stream); the cursor is
# the number of prompts consumed so far, which is all a resume needs to continue the same order
pool = [(t, r) for t in args.tasks for r in common.load_task(t, "train", data=args.data, **common.data_options(args))]
held = {t: common.load_task(t, "test", data=args.data, n=args.n_eval, seed=args.seed, **common.data_options(args)) for t in args.tasks}


engine, lora_dir = None, os.path.join(args.out_dir, "vllm_lora")
if backend == "vllm":  # colocated engine, created once; the LoRA travels per step as a LoRARequest
    from vllm.lora.request import LoRARequest
    every = [common.build_prompt(tok, t, r) for t, r in pool] + [common.build_prompt(tok, t, r) for t in held for r in held[t]]
    engine = common.make_vllm_engine(args.teacher, seed=args.seed, max_model_len=common.vllm_max_len(tok, every, max(budget.values())),
                                     enable_lora=True, max_lora_rank=args.lora_r)
    if rank == 0:
        shutil.rmtree(lora_dir, ignore_errors=True)  # an earlier run's adapters: other weights under the same step numbers
lora_saved = [None]  # the step whose adapter lora_dir holds


def lora_request(step):
    """vLLM: the adapter after `step` optimizer steps, saved once per step (an eval step asks four times) under
    a new id, so the engine loads it fresh."""
    if engine is None:
        return None
    path = os.path.join(lora_dir, str(step))
    if lora_saved[0] != step:  # decided alike on every rank (torchrun: every engine reads what rank 0 wrote, after the barrier)
        if rank == 0:
            model.save_pretrained(path)
            shutil.rmtree(os.path.join(lora_dir, str(step - 1)), ignore_errors=True)
        common.barrier()
        lora_saved[0] = step
    return LoRARequest(f"calib{step}", step + 1, path)


# -----------------------------------------------------------------------------
# helpers
# what the stage is doing and since when; a real model's scoring and backward on a CPU take minutes
phase = [None, time.time()]
stop_beat = common.start_heartbeat(  # silent for a phase younger than PROGRESS_SECS (toy steps take under a second)
    lambda: phase[0] and time.time() - phase[1] >= common.PROGRESS_SECS and f"{phase[0]} | {common.fmt_secs(time.time() - phase[1])} so far")


def rollouts(rows, n, seed, greedy, step, use_lora=True):
    """n samples per row from theta (or the original teacher with use_lora=False): flat, prompt-major.
    Temperature 1, no top-k/top-p: the policy itself, which REINFORCE and the K3 anchor score (samples
    at another temperature would make the update off-policy). Each row gets its task's budget."""
    prompts, budgets = [common.build_prompt(tok, t, r) for t, r in rows], [budget[t] for t, _ in rows]
    phase[:] = [None, time.time()]  # the sampler prints its own progress
    if engine is not None:
        return prompts, common.generate_by_budget(None, tok, prompts, budgets, n=n, temperature=1.0, greedy=greedy, seed=seed,
                                                  backend="vllm", engine=engine, lora_request=lora_request(step) if use_lora else None,
                                                  spread=True)
    with contextlib.nullcontext() if use_lora else model.disable_adapter():
        return prompts, common.generate_by_budget(model, tok, prompts, budgets, n=n, temperature=1.0, greedy=greedy, seed=seed,
                                                  batch_size=args.gen_batch, spread=True)


def target_seq_logprobs(rows, samples):
    """log p_target(y|x) on the target's own tokenization of the same prompt and completion text."""
    tprompts = [common.build_prompt(tok_tgt, *rows[s["i"]]) for s in samples]
    return common.text_seq_logprobs(target, tok_tgt, tprompts, [s["text"] for s in samples],
                                    eos=[s["finished"] for s in samples], chunk=args.chunk)


def evaluate(step, tag, use_lora=True):
    """Greedy held-out accuracy per task, and the on-policy sequence KL(theta||target) on one
    sample per held-out prompt (fixed sampling seed, so before/after see the same randomness)."""
    t0, res = time.time(), {"step": step, "eval": tag}
    kls = []
    for t, rs in held.items():
        rows = [(t, r) for r in rs]
        _, gs = rollouts(rows, 1, seed=common.derive_seed(args.seed, "eval_greedy"), greedy=True, step=step, use_lora=use_lora)
        res[f"acc_{t}"] = float(np.mean([common.grade(t, s["text"], r, s["finished"]) for s, (_, r) in zip(gs, rows)]))
        common.warn_cutoffs(f"eval ({tag}) {t}", float(np.mean([s["finished"] for s in gs])), budget[t])
        prompts, ss = rollouts(rows, 1, seed=common.derive_seed(args.seed, "eval_sample"), greedy=False, step=step, use_lora=use_lora)
        res[f"sampled_acc_{t}"] = float(np.mean([common.grade(t, s["text"], r, s["finished"]) for s, (_, r) in zip(ss, rows)]))
        res[f"checked_{t}"] = float(np.mean([common.opens_with_check(s["text"]) for s in ss]))
        res[f"len_{t}"] = float(np.mean([len(s["ids"]) for s in ss]))
        phase[:] = [f"eval ({tag}) {t}: scoring {len(ss)} samples", time.time()]
        ids, am, cm = common.make_batch(tok, prompts, [s["ids"] for s in ss], device)
        with torch.no_grad(), (contextlib.nullcontext() if use_lora else model.disable_adapter()):
            lp = (common.completion_logprobs(model, ids, am, cm, args.chunk) * cm).sum(-1)
        lt, _ = target_seq_logprobs(rows, ss)
        kls.append(lp - lt)
    res["seq_kl_target"] = torch.cat(kls).mean().item()
    res["seconds"] = round(time.time() - t0, 2)
    print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()), flush=True)
    if rank == 0:
        common.append_jsonl(os.path.join(args.out_dir, "metrics.jsonl"), res)
    return res


def save_ckpt(meta):
    """ckpt/: the adapter's weights, optimizer and meta (step, RNG, data cursor, band history) as they were
    at the start of step meta["step"] + 1 (common.save_checkpoint: atomic, the previous checkpoint kept
    until this one is whole)."""
    if rank == 0:  # the adapter and its optimizer are the same on every rank
        common.save_checkpoint(ckpt_dir, get_peft_model_state_dict(model), opt.state_dict(), meta)


# -----------------------------------------------------------------------------
# resume or start
step, cursor, rng = 0, 0, None
band = {}  # recent good losses and grad norms (common.band_check): which weights are safe to checkpoint
metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
ck = common.load_checkpoint(ckpt_dir)
if ck:
    set_peft_model_state_dict(model, {k: v.to(device) for k, v in ck["weights"].items()})
    opt.load_state_dict(ck["optimizer"])
    lr0 = opt.param_groups[0]["lr"]
    for g in opt.param_groups:  # --lr may differ from the checkpoint's: continuing a diverged run with a smaller step
        g["lr"] = args.lr
    step, cursor, band, rng = ck["meta"]["step"], ck["meta"]["cursor"], ck["meta"]["band"], ck["meta"]["rng"]
    # drop metrics lines written after the checkpoint (a kill between save_every steps), so the
    # log has each step exactly once
    if os.path.exists(metrics_path) and rank == 0:
        common.write_jsonl(metrics_path, [m for m in common.read_jsonl(metrics_path) if m["step"] <= step])
    print(f"resumed from {ck['file']} at step {step}" + (f" with --lr {args.lr} (it trained with {lr0})" if lr0 != args.lr else ""),
          flush=True)
elif os.path.exists(metrics_path) and rank == 0:
    os.remove(metrics_path)  # a run that died before its first checkpoint starts over
before_path = os.path.join(args.out_dir, "eval_before.json")
if ck and os.path.exists(before_path):  # resuming (same settings, checked above)
    before = common.read_jsonl(before_path)[0]
else:  # the original teacher (LoRA off), once; kept on disk so a resumed run reports the same numbers
    before = evaluate(0, "original", use_lora=False)
    if rank == 0:
        common.write_jsonl(before_path, [before])

# -----------------------------------------------------------------------------
# loop
# Divergence: a step scores the weights it starts from, so those are checkpointed during the step (after its
# backward, before its update) and only when its loss and grad norm are in band (common.band_check): ckpt/
# never holds weights that a step showed to be diverged, and a non-finite step names the last good one.
t_start, done_here, good_step, bad = time.time(), 0, step, []  # good_step: what ckpt/ holds (0: nothing)
phase[:] = [None, time.time()]
if rng is not None:
    common.set_rng_state(rng)
while step < args.steps:
    t0 = time.time()
    meta = {"step": step, "rng": common.rng_state(), "cursor": cursor, "band": {k: list(v) for k, v in band.items()}}
    rows = [pool[i] for i in common.epoch_stream(args.seed, "prompt_order", len(pool), cursor, P)]
    cursor += P
    # each step's rollouts get their own seed derived from (seed, step): reruns and resumes agree
    prompts, samples = rollouts(rows, G, seed=common.derive_seed(args.seed, "rollouts", step), greedy=False, step=step)
    all_samples, mine = samples, common.rank_slice(P)  # torchrun: this rank's whole groups (one process: all)
    rows, prompts, samples = rows[mine], prompts[mine], [{**s, "i": s["i"] - mine.start} for s in samples[mine.start * G:mine.stop * G]]
    # strict: a rollout cut off at --max_new_tokens, or with no final-answer marker, earns no task reward
    r_task_B = torch.tensor([float(common.grade(rows[s["i"]][0], s["text"], rows[s["i"]][1], s["finished"])) for s in samples])

    model.train()
    phase[:] = [f"step {step + 1}/{args.steps}: scoring and backward over {len(samples)} rollouts", time.time()]
    ids, am, cm = common.make_batch(tok, [prompts[s["i"]] for s in samples], [s["ids"] for s in samples], device)
    cm = cm.float()
    # row slices of --micro_batch sequences (one slice by default), each cut to its own longest row
    sl = [(slice(a, a + MB), int(am[a:a + MB].sum(1).max())) for a in range(0, len(samples), MB)]
    logp_BT = common.completion_logprobs(model, ids, am, cm, args.chunk) if len(sl) == 1 else None  # grad into the LoRA
    with torch.no_grad():
        if logp_BT is None:  # theta's sequence log-probs for r_cal first; the graded passes follow per slice
            seq_theta_B = torch.cat([(common.completion_logprobs(model, ids[r, :L], am[r, :L], cm[r, :L], args.chunk) * cm[r, :L]).sum(-1)
                                     for r, L in sl])
        else:
            seq_theta_B = (logp_BT.detach() * cm).sum(-1)
        with model.disable_adapter():  # the anchor: same weights, LoRA off
            ref_BT = torch.zeros_like(cm)
            for r, L in sl:
                ref_BT[r, :L] = common.completion_logprobs(model, ids[r, :L], am[r, :L], cm[r, :L], args.chunk)
    seq_tgt_B, n_tgt_B = target_seq_logprobs(rows, samples)
    n_theta_B = cm.sum(-1)
    r_cal_B = (common.calibration_reward(seq_tgt_B, seq_theta_B, n_tgt_B, n_theta_B) if args.cal_length_norm
               else common.calibration_reward(seq_tgt_B, seq_theta_B))
    if not torch.isfinite(r_cal_B).all():
        common.die(f"non-finite calibration reward at step {step + 1} (a model gives a sampled token probability 0: check its "
                   f"dtype and logits); {ckpt_dir} keeps step {good_step or 'none'}")
    # Algorithm 1's loss (common.calibration_loss) accumulated over the slices: advantages from the whole
    # groups, every part divided by the whole batch's token count, so the summed gradient is exact
    adv_B = common.combine_advantages(r_task_B, r_cal_B.cpu(), args.lam, G).to(device)
    n_tok = common.all_sum(cm.sum())  # the whole batch's, over the ranks
    opt.zero_grad(set_to_none=True)
    loss, parts = torch.zeros((), device=device), {"pg": 0.0, "kl": 0.0}
    for r, L in sl:
        lp = logp_BT if logp_BT is not None else common.completion_logprobs(model, ids[r, :L], am[r, :L], cm[r, :L], args.chunk)
        part, pg, kl = common.calibration_loss_part(lp, ref_BT[r, :L], cm[r, :L], adv_B[r], args.beta, n_tokens=n_tok)
        part.backward()
        loss, parts = loss + part.detach(), {"pg": parts["pg"] + pg, "kl": parts["kl"] + kl}
    model.eval()  # rollouts next: HF turns the KV cache off for a model that trains with --grad_ckpt
    if world > 1:  # each rank's parts are divided by the global token count: the sum is the one-process gradient
        common.all_sum_grads(lora_params)
        loss, parts = common.all_sum(loss), {k: common.all_sum(v) for k, v in parts.items()}
        r_task_B, r_cal_B, seq_theta_B, seq_tgt_B, n_theta_B = (common.all_gather_cat(t.to(device)).cpu() for t in
                                                                (r_task_B, r_cal_B, seq_theta_B, seq_tgt_B, n_theta_B))
    gnorm = torch.nn.utils.clip_grad_norm_(lora_params, args.grad_clip)
    # the REINFORCE loss is a zero-mean surrogate: its band is set by a few steps' spread, not by step 1 alone
    bad = common.band_check({"loss": loss.item(), "grad_norm": gnorm.item()}, band, warmup=5)
    if not (torch.isfinite(loss) and torch.isfinite(gnorm)):
        common.diverged(f"non-finite at step {step + 1}: loss {loss.item()}, grad norm {gnorm.item()}, pg {parts['pg'].item()}, "
                        f"kl {parts['kl'].item()}, r_cal range [{r_cal_B.min().item()}, {r_cal_B.max().item()}] (a larger --beta "
                        "also holds the teacher closer)", ckpt_dir, good_step, args.lr)
    if step > good_step and step % args.save_every == 0:  # the weights this step scored, before its update
        if bad:
            print(f"step {step + 1}: {', '.join(bad)} out of the band of recent good steps: step {step}'s adapter is not "
                  f"checkpointed ({ckpt_dir} keeps step {good_step or 'none'})", flush=True)
        else:
            save_ckpt(meta)
            good_step = step
    opt.step()
    step += 1
    done_here += 1

    secs = time.time() - t0
    eta = (time.time() - t_start) / done_here * (args.steps - step)
    m = {"step": step, "loss": loss.item(), "reward_task": r_task_B.mean().item(), "reward_cal": r_cal_B.mean().item(),
         "kl_anchor": parts["kl"].item(), "accuracy": r_task_B.mean().item(), "len": n_theta_B.mean().item(),
         "seq_kl_target": (seq_theta_B - seq_tgt_B).mean().item(), "grad_norm": gnorm.item(), "in_band": not bad,
         # the mechanism (paper 6.4-6.5): how often the teacher opens with a self-check, and how many it makes
         "checked_share": float(np.mean([common.opens_with_check(s["text"]) for s in all_samples])),
         "checks": float(np.mean([common.check_count(s["text"]) for s in all_samples])),
         "finished": float(np.mean([s["finished"] for s in all_samples])), "seconds": round(secs, 3), "eta": round(eta, 1)}
    print(f"step {step}/{args.steps} | loss {m['loss']:.4f} | r_task {m['reward_task']:.3f} | r_cal {m['reward_cal']:.2f} | "
          f"kl {m['kl_anchor']:.4f} | seq_kl_tgt {m['seq_kl_target']:.2f} | len {m['len']:.1f} | checked {m['checked_share']:.2f} | "
          f"{secs:.1f}s | eta {common.fmt_secs(eta)}", flush=True)
    if rank == 0:
        common.append_jsonl(metrics_path, m)
    if args.sample_every and step % args.sample_every == 0:
        s = samples[0]
        print(f"  sample ({rows[0][0]}, correct={bool(r_task_B[0])}): {s['text'][:300]!r}", flush=True)
    if args.eval_every and step % args.eval_every == 0 and step < args.steps:
        evaluate(step, "calibrated")
    if step == args.steps and not bad:  # the final adapter (nothing scores it): kept unless this step left the band
        save_ckpt({"step": step, "rng": common.rng_state(), "cursor": cursor, "band": band})
        good_step = step
    if args.stop_after and step >= args.stop_after and step < args.steps:
        print(f"stopping after step {step} (--stop_after), as if killed; rerun to resume", flush=True)
        common.dist_teardown()
        sys.exit(0)
if good_step < args.steps:
    print(f"warning: the last steps left the band of the good ones (see in_band in metrics.jsonl); adapter/ and merged/ hold "
          f"the final weights, {ckpt_dir} keeps step {good_step or 'none'}: {common.rerun_command(lr=f'{args.lr / 10:g}')} "
          "continues from it", flush=True)

# -----------------------------------------------------------------------------
# outputs: adapter, held-out eval of the calibrated teacher, merged model, summary
if rank == 0:
    common.atomic_save_dir(os.path.join(args.out_dir, "adapter"), model.save_pretrained)
after = evaluate(step, "calibrated")
stop_beat()
merge_lost = common.lora_merge_loss(model)  # 0 in fp32; a bf16 merge can round a small-lr update away
if merge_lost > 0.1:
    print(f"warning: merging the LoRA into the {base.dtype} teacher rounds away {merge_lost:.0%} of its weight change; "
          "merged/, which the later stages load, carries only the rest (the accuracy and KL above are of base + adapter). "
          "A larger --lr keeps more of it; adapter/ has all of it", flush=True)
merged = model.merge_and_unload()  # plain HF model: loads with AutoModelForCausalLM.from_pretrained


def save_merged(path):
    merged.save_pretrained(path)
    tok.save_pretrained(path)


if rank == 0:
    common.atomic_save_dir(os.path.join(args.out_dir, "merged"), save_merged)
    shutil.rmtree(lora_dir, ignore_errors=True)
common.barrier()  # torchrun: rank 0 has appended its last line to metrics.jsonl
rows = common.read_jsonl(metrics_path)
train = [r for r in rows if "eval" not in r]
summary = {"lam": args.lam, "beta": args.beta, "steps": step, "teacher": args.teacher, "target": args.target,
           "acc": {"original": {t: before[f"acc_{t}"] for t in args.tasks}, "calibrated": {t: after[f"acc_{t}"] for t in args.tasks}},
           "seq_kl_target": {"original": before["seq_kl_target"], "calibrated": after["seq_kl_target"]},
           **{k: {"original": {t: before[f"{k}_{t}"] for t in args.tasks}, "calibrated": {t: after[f"{k}_{t}"] for t in args.tasks}}
              for k in ("sampled_acc", "checked", "len")},
           "train_first_last": {k: [train[0][k], train[-1][k]] for k in ("reward_task", "reward_cal", "seq_kl_target", "kl_anchor")} if train else {},
           "n_eval": {t: len(r) for t, r in held.items()}, "merge_lost_share": merge_lost}
if rank == 0:
    common.atomic_write_json(os.path.join(args.out_dir, "summary.json"), summary)
print(f"done: acc {summary['acc']} | seq_kl_target {before['seq_kl_target']:.2f} -> {after['seq_kl_target']:.2f} | "
      f"wrote {args.out_dir}/{{adapter,merged,ckpt,summary.json}}", flush=True)
common.dist_teardown()
