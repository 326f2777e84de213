"""
Pilot KL study (paper section 4: Table 1 and Figure 2; Table 4 when the teacher is a calibrated
.../merged folder). For one teacher/student pair and each task, samples rollouts from both models,
grades them, and measures how the KL estimators behave on them.

Per task, n rollouts per prompt from each model (temperature 1.0, no top-k/top-p), then:
- token KL (Eq. 2), exact over the vocabulary, reverse KL(s||t) and forward KL(t||s), on student
  samples (on-policy) and on teacher samples (off-policy); per token and summed per sequence;
- sequence KL (Eq. 1): reverse on student samples, forward on teacher samples;
- off-policy sequence RKL from teacher samples with importance weights (Eq. 3) and with K3: mean,
  median and the share of non-finite weights, because the point is that they are unstable;
- wrong-trace preference (4.2, DPO lens): how often a wrong student trace has a lower sequence RKL
  than a correct one of the same prompt;
- forking tokens: the share of on-policy token RKL on the 20% highest-student-entropy positions;
- tail noise (Eq. 4, DESIGN 4): per vocabulary token, its RKL contribution within the student's
  top-k (k = 1, 5, 20, 100, all) against its frequency in the rollouts, Spearman rho per k.

    python 01_pilot_kl.py --teacher runs/toy/00_toy_world/teacher --student runs/toy/00_toy_world/student \
        --teacher_name original --data runs/toy/00_toy_world/data --out_dir runs/toy/01_pilot/original
    # Table 4: --teacher runs/toy/02_calibrate/distillable/merged --teacher_name distillable
    # real: --teacher Qwen/Qwen3-8B --student Qwen/Qwen3-1.7B --tasks gsm8k,csqa   (hub data, each task's own budget)

Writes config.json (first), metrics.jsonl (one line per task), table1.json and table1.md (quantities
down, tasks across, like the paper's Table 1), tail_noise.png, rollouts.jsonl (every rollout, its
grade and both models' sequence log-probs) and samples_student.json / samples_teacher.json (reused by
a rerun with the same weights and settings).

Expected on the default toy world: see docs/RESULTS.md

Departures from the paper and why:
- One column per task, so that a task unlike the rest of its family shows; the paper averages KL
  over the tasks of a family. Per-token means pool all completion positions of a task
  (token-weighted); "*_per_seq" keys are per-sequence sums. On student samples
  onpolicy_token_rkl_per_seq and onpolicy_seq_rkl estimate the same quantity (Eq. 2 is the
  Rao-Blackwellized Eq. 1), so their gap is sampling noise.
- Teacher and student with different tokenizers (e.g. the teacher against the target): token KL is
  undefined across vocabularies, so only sequence-level rows; each model scores the same text with its
  own tokenization (the sampler scores its own sampled ids exactly). Token-level fields are null with
  the reason in "note".
- Tail noise uses |contribution|: a token's contribution p_s(v) log(p_s/p_t) is negative where the
  teacher puts more mass, and both signs are discrepancy (tail_spearman_signed keeps the sign). rho is
  over tokens realized at least once in the student's rollouts and ever inside the top-k. Eq. 4 reads
  two ways, and both are reported (one figure row each): tail_spearman divides a token's summed
  contribution by all positions (DESIGN 4); tail_spearman_member by the positions where the token was a
  top-k candidate (the paper's "average KL divergence for each token"). At small k the first mostly
  counts how often a token is a candidate, which follows its frequency, so only the second can show the
  paper's finding that the correlation appears only as k -> |V|.
"""
import argparse, math, os, sys, time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

# ----------------------------------------------------------------------------- config
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--teacher", required=True, help="teacher: hub id or HF folder (a calibrated .../merged works)")
p.add_argument("--student", required=True, help="student: hub id or HF folder")
p.add_argument("--teacher_name", default="", help="label in the tables (default: folder or id basename)")
p.add_argument("--tasks", type=common.csv_list, default=["toy_math", "toy_qa"], help="comma list of tasks")
p.add_argument("--data", default=None, help="toy world data folder, a folder of <task>/<split>.jsonl, or one .jsonl/.parquet (split 9:1 by prompt hash; None: hub)")
p.add_argument("--prompt_field", default=None, help="local --data: the prompt column (default: prompt, question, problem, instruction or input)")
p.add_argument("--answer_field", default=None, help="local --data: the answer column (default: answer, solution, output, target or response; '#### 72' reads 72)")
p.add_argument("--choices_field", default=None, help="local --data, multiple choice: the options column (default: choices or options)")
p.add_argument("--whole_file", action="store_true", help="one --data file: all of it is the test split (default: a fixed 9:1 train/test split by prompt hash)")
p.add_argument("--split", default="test", help="which split the prompts come from")
p.add_argument("--n_prompts", type=int, default=32, help="prompts per task")
p.add_argument("--n_samples", type=int, default=16, help="rollouts per prompt per model (paper: 16)")
p.add_argument("--max_new_tokens", type=int, default=None, help="completion budget (default: each task's own, common.TASKS)")
p.add_argument("--temperature", type=float, default=1.0, help="1.0 = unbiased sampling (no top-k/top-p ever)")
p.add_argument("--forking_frac", type=float, default=0.2, help="share of highest-entropy positions called forking")
p.add_argument("--batch_size", type=int, default=128, help="sequences per generation batch; a batch waits for its longest sample")
p.add_argument("--score_batch", type=int, default=64, help="sequences per scoring forward (both models)")
p.add_argument("--chunk", type=int, default=512, help="positions per (chunk, V) logits block in token KL")
p.add_argument("--backend", default="auto", help="generation: hf | vllm | auto (vllm on CUDA when installed)")
p.add_argument("--device", default="auto", help="auto | cpu | cuda")
p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is faster on an oversubscribed CPU)")
p.add_argument("--out_dir", required=True, help="where everything is written")
p.add_argument("--seed", type=int, default=0, help="prompt choice and sampling seeds")
args = common.parse_args(p)
KS = (1, 5, 20, 100, None)  # None = the whole vocabulary ("all")
KEYS = ["1", "5", "20", "100", "all"]
common.check_flags(args, counts=("n_prompts", "n_samples", "max_new_tokens", "batch_size", "score_batch", "chunk"),
                   nonneg=("temperature", "forking_frac"))
if not args.teacher_name:  # ".../<variant>/merged" -> "<variant>", "Qwen/Qwen3-8B" -> "Qwen3-8B"
    parts = os.path.normpath(args.teacher).split(os.sep)
    args.teacher_name = parts[-2] if parts[-1] in ("merged", "model", "adapter") and len(parts) > 1 else parts[-1]
budget = {t: common.task_budget(t, args.max_new_tokens) for t in args.tasks}  # max new tokens per task
common.write_config(args.out_dir, {**vars(args), "max_new_tokens_per_task": budget})

# ----------------------------------------------------------------------------- seed, device, models
common.seed_everything(args.seed)
device = common.get_device(args.device)
if args.threads > 0:
    torch.set_num_threads(args.threads)
backend = common.resolve_backend(args.backend)
t_start = time.time()
datas = {t: common.load_task(t, args.split, data=args.data, n=args.n_prompts, seed=args.seed, **common.data_options(args))
         for t in args.tasks}  # before the models: a data problem shows in seconds, not after minutes of loading
tok_s, tok_t = common.load_tokenizer(args.student), common.load_tokenizer(args.teacher)
student = common.load_model(args.student, device)
teacher = common.load_model(args.teacher, device)
try:  # token-level KL needs a shared vocabulary; otherwise sequence-level rows only
    vocab, note = common.shared_vocab(student, teacher, tok_s, tok_t), None
except ValueError as e:
    vocab, note = None, f"token-level KL undefined across tokenizers: {e}"
    print(f"note: {note}")
metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
if os.path.exists(metrics_path):
    os.remove(metrics_path)  # a rerun replaces the run, it does not append to it


# ----------------------------------------------------------------------------- helpers
@torch.inference_mode()
def score(samples, prompts_s, prompts_t, sampler, tail=None):
    """Both models' log-probs of each rollout; with a shared vocabulary also the exact token KL.
    samples: generate() output of the `sampler` model ("student" | "teacher"). Returns per-sequence
    arrays lp_s, lp_t (summed log-probs), n_tok and, token-level only, rkl_sum, fkl_sum, plus pooled
    per-position rkl, fkl, ent (student entropy). tail: tail-noise accumulator, updated in place."""
    B = len(samples)
    out = {k: np.zeros(B) for k in ("lp_s", "lp_t", "n_tok", "rkl_sum", "fkl_sum")}
    pooled = {"rkl": [], "fkl": [], "ent": []}
    order = np.argsort([len(x["ids"]) for x in samples], kind="stable")  # similar lengths batch together: less padding
    t0, at = time.time(), [0, time.time()]  # sequences scored, start of the running batch
    with common.heartbeat(lambda: f"score {sampler} samples: {at[0]}/{B} seq done | batch of {min(args.score_batch, B - at[0])} "
                                  f"running {common.fmt_secs(time.time() - at[1])} | {common.fmt_secs(time.time() - t0)} so far"):
        for s in range(0, B, args.score_batch):
            at[:] = [s, time.time()]
            idx = order[s:s + args.score_batch]
            xs = [samples[j] for j in idx]
            ids = [x["ids"] for x in xs]
            ps, pt = [prompts_s[x["i"]] for x in xs], [prompts_t[x["i"]] for x in xs]
            if vocab is not None:  # same tokenizer: both models score the sampled ids exactly
                own_tok, own_p = (tok_s, ps) if sampler == "student" else (tok_t, pt)
                ids_BL, am_BL, cm_BL = common.make_batch(own_tok, own_p, ids, device)
                got = {"fkl": [], "ent": [], "lps": [], "lpt": []}

                def on_chunk(sl, tl, tgt):  # (n, V), (n, V), (n,): one pass over each model's logits
                    ls = F.log_softmax(sl, -1)
                    got["fkl"].append(common.token_divergence(sl, tl, beta=0.0))
                    got["ent"].append(-(ls.exp() * ls).sum(-1))
                    got["lps"].append(common.logprobs_of(sl, tgt))
                    got["lpt"].append(common.logprobs_of(tl, tgt))
                    if tail is not None:
                        common.tail_noise_update(tail, sl, tl, KS)
                rkl_N = common.chunked_token_divergence(student, teacher, ids_BL, am_BL, cm_BL, beta=1.0, chunk=args.chunk,
                                                        vocab=vocab, on_chunk=on_chunk)
                fkl_N, ent_N = torch.cat(got["fkl"]), torch.cat(got["ent"])
                lps_N, lpt_N = torch.cat(got["lps"]), torch.cat(got["lpt"])
                rows_N = cm_BL.bool().nonzero()[:, 0]  # same order as the positions above (row-major)
                per_seq = lambda v_N: torch.zeros(len(xs), dtype=torch.float64, device=v_N.device).index_add_(0, rows_N, v_N.double()).cpu().numpy()
                out["lp_s"][idx], out["lp_t"][idx] = per_seq(lps_N), per_seq(lpt_N)
                out["rkl_sum"][idx], out["fkl_sum"][idx] = per_seq(rkl_N), per_seq(fkl_N)
                for k, v in (("rkl", rkl_N), ("fkl", fkl_N), ("ent", ent_N)):
                    pooled[k].append(v.float().cpu())
            else:  # different tokenizers: the sampler scores its own ids, the other model the same text its own way
                fin = [x["finished"] for x in xs]
                texts = [x["text"] for x in xs]
                b_s = common.make_batch(tok_s, ps, ids, device) if sampler == "student" else common.make_text_batch(tok_s, ps, texts, fin, device)
                b_t = common.make_batch(tok_t, pt, ids, device) if sampler == "teacher" else common.make_text_batch(tok_t, pt, texts, fin, device)
                out["lp_s"][idx] = common.completion_logprobs(student, *b_s, chunk=args.chunk).sum(-1).double().cpu().numpy()
                out["lp_t"][idx] = common.completion_logprobs(teacher, *b_t, chunk=args.chunk).sum(-1).double().cpu().numpy()
            out["n_tok"][idx] = [len(x) for x in ids]
            common.progress(min(s + args.score_batch, B), B, t0, f"score {sampler} samples", "seq")
    if vocab is None:
        return out, None
    return out, {k: torch.cat(v).double().numpy() for k, v in pooled.items()}




def fnum(x, nd=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2e}" if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3) else f"{x:.{nd}f}"


# ----------------------------------------------------------------------------- rollouts: one model at a time
# Every task's rollouts first, one model's vLLM engine alive at a time: two engines beside both HF
# models would not fit one 80 GB GPU for an 8B teacher. Each (task, model) gets its own sampling seed,
# so no two sample sets share random numbers and the order of sampling changes nothing. Each model's
# rollouts are kept in samples_<model>.json: a rerun with the same weights and settings (after the
# second engine found no GPU memory, say) samples only what is missing.
prompts = {(t, m): [common.build_prompt(tk, t, r) for r in datas[t]] for t in args.tasks for m, tk in (("s", tok_s), ("t", tok_t))}
gens, gen_secs = {}, {t: 0.0 for t in args.tasks}
for m, (name, model, tok, path) in enumerate((("student", student, tok_s, args.student), ("teacher", teacher, tok_t, args.teacher))):
    cache_path = os.path.join(args.out_dir, f"samples_{name}.json")
    key = {"model": path, "stamp": common.model_stamp(path), "prompts": {t: prompts[t, name[0]] for t in args.tasks},
           **{k: getattr(args, k) for k in ("n_samples", "temperature", "seed")}, "max_new_tokens": budget, "backend": backend}
    cached = common.load_cached(cache_path, key)
    if cached is not None:
        print(f"{name} rollouts: reusing {cache_path} (same weights and settings)")
        gens.update({(t, name): cached[t] for t in args.tasks})
        continue
    engine = None
    if backend == "vllm":
        mine = [p for t in args.tasks for p in prompts[t, name[0]]]
        engine = common.make_vllm_engine(path, args.seed, common.vllm_max_len(tok, mine, max(budget.values())))
    for ti, task in enumerate(args.tasks):
        t0 = time.time()
        gens[task, name] = common.generate(model, tok, prompts[task, name[0]], n=args.n_samples, max_new_tokens=budget[task],
                                           temperature=args.temperature, seed=common.derive_seed(args.seed, "pilot", task, name),
                                           batch_size=args.batch_size, backend=backend, engine=engine, show=f"sample {name} {task}")
        gen_secs[task] += time.time() - t0
    del engine
    common.release_memory()  # the engine's memory goes back before the next model's engine starts
    common.atomic_write_json(cache_path, {"key": key, "samples": {t: gens[t, name] for t in args.tasks}})
for (task, name), xs in gens.items():  # graded here, not cached: the tables follow the current grader
    for x in xs:
        x.update(common.grade_record(task, x["text"], datas[task][x["i"]], x["finished"]))

# ----------------------------------------------------------------------------- loop over tasks: scoring
rows, rollout_rows, tails = [], [], {}
for task in args.tasks:
    t0 = time.time()
    data, prompts_s, prompts_t = datas[task], prompts[task, "s"], prompts[task, "t"]
    gen_s, gen_t, t_gen = gens[task, "student"], gens[task, "teacher"], gen_secs[task]

    tail = {} if vocab is not None else None
    sc_s, tok_on = score(gen_s, prompts_s, prompts_t, "student", tail)  # on-policy for RKL
    sc_t, tok_off = score(gen_t, prompts_s, prompts_t, "teacher")       # off-policy for RKL
    seq_rkl = sc_s["lp_s"] - sc_s["lp_t"]  # Eq. 1 on student samples: sum of log p_s - log p_t over realized tokens
    seq_fkl = sc_t["lp_t"] - sc_t["lp_s"]  # Eq. 1 with roles swapped, on teacher samples
    off = common.offpolicy_seq_rkl(sc_t["lp_s"], sc_t["lp_t"])  # Eq. 3 and K3 from teacher samples
    is_open = common.task_kind(task) == "open"  # no grader: no correct/wrong split
    if not is_open:
        wtp, wtp_n = common.wrong_trace_preference(seq_rkl, [x["correct"] for x in gen_s], [x["i"] for x in gen_s])
        wtp = None if wtp_n == 0 else wtp  # no prompt had both a correct and a wrong trace
    else:
        wtp, wtp_n = None, 0

    row = {"teacher": args.teacher_name, "student": os.path.basename(os.path.normpath(args.student)), "task": task,
           "onpolicy_token_rkl": None, "onpolicy_token_fkl": None,
           "onpolicy_seq_rkl": float(seq_rkl.mean()), "wrong_trace_pref": wtp,
           "offpolicy_seq_rkl_is": off["is_mean"], "offpolicy_seq_rkl_k3": off["k3_mean"],
           "tail_spearman": None,
           # extras
           "onpolicy_seq_rkl_median": float(np.median(seq_rkl)), "seq_fkl_teacher_samples": float(seq_fkl.mean()),
           "offpolicy_seq_rkl_is_median": off["is_median"], "offpolicy_seq_rkl_k3_median": off["k3_median"],
           "offpolicy_nonfinite_share": off["nonfinite_share"], "offpolicy_log_w_max": off["log_w_max"],
           "wrong_trace_prompts": wtp_n,
           "offpolicy_token_rkl": None, "offpolicy_token_fkl": None,
           "onpolicy_token_rkl_per_seq": None, "onpolicy_token_fkl_per_seq": None, "offpolicy_token_rkl_per_seq": None,
           "forking_share": None, "tail_spearman_signed": None, "tail_spearman_member": None,
           **{f"{k}_{who}": None if is_open and k != "finished" else float(np.mean([x[rec] for x in g]))
              for who, g in (("student", gen_s), ("teacher", gen_t))
              for k, rec in (("acc", "correct"), ("acc_lenient", "correct_lenient"), ("finished", "finished"), ("no_answer", "no_answer"))},
           **{f"{k}_{who}": float(np.mean([fn(x["text"]) for x in g])) for who, g in (("student", gen_s), ("teacher", gen_t))
              for k, fn in (("checked_share", common.opens_with_check), ("checks", common.check_count))},
           "len_student": float(sc_s["n_tok"].mean()), "len_teacher": float(sc_t["n_tok"].mean()),
           "n_prompts": len(data), "n_samples": args.n_samples, "note": note}
    if vocab is not None:
        freq_V = np.bincount(np.concatenate([x["ids"] for x in gen_s]).astype(np.int64), minlength=vocab)[:vocab]
        row.update({
            "onpolicy_token_rkl": float(tok_on["rkl"].mean()), "onpolicy_token_fkl": float(tok_on["fkl"].mean()),
            "offpolicy_token_rkl": float(tok_off["rkl"].mean()), "offpolicy_token_fkl": float(tok_off["fkl"].mean()),
            "onpolicy_token_rkl_per_seq": float(sc_s["rkl_sum"].mean()), "onpolicy_token_fkl_per_seq": float(sc_s["fkl_sum"].mean()),
            "offpolicy_token_rkl_per_seq": float(sc_t["rkl_sum"].mean()),
            "forking_share": common.forking_share(tok_on["rkl"], tok_on["ent"], args.forking_frac),
            "tail_spearman": common.tail_spearman(tail, freq_V, KEYS),
            "tail_spearman_signed": common.tail_spearman(tail, freq_V, KEYS, signed=True),
            "tail_spearman_member": common.tail_spearman(tail, freq_V, KEYS, per="member")})
        tails[task] = (tail, freq_V)
    rows.append(row)
    for src, g, sc in (("student", gen_s, sc_s), ("teacher", gen_t, sc_t)):
        for j, x in enumerate(g):
            rollout_rows.append({"task": task, "i": x["i"], "source": src, "text": x["text"], "finished": x["finished"],
                                 "correct": x["correct"], "correct_lenient": x["correct_lenient"], "no_answer": x["no_answer"],
                                 "n_tokens": int(sc["n_tok"][j]), "ids": x["ids"],
                                 "seq_logp_student": float(sc["lp_s"][j]), "seq_logp_teacher": float(sc["lp_t"][j])})
    for who in ("student", "teacher"):
        common.warn_cutoffs(f"{who} {task}", row[f"finished_{who}"], budget[task])
    m = {"task": task, "max_new": budget[task], "acc_s": row["acc_student"], "acc_t": row["acc_teacher"], "fin_s": row["finished_student"],
         "fin_t": row["finished_teacher"], "tok_rkl": row["onpolicy_token_rkl"],
         "tok_fkl": row["onpolicy_token_fkl"], "seq_rkl": row["onpolicy_seq_rkl"], "wtp": wtp,
         "is": off["is_mean"], "k3": off["k3_mean"], "fork": row["forking_share"], "rho_all": (row["tail_spearman"] or {}).get("all"),
         "gen_s": f"{t_gen:.1f}", "time_s": f"{t_gen + time.time() - t0:.1f}"}
    print(" | ".join(f"{k} {fnum(v) if isinstance(v, float) else v}" for k, v in m.items()), flush=True)
    common.append_jsonl(metrics_path, m)

# ----------------------------------------------------------------------------- write outputs
common.write_jsonl(os.path.join(args.out_dir, "rollouts.jsonl"), rollout_rows)

LINES = [  # (label, key): Table 1 layout, quantities down, tasks across
    ("Accuracy student / teacher (strict: finished, explicit final answer)", None),
    ("Accuracy student / teacher, lenient (last number; cut-offs count)", "acc_lenient"),
    ("Finished before the token limit, student / teacher", "finished"),
    ("No final answer, student / teacher", "no_answer"),
    ("Mean completion tokens, student / teacher", "len"),
    ("Opens with a self-check, student / teacher", "checked_share"),
    ("Self-check phrases per completion, student / teacher", "checks"),
    ("On-policy token RKL (per token)", "onpolicy_token_rkl"), ("On-policy token FKL (per token)", "onpolicy_token_fkl"),
    ("Off-policy token RKL (per token, teacher samples)", "offpolicy_token_rkl"),
    ("Off-policy token FKL (per token, teacher samples)", "offpolicy_token_fkl"),
    ("On-policy token RKL (per sequence, summed)", "onpolicy_token_rkl_per_seq"),
    ("On-policy sequence RKL (per sequence) (wrong-trace pref.)", "onpolicy_seq_rkl"),
    ("Sequence FKL on teacher samples (per sequence)", "seq_fkl_teacher_samples"),
    ("Off-policy sequence RKL, IS: mean / median", "offpolicy_seq_rkl_is"),
    ("Off-policy sequence RKL, K3: mean / median", "offpolicy_seq_rkl_k3"),
    ("Off-policy non-finite weights / max log w", "offpolicy_nonfinite_share"),
    (f"Forking share (token RKL on top {args.forking_frac:.0%} entropy)", "forking_share"),
] + [(f"Tail-noise Spearman, k={k}: per position / per top-k occurrence", ("tail", k)) for k in KEYS]


def cell(r, key):
    if key is None:
        return f"{fnum(r['acc_student'])} / {fnum(r['acc_teacher'])}"
    if key in ("acc_lenient", "finished", "no_answer", "len", "checked_share", "checks"):
        nd = 1 if key in ("len", "checks") else 3
        return f"{fnum(r[key + '_student'], nd)} / {fnum(r[key + '_teacher'], nd)}"
    if isinstance(key, tuple):
        return f"{fnum((r['tail_spearman'] or {}).get(key[1]))} / {fnum((r['tail_spearman_member'] or {}).get(key[1]))}"
    if key == "onpolicy_seq_rkl":
        return fnum(r[key], 1) + ("" if r["wrong_trace_pref"] is None else f" ({r['wrong_trace_pref']:.1%})")
    if key == "offpolicy_seq_rkl_is":
        return f"{fnum(r[key])} / {fnum(r['offpolicy_seq_rkl_is_median'])}"
    if key == "offpolicy_seq_rkl_k3":
        return f"{fnum(r[key])} / {fnum(r['offpolicy_seq_rkl_k3_median'])}"
    if key == "offpolicy_nonfinite_share":
        return f"{r[key]:.1%} / {fnum(r['offpolicy_log_w_max'], 1)}"
    return fnum(r[key])


md = [f"# Table 1 analogue: student {rows[0]['student']}, teacher {args.teacher_name}", "",
      f"{args.n_prompts} prompts x {args.n_samples} samples per model and task, temperature {args.temperature}, "
      f"max new tokens {', '.join(f'{t} {b}' for t, b in budget.items())}. Token KL per token (pooled positions); "
      "sequence KL per sequence.", "",
      "| Quantity | " + " | ".join(r["task"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
md += [f"| {label} | " + " | ".join(cell(r, key) for r in rows) + " |" for label, key in LINES]
if note:
    md += ["", f"Token-level rows are empty: {note}"]
common.atomic_write_text(os.path.join(args.out_dir, "table1.md"), "\n".join(md) + "\n")

# Figure 2 analogue: one log-log panel per k, tokens as points, one colour per task
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, axes = plt.subplots(2, len(KEYS), figsize=(4 * len(KEYS), 7.2), squeeze=False)
for row_axes, per, field in ((axes[0], "position", "tail_spearman"), (axes[1], "member", "tail_spearman_member")):
    for ax, key in zip(row_axes, KEYS):
        titles = []
        for task, (tail, freq_V) in tails.items():
            y_V = np.abs(common.tail_contribution(tail, key, per))  # |.|: see the docstring
            m = (freq_V > 0) & (y_V > 0)
            ax.scatter(freq_V[m], y_V[m], s=6, alpha=0.5, label=task)
            titles.append(f"{task} {fnum(next(r for r in rows if r['task'] == task)[field][key], 2)}")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_title(f"k={key}: rho " + ", ".join(titles) if titles else f"k={key}: no shared vocabulary", fontsize=8)
        ax.set_xlabel("token frequency in student rollouts")
axes[0][0].set_ylabel("|RKL contribution| summed, per position")
axes[1][0].set_ylabel("|RKL contribution|, mean where in top-k")
if tails:
    axes[0][0].legend(fontsize=7)
fig.suptitle(f"Tail noise: {args.teacher_name} vs {rows[0]['student']}", fontsize=9)
fig.tight_layout()
common.atomic_write_file(os.path.join(args.out_dir, "tail_noise.png"), lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")
common.atomic_write_json(os.path.join(args.out_dir, "table1.json"), rows)  # last: run_all.sh's "stage done" file
print("\n".join(md))
print(f"done in {common.fmt_secs(time.time() - t_start)} -> {args.out_dir}")
