"""report.py's verdicts on a hand-made run folder: paired differences over the same prompts, with the
numbers known in advance (each model's per-prompt accuracy is set, so every difference is exact)."""
import json
import os
import subprocess
import sys

import numpy as np

import common as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("teacher", "distillable", "undistillable", "student", "sft", "fkl", "rkl", "improve", "misled")


def write_model(run, model, task, per_prompt, k=4):
    """Stage 04's samples for one model: prompt i has round(per_prompt[i] * k) correct of k samples."""
    rows = [{"i": i, "j": j, "correct": j < round(a * k), "answer": "1", "completion": "", "question": f"q{i}"}
            for i, a in enumerate(per_prompt) for j in range(k)]
    C.write_jsonl(os.path.join(run, "04_eval", "samples", f"{model}__{task}.jsonl"), rows)
    return {"model": model, "task": task, "acc": float(np.mean([r["correct"] for r in rows])), "acc_ci": [0.0, 1.0]}


def test_paired_differences_and_verdicts(tmp_path):
    run, task, P = str(tmp_path / "run"), "toy_math", 40
    base = np.full(P, 0.25)
    acc = {m: base.copy() for m in MODELS}
    acc["teacher"] = np.full(P, 0.75)
    acc["undistillable"] = np.full(P, 0.75)
    acc["rkl"][:] = 0.5                      # rkl - student = +0.25 on every prompt: beyond noise
    acc["misled"][:20] = 0.0                 # misled - rkl = (20 * -0.5 + 20 * -0.25) / 40 = -0.375
    acc["improve"][:] = 0.5
    acc["improve"][:2] = 0.75                # improve - rkl = +0.0125, on 2 prompts only: within noise
    table = [write_model(run, m, task, acc[m]) for m in MODELS]
    C.atomic_write_json(os.path.join(run, "04_eval", "table2.json"), table)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), "--run", run], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = open(os.path.join(run, "REPORT.md")).read()
    line = next(x for x in rep.splitlines() if x.startswith("- misled student collapses"))
    assert "paired difference -0.375 [" in line and "beyond noise" in line
    line = next(x for x in rep.splitlines() if x.startswith("- improve student beats"))
    # 2 of 40 prompts differ: a resample misses both with probability (38/40)^40 = 0.13 > 2.5%, so the interval starts at 0
    assert "vs rkl: paired difference +0.013 [+0.000, " in line and line.endswith("within noise)")
    line = next(x for x in rep.splitlines() if x.startswith("- precondition, toy_math"))
    assert "): yes (beyond noise: rkl)" in line and "+0.250 [+0.250, +0.250]" in line
    line = next(x for x in rep.splitlines() if x.startswith("- undistillable teacher keeps"))
    assert "-> yes" in line and "paired difference +0.000 [+0.000, +0.000], within noise" in line


def test_table3_checks_find_task_suffixed_cd_students(tmp_path):
    """Real presets have several OOD tasks, and run_all.sh names each one's CD student misled_cd_<task>."""
    run, P = str(tmp_path / "run"), 20
    table3 = []
    for t in ("csqa", "mmlu_pro"):
        for m, a in (("teacher", 0.8), ("undistillable_ood", 0.8), ("student", 0.5), ("misled_ood", 0.25),
                     ("rkl_ood", 0.25), (f"misled_cd_{t}", 0.0), (f"rkl_cd_{t}", 0.5)):
            table3.append(write_model(run, m, t, np.full(P, a)))
    C.atomic_write_json(os.path.join(run, "04_eval", "table3.json"), table3)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "report.py"), "--run", run], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = open(os.path.join(run, "REPORT.md")).read()
    for t in ("csqa", "mmlu_pro"):
        line = next(x for x in rep.splitlines() if x.startswith(f"- Table 3, {t}:"))
        assert "misled (CD) below the student: 0.000 -> yes (paired difference -0.500 [-0.500, -0.500], beyond noise)" in line
        assert f"  - misled_cd_{t} below its control rkl_cd_{t} beyond noise (same distillation, original teacher): 0.000 vs 0.500 -> yes" in rep
