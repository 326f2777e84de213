"""
Evaluation (paper section 6: Tables 2, 3, 6 and 7). For each model and task, k samples per
prompt (temperature 1.0), each graded; accuracy, maj@k and pass@k with bootstrap intervals, and a
reward-model score for open-ended tasks.

- acc  = mean correctness over all P*k samples (the paper's "accuracy"), graded strictly: a finished
         completion with an explicit final answer (common.grade); the lenient reading is reported beside it;
- maj  = maj@k: the majority-voted answer is correct (ties: the answer seen first; no answer never
         gets a vote), averaged over prompts;
- pass = pass@k, the unbiased estimator of Chen et al. 2021, averaged over prompts; with n = k samples,
         as in the paper (k = 16), it is "any sample correct";
- 95% percentile-bootstrap intervals over prompts for each (acc_ci, maj_ci, pass_ci);
- rm_score for open-ended tasks (dolly, vicuna): a sequence-classification reward model scores
  [user prompt, assistant completion] through its own chat template.

    python 04_eval.py --data runs/toy/00_toy_world/data --out_dir runs/toy/04_eval \
        --models teacher=runs/toy/00_toy_world/teacher,student=runs/toy/00_toy_world/student,misled=runs/toy/03_distill/rkl_undistillable/model \
        --labels teacher=Teacher,student=Student,misled=Misled
    # Table 3 (OOD / cross-distribution): same script, other models, tasks and labels, --table table3
    # real: --models ...=Qwen/Qwen3-8B,... --tasks bigmath_l4,bigmath_l5,csqa,mmlu_pro,supergpqa,dolly,vicuna \
    #       --reward_model Skywork/Skywork-Reward-V2-Llama-3.1-8B --backend vllm   (each task's own budget, common.TASKS)

Writes config.json (first; config_table3.json with --table table3), metrics.jsonl (one line per
model x task), samples/<model>__<task>.jsonl (every completion with its prompt, answer, grade,
finished flag, length and rm_raw; 05_failure_modes.py reads them) with a .meta.json beside each (model
path, a stamp of its weight files, sampling settings), <table>.json (DESIGN 9 rows plus extra keys) and
<table>.md (rows grouped like the paper's Table 2, columns = tasks, cells `acc [maj, pass]`, rm_score
for open tasks; then how the completions ended, and the intervals). A sample file is reused (the model
is not even loaded) when its meta matches and it holds P*k rows for the same prompts, unless --redo:
new --labels only rebuild the tables, a model retrained at the same path is sampled anew.

Expected on the default toy world: see docs/RESULTS.md

Departures from the paper and why:
- rm_score: Skywork-Reward-V2 emits an unbounded Bradley-Terry logit r; we report the mean of
  sigmoid(r) (the win probability against a reference answer scored 0, in [0, 1], so models compare on
  one scale) and the mean raw logit as rm_raw. The paper reports 0-1 numbers without saying how it
  obtained them.
- Strict grading (above): the paper does not describe its grader; a lenient one credits a number
  found mid-computation in a completion cut off at the token limit.
- Models are evaluated one at a time, to bound memory.
"""
import argparse, json, math, os, re, sys, time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

# ----------------------------------------------------------------------------- config
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--models", required=True, help="comma list name=path (HF folder or hub id); names become file names")
p.add_argument("--tasks", type=common.csv_list, default=["toy_math", "toy_qa"], help="comma list of tasks")
p.add_argument("--data", default=None, help="toy world data folder, a folder of <task>/<split>.jsonl, or one .jsonl/.parquet (split 9:1 by prompt hash; None: hub)")
p.add_argument("--prompt_field", default=None, help="local --data: the prompt column (default: prompt, question, problem, instruction or input)")
p.add_argument("--answer_field", default=None, help="local --data: the answer column (default: answer, solution, output, target or response; '#### 72' reads 72)")
p.add_argument("--choices_field", default=None, help="local --data, multiple choice: the options column (default: choices or options)")
p.add_argument("--whole_file", action="store_true", help="one --data file: all of it is the test split (default: a fixed 9:1 train/test split by prompt hash)")
p.add_argument("--split", default="test", help="which split the prompts come from")
p.add_argument("--n_prompts", type=int, default=64, help="prompts per task (seeded subset)")
p.add_argument("--k", type=int, default=16, help="samples per prompt: acc over all, maj@k, pass@k")
p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (no top-k/top-p)")
p.add_argument("--max_new_tokens", type=int, default=None, help="completion budget (default: each task's own, common.TASKS)")
p.add_argument("--batch_size", type=int, default=128, help="sequences per generate call (prompts x k); smaller = less tail waste on CPU")
p.add_argument("--reward_model", default="", help="sequence-classification RM for open tasks (e.g. Skywork-Reward-V2)")
p.add_argument("--rm_batch", type=int, default=16, help="sequences per reward-model forward")
p.add_argument("--rm_max_len", type=int, default=4096, help="truncate RM inputs to this many tokens")
p.add_argument("--labels", default="", help="comma list name=Method or name=Base:Method (e.g. teacher=Qwen3-8B:Teacher)")
p.add_argument("--table", default="table2", choices=["table2", "table3"], help="name of the json/md tables")
p.add_argument("--backend", default="auto", help="hf | vllm | auto")
p.add_argument("--device", default="auto", help="cpu | cuda | auto")
p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is faster on an oversubscribed CPU)")
p.add_argument("--n_boot", type=int, default=1000, help="bootstrap resamples for the intervals")
p.add_argument("--seed", type=int, default=0, help="prompt subset, sampling, bootstrap")
p.add_argument("--redo", action="store_true", help="resample even where samples/ already has this model x task")
p.add_argument("--out_dir", required=True, help="where everything is written")
args = common.parse_args(p)

models = {}
for item in common.csv_list(args.models):
    name, _, path = item.partition("=")
    if not path or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        common.die(f"--models entry '{item}': expected name=path with a name of letters, digits, _ . + - (it names the sample files)")
    if name in models:
        common.die(f"--models: name '{name}' given twice; each model needs its own name")
    models[name] = path
labels = {}  # name -> (base, method)
for item in common.csv_list(args.labels):
    name, _, lab = item.partition("=")
    if name not in models or not lab:
        common.die(f"--labels entry '{item}': expected name=Method or name=Base:Method with name one of {', '.join(models)}")
    base, _, method = lab.rpartition(":")
    labels[name] = (base, method)
common.check_flags(args, counts=("n_prompts", "k", "max_new_tokens", "batch_size", "rm_batch", "rm_max_len", "n_boot"),
                   nonneg=("temperature", "threads"))
open_tasks = [t for t in args.tasks if common.task_kind(t) == "open"]
if open_tasks and not args.reward_model:
    common.die(f"tasks {', '.join(open_tasks)} are open-ended and need --reward_model (e.g. Skywork/Skywork-Reward-V2-Llama-3.1-8B)")

budget = {t: common.task_budget(t, args.max_new_tokens) for t in args.tasks}  # max new tokens per task
# table3 runs into table2's folder (sharing its samples): its own config file, so table2's is kept
common.write_config(args.out_dir, {**vars(args), "max_new_tokens_per_task": budget},
                    "config.json" if args.table == "table2" else f"config_{args.table}.json")
common.seed_everything(args.seed)
device = common.get_device(args.device)
if args.threads > 0:
    torch.set_num_threads(args.threads)
backend = common.resolve_backend(args.backend)
sample_dir = os.path.join(args.out_dir, "samples")
os.makedirs(sample_dir, exist_ok=True)
metrics_path = os.path.join(args.out_dir, "metrics.jsonl")

# ----------------------------------------------------------------------------- inputs
rows = {t: common.load_task(t, args.split, data=args.data, n=args.n_prompts, seed=args.seed, **common.data_options(args))
        for t in args.tasks}
for t, r in rows.items():
    if len(r) < args.n_prompts:
        print(f"note: {t} has {len(r)} {args.split} prompts (< --n_prompts {args.n_prompts}); using all of them")


def sample_path(name, task):
    return os.path.join(sample_dir, f"{name}__{task}.jsonl")


def sample_meta(name, task):
    """What made a sample file: the model (and its weights' stamp) and the sampling settings."""
    return {"model": models[name], "stamp": common.model_stamp(models[name]), "task": task, "split": args.split,
            "k": args.k, "temperature": args.temperature, "max_new_tokens": budget[task], "seed": args.seed,
            "backend": backend, "reward_model": args.reward_model if task in open_tasks else None}


def reusable(name, task):
    """Samples on disk count if the same model weights made them with the same settings (samples/
    *.meta.json) and they hold exactly P*k rows for the same prompt questions. They are re-graded."""
    path = sample_path(name, task)
    if args.redo or not os.path.exists(path):
        return None
    meta = path[:-len(".jsonl")] + ".meta.json"
    try:  # a damaged cache (a kill can cut neither file, but a user can) is resampled, never trusted
        same = False
        if os.path.exists(meta):
            with open(meta) as f:
                same = json.load(f) == sample_meta(name, task)
        s = common.read_jsonl(path) if same else None
    except (ValueError, OSError):
        print(f"note: {path} or its .meta.json does not parse; resampling")
        return None
    if not same:
        print(f"note: {path} was made by other weights or settings; resampling")
        return None
    qs = [common.format_question(task, r) for r in rows[task]]
    if len(s) != len(qs) * args.k or any(x["i"] >= len(qs) or x.get("question") != qs[x["i"]] for x in s):
        print(f"note: {path} was made with other prompts or another k; resampling")
        return None
    before = json.dumps(s)
    for x in s:  # graded again: the tables (and 05, which reads these files) follow the current grader
        x.update(common.grade_record(task, x["completion"], x["row"], x["finished"]))
    if json.dumps(s) != before:
        common.write_jsonl(path, s)
    return s


def per_prompt(samples, k):
    """P prompts x k samples -> per-prompt accuracy, maj@k and pass@k arrays (each shape (P,))."""
    by = {}
    for x in samples:
        by.setdefault(x["i"], []).append(x)
    acc_P, maj_P, pass_P = [], [], []
    for i in sorted(by):
        g = by[i]
        c = [bool(x["correct"]) for x in g]
        acc_P.append(np.mean(c))
        maj_P.append(float(common.maj_at_k([x["answer"] for x in g], c)))
        pass_P.append(common.pass_at_k(len(c), sum(c), k))
    return np.array(acc_P), np.array(maj_P), np.array(pass_P)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# ----------------------------------------------------------------------------- sampling, one model at a time
samples = {}  # (name, task) -> rows
t_start, gen_secs, gen_tokens = time.time(), 0.0, 0
for name, path in models.items():
    todo = []
    for task in args.tasks:
        s = reusable(name, task)
        if s is not None:
            samples[(name, task)] = s
        else:
            todo.append(task)
    if not todo:
        print(f"{name}: reusing samples for {', '.join(args.tasks)}")
        continue
    tok = common.load_tokenizer(path)
    engine = model = None
    if backend == "vllm":
        every = [common.build_prompt(tok, t, r) for t in todo for r in rows[t]]
        # alone on the GPU while it generates (no HF model; the reward model comes after): most of it, for KV cache
        engine = common.make_vllm_engine(path, seed=args.seed, max_model_len=common.vllm_max_len(tok, every, max(budget[t] for t in todo)),
                                         gpu_memory_utilization=0.85)
    else:
        model = common.load_model(path, device=device)
    for task in todo:
        prompts = [common.build_prompt(tok, task, r) for r in rows[task]]
        t0 = time.time()
        outs = common.generate(model, tok, prompts, n=args.k, max_new_tokens=budget[task],
                               temperature=args.temperature, seed=args.seed, batch_size=args.batch_size,
                               backend=backend, engine=engine, show=f"{name} {task}")
        secs = time.time() - t0
        s = []
        for j, o in enumerate(outs):
            r = rows[task][o["i"]]
            s.append({"i": o["i"], "j": j % args.k, "question": common.format_question(task, r),
                      "row": {k: r[k] for k in ("prompt", "answer", "choices") if k in r}, "completion": o["text"],
                      **common.grade_record(task, o["text"], r, o["finished"]), "n_tokens": len(o["ids"]), "rm_raw": None})
        common.write_jsonl(sample_path(name, task), s)
        common.atomic_write_json(sample_path(name, task)[:-len(".jsonl")] + ".meta.json", sample_meta(name, task))
        samples[(name, task)] = s
        n_tok = sum(x["n_tokens"] for x in s)
        gen_secs, gen_tokens = gen_secs + secs, gen_tokens + n_tok
        m = {"model": name, "task": task, "max_new": budget[task], "n": len(s), "secs": round(secs, 2), "tok_per_s": round(n_tok / secs, 1),
             "mean_tokens": round(n_tok / len(s), 1), "finished": round(np.mean([x["finished"] for x in s]), 4)}
        print(" | ".join(f"{k} {v}" for k, v in m.items()), flush=True)
        common.warn_cutoffs(f"{name} {task}", m["finished"], budget[task])
        common.append_jsonl(metrics_path, m)
    del model, engine
    common.release_memory()  # the next model must fit where this one was

# ----------------------------------------------------------------------------- reward model (open tasks)
need_rm = [(n, t) for (n, t), s in samples.items() if t in open_tasks and any(x["rm_raw"] is None for x in s)]
if need_rm:
    from transformers import AutoModelForSequenceClassification
    rm_tok = common.load_tokenizer(args.reward_model, padding_side="right")
    try:
        rm = AutoModelForSequenceClassification.from_pretrained(args.reward_model, dtype=common.default_dtype(device))
    except (OSError, ValueError) as e:
        common.die(common._not_found(args.reward_model, e))
    rm.to(device).eval()
    for name, task in need_rm:
        s = samples[(name, task)]
        t0 = time.time()
        raw = common.reward_model_scores(rm, rm_tok, [x["question"] for x in s], [x["completion"] for x in s],
                                         batch_size=args.rm_batch, max_len=args.rm_max_len, show=f"rm {name} {task}")
        for x, r in zip(s, raw):
            x["rm_raw"] = r
        common.write_jsonl(sample_path(name, task), s)
        print(f"rm {name} {task} | mean raw {np.mean(raw):.3f} | {time.time() - t0:.1f}s", flush=True)
    del rm

# ----------------------------------------------------------------------------- metrics and tables
table = []
for name in models:
    for task in args.tasks:
        s = samples[(name, task)]
        base, method = labels.get(name, ("", name))
        row = {"model": name, "task": task, "k": args.k, "n_prompts": len({x["i"] for x in s}), "label": method, "base": base,
               "acc": None, "acc_ci": None, "maj": None, "maj_ci": None, "pass": None, "pass_ci": None,
               "rm_score": None, "rm_score_ci": None, "rm_raw": None, "acc_lenient": None, "no_answer": None,
               "finished": float(np.mean([x["finished"] for x in s])), "mean_tokens": float(np.mean([x["n_tokens"] for x in s])),
               "checked_share": float(np.mean([common.opens_with_check(x["completion"]) for x in s])),
               "checks": float(np.mean([common.check_count(x["completion"]) for x in s]))}
        if task in open_tasks:
            by = {}
            for x in s:
                by.setdefault(x["i"], []).append(sigmoid(x["rm_raw"]))
            rm_P = np.array([np.mean(v) for _, v in sorted(by.items())])
            row.update(rm_score=float(rm_P.mean()), rm_score_ci=common.bootstrap_ci(rm_P, args.n_boot, args.seed),
                       rm_raw=float(np.mean([x["rm_raw"] for x in s])))
        else:
            acc_P, maj_P, pass_P = per_prompt(s, args.k)
            for key, v in (("acc", acc_P), ("maj", maj_P), ("pass", pass_P)):
                row[key] = float(v.mean())
                row[key + "_ci"] = common.bootstrap_ci(v, args.n_boot, args.seed)
            row["acc_lenient"] = float(np.mean([x["correct_lenient"] for x in s]))
            row["no_answer"] = float(np.mean([x["no_answer"] for x in s]))
        table.append(row)

# paper Table 2 order: teacher side (teacher, distillable, undistillable), then student side
ORDER = ["teacher", "original", "distillable", "undistillable", "student", "sft", "gkd-fkl", "fkl", "gkd-rkl", "rkl",
         "gkd-jsd", "jsd", "improve", "misled"]


def order_key(name):
    method = labels.get(name, ("", name))[1].lower().split(" ")[0]
    return (ORDER.index(method) if method in ORDER else len(ORDER), list(models).index(name))


def render(table, tasks):
    """Markdown: one row per model in paper order, one column per task, `acc [maj, pass]` cells
    (rm_score for open tasks), a rule between teacher-side and student-side rows; then the 95% CIs."""
    names = sorted(dict.fromkeys(r["model"] for r in table), key=order_key)
    cell = {(r["model"], r["task"]): r for r in table}
    k = table[0]["k"]
    head = "| Base | Method | " + " | ".join(tasks) + " |\n|---|---|" + "---|" * len(tasks) + "\n"
    out = [f"strict acc [maj@{k}, pass@{k}] over {table[0]['n_prompts']} prompts x {k} samples; open tasks: reward-model score "
           f"(mean sigmoid of the RM logit)\n\n" + head]
    teacher_side = {"teacher", "original", "distillable", "undistillable"}
    prev = None
    for n in names:
        side = labels.get(n, ("", n))[1].lower().split(" ")[0] in teacher_side
        if prev is not None and side != prev:
            out.append("| | | " + " | ".join("" for _ in tasks) + " |\n")
        prev = side
        base, method = labels.get(n, ("", n))
        cs = []
        for t in tasks:
            r = cell[(n, t)]
            cs.append(f"{r['rm_score']:.3f}" if r["acc"] is None else f"{r['acc']:.3f} [{r['maj']:.3f}, {r['pass']:.3f}]")
        out.append(f"| {base} | {method} | " + " | ".join(cs) + " |\n")
    out.append("\nHow the completions ended: `lenient acc | finished | no final answer | mean tokens | opens with a self-check`. "
               "Strict acc (above) needs a finished completion with an explicit final answer; lenient also reads the last number, "
               "cut-offs included\n\n" + head)
    for n in names:
        base, method = labels.get(n, ("", n))
        cs = []
        for t in tasks:
            r = cell[(n, t)]
            lead = "-" if r["acc_lenient"] is None else f"{r['acc_lenient']:.3f}"
            na = "-" if r["no_answer"] is None else f"{r['no_answer']:.3f}"
            cs.append(f"{lead} \\| {r['finished']:.3f} \\| {na} \\| {r['mean_tokens']:.0f} \\| {r['checked_share']:.2f}")
        out.append(f"| {base} | {method} | " + " | ".join(cs) + " |\n")
    out.append("\n95% bootstrap intervals over prompts (acc; rm_score for open tasks)\n\n" + head)
    for n in names:
        base, method = labels.get(n, ("", n))
        cs = []
        for t in tasks:
            r = cell[(n, t)]
            lo, hi = r["acc_ci"] if r["acc"] is not None else r["rm_score_ci"]
            cs.append(f"[{lo:.3f}, {hi:.3f}]")
        out.append(f"| {base} | {method} | " + " | ".join(cs) + " |\n")
    return "".join(out)


md = render(table, args.tasks)
common.atomic_write_text(os.path.join(args.out_dir, f"{args.table}.md"), md)
common.atomic_write_json(os.path.join(args.out_dir, f"{args.table}.json"), table)  # last: run_all.sh's "stage done" file
print(md)
if gen_secs:
    print(f"sampling: {gen_tokens} tokens in {gen_secs:.1f}s ({gen_tokens / gen_secs:.0f} tokens/s)")
print(f"done in {common.fmt_secs(time.time() - t_start)} -> {os.path.join(args.out_dir, args.table + '.md')}")
