"""Stage 03 (03_distill.py): each method's loss against its formula with full logits, on-policy RKL
moves the student toward the teacher, cross-tokenizer SFT (with LoRA), the shared-vocabulary error,
exact resume, the non-finite stop, and every output written. Subprocess runs on the tiny fixtures."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import kill_at_first_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "03_distill.py")
SMALL = ["--steps", "1", "--max_new_tokens", "6", "--n_prompts", "3", "--teacher_samples", "2", "--n_eval", "2",
         "--batch_size", "12", "--lr", "1e-3", "--seed", "0"]


@pytest.fixture(scope="module")
def data(two_task_data):
    return two_task_data


def run(tiny_dirs, data, out, *extra, teacher="teacher", check=True):
    cmd = [sys.executable, SCRIPT, "--teacher", str(tiny_dirs / teacher), "--student", str(tiny_dirs / "student"),
           "--data", str(data), "--out_dir", str(out), *SMALL, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def metrics(out):
    return common.read_jsonl(os.path.join(out, "metrics.jsonl"))


def pool_batch(tiny_dirs, data, out, tok_name):
    """The whole off-policy pool as (student prompt, completion) pairs, rebuilt from the cache and the
    task files; with --batch_size = pool size the first step's batch is exactly this pool."""
    stok = common.load_tokenizer(str(tiny_dirs / tok_name))
    items = [(t, r) for t in ("toy_math", "toy_qa") for r in common.load_task(t, "train", data=str(data), n=3, seed=0)]
    with open(os.path.join(out, "teacher_samples.json")) as f:
        samples = json.load(f)["samples"]
    assert len(samples) == 12
    return stok, [(common.build_prompt(stok, *items[s["i"]]), s) for s in samples]


def reference_divergence(s_logits, t_logits, beta, topk=None):
    """Written out independently from common.token_divergence: probabilities, not log-space tricks."""
    ps, pt = F.softmax(s_logits.double(), -1), t_logits.double()
    if topk:
        pt = pt.masked_fill(pt < pt.topk(topk, -1).values[..., -1:], float("-inf"))
    pt = F.softmax(pt, -1)

    def kl(p, q):
        return sum(float(p[v] * (p[v].log() - q[v].log())) for v in range(len(p)) if p[v] > 0)
    if beta == 0:
        return kl(pt, ps)
    if beta == 1:
        return kl(ps, pt)
    m = (1 - beta) * ps + beta * pt
    return beta * kl(pt, m) + (1 - beta) * kl(ps, m)


@pytest.mark.parametrize("method,extra,beta,topk", [("fkl", [], 0.0, None), ("rkl", ["--lmbda", "0"], 1.0, None),
                                                    ("jsd", ["--lmbda", "0", "--beta", "0.3"], 0.3, None),
                                                    ("fkl", ["--topk", "5"], 0.0, 5)])
def test_token_loss_matches_formula_and_writes_outputs(tiny_dirs, data, tmp_path, method, extra, beta, topk):
    """Step 1's loss (before any update) = mean over every completion token of the pool of the exact
    divergence computed from full logits; and the run writes every output."""
    out = tmp_path / method
    run(tiny_dirs, data, out, "--method", method, *extra)
    stok, pairs = pool_batch(tiny_dirs, data, out, "student")
    s = common.load_model(str(tiny_dirs / "student"), "cpu")
    t = common.load_model(str(tiny_dirs / "teacher"), "cpu")
    vals = []
    for prompt, smp in pairs:
        p_ids = stok(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + smp["ids"]])
        sl, tl = s(input_ids=ids).logits[0], t(input_ids=ids).logits[0]
        for j in range(len(smp["ids"])):  # position len(p)-1+j predicts completion token j
            pos = len(p_ids) - 1 + j
            vals.append(reference_divergence(sl[pos], tl[pos], beta, topk))
    want = sum(vals) / len(vals)
    m = metrics(out)
    assert m[0]["step"] == 1 and m[0]["loss"] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert m[0]["kl"] == pytest.approx(m[0]["loss"])
    for f in ("config.json", "metrics.jsonl", "summary.json", "ckpt/state.pt", "teacher_samples.json", "model/config.json"):
        assert os.path.exists(out / f), f
    summ = json.loads((out / "summary.json").read_text())
    assert set(summ["acc_before"]) == set(summ["acc_after"]) == {"toy_math", "toy_qa"}
    assert common.load_model(str(out / "model"), "cpu") is not None and common.load_tokenizer(str(out / "model")) is not None


def test_sft_loss_is_cross_entropy_across_tokenizers_with_lora(tiny_dirs, data, tmp_path):
    """sft from the target (tokenizer B) into the student (tokenizer A), with a LoRA: step 1's loss is
    HF's own cross-entropy on the re-tokenized teacher text (+ eos when the sample finished), and
    model/ is a plain merged HF folder."""
    out = tmp_path / "sft"
    run(tiny_dirs, data, out, "--method", "sft", "--lora", "2", teacher="target")
    stok, pairs = pool_batch(tiny_dirs, data, out, "student")
    s = common.load_model(str(tiny_dirs / "student"), "cpu")
    nll, n = 0.0, 0
    for prompt, smp in pairs:
        p_ids = stok(prompt, add_special_tokens=False)["input_ids"]
        c_ids = stok(smp["text"], add_special_tokens=False)["input_ids"] + ([stok.eos_token_id] if smp["finished"] else [])
        ids = torch.tensor([p_ids + c_ids])
        labels = torch.tensor([[-100] * len(p_ids) + c_ids])
        nll += s(input_ids=ids, labels=labels).loss.item() * len(c_ids)
        n += len(c_ids)
    m = metrics(out)
    assert m[0]["loss"] == pytest.approx(nll / n, rel=1e-4)
    assert m[0]["kl"] is None
    sd = common.load_model(str(out / "model"), "cpu").state_dict()
    assert not any("lora" in k for k in sd) and "model.embed_tokens.weight" in sd


def test_token_methods_across_vocabularies_fail_clearly(tiny_dirs, data, tmp_path):
    r = run(tiny_dirs, data, tmp_path / "x", "--method", "fkl", teacher="target", check=False)
    assert r.returncode == 2
    assert "shared vocabulary" in r.stderr and "--method sft" in r.stderr and "Traceback" not in r.stderr


def test_topk_with_reverse_kl_fails_clearly(tiny_dirs, data, tmp_path):
    """Reverse KL against a top-k teacher is infinite (log 0 outside the k tokens): refused before any work."""
    torch.manual_seed(0)
    s, t = torch.randn(3, 7), torch.randn(3, 7)
    assert torch.isinf(common.token_divergence(s, t, beta=1.0, teacher_topk=2)).all()
    assert torch.isfinite(common.token_divergence(s, t, beta=0.5, teacher_topk=2)).all()
    for extra in (["--method", "rkl"], ["--method", "jsd", "--beta", "1"]):
        r = run(tiny_dirs, data, tmp_path / "x", *extra, "--topk", "5", check=False)
        assert r.returncode == 2 and "--topk with reverse KL" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_on_policy_batches_at_another_temperature_are_refused(tiny_dirs, data, tmp_path):
    """The divergence scores the student at T=1, so its samples must be drawn at T=1 to be on-policy."""
    r = run(tiny_dirs, data, tmp_path / "x", "--method", "rkl", "--temperature", "0.7", check=False)
    assert r.returncode == 2 and "not on-policy" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_rkl_reduces_reverse_kl_to_teacher(tiny_dirs, data, tmp_path):
    """A few on-policy RKL steps lower the token reverse KL(s||t) on a fixed set of sequences."""
    out = tmp_path / "rkl"
    run(tiny_dirs, data, out, "--method", "rkl", "--steps", "6", "--lr", "1e-2", "--batch_size", "6", "--max_new_tokens", "12")
    assert all(r["onpolicy"] for r in metrics(out))
    tok = common.load_tokenizer(str(tiny_dirs / "student"))
    s0 = common.load_model(str(tiny_dirs / "student"), "cpu")
    s1 = common.load_model(str(out / "model"), "cpu")
    t = common.load_model(str(tiny_dirs / "teacher"), "cpu")
    rows = common.load_task("toy_math", "test", data=str(data))
    prompts = [common.build_prompt(tok, "toy_math", r) for r in rows]
    smp = common.generate(s0, tok, prompts, n=2, max_new_tokens=12, seed=123)
    batch = common.make_batch(tok, [prompts[x["i"]] for x in smp], [x["ids"] for x in smp])
    with torch.no_grad():
        before = common.chunked_token_divergence(s0, t, *batch, beta=1.0).mean().item()
        after = common.chunked_token_divergence(s1, t, *batch, beta=1.0).mean().item()
    assert after < 0.7 * before, (before, after)


def digest(out, skip=("seconds", "eta")):
    """A hash of model/'s weights and the metrics rows without wall times."""
    import hashlib
    rows = [{k: v for k, v in r.items() if k not in skip} for r in metrics(out)]
    return hashlib.sha256((out / "model" / "model.safetensors").read_bytes()).hexdigest(), rows


def test_resume_continues_to_identical_weights_and_metrics(tiny_dirs, data, tmp_path):
    """jsd with lmbda 0.5 mixes on- and off-policy batches: a run of 2 steps continued to 4 ends with the
    same weights (bit for bit) and the same metrics (coins, both cursors, RNG, optimizer) as one run of 4."""
    base = ["--method", "jsd", "--batch_size", "4", "--save_every", "2", "--lr", "1e-2"]
    full, part = tmp_path / "full", tmp_path / "part"
    run(tiny_dirs, data, full, *base, "--steps", "4")
    run(tiny_dirs, data, part, *base, "--steps", "2")
    cfg = open(part / "config.json").read()
    # another run's settings into the same out_dir: refused, the checkpoint and its config.json untouched
    r = run(tiny_dirs, data, part, *base, "--steps", "4", "--beta", "0.3", check=False)
    assert r.returncode == 2 and "--beta 0.5 (now 0.3)" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert open(part / "config.json").read() == cfg
    r = run(tiny_dirs, data, part, *base, "--steps", "4")
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    assert {x["onpolicy"] for x in metrics(full)} == {True, False}  # both kinds of batch were exercised
    # the 2-step run evaluated at its last step; the 4-step run did not: that row's accuracy is the one difference
    skip = ("seconds", "eta", "acc", "acc_tasks")
    assert digest(full, skip) == digest(part, skip)
    assert metrics(full)[-1]["acc_tasks"] == metrics(part)[-1]["acc_tasks"]


def test_kill_9_mid_run_then_rerun_ends_identical(tiny_dirs, data, tmp_path):
    """A real kill -9 once the first checkpoint exists (mid-step or mid-save, wherever the run is), then the
    same command again: the same final weights hash and metrics as the uninterrupted run."""
    base = ["--method", "jsd", "--batch_size", "4", "--save_every", "1", "--lr", "1e-2", "--steps", "6"]
    full, out = tmp_path / "full", tmp_path / "killed"
    run(tiny_dirs, data, full, *base)
    cmd = [sys.executable, SCRIPT, "--teacher", str(tiny_dirs / "teacher"), "--student", str(tiny_dirs / "student"),
           "--data", str(data), "--out_dir", str(out), *SMALL, *base]
    kill_at_first_checkpoint(cmd, out / "ckpt", cwd=ROOT)
    assert not os.path.exists(out / "model")
    r = run(tiny_dirs, data, out, *base)
    assert "resumed from" in r.stdout
    assert digest(out) == digest(full)


def test_divergence_keeps_the_last_good_checkpoint_and_a_rerun_with_a_smaller_lr_continues(tiny_dirs, data, tmp_path):
    """4 good steps, then the same run continued at an absurd lr: the loss leaves its band, the weights
    of those steps are never checkpointed, and the run stops at the first non-finite step naming step 4 and
    the exact command; that command (only --lr changed) resumes from step 4 and finishes."""
    out = tmp_path / "div"
    base = ["--method", "fkl", "--batch_size", "4", "--save_every", "1", "--grad_clip", "0"]
    run(tiny_dirs, data, out, *base, "--steps", "4", "--lr", "1e-3")
    r = run(tiny_dirs, data, out, *base, "--steps", "12", "--lr", "1e30", check=False)
    assert "with --lr 1e+30 (it trained with 0.001)" in r.stdout
    assert r.returncode == 2 and "non-finite" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "keeps step 4" in r.stderr, r.stderr
    ck = common.load_checkpoint(str(out / "ckpt"))
    assert ck["meta"]["step"] == 4 and all(torch.isfinite(w).all() for w in ck["weights"].values())
    cmd = r.stderr.strip().split(": ")[-1]
    assert cmd.startswith("python ") and cmd.endswith("--lr 1e+29"), cmd
    r2 = subprocess.run(cmd.replace("python ", sys.executable + " ", 1).replace("--lr 1e+29", "--lr 1e-3"), shell=True,
                        capture_output=True, text=True, cwd=ROOT)
    assert r2.returncode == 0 and "at step 4" in r2.stdout, r2.stderr[-2000:]
    assert [x["step"] for x in metrics(out)] == list(range(1, 13))


def test_nonfinite_loss_stops_and_keeps_no_diverged_checkpoint(tiny_dirs, data, tmp_path):
    """An absurd lr blows the weights up in step 1's update: the run stops with one clear line naming the
    step and the fix, and writes neither a checkpoint of those weights nor model/."""
    out = tmp_path / "nan"
    r = run(tiny_dirs, data, out, "--method", "fkl", "--steps", "5", "--save_every", "1", "--lr", "1e30", "--grad_clip", "0",
            "--batch_size", "4", check=False)
    assert r.returncode == 2 and "non-finite" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "no checkpoint passed the divergence check" in r.stderr and "--lr 1e+29" in r.stderr
    ck = common.load_checkpoint(str(out / "ckpt"))
    assert ck is None or all(torch.isfinite(w).all() for w in ck["weights"].values())
    assert not os.path.exists(out / "model")


def test_gold_sft_trains_on_reference_completions(tiny_dirs, data, tmp_path):
    """--gold: step 1 (batch = all 6 train prompts) is the cross-entropy of the rows' own completions
    (+ eos), no teacher sampled; rows without a completion fail with one line naming the fix."""
    r = run(tiny_dirs, data, tmp_path / "nogold", "--method", "sft", "--gold", check=False)
    assert r.returncode == 2 and "no reference 'completion'" in r.stderr and "Traceback" not in r.stderr
    gold = tmp_path / "gold_data"
    for task in ("toy_math", "toy_qa"):
        os.makedirs(gold / task)
        for split in ("train", "test"):
            rows = [dict(x, completion=f"so {x['answer']}\n#### {x['answer']}") for x in common.read_jsonl(str(data / task / f"{split}.jsonl"))]
            common.write_jsonl(str(gold / task / f"{split}.jsonl"), rows)
    out = tmp_path / "gold"
    run(tiny_dirs, gold, out, "--method", "sft", "--gold", "--batch_size", "6")
    assert not os.path.exists(out / "teacher_samples.json")
    stok, s = common.load_tokenizer(str(tiny_dirs / "student")), common.load_model(str(tiny_dirs / "student"), "cpu")
    nll, n = 0.0, 0
    for t in ("toy_math", "toy_qa"):
        for row in common.load_task(t, "train", data=str(gold), n=3, seed=0):
            p_ids = stok(common.build_prompt(stok, t, row), add_special_tokens=False)["input_ids"]
            c_ids = stok(row["completion"], add_special_tokens=False)["input_ids"] + [stok.eos_token_id]
            nll += s(input_ids=torch.tensor([p_ids + c_ids]), labels=torch.tensor([[-100] * len(p_ids) + c_ids])).loss.item() * len(c_ids)
            n += len(c_ids)
    assert metrics(out)[0]["loss"] == pytest.approx(nll / n, rel=1e-4)


def test_teacher_sample_cache_follows_the_teacher_weights(tiny_dirs, data, tmp_path):
    """A shared --samples_file is reused while the teacher is the same; the same path holding retrained
    weights (a new stamp) samples anew."""
    f = str(tmp_path / "pool.json")
    made = lambda r: "teacher samples:" in r.stdout
    assert made(run(tiny_dirs, data, tmp_path / "a", "--method", "sft", "--samples_file", f))
    assert not made(run(tiny_dirs, data, tmp_path / "b", "--method", "sft", "--samples_file", f))
    w = tiny_dirs / "teacher" / "model.safetensors"
    st = os.stat(w)
    try:
        os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert made(run(tiny_dirs, data, tmp_path / "c", "--method", "sft", "--samples_file", f))
    finally:
        os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("method", ["rkl", "sft"])
def test_micro_batches_and_checkpointing_give_the_full_batch_step(tiny_dirs, data, tmp_path, method):
    """--micro_batch 5 (12 sequences: 5 + 5 + 2, unequal token counts) with --grad_ckpt takes the same step as
    one full-batch backward: same loss, same weights after it. Off-policy (lmbda 0) so both see one batch."""
    outs = {}
    for name, extra in (("full", []), ("micro", ["--micro_batch", "5", "--grad_ckpt"])):
        outs[name] = tmp_path / name
        run(tiny_dirs, data, outs[name], "--method", method, "--lmbda", "0", "--samples_file", str(tmp_path / "teacher_samples.json"), *extra)
    assert metrics(outs["micro"])[0]["loss"] == pytest.approx(metrics(outs["full"])[0]["loss"], rel=1e-6)
    # AdamW is blind to a uniform gradient scale, so the pre-clip norm pins the normalization: both runs
    # against the gradient of the batch mean computed here from the pool (the first batch is the whole pool)
    stok, pairs = pool_batch(tiny_dirs, data, tmp_path, "student")  # the shared pool file
    s = common.load_model(str(tiny_dirs / "student"), "cpu", trainable=True)
    if method == "sft":
        ids, am, cm = common.make_text_batch(stok, [p for p, _ in pairs], [x["text"] for _, x in pairs], eos=[x["finished"] for _, x in pairs])
        (-(common.completion_logprobs(s, ids, am, cm) * cm).sum() / cm.sum()).backward()
    else:
        t = common.load_model(str(tiny_dirs / "teacher"), "cpu")
        ids, am, cm = common.make_batch(stok, [p for p, _ in pairs], [x["ids"] for _, x in pairs])
        common.chunked_token_divergence(s, t, ids, am, cm, beta=1.0).mean().backward()
    ref = torch.norm(torch.stack([q.grad.norm() for q in s.parameters() if q.grad is not None])).item()
    for name in outs:
        assert metrics(outs[name])[0]["grad_norm"] == pytest.approx(ref, rel=1e-4), name
    a = common.load_model(str(outs["full"] / "model"), "cpu").state_dict()
    b = common.load_model(str(outs["micro"] / "model"), "cpu").state_dict()
    s0 = common.load_model(str(tiny_dirs / "student"), "cpu").state_dict()
    da = torch.cat([(a[k] - s0[k]).flatten() for k in a])  # the two steps' updates
    db = torch.cat([(b[k] - s0[k]).flatten() for k in a])
    assert da.abs().max() > 5e-4  # the step did move the student (lr 1e-3)
    # AdamW's first step is about lr * sign(grad): where |grad| ~ eps, float noise in the gradient moves an
    # entry by up to ~1e-5, so compare the updates as a whole, not entry by entry
    assert torch.nn.functional.cosine_similarity(da, db, 0) > 0.9999
    assert ((da - db).abs() > 1e-6).float().mean() < 1e-3
