"""Stage 01 (pilot KL study): the aggregation math it adds to common.py, checked by hand and by
brute force, and subprocess runs of 01_pilot_kl.py on the tiny fixtures (same tokenizer and
cross-tokenizer) whose numbers are re-derived independently from the saved rollouts."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_forking_share_by_hand():
    kl = [1, 2, 3, 4, 10]          # total 20
    ent = [.5, .1, .9, .3, .2]     # entropy order: idx 2, 0, 3, 4, 1
    assert C.forking_share(kl, ent, 0.2) == pytest.approx(3 / 20)        # ceil(1.0) = 1 position: idx 2
    assert C.forking_share(kl, ent, 0.4) == pytest.approx((3 + 1) / 20)  # idx 2, 0
    assert C.forking_share(kl, ent, 0.5) == pytest.approx((3 + 1 + 4) / 20)  # ceil(2.5) = 3: idx 2, 0, 3
    assert C.forking_share(kl, ent, 1.0) == pytest.approx(1.0)
    assert C.forking_share([0, 0], [1, 2]) is None  # no KL at all: the share is undefined


def _rank_no_ties(a):
    return np.array([sum(b < x for b in a) for x in a], float)


def test_tail_spearman_matches_brute_force_loop():
    g = torch.Generator().manual_seed(3)
    N, V = 9, 7
    s, t = torch.randn(N, V, generator=g) * 2, torch.randn(N, V, generator=g) * 2
    acc = C.tail_noise_update({}, s[:5], t[:5], ks=(1, 3, None))
    acc = C.tail_noise_update(acc, s[5:], t[5:], ks=(1, 3, None))  # chunked, as the script feeds it
    freq = np.array([5, 0, 3, 8, 1, 12, 2])  # token 1 never realized: excluded
    got = C.tail_spearman(acc, freq, keys=("1", "3", "all"))
    got_signed = C.tail_spearman(acc, freq, keys=("all",), signed=True)
    ps, pt = F.softmax(s, -1), F.softmax(t, -1)
    for k, key in ((1, "1"), (3, "3"), (V, "all")):
        y, inside = np.zeros(V), np.zeros(V, bool)
        for n in range(N):  # brute force: every position, every token, explicit top-k membership
            order = sorted(range(V), key=lambda v: -ps[n, v].item())
            for v in order[:k]:
                y[v] += ps[n, v].item() * math.log(ps[n, v].item() / pt[n, v].item())
                inside[v] = True
        y /= N
        for signed in (False, True):
            if signed and key != "all":
                continue
            yy = y if signed else np.abs(y)
            keep = [v for v in range(V) if freq[v] > 0 and inside[v]]
            if len(keep) < 2:
                assert got[key] is None
                continue
            rx, ry = _rank_no_ties(freq[keep]), _rank_no_ties(yy[keep])  # no ties here by construction
            n = len(keep)
            want = 1 - 6 * ((rx - ry) ** 2).sum() / (n * (n * n - 1))
            assert (got_signed if signed else got)[key] == pytest.approx(want, abs=1e-9)


def _toy_data(root):
    rows_m = [{"prompt": f"Ann has {a} pens. She buys {b} more. How many pens does she have now?", "answer": str(a + b)}
              for a, b in ((3, 4), (10, 2), (7, 7), (1, 9))]
    rows_q = [{"prompt": f"Which is {c}?\nA) x\nB) y\nC) z\nD) w", "answer": c, "choices": ["x", "y", "z", "w"]} for c in "ABCD"]
    for task, rows in (("toy_math", rows_m), ("toy_qa", rows_q)):
        os.makedirs(root / "data" / task, exist_ok=True)
        with open(root / "data" / task / "test.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return root / "data"


def _run(tiny_dirs, tmp_path, teacher, out, n_prompts=3, n_samples=4, extra=(), log=None):
    data = _toy_data(tmp_path)
    cmd = [sys.executable, os.path.join(ROOT, "01_pilot_kl.py"), "--teacher", str(tiny_dirs / teacher),
           "--student", str(tiny_dirs / "student"), "--data", str(data), "--out_dir", str(out),
           "--n_prompts", str(n_prompts), "--n_samples", str(n_samples), "--max_new_tokens", "12",
           "--batch_size", "5", "--score_batch", "5", "--chunk", "7", "--device", "cpu", "--backend", "hf", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    for f in ("config.json", "table1.json", "table1.md", "tail_noise.png", "rollouts.jsonl", "metrics.jsonl",
              "samples_student.json", "samples_teacher.json"):
        assert os.path.getsize(out / f) > 0, f
    if log is not None:
        log.append(r.stdout)
    return json.load(open(out / "table1.json")), C.read_jsonl(out / "rollouts.jsonl"), data


SCHEMA = ["teacher", "student", "task", "onpolicy_token_rkl", "onpolicy_token_fkl", "onpolicy_seq_rkl",
          "wrong_trace_pref", "offpolicy_seq_rkl_is", "offpolicy_seq_rkl_k3", "tail_spearman"]


def test_pilot_same_tokenizer_outputs_and_rescored_numbers(tiny_dirs, tmp_path):
    out = tmp_path / "pilot"
    rows, rolls, data = _run(tiny_dirs, tmp_path, "teacher", out)
    assert [r["task"] for r in rows] == ["toy_math", "toy_qa"]
    for r in rows:
        assert all(k in r for k in SCHEMA) and r["note"] is None and r["teacher"] == "teacher"
        for k in ("onpolicy_token_rkl", "onpolicy_token_fkl", "offpolicy_token_rkl", "offpolicy_token_fkl"):
            assert math.isfinite(r[k]) and r[k] >= 0, k
        assert set(r["tail_spearman"]) == {"1", "5", "20", "100", "all"}
        assert 0 <= r["forking_share"] <= 1
        assert len([x for x in rolls if x["task"] == r["task"]]) == 2 * 3 * 4
    # Re-derive the token-level numbers of one task from the saved ids with the unchunked reference:
    # catches a mis-ordered position/sequence mapping, a wrong prompt, or a swapped direction.
    tok = C.load_tokenizer(str(tiny_dirs / "student"))
    s, t = C.load_model(str(tiny_dirs / "student"), "cpu"), C.load_model(str(tiny_dirs / "teacher"), "cpu")
    task, r = "toy_math", rows[0]
    prompts = [C.build_prompt(tok, task, x) for x in C.load_task(task, "test", data=str(data), n=3, seed=0)]
    for src, key in (("student", "onpolicy"), ("teacher", "offpolicy")):
        xs = [x for x in rolls if x["task"] == task and x["source"] == src]
        ids, am, cm = C.make_batch(tok, [prompts[x["i"]] for x in xs], [x["ids"] for x in xs])
        with torch.no_grad():
            rkl = C.naive_token_divergence(s, t, ids, am, cm, beta=1.0)
            fkl = C.naive_token_divergence(s, t, ids, am, cm, beta=0.0)
            lps, lpt = C.completion_logprobs(s, ids, am, cm).sum(-1), C.completion_logprobs(t, ids, am, cm).sum(-1)
        assert r[f"{key}_token_rkl"] == pytest.approx(rkl.mean().item(), rel=1e-4)
        assert r[f"{key}_token_fkl"] == pytest.approx(fkl.mean().item(), rel=1e-4)
        assert [x["seq_logp_student"] for x in xs] == pytest.approx(lps.tolist(), rel=1e-4)
        assert [x["seq_logp_teacher"] for x in xs] == pytest.approx(lpt.tolist(), rel=1e-4)
        if src == "student":
            assert r["onpolicy_seq_rkl"] == pytest.approx((lps - lpt).mean().item(), rel=1e-4)
            rows_N = cm.nonzero()[:, 0]
            assert r["onpolicy_token_rkl_per_seq"] == pytest.approx(torch.zeros(len(xs)).index_add_(0, rows_N, rkl).mean().item(), rel=1e-4)
        else:
            assert r["seq_fkl_teacher_samples"] == pytest.approx((lpt - lps).mean().item(), rel=1e-4)
            d = (lps - lpt).double()
            assert r["offpolicy_seq_rkl_is"] == pytest.approx((d.exp() * d).mean().item(), rel=1e-4)


def test_pilot_cross_tokenizer_is_sequence_level_only(tiny_dirs, tmp_path):
    rows, rolls, _ = _run(tiny_dirs, tmp_path, "target", tmp_path / "cross", n_prompts=2, n_samples=3)
    for r in rows:
        assert "shared vocabulary" in r["note"]
        for k in ("onpolicy_token_rkl", "onpolicy_token_fkl", "offpolicy_token_rkl", "tail_spearman", "forking_share"):
            assert r[k] is None, k
        for k in ("onpolicy_seq_rkl", "seq_fkl_teacher_samples"):
            assert math.isfinite(r[k]), k
    assert all(math.isfinite(x["seq_logp_student"]) and math.isfinite(x["seq_logp_teacher"]) for x in rolls)
    assert "Token-level rows are empty" in open(tmp_path / "cross" / "table1.md").read()


def test_pilot_rerun_reuses_rollouts_only_when_weights_and_settings_match(tiny_dirs, tmp_path):
    """A rerun into the same out_dir takes each model's rollouts from samples_<model>.json (what lets a
    vLLM run that stopped at its second engine finish); other settings or retrained weights sample anew."""
    out, log, teacher = tmp_path / "pilot", [], tmp_path / "teacher"  # a copy: its weights' mtime changes below
    shutil.copytree(tiny_dirs / "teacher", teacher)
    rows1, rolls1, _ = _run(tiny_dirs, tmp_path, teacher, out, n_prompts=2, n_samples=2, log=log)
    cached = json.load(open(out / "samples_teacher.json"))
    for x in cached["samples"]["toy_math"]:  # mark the cache: only a reuse can show these texts
        x["text"] = "42"
    C.atomic_write_json(out / "samples_teacher.json", cached)
    rows2, rolls2, _ = _run(tiny_dirs, tmp_path, teacher, out, n_prompts=2, n_samples=2, log=log)
    assert "student rollouts: reusing" in log[1] and "teacher rollouts: reusing" in log[1]
    assert [x["ids"] for x in rolls2] == [x["ids"] for x in rolls1]
    assert {x["text"] for x in rolls2 if x["source"] == "teacher" and x["task"] == "toy_math"} == {"42"}
    assert rows2[1]["onpolicy_token_rkl"] == pytest.approx(rows1[1]["onpolicy_token_rkl"], rel=1e-6)
    _run(tiny_dirs, tmp_path, teacher, out, n_prompts=2, n_samples=2, extra=["--temperature", "0.9"], log=log)
    assert "reusing" not in log[2]
    os.utime(teacher / "model.safetensors", ns=(1, 1))  # a teacher retrained in place: its rollouts are stale
    _run(tiny_dirs, tmp_path, teacher, out, n_prompts=2, n_samples=2, extra=["--temperature", "0.9"], log=log)
    assert "student rollouts: reusing" in log[3] and "teacher rollouts: reusing" not in log[3]
