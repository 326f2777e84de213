"""
Failure-mode analysis (paper section 6.5 and appendix G). Reads stage 04's samples of the base
student, the misled student(s) and any other models, counts five failure modes with deterministic
detectors, and runs the prefix-continuation test of Figure 4 with the teacher.

Detectors (common.py, section "failure-mode detectors", each unit-tested on hand-written completions):
- repetition:          a span repeated back to back >= 4 times and no answer committed after it;
- no_answer:           no final answer in any recognised scheme ('####', \\boxed, 'the answer is');
                       "truncated" (extra key) = no answer and the completion hit max_new_tokens;
- self_check_flip:     a recheck phrase ("wait", "let me verify", "double-check", "check:") after a
                       correct intermediate answer, then a different, wrong final answer;
- format_drift:        the final answer in another labelling scheme than the prompt asked for;
- overconfident_wrong: per prompt, the majority answer is wrong while some sample is right (the
                       paper's pass@16 - maj@16 gap; uniform guessing scores high too, so compare models).
The first four are fractions of the analysed completions, overconfident_wrong a fraction of the
analysed prompts. Each is reported over all prompts and over the paper's focus set: prompts the base
student solved by majority vote that this model fails by majority vote.

Prefix-continuation test (paper Figure 4): each self-check flip of a misled student is cut just
before its recheck phrase; the teacher continues prompt + prefix (--n_continue samples) and we report
how often it ends correct (paper: 89-95%). A high rate says the student had the knowledge and lost it
to distillation-induced instability.

    python 05_failure_modes.py --samples runs/toy/04_eval/samples --base student --misled misled \
        --models teacher,improve --teacher runs/toy/00_toy_world/teacher --out_dir runs/toy/05_failure

Writes config.json (first), metrics.jsonl (one line per model x task), failure_modes.json (DESIGN 9
plus "focus", "by_task", "truncated", counts), failure_modes.md, examples.md (short excerpts per mode
and model) and failure_modes.png (bars per model).

Expected on the default toy world: see docs/RESULTS.md

Departures from the paper and why:
- The paper builds its taxonomy iteratively with a Claude judge; here the detectors are fixed rules,
  so counts are reproducible and need no API. An LLM judge (--judge, any local chat model, prompt
  below) is optional and off by default: it labels the focus-set completions a detector flagged, and its
  counts are reported beside the rules'.
- The prompt rows come from the sample files themselves (04 stores each row), so there is no --data.
"""
import argparse, os, sys, time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

# ----------------------------------------------------------------------------- config
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--samples", required=True, help="stage 04's samples/ folder (<model>__<task>.jsonl)")
p.add_argument("--base", required=True, help="name of the base (undistilled) student in samples/")
p.add_argument("--misled", type=common.csv_list, required=True, help="comma list: misled student name(s)")
p.add_argument("--models", type=common.csv_list, default=[], help="comma list: other names to report (teacher, improve, ...)")
p.add_argument("--tasks", type=common.csv_list, default=["toy_math", "toy_qa"], help="comma list of tasks")
p.add_argument("--teacher", default="", help="teacher HF folder / hub id for the prefix test ('' = skip it)")
p.add_argument("--n_continue", type=int, default=4, help="teacher samples per cut prefix")
p.add_argument("--max_prefix", type=int, default=64, help="at most this many flips per misled model go to the prefix test")
p.add_argument("--max_new_tokens", type=int, default=None, help="teacher continuation budget (default: each task's own, common.TASKS)")
p.add_argument("--temperature", type=float, default=1.0, help="teacher sampling temperature")
p.add_argument("--min_repeats", type=int, default=4, help="repetition: back-to-back repeats of one span")
p.add_argument("--judge", default="", help="optional chat model for an LLM-judge pass on focus-set completions")
p.add_argument("--n_examples", type=int, default=2, help="excerpts per mode and model in examples.md")
p.add_argument("--batch_size", type=int, default=256, help="sequences per generate call")
p.add_argument("--backend", default="auto", help="hf | vllm | auto")
p.add_argument("--device", default="auto", help="cpu | cuda | auto")
p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is faster on an oversubscribed CPU)")
p.add_argument("--seed", type=int, default=0, help="teacher and judge sampling")
p.add_argument("--out_dir", required=True, help="where everything is written")
args = common.parse_args(p)
common.check_flags(args, counts=("n_continue", "max_new_tokens", "min_repeats", "n_examples", "batch_size"),
                   nonneg=("max_prefix", "temperature", "threads"))

names = list(dict.fromkeys([args.base] + args.misled + args.models))
budget = {t: common.task_budget(t, args.max_new_tokens) for t in args.tasks}  # max new tokens per task
common.write_config(args.out_dir, {**vars(args), "max_new_tokens_per_task": budget})
common.seed_everything(args.seed)
device = common.get_device(args.device)
if args.threads > 0:
    torch.set_num_threads(args.threads)
backend = common.resolve_backend(args.backend)
metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
MODES = ["repetition", "self_check_flip", "format_drift", "no_answer", "overconfident_wrong"]
JUDGE_PROMPT = """You are auditing a student model's answer. Question:
{question}

Reference answer: {gold}

Student completion:
{completion}

Which one failure mode fits best? Reply with exactly one label:
repetition (repeats a span and never finishes), self_check_flip (had the right answer, rechecked, changed to a wrong one),
format_drift (answer in the wrong format), no_answer (never commits to an answer), hallucination (fluent but wrong facts or
reasoning), other.
Label:"""
JUDGE_LABELS = ["repetition", "self_check_flip", "format_drift", "no_answer", "hallucination", "other"]

# ----------------------------------------------------------------------------- inputs
samples = {}  # (name, task) -> rows, grouped later by prompt
for n in names:
    for t in args.tasks:
        path = os.path.join(args.samples, f"{n}__{t}.jsonl")
        if not os.path.exists(path):
            common.die(f"missing {path}; run 04_eval.py with --models {n}=<path> --tasks {t} first (or fix --samples/--base/--misled)")
        s = common.read_jsonl(path)
        if not s or "row" not in s[0]:
            common.die(f"{path} is empty or has no 'row' field; regenerate it with the current 04_eval.py (--redo)")
        samples[(n, t)] = s


def by_prompt(s):
    g = {}
    for x in s:
        g.setdefault(x["i"], []).append(x)
    return g


def majority_ok(g):
    return common.maj_at_k([x["answer"] for x in g], [bool(x["correct"]) for x in g])


def detect(task, x):
    """Per-completion flags (the four completion-level modes) plus the detectors' details."""
    text = x["completion"]
    rep = common.repetition_loop(task, text, min_repeats=args.min_repeats)
    flip = common.self_check_flip(task, text, x["row"])
    drift = common.format_drift(task, text)
    no_ans = not common.final_answer_marked(task, text)
    return {"repetition": rep is not None, "self_check_flip": flip is not None, "format_drift": drift is not None,
            "no_answer": no_ans, "truncated": no_ans and not x["finished"], "finished": bool(x["finished"]),
            "checked": common.opens_with_check(text), "checks": common.check_count(text), "tokens": x.get("n_tokens", 0),
            "rep": rep, "flip": flip, "drift": drift}


def rates(flags, prompt_ow):
    """flags: per-completion dicts; prompt_ow: per-prompt overconfident_wrong bools -> fractions."""
    r = {m: (float(np.mean([f[m] for f in flags])) if flags else None) for m in MODES[:4] + ["truncated", "finished", "checked",
                                                                                           "checks", "tokens"]}
    r["overconfident_wrong"] = float(np.mean(prompt_ow)) if prompt_ow else None
    r["n_completions"], r["n_prompts"] = len(flags), len(prompt_ow)
    return r


# ----------------------------------------------------------------------------- detectors
t_start = time.time()
base_ok = {t: {i for i, g in by_prompt(samples[(args.base, t)]).items() if majority_ok(g)} for t in args.tasks}
result, flags_all, examples, flips = {}, {}, {}, []
for n in names:
    pooled = {"all": ([], []), "focus": ([], [])}
    by_task = {}
    for t in args.tasks:
        t0 = time.time()
        f_all, ow_all, f_focus, ow_focus = [], [], [], []
        for i, g in sorted(by_prompt(samples[(n, t)]).items()):
            fl = [detect(t, x) for x in g]
            ow = common.overconfident_wrong([x["answer"] for x in g], [bool(x["correct"]) for x in g])
            f_all += fl
            ow_all.append(ow)
            focus = n != args.base and i in base_ok[t] and not majority_ok(g)
            if focus:
                f_focus += fl
                ow_focus.append(ow)
            for x, f in zip(g, fl):
                for m in MODES[:4]:
                    if f[m]:
                        examples.setdefault((n, m), []).append((t, x, f, focus))
                if f["flip"] and n in args.misled:
                    flips.append((n, t, x, f["flip"]))
            if ow:
                examples.setdefault((n, "overconfident_wrong"), []).append((t, g[0], {"answers": [x["answer"] for x in g]}, focus))
        by_task[t] = {"all": rates(f_all, ow_all), "focus": rates(f_focus, ow_focus)}
        for k, (a, b) in (("all", (f_all, ow_all)), ("focus", (f_focus, ow_focus))):
            pooled[k][0].extend(a)
            pooled[k][1].extend(b)
        m = {"model": n, "task": t, **{k: round(v, 4) if isinstance(v, float) else v for k, v in by_task[t]["all"].items()},
             "focus_prompts": len(ow_focus), "secs": round(time.time() - t0, 2)}
        print(" | ".join(f"{k} {v}" for k, v in m.items()), flush=True)
        common.append_jsonl(metrics_path, m)
    result[n] = {**rates(*pooled["all"]), "focus": rates(*pooled["focus"]), "by_task": by_task}

# ----------------------------------------------------------------------------- prefix-continuation test
prefix = {"n": 0, "teacher_correct_rate": None, "n_samples": 0, "any_correct_rate": None, "by_model": {}}
if args.teacher and flips:
    tok = common.load_tokenizer(args.teacher)
    chosen = []
    for n in args.misled:
        mine = [f for f in flips if f[0] == n]
        idx = np.random.default_rng(args.seed).permutation(len(mine))[:args.max_prefix]
        chosen += [mine[j] for j in sorted(idx)]
    # the teacher sees its own prompt template plus the student's text up to the recheck phrase
    cuts = [x["completion"][:fl["cut"]] for _, _, x, fl in chosen]
    prompts = [common.build_prompt(tok, t, x["row"]) + c for (_, t, x, _), c in zip(chosen, cuts)]
    engine = model = None
    if backend == "vllm":  # the prompts carry the students' prefixes: size the engine's context to them
        engine = common.make_vllm_engine(args.teacher, seed=args.seed, max_model_len=common.vllm_max_len(tok, prompts, max(budget.values())))
    else:
        model = common.load_model(args.teacher, device=device)
    outs = common.generate_by_budget(model, tok, prompts, [budget[t] for _, t, _, _ in chosen], n=args.n_continue,
                                     temperature=args.temperature, seed=args.seed, batch_size=args.batch_size, backend=backend,
                                     engine=engine, show="teacher continues")
    # strict grade (common.continuation_correct): the prefix ends on a correct intermediate value, which
    # grade()'s last-number fallback would credit to a continuation that never commits an answer
    for t in dict.fromkeys(c[1] for c in chosen):
        common.warn_cutoffs(f"teacher continuations {t}", np.mean([o["finished"] for o in outs if chosen[o["i"]][1] == t]), budget[t])
    ok = np.array([common.continuation_correct(chosen[o["i"]][1], cuts[o["i"]], o["text"], chosen[o["i"]][2]["row"]) for o in outs])
    ok_PN = ok.reshape(len(chosen), args.n_continue)
    prefix.update(n=len(chosen), n_samples=int(ok.size), teacher_correct_rate=float(ok.mean()),
                  any_correct_rate=float(ok_PN.any(1).mean()), ci=common.bootstrap_ci(ok_PN.mean(1), seed=args.seed))
    for n in args.misled:
        rows_n = [j for j, c in enumerate(chosen) if c[0] == n]
        if rows_n:
            prefix["by_model"][n] = {"n": len(rows_n), "teacher_correct_rate": float(ok_PN[rows_n].mean())}
    prefix["example"] = {"prefix": cuts[0][-300:], "teacher": outs[0]["text"][:300], "correct": bool(ok[0])}
    print(f"prefix test | {len(chosen)} prefixes x {args.n_continue} | teacher ends correct {ok.mean():.3f}", flush=True)
    del model, engine
    common.release_memory()

# ----------------------------------------------------------------------------- optional LLM judge
judge = None
if args.judge:
    jtok, jmodel = common.load_tokenizer(args.judge), common.load_model(args.judge, device=device)
    items = [(n, t, x) for (n, m), ex in examples.items() for (t, x, _, focus) in ex if focus]
    items = list({(n, t, x["i"], x["j"]): (n, t, x) for n, t, x in items}.values())
    prompts = []
    for n, t, x in items:
        q = JUDGE_PROMPT.format(question=x["question"][:1500], gold=x["row"]["answer"], completion=x["completion"][-3000:])
        prompts.append(jtok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                       if getattr(jtok, "chat_template", None) else q)
    outs = common.generate(jmodel, jtok, prompts, n=1, max_new_tokens=8, greedy=True, batch_size=args.batch_size) if prompts else []
    judge = {}
    for (n, t, x), o in zip(items, outs):
        lab = next((l for l in JUDGE_LABELS if l in o["text"].lower().replace("-", "_")), "other")
        judge.setdefault(n, {}).setdefault(lab, 0)
        judge[n][lab] += 1
    del jmodel

# ----------------------------------------------------------------------------- outputs
out = {"models": result, "prefix_continuation": prefix, "focus_definition":
       f"prompts that {args.base} solved by majority vote and the model fails by majority vote", "judge": judge,
       "tasks": args.tasks, "base": args.base, "misled": args.misled}


def pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


def table(key):
    head = ("| Model | " + " | ".join(MODES) + " | truncated | finished | opens with a check | checks | tokens | completions | prompts |\n|---|"
            + "---|" * (len(MODES) + 7) + "\n")
    rows = []
    for n in names:
        r = result[n] if key == "all" else result[n]["focus"]
        tag = " (base)" if n == args.base else " (misled)" if n in args.misled else ""
        rows.append(f"| {n}{tag} | " + " | ".join(pct(r[m]) for m in MODES) + f" | {pct(r['truncated'])} | {pct(r['finished'])} | {pct(r['checked'])} | "
                    f"{r['checks'] or 0:.1f} | {r['tokens'] or 0:.0f} | {r['n_completions']} | {r['n_prompts']} |\n")
    return head + "".join(rows)


md = [f"# Failure modes (paper 6.5): tasks {', '.join(args.tasks)}\n\n",
      "Fractions of analysed completions (overconfident_wrong: of analysed prompts).\n\n## All prompts\n\n", table("all"),
      f"\n## Focus set: prompts {args.base} solved by majority vote that the model fails\n\n", table("focus"),
      "\n## Prefix-continuation test\n\n"]
if prefix["n"]:
    md.append(f"{prefix['n']} self-check flips of {', '.join(args.misled)} cut before the recheck phrase; the teacher "
              f"continued each {args.n_continue} times and ended correct in {pct(prefix['teacher_correct_rate'])} of "
              f"{prefix['n_samples']} continuations (95% CI {pct(prefix['ci'][0])}-{pct(prefix['ci'][1])}; "
              f"at least one correct for {pct(prefix['any_correct_rate'])} of prefixes). Paper: 89-95%.\n")
else:
    md.append("not run: " + ("no --teacher given" if not args.teacher else "no self-check flips among the misled students' completions") + "\n")
if judge is not None:
    md.append("\n## LLM judge (focus-set completions flagged by a detector)\n\n" +
              "".join(f"- {n}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())) + "\n" for n, c in judge.items()))
common.atomic_write_text(os.path.join(args.out_dir, "failure_modes.md"), "".join(md))


def excerpt(t, x, f, m):
    """A short window of the completion around where the mode shows."""
    c = x["completion"]
    if m == "repetition":
        s = f["rep"]["start"]
        return f"loop x{f['rep']['repeats']} of `{f['rep']['span'][:60]}`:\n\n```\n{c[max(0, s - 120):s + 240]}\n```"
    if m == "self_check_flip":
        s = f["flip"]["cut"]
        return f"intermediate {f['flip']['intermediate']} (correct) -> final {f['flip']['final']}:\n\n```\n{c[max(0, s - 160):s + 200]}\n```"
    if m == "overconfident_wrong":
        return f"answers of the k samples: {f['answers']}"
    note = f"scheme: {f['drift']}" if m == "format_drift" else f"finished: {x['finished']}, {x['n_tokens']} tokens"
    return f"{note}\n\n```\n{c[-300:]}\n```"


ex = ["# Failure-mode examples\n\nShort excerpts per mode and model (focus-set cases first).\n"]
for n in names:
    for m in MODES:
        seen = {}  # one excerpt per prompt, focus-set cases first
        for e in sorted(examples.get((n, m), []), key=lambda e: not e[3]):
            seen.setdefault((e[0], e[1]["i"]), e)
        cases = list(seen.values())[:args.n_examples]
        if not cases:
            continue
        ex.append(f"\n## {n}: {m} ({pct(result[n][m])} over all prompts)\n")
        for t, x, f, focus in cases:
            ex.append(f"\n**{t}** prompt {x['i']}{' (focus set)' if focus else ''}, gold `{x['row']['answer']}`: "
                      f"{x['question'][:160]!r}\n\n{excerpt(t, x, f, m)}\n")
common.atomic_write_text(os.path.join(args.out_dir, "examples.md"), "".join(ex))

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(MODES), 3.6))
w = 0.8 / len(names)
for j, n in enumerate(names):
    ax.bar(np.arange(len(MODES)) + j * w, [result[n][m] or 0 for m in MODES], w, label=n)
ax.set_xticks(np.arange(len(MODES)) + 0.4 - w / 2)
ax.set_xticklabels([m.replace("_", " ") for m in MODES], fontsize=8)
ax.set_ylabel("fraction (all prompts)")
ax.set_title("failure modes per model (paper 6.5)")
ax.legend(fontsize=8)
fig.tight_layout()
common.atomic_write_file(os.path.join(args.out_dir, "failure_modes.png"), lambda tmp: fig.savefig(tmp, dpi=120), suffix=".png")
common.atomic_write_json(os.path.join(args.out_dir, "failure_modes.json"), out)  # last: run_all.sh's "stage done" file
print("".join(md))
print(f"done in {common.fmt_secs(time.time() - t_start)} -> {args.out_dir}")
