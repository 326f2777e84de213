"""
Assemble runs/<run>/REPORT.md from the stages' outputs (called by run_all.sh; safe to rerun).

    python report.py --run runs/toy
    python report.py --spread runs/toy runs/seed1 runs/seed2     # README's seed table (prints markdown)

Every table and figure of the run, wall time per stage, the configs used, and a "what reproduced"
section that checks the paper's claims against this run's numbers. The thresholds of those checks
are stated next to each verdict; they are fixed here and never tuned to a run.
"""
import argparse
import functools
import glob
import json
import os

import common

p = argparse.ArgumentParser()
p.add_argument("--run", help="runs/<run> folder written by run_all.sh")
p.add_argument("--spread", nargs="+", help="several finished runs (e.g. seeds): the headline numbers per run, mean and sd")
args = common.parse_args(p)
R = args.run
if not (args.run or args.spread):
    common.die("give --run runs/<run> (one report) or --spread RUN RUN ... (the seed table)")
for run in [args.run] if args.run else args.spread:
    if not os.path.isdir(run):  # a typo must not create an empty run folder with an empty report
        have = sorted(d for d in os.listdir("runs") if os.path.isdir(os.path.join("runs", d))) if os.path.isdir("runs") else []
        common.die(f"no run folder {run}; pass one that run_all.sh made" + (f" (runs/ holds {', '.join(have)})" if have else ""))


def damaged(path, err):
    """A file a finished stage wrote that does not parse: one line naming it and the fix (REPORT.md is not rewritten)."""
    common.die(f"{path} is damaged ({type(err).__name__}: {str(err)[:120]}): its stage was cut off or the file was edited; "
               "rerun run_all.sh with the same settings (it redoes a stage whose outputs do not parse), then report.py")


def load(path, default=None, root=None):
    """A run's json output (root: another run than --run), or default when it is missing; a damaged one stops the report."""
    full = os.path.join(root or R, path)
    try:
        with open(full) as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        damaged(full, e)


@functools.lru_cache(maxsize=None)  # the checks ask for the same model's file many times
def per_prompt(model, task, sub="04_eval"):
    """{prompt index: accuracy over its k samples} of one model from stage 04's samples, or None. Stage 04
    evaluates every model on the same prompts (same n_prompts and seed), so indices pair up across models."""
    path = os.path.join(R, sub, "samples", f"{model}__{task}.jsonl")
    if not os.path.exists(path):
        return None
    by = {}
    try:
        rows = common.read_jsonl(path)
    except common.BadInput:
        raise
    except ValueError as e:
        damaged(path, e)
    for r in rows:
        if r.get("correct") is not None:
            by.setdefault(r["i"], []).append(bool(r["correct"]))
    return {i: sum(v) / len(v) for i, v in by.items()} or None


def paired(x, y, task, sub="04_eval"):
    """x - y in accuracy on the prompts both answered: (mean difference, 95% bootstrap interval over
    prompts) or None. Paired, so prompt difficulty cancels: two models' own intervals can overlap while
    their difference is clearly non-zero (overlap is not a test)."""
    a, b = per_prompt(x, task, sub), per_prompt(y, task, sub)
    if not a or not b:
        return None
    d = [a[i] - b[i] for i in sorted(set(a) & set(b))]
    return sum(d) / len(d), common.bootstrap_ci(d)


def diff_str(pd):
    """'+0.031 [-0.012, +0.070], within noise' for a paired() result."""
    if pd is None:
        return "paired difference n/a (no samples)"
    d, (lo, hi) = pd
    return f"paired difference {d:+.3f} [{lo:+.3f}, {hi:+.3f}], {'beyond noise' if lo > 0 or hi < 0 else 'within noise'}"


def text(path):
    try:
        with open(os.path.join(R, path)) as f:
            return f.read().strip()
    except OSError:
        return f"_missing: {path}_"


def f3(x):
    return "-" if x is None else f"{x:.3f}"


def spread(runs):
    """One markdown row per headline number: its value in every run, then mean and sample sd."""
    import numpy as np
    rows = {}

    def put(name, run_i, v):
        rows.setdefault(name, [None] * len(runs))[run_i] = v
    for i, r in enumerate(runs):
        def j(path):
            return load(path, root=r)
        w = j("00_toy_world/summary.json") or {"models": {}}
        for m, d in w["models"].items():
            for t in ("toy_math", "toy_qa"):
                put(f"00 {m} greedy acc {t}", i, d["acc"][t])
        for v in ("distillable", "undistillable"):
            c = j(f"02_calibrate/{v}/summary.json")
            if c:
                put(f"02 {v} (lam {c['lam']:+g}) seq KL to target, before", i, c["seq_kl_target"]["original"])
                put(f"02 {v} (lam {c['lam']:+g}) seq KL to target, after", i, c["seq_kl_target"]["calibrated"])
                for t, a in c["acc"]["calibrated"].items():
                    put(f"02 original teacher greedy acc {t} (02's eval prompts)", i, c["acc"]["original"][t])
                    put(f"02 {v} teacher greedy acc {t}", i, a)
        for row in j("04_eval/table2.json") or []:
            put(f"04 Table 2 sampled acc {row['task']}: {row['model']}", i, row["acc"])
    print(f"| number | {' | '.join(os.path.basename(r.rstrip('/')) for r in runs)} | mean | sd |")
    print("|---|" + "---:|" * (len(runs) + 2))
    for name, vals in rows.items():
        got = [v for v in vals if v is not None]
        sd = f"{np.std(got, ddof=1):.3f}" if len(got) > 1 else "-"
        print(f"| {name} | {' | '.join(f3(v) for v in vals)} | {np.mean(got):.3f} | {sd} |")


if args.spread:
    spread(args.spread)
    raise SystemExit(0)


out = [f"# Report: {os.path.basename(os.path.normpath(R))}", ""]

# ----------------------------------------------------------------------------- wall time
times = []
if os.path.exists(os.path.join(R, "times.tsv")):
    with open(os.path.join(R, "times.tsv")) as f:  # a line cut by a kill mid-append is skipped
        times = [x for x in (line.rstrip("\n").split("\t") for line in f) if len(x) == 2 and x[1].isdigit()]
out += ["## Wall time per stage", "", "| stage | seconds |", "|---|---:|"]
out += [f"| {n} | {s} |" for n, s in times]
out += [f"| **sum of the stages** | **{sum(int(s) for _, s in times)}** |", ""]
wall = load("wall.json")  # run_all.sh's last invocation: stages run side by side (JOBS), so the wall time is less than the sum
if wall:
    out += [f"Wall time of the last `run_all.sh` ({wall['jobs']} stages at a time, {wall['stages_run']} stages run, "
            f"the others skipped as complete): **{wall['seconds']} s**.", ""]
out += ["(times.tsv accumulates over reruns; a resumed stage shows the time of its last part)", ""]

# ----------------------------------------------------------------------------- toy world
tw = load("00_toy_world/summary.json")
if tw:
    out += ["## Toy world (stage 00): greedy test accuracy", "", "| model | params | tokenizer | toy_math | toy_qa |", "|---|---:|---|---:|---:|"]
    for m, d in tw["models"].items():
        out.append(f"| {m} | {d['params']:,} | {d['tokenizer']} | {f3(d['acc'].get('toy_math'))} | {f3(d['acc'].get('toy_qa'))} |")
    out.append("")

# ----------------------------------------------------------------------------- Table 1, Figure 2
out += ["## Table 1: pilot KL study, original teacher vs student (stage 01)", "", text("01_pilot/original/table1.md"), "",
        "![tail noise](01_pilot/original/tail_noise.png)", ""]

# ----------------------------------------------------------------------------- Table 4
t1 = {v: load(f"01_pilot/{v}/table1.json", []) for v in ("original", "distillable", "undistillable")}
tasks = [r["task"] for r in t1["original"]]
if tasks:
    out += ["## Table 4: do the traps move with calibration? (stage 01 on calibrated teachers)", "",
            "| quantity | variant | " + " | ".join(tasks) + " |", "|---|---|" + "---:|" * len(tasks)]
    for key, name in (("onpolicy_token_rkl", "on-policy token RKL"), ("onpolicy_seq_rkl", "on-policy sequence RKL (wrong-trace pref.)")):
        for v, rows in t1.items():
            by = {r["task"]: r for r in rows}
            cells = []
            for t in tasks:
                r = by.get(t, {})
                c = f3(r.get(key))
                if key == "onpolicy_seq_rkl" and r.get("wrong_trace_pref") is not None:
                    c += f" ({100 * r['wrong_trace_pref']:.1f}%)"
                cells.append(c)
            out.append(f"| {name} | {v} | " + " | ".join(cells) + " |")
    out.append("")

# ----------------------------------------------------------------------------- calibration
cal = {os.path.basename(os.path.dirname(pth)): load(os.path.relpath(pth, R)) for pth in sorted(glob.glob(os.path.join(R, "02_calibrate/*/summary.json")))}
if cal:
    out += ["## Calibration (stage 02): the knob", "",
            "| variant | lam | task | acc original | acc calibrated | seq KL(theta||target) original | calibrated |", "|---|---:|---|---:|---:|---:|---:|"]
    for v, s in cal.items():
        for t in s["acc"]["original"]:
            out.append(f"| {v} | {s['lam']:+g} | {t} | {f3(s['acc']['original'][t])} | {f3(s['acc']['calibrated'][t])} | "
                       f"{f3(s['seq_kl_target']['original'])} | {f3(s['seq_kl_target']['calibrated'])} |")
    out.append("")

# ----------------------------------------------------------------------------- Tables 2, 3, failure modes
out += ["## Table 2: students and teachers (stage 04)", "", text("04_eval/table2.md"), "",
        "## Table 3: calibrated on math only; OOD and cross-distribution (stage 04)", "", text("04_eval/table3.md"), "",
        "## Failure modes (stage 05, paper 6.5)", "", text("05_failure/failure_modes.md"), "",
        "![failure modes](05_failure/failure_modes.png)", ""]

# ----------------------------------------------------------------------------- extras
t2 = load("04_eval/table2.json", [])
if t2 and "checked_share" in t2[0]:
    mtasks = sorted({r["task"] for r in t2})
    out += ["## The mechanism: how each teacher and student answers (stage 04 samples)", "",
            "Strict accuracy, share of completions that open with a self-check (the checked style), self-check phrases per "
            "completion, mean tokens, share finished before the token limit and share with no final answer.", "",
            "| model | " + " | ".join(f"{t}: acc / checked / checks / tokens / finished / no answer" for t in mtasks) + " |",
            "|---|" + "---|" * len(mtasks)]
    by2 = {(r["model"], r["task"]): r for r in t2}
    for m in dict.fromkeys(r["model"] for r in t2):
        cells = []
        for t in mtasks:
            r = by2.get((m, t))
            cells.append("-" if r is None or r.get("acc") is None else
                         f"{r['acc']:.3f} / {r['checked_share']:.2f} / {r['checks']:.1f} / {r['mean_tokens']:.0f} / {r['finished']:.2f} / "
                         f"{r['no_answer']:.2f}")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    out.append("")

pb = load("probe/probe.json", {})
if pb:
    out += ["## The fork: commit, or verify again? (probe.py)", "",
            "Where the checked style (H) writes its answer and the checked-twice style (H2) verifies once more, each model's "
            "probability of committing (`####`) and of verifying again, teacher-forced on the references, mean over the "
            "toy_math test rows that fit the model's window. H2 never fits the student's window: a student that learns to "
            "verify again runs out of room. Reverse KL on the student's own samples gives ~0 gradient to a branch the "
            "student gives ~0 probability.", "",
            "| model | P(commit) | P(verify again) | rows |", "|---|---:|---:|---:|"]
    out += [f"| {m} | {f3(r['p_commit'])} | {f3(r['p_verify'])} | {r['n']} |" for m, r in pb.items()] + [""]


def acc(rows, model, task, key="acc"):
    for r in rows:
        if r["model"] == model and r["task"] == task:
            return r.get(key)
    return None


knob = load("extras/knob/table2.json")
if knob:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lams = sorted({float(r["model"].rsplit("_", 1)[1]) for r in knob if r["model"].startswith("teacher_lam_")} | {-1.0, 1.0})
    name_t = lambda lam: {1.0: ("distillable", t2), -1.0: ("undistillable", t2)}.get(lam, (f"teacher_lam_{lam:g}", knob))
    name_s = lambda lam: {1.0: ("improve", t2), -1.0: ("misled", t2)}.get(lam, (f"student_lam_{lam:g}", knob))
    ktasks = sorted({r["task"] for r in knob})
    fig, axes = plt.subplots(1, len(ktasks), figsize=(5 * len(ktasks), 3.5), squeeze=False)
    out += ["## Extra: the knob sweep (teacher calibrated with lam, then an on-policy RKL student)", "",
            "Accuracy (share of samples that open with a self-check).", "",
            "| lam | " + " | ".join(f"teacher {t} | rkl student {t}" for t in ktasks) + " |", "|---:|" + "---:|---:|" * len(ktasks)]
    for lam in lams:
        cells = []
        for t in ktasks:
            for fn in (name_t, name_s):
                cs = acc(fn(lam)[1], fn(lam)[0], t, "checked_share")
                cells.append(f3(acc(fn(lam)[1], fn(lam)[0], t)) + ("" if cs is None else f" ({cs:.2f})"))
        out.append(f"| {lam:+g} | " + " | ".join(cells) + " |")
    for ax, t in zip(axes[0], ktasks):
        for who, fn, c in (("teacher", name_t, "C0"), ("rkl student", name_s, "C1")):
            for key, ls, what in (("acc", "o-", "accuracy"), ("checked_share", "s--", "opens with a self-check")):
                ys = [acc(fn(lam)[1], fn(lam)[0], t, key) for lam in lams]
                ax.plot(lams, [y if y is not None else float("nan") for y in ys], ls, c=c, label=f"{who}: {what}")
        ax.axhline(acc(t2, "student", t) or float("nan"), ls=":", c="gray", label="student before: accuracy")
        ax.set(title=t, xlabel="lam (calibration knob)", ylabel="share of samples", ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    common.atomic_write_file(os.path.join(R, "knob_sweep.png"), lambda tmp: fig.savefig(tmp, dpi=120), suffix=".png")
    out += ["", "![knob sweep](knob_sweep.png)", ""]

guard = load("extras/guard/table2.json")
if guard:
    gtasks = sorted({r["task"] for r in guard})
    both = t2 + guard
    out += ["## Extra: guard matrix (student accuracy after each attacker)", "",
            "| attacker | " + " | ".join(f"original teacher {t} | undistillable teacher {t}" for t in gtasks) + " |",
            "|---|" + "---:|---:|" * len(gtasks)]
    for att, orig, und in (("none (the student before)", "student", "student"), ("SFT", "sft", "sft_undistillable"),
                           ("GKD-FKL", "fkl", "fkl_undistillable"), ("GKD-RKL", "rkl", "misled"),
                           ("FKL top-20", "fkl_top20_original", "fkl_top20_undistillable"),
                           ("GKD-RKL, teacher calibrated against the cross-tokenizer target", "rkl", "misled_xtok"),
                           ("none, cross-tokenizer student (the target_x model)", "student_x", "student_x"),
                           ("SFT, cross-tokenizer student", "sft_x_original", "sft_x_undistillable")):
        out.append(f"| {att} | " + " | ".join(f"{f3(acc(both, orig, t))} | {f3(acc(both, und, t))}" for t in gtasks) + " |")
    xt = {t: acc(guard, "undistillable_xtok", t) for t in gtasks}
    out += ["", "Teacher calibrated with lam -1 against the cross-tokenizer target: accuracy "
            + ", ".join(f"{t} {f3(v)}" for t, v in xt.items()) + "; the same-family one: "
            + ", ".join(f"{t} {f3(acc(t2, 'undistillable', t))}" for t in gtasks) + ".", ""]

# ----------------------------------------------------------------------------- what reproduced
out += ["## What reproduced and what did not", "",
        "Checks against the paper's claims, on this run's held-out accuracy (mean over k samples, stage 04). "
        "Thresholds are fixed in report.py, not tuned to the run. A comparison of two models is their paired "
        "difference over the same prompts with its 95% bootstrap interval; 'beyond noise' when it excludes 0.", ""]
ttasks = sorted({r["task"] for r in t2})
for t in ttasks:
    a = {m: acc(t2, m, t) for m in ("teacher", "distillable", "undistillable", "student", "sft", "fkl", "rkl", "improve", "misled")}
    if any(v is None for v in a.values()):
        continue
    keep = a["undistillable"] >= 0.9 * a["teacher"]
    collapse = a["misled"] <= 0.5 * a["student"]
    worse = a["misled"] < a["rkl"]
    beats = {m: paired("improve", m, t) for m in ("sft", "fkl", "rkl")}
    improve = all(v is not None and v[1][0] > 0 for v in beats.values())  # beyond noise against each baseline
    pd = lambda x, y: diff_str(paired(x, y, t))
    out += [f"**{t}**", "",
            f"- undistillable teacher keeps at least 90% of the teacher's accuracy: {a['undistillable']:.3f} vs {a['teacher']:.3f} "
            f"({a['undistillable'] / max(a['teacher'], 1e-9):.0%}) -> {'yes' if keep else 'no'} ({pd('undistillable', 'teacher')})",
            f"- misled student collapses (at most half the base student's accuracy): {a['misled']:.3f} vs student {a['student']:.3f} -> {'yes' if collapse else 'no'}"
            f"; below the GKD-RKL student from the original teacher ({a['rkl']:.3f}): {'yes' if worse else 'no'} ({pd('misled', 'rkl')})",
            f"- improve student beats SFT, GKD-FKL and GKD-RKL beyond noise: {a['improve']:.3f} vs {a['sft']:.3f} / {a['fkl']:.3f} / {a['rkl']:.3f} -> "
            f"{'yes' if improve else 'no'} ({'; '.join(f'vs {m}: ' + diff_str(v) for m, v in beats.items())})", ""]
# the guard against each attacker (EXTRAS=1): a student distilled from the undistillable teacher collapses
for t in (sorted({r["task"] for r in guard}) if guard else []):
    base = {"student": acc(t2, "student", t), "student_x": acc(guard, "student_x", t)}
    rows = [(m, b) for m, b in (("sft_undistillable", "student"), ("fkl_undistillable", "student"), ("misled", "student"),
                                ("fkl_top20_undistillable", "student"), ("misled_xtok", "student"), ("sft_x_undistillable", "student_x"))
            if acc(both, m, t) is not None and base[b]]  # a base of 0 has no half to fall to
    if rows:
        hit = [m for m, b in rows if acc(both, m, t) <= 0.5 * base[b]]
        out.append(f"- guard matrix, {t}: attackers of the undistillable teacher that collapse (at most half their base student): "
                   f"{len(hit)} of {len(rows)} ("
                   + ", ".join(f"{m} {acc(both, m, t):.3f} vs {base[b]:.3f}" for m, b in rows) + ")")
# the precondition of every student claim: distillation from the ORIGINAL teacher must move the student
# at this budget, or there is no signal for calibration to amplify (distillable) or poison (undistillable)
for t in ttasks:
    diffs = {m: paired(m, "student", t) for m in ("sft", "fkl", "rkl")}
    if any(v is None for v in diffs.values()):
        continue
    up = [m for m, (d, (lo, hi)) in diffs.items() if lo > 0]
    down = [m for m, (d, (lo, hi)) in diffs.items() if hi < 0]
    out.append(f"- precondition, {t}: GKD-RKL from the original teacher raises the student's accuracy beyond noise "
               f"(student {acc(t2, 'student', t):.3f}; sft / fkl / rkl {' / '.join(f3(acc(t2, m, t)) for m in ('sft', 'fkl', 'rkl'))}; "
               f"paired differences {' / '.join(f'{d:+.3f} [{lo:+.3f}, {hi:+.3f}]' for d, (lo, hi) in diffs.values())}): "
               + ("yes" if "rkl" in up else "no: at this distillation budget there is no signal for the knob to act on")
               + (f" (beyond noise: {', '.join(up)})" if up else "") + (f"; lowers it: {', '.join(down)}" if down else ""))
# Table 3 (paper 6.3): calibrated on math only, the trap persists out of distribution (OOD) and across (CD)
t3 = load("04_eval/table3.json", [])
for t in sorted({r["task"] for r in t3}):
    # run_all.sh suffixes the CD students with their task when there are several OOD tasks (real presets)
    cd = lambda m: m if acc(t3, m, t) is not None else f"{m}_{t}"
    a = {m: acc(t3, m, t) for m in ("teacher", "undistillable_ood", "student", "misled_ood")}
    a["misled_cd"], rkl_cd = acc(t3, cd("misled_cd"), t), cd("rkl_cd")
    if any(v is None for v in a.values()):
        continue
    pd = lambda x, y: diff_str(paired(x, y, t))
    out.append(f"- Table 3, {t}: undistillable (OOD) teacher at most 0.05 below the teacher: {a['undistillable_ood']:.3f} vs "
               f"{a['teacher']:.3f} -> {'yes' if a['undistillable_ood'] >= a['teacher'] - 0.05 else 'no'} "
               f"({pd('undistillable_ood', 'teacher')}); misled (OOD) below the student: {a['misled_ood']:.3f} vs {a['student']:.3f} -> "
               f"{'yes' if a['misled_ood'] < a['student'] else 'no'} ({pd('misled_ood', 'student')}); misled (CD) below the student: "
               f"{a['misled_cd']:.3f} -> {'yes' if a['misled_cd'] < a['student'] else 'no'} ({pd(cd('misled_cd'), 'student')})")
    for m, name, c in (("misled_ood", "misled_ood", "rkl_ood"), ("misled_cd", cd("misled_cd"), rkl_cd)):  # same distillation, original teacher
        if acc(t3, c, t) is not None:
            below = paired(name, c, t)  # below the control means beyond noise: the guard, not forgetting
            out.append(f"  - {name} below its control {c} beyond noise (same distillation, original teacher): {a[m]:.3f} vs "
                       f"{acc(t3, c, t):.3f} -> {'yes' if below and below[1][1] < 0 else 'no'} ({pd(name, c)})")
# Table 4 (paper 6.4): distillable teachers lower token RKL and the wrong-trace preference, undistillable ones raise both
by01 = {v: {r["task"]: r for r in rows} for v, rows in t1.items()}
for t in tasks:
    o = by01["original"].get(t, {})
    for v, want in (("distillable", "down"), ("undistillable", "up")):
        r = by01[v].get(t)
        if not r:
            continue
        got = []
        for key, name in (("onpolicy_token_rkl", "token RKL"), ("wrong_trace_pref", "wrong-trace preference")):
            if r.get(key) is not None and o.get(key) is not None:
                got.append(f"{name} {o[key]:.3f} -> {r[key]:.3f} ({'down' if r[key] < o[key] else 'up'})")
        if got:
            out.append(f"- Table 4, {t}, {v} teacher (the paper expects both {want}): " + "; ".join(got)
                       + " (point estimates of 01, no intervals)")
# Figure 2 (paper 4.2): the frequency-KL correlation appears only as k -> |V|, on each token's mean contribution
# where it is a top-k candidate (tail_spearman_member; the per-position form tracks candidate counts at small k)
for t in tasks:
    rho = by01["original"].get(t, {}).get("tail_spearman_member") or {}
    if rho.get("1") is not None and rho.get("all") is not None:
        ok = rho["1"] < 0.3 and rho["all"] - rho["1"] >= 0.3
        out.append(f"- tail noise, {t}: Spearman rho (token frequency vs its mean RKL contribution in the student's top-k) "
                   f"for k = 1, 5, 20, 100, |V|: {', '.join(f3(rho.get(k)) for k in ('1', '5', '20', '100', 'all'))}; "
                   f"no elevation of frequent tokens at k=1 (rho < 0.3), a correlation growing by at least 0.3 toward |V|: {'yes' if ok else 'no'}")
for v, s in cal.items():
    o, c = s["seq_kl_target"]["original"], s["seq_kl_target"]["calibrated"]
    want = "down" if s["lam"] > 0 else "up" if s["lam"] < 0 else "-"
    got = "down" if c < o else "up"
    out.append(f"- calibration {v} (lam {s['lam']:+g}): sequence KL to the target {o:.2f} -> {c:.2f} ({got}; the paper expects {want})")
out.append("")

# ----------------------------------------------------------------------------- configs
out += ["## Configs used", ""]
for pth in sorted(glob.glob(os.path.join(R, "**/config*.json"), recursive=True)):
    rel = os.path.relpath(pth, R)
    if any(s in rel for s in ("/teacher/", "/student/", "/target/", "/merged/", "/model/", "/adapter/", "/ckpt")):
        continue  # model configs, not run configs
    cfg = load(rel)
    out += [f"<details><summary>{rel}</summary>", "", "```json", json.dumps(cfg, indent=1), "```", "</details>", ""]

common.atomic_write_text(os.path.join(R, "REPORT.md"), "\n".join(out) + "\n")
print(f"wrote {os.path.join(R, 'REPORT.md')}")
