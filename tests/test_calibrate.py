"""Stage 02 (teacher calibration): the loss and reward math against hand-computed numbers and plain
REINFORCE, the cross-tokenizer reward against full-logits references, and subprocess runs of
02_calibrate.py on the tiny fixtures (every output written, merged/ reloads, kill + rerun resumes
with the same next loss)."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import common as C
from conftest import kill_at_first_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- math


def test_lam0_beta0_is_plain_reinforce_on_task_reward():
    """With lam = 0 and beta = 0 the calibration loss, and its gradient, are REINFORCE with
    gn(r_task) alone: r_cal and the reference must not leak in."""
    torch.manual_seed(0)
    B, T, G = 6, 5, 3
    logits = torch.randn(B, T, 7, requires_grad=True)
    y = torch.randint(0, 7, (B, T))
    mask = (torch.rand(B, T) > 0.2).float()
    r_task = torch.tensor([1.0, 0, 0, 1, 1, 0])
    r_cal = torch.randn(B) * 10
    ref = torch.randn(B, T)

    def logp():
        return logits.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
    loss, parts = C.calibration_loss(logp(), ref, mask, r_task, r_cal, lam=0.0, beta=0.0, group_size=G)
    g1, = torch.autograd.grad(loss, logits)
    want = C.reinforce_loss(logp(), mask, C.group_normalize(r_task, G))
    g2, = torch.autograd.grad(want, logits)
    assert loss.item() == pytest.approx(want.item(), abs=1e-7)
    assert torch.allclose(g1, g2, atol=1e-7)
    assert g1.abs().sum() > 0
    # the knob and the anchor do change things when turned on
    l_lam, _ = C.calibration_loss(logp(), ref, mask, r_task, r_cal, lam=1.0, beta=0.0, group_size=G)
    l_beta, _ = C.calibration_loss(logp(), ref, mask, r_task, r_cal, lam=0.0, beta=0.5, group_size=G)
    assert abs(l_lam.item() - want.item()) > 1e-3 and abs(l_beta.item() - want.item()) > 1e-3


def test_micro_batched_parts_sum_to_the_calibration_loss_and_its_gradient():
    """02's --micro_batch: advantages from the whole groups, each slice's reinforce + beta * K3 divided by
    the whole batch's token count; the parts' values and gradients sum to calibration_loss's exactly."""
    torch.manual_seed(1)
    B, T, G, V = 6, 5, 3, 7
    logits = torch.randn(B, T, V, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.3).float()
    r_task, r_cal, ref = torch.tensor([1.0, 0, 1, 0, 0, 1]), torch.randn(B) * 5, torch.randn(B, T) - 2

    def logp():
        return logits.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1)
    whole, _ = C.calibration_loss(logp(), ref, mask, r_task, r_cal, lam=0.7, beta=0.3, group_size=G)
    g_whole, = torch.autograd.grad(whole, logits)
    adv, n = C.combine_advantages(r_task, r_cal, 0.7, G), mask.sum()
    total, g_parts = 0.0, torch.zeros_like(logits)
    for r in (slice(0, 4), slice(4, 6)):  # slices that cut a group in two
        lp = logp()[r]
        part, _, _ = C.calibration_loss_part(lp, ref[r], mask[r], adv[r], 0.3, n_tokens=n)
        g_parts += torch.autograd.grad(part, logits)[0]
        total += part.item()
    assert total == pytest.approx(whole.item(), abs=1e-6)
    assert torch.allclose(g_parts, g_whole, atol=1e-7) and g_whole.abs().sum() > 0


def test_calibration_loss_by_hand_with_zero_variance_groups():
    """Two groups of 4. Group 1: r_task (1,0,0,0), r_cal (0,1,2,3). Group 2: r_task all 1 and r_cal
    all 5 (zero variance: no signal, zero advantage, no NaN). lam = -1, beta = 0.1. One token per
    sequence with log p_theta = -0.1 * (i+1) and log p_ref = log p_theta - log 2 (r = 1/2)."""
    r_task = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    r_cal = torch.tensor([0.0, 1, 2, 3, 5, 5, 5, 5])
    s3 = math.sqrt(3)  # gn(1,0,0,0) = (3, -1, -1, -1) / sqrt(3)
    s5 = math.sqrt(5)  # gn(0,1,2,3) = (-3, -1, 1, 3) / sqrt(5)
    adv = [3 / s3 + 3 / s5, -1 / s3 + 1 / s5, -1 / s3 - 1 / s5, -1 / s3 - 3 / s5, 0, 0, 0, 0]
    logp = torch.tensor([[-0.1 * (i + 1)] for i in range(8)])
    ref = logp - math.log(2)
    mask = torch.ones(8, 1)
    loss, parts = C.calibration_loss(logp, ref, mask, r_task, r_cal, lam=-1.0, beta=0.1, group_size=4)
    assert parts["adv"].tolist() == pytest.approx(adv, abs=1e-5)
    k3 = 0.5 - 1 - math.log(0.5)  # r - 1 - log r at r = 1/2, every token
    pg = -sum(a * lp for a, lp in zip(adv, logp[:, 0].tolist())) / 8
    assert parts["kl"].item() == pytest.approx(k3, abs=1e-6)
    assert loss.item() == pytest.approx(pg + 0.1 * k3, abs=1e-6)


def test_calibration_reward_by_hand():
    t, s = torch.tensor([-10.0, -4.0]), torch.tensor([-6.0, -8.0])
    assert C.calibration_reward(t, s).tolist() == [-4.0, 4.0]
    # length-normalized: each side by its own token count (target 5 and 2 tokens, theta 3 and 4)
    r = C.calibration_reward(t, s, torch.tensor([5.0, 2.0]), torch.tensor([3.0, 4.0]))
    assert r.tolist() == pytest.approx([-2.0 + 2.0, -2.0 + 2.0])
    x = torch.tensor([1.0], requires_grad=True)
    assert not C.calibration_reward(x * 2, x).requires_grad  # stop-gradient (Eq. 10)


# ----------------------------------------------------------------------------- cross-tokenizer reward


def _full_logits_seq_logprob(model, ids, n_prompt):
    """Reference: one forward over the whole sequence, full (L, V) logits, sum of the log-probs of
    the tokens after the prompt."""
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return sum(lp[j - 1, ids[j]].item() for j in range(n_prompt, len(ids)))


def test_cross_tokenizer_reward_equals_each_models_own_logprob(tiny_dirs):
    """r_cal = log p_target(y|x) - log p_theta(y|x): theta scored on its sampled ids (make_batch),
    the target on ITS tokenization of the same text (tokenizer B has extra characters that A maps
    to unk), each equal to a full-logits reference."""
    from transformers import AutoModelForCausalLM
    tok_a, tok_b = C.load_tokenizer(str(tiny_dirs / "teacher")), C.load_tokenizer(str(tiny_dirs / "target"))
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dirs / "teacher").eval()
    target = AutoModelForCausalLM.from_pretrained(tiny_dirs / "target").eval()
    assert len(tok_a) != len(tok_b)
    rows = [{"prompt": "2+3?", "answer": "5"}, {"prompt": "What is [x] plus 10?", "answer": "12"}]
    texts = ["so 2 + 3 = 5 #### 5", "[x] = {2}, 2 + 10 = 12\n#### 12"]
    assert tok_a(texts[1], add_special_tokens=False)["input_ids"] != tok_b(texts[1], add_special_tokens=False)["input_ids"]
    # target side, as the stage does it: its own prompt template and tokenization, eos per row
    tp = [C.build_prompt(tok_b, "toy_math", r) for r in rows]
    got, n = C.text_seq_logprobs(target, tok_b, tp, texts, eos=[True, False])
    for i, (p, t) in enumerate(zip(tp, texts)):
        pi = tok_b(p, add_special_tokens=False)["input_ids"]
        ci = tok_b(t, add_special_tokens=False)["input_ids"] + ([tok_b.eos_token_id] if i == 0 else [])
        assert got[i].item() == pytest.approx(_full_logits_seq_logprob(target, pi + ci, len(pi)), abs=1e-4)
        assert n[i].item() == len(ci)
    # theta side: on the sampled ids, as the stage does it
    ap = [C.build_prompt(tok_a, "toy_math", r) for r in rows]
    samples = C.generate(teacher, tok_a, ap, n=2, max_new_tokens=12, seed=3)
    ids, am, cm = C.make_batch(tok_a, [ap[s["i"]] for s in samples], [s["ids"] for s in samples])
    with torch.no_grad():
        theta = (C.completion_logprobs(teacher, ids, am, cm, chunk=5) * cm).sum(-1)
    for k, s in enumerate(samples):
        pi = tok_a(ap[s["i"]], add_special_tokens=False)["input_ids"]
        assert theta[k].item() == pytest.approx(_full_logits_seq_logprob(teacher, pi + s["ids"], len(pi)), abs=1e-4)


# ----------------------------------------------------------------------------- the stage, as a subprocess


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A toy_math data folder: 'a+b?' -> a+b."""
    root = tmp_path_factory.mktemp("calib_data")
    rng = random.Random(0)
    for split, n in (("train", 24), ("test", 6)):
        os.makedirs(root / "toy_math", exist_ok=True)
        with open(root / "toy_math" / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                a, b = rng.randint(1, 9), rng.randint(1, 9)
                f.write(json.dumps({"prompt": f"{a}+{b}?", "answer": str(a + b)}) + "\n")
    return root


def _run(tiny_dirs, data, out, *extra, check=True):
    cmd = [sys.executable, os.path.join(ROOT, "02_calibrate.py"), "--teacher", str(tiny_dirs / "teacher"),
           "--target", str(tiny_dirs / "target"), "--data", str(data), "--tasks", "toy_math", "--out_dir", str(out),
           "--prompts_per_step", "2", "--group_size", "3", "--max_new_tokens", "8", "--n_eval", "4", "--lr", "0.01",
           "--lam", "-1", "--save_every", "1", "--backend", "hf", "--device", "cpu", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def full_run(tiny_dirs, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "full"
    _run(tiny_dirs, tiny_data, out, "--steps", "3")
    return out


def test_three_step_run_writes_every_output_and_merged_reloads(full_run, tiny_dirs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = full_run
    for f in ("config.json", "metrics.jsonl", "summary.json", "adapter/adapter_config.json", "merged/config.json",
              "merged/tokenizer_config.json", "ckpt/state.pt"):
        assert (out / f).exists(), f
    steps = [m for m in C.read_jsonl(out / "metrics.jsonl") if "eval" not in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for k in ("reward_task", "reward_cal", "kl_anchor", "accuracy", "len", "seq_kl_target", "loss", "seconds", "eta"):
        assert all(math.isfinite(m[k]) for m in steps), k
    # the step's reward_cal is the negative of the on-policy sequence KL (same samples, no length norm)
    assert all(m["reward_cal"] == pytest.approx(-m["seq_kl_target"], abs=1e-4) for m in steps)
    s = json.loads((out / "summary.json").read_text())
    assert s["lam"] == -1.0 and set(s["acc"]["original"]) == set(s["acc"]["calibrated"]) == {"toy_math"}
    assert all(0 <= v <= 1 for d in s["acc"].values() for v in d.values())
    assert math.isfinite(s["seq_kl_target"]["original"]) and math.isfinite(s["seq_kl_target"]["calibrated"])
    assert 0 <= s["merge_lost_share"] < 1e-3  # an fp32 teacher keeps its whole update in merged/
    assert json.loads((out / "config.json").read_text())["lam"] == -1.0
    # merged/ is a plain HF folder equal to teacher + adapter, and the LoRA actually moved
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs / "teacher").eval()
    peft_m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dirs / "teacher"), out / "adapter").eval()
    x = C.load_tokenizer(str(out / "merged"))("<|user|>1+2?\n<|assistant|>", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lm, lp, lb = merged(x).logits, peft_m(x).logits, base(x).logits
    assert torch.allclose(lm, lp, atol=1e-4)
    assert (lm - lb).abs().max() > 1e-4


def test_micro_batches_with_checkpointing_train_like_the_whole_batch(full_run, tiny_dirs, tiny_data, tmp_path):
    """--micro_batch 4 --grad_ckpt (the real presets' memory switches) give the same steps as the default."""
    _run(tiny_dirs, tiny_data, tmp_path / "mb", "--steps", "3", "--micro_batch", "4", "--grad_ckpt")
    want = [m for m in C.read_jsonl(full_run / "metrics.jsonl") if "eval" not in m]
    got = [m for m in C.read_jsonl(tmp_path / "mb" / "metrics.jsonl") if "eval" not in m]
    for w, g in zip(want, got):
        for k in ("loss", "reward_cal", "kl_anchor", "grad_norm", "len"):
            assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-6), (w["step"], k)


def outputs_digest(out):
    """What a finished run produced, byte for byte where it is deterministic: a hash of merged/ and adapter/'s
    weights, and every metrics.jsonl row without its wall times."""
    import hashlib
    h = hashlib.sha256()
    for f in ("merged/model.safetensors", "adapter/adapter_model.safetensors"):
        h.update((out / f).read_bytes())
    rows = [{k: v for k, v in m.items() if k not in ("seconds", "eta")} for m in C.read_jsonl(out / "metrics.jsonl")]
    return h.hexdigest(), rows


def test_interrupted_run_resumes_to_identical_weights_and_metrics(full_run, tiny_dirs, tiny_data, tmp_path):
    """Stop after step 2 as if killed (checkpoint every step; step 1's adapter is checkpointed once step 2 has
    scored it), rerun: the finished run's weights and metrics equal the uninterrupted run's, bit for bit."""
    out = tmp_path / "resumed"
    r1 = _run(tiny_dirs, tiny_data, out, "--steps", "3", "--stop_after", "2")
    assert "stopping after step 2" in r1.stdout and not (out / "summary.json").exists()
    bad = _run(tiny_dirs, tiny_data, out, "--steps", "3", "--lam", "1", check=False)  # argparse: the last --lam wins
    assert bad.returncode == 2 and "--lam -1.0 (now 1.0)" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    r2 = _run(tiny_dirs, tiny_data, out, "--steps", "3")
    assert "resumed from" in r2.stdout and "at step 1" in r2.stdout
    assert [m["step"] for m in C.read_jsonl(out / "metrics.jsonl") if "eval" not in m] == [1, 2, 3]
    assert outputs_digest(out) == outputs_digest(full_run)
    assert json.loads((out / "summary.json").read_text())["acc"] == json.loads((full_run / "summary.json").read_text())["acc"]


def test_kill_9_mid_run_then_rerun_ends_identical(full_run, tiny_dirs, tiny_data, tmp_path):
    """A real kill -9 once the first checkpoint exists (wherever the run then is: mid-step, mid-save), then a
    plain rerun: the same final weights hash and metrics as the uninterrupted run."""
    out = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "02_calibrate.py"), "--teacher", str(tiny_dirs / "teacher"),
           "--target", str(tiny_dirs / "target"), "--data", str(tiny_data), "--tasks", "toy_math", "--out_dir", str(out),
           "--prompts_per_step", "2", "--group_size", "3", "--max_new_tokens", "8", "--n_eval", "4", "--lr", "0.01",
           "--lam", "-1", "--save_every", "1", "--backend", "hf", "--device", "cpu", "--steps", "3"]
    kill_at_first_checkpoint(cmd, out / "ckpt")
    assert not (out / "summary.json").exists()
    r = _run(tiny_dirs, tiny_data, out, "--steps", "3")
    assert "resumed from" in r.stdout
    assert outputs_digest(out) == outputs_digest(full_run)


def test_lora_merge_loss_predicts_what_a_bf16_merge_rounds_away():
    """The share of the LoRA update lost in merge_and_unload: ~0 for an fp32 base; for a bf16 base it
    matches the loss measured on an actual merge, large for a small update and small for a large one."""
    import copy
    from peft import LoraConfig, get_peft_model
    from tests.conftest import tiny_llama

    def lora(dtype, scale):
        base = tiny_llama(64, hidden=64).to(dtype)
        m = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        for mod in m.modules():  # B @ A of a chosen size relative to W (~0.1 per entry in these random weights)
            if "default" in getattr(mod, "lora_B", {}):
                mod.lora_B["default"].weight.data.mul_(scale)
        return m

    def measured(m):  # ||merged - W - dW|| / ||dW||, from the weights an actual merge writes
        base = {n: p.detach().float().clone() for n, p in m.named_parameters() if "base_layer.weight" in n}
        deltas = {n: (mod.lora_B["default"].weight.float() @ mod.lora_A["default"].weight.float()) * mod.scaling["default"]
                  for n, mod in m.named_modules() if "default" in getattr(mod, "lora_A", {})}
        merged = dict(copy.deepcopy(m).merge_and_unload().named_parameters())
        lost2 = tot2 = 0.0
        for n, d in deltas.items():
            w_new = merged[n.replace("base_model.model.", "") + ".weight"].float()
            lost2 += (w_new - base[n + ".base_layer.weight"] - d).pow(2).sum().item()
            tot2 += d.pow(2).sum().item()
        return math.sqrt(lost2 / tot2)

    assert C.lora_merge_loss(lora(torch.float32, 1e-3)) < 1e-4
    small, large = lora(torch.bfloat16, 1e-4), lora(torch.bfloat16, 1.0)
    assert C.lora_merge_loss(small) > 0.5 and C.lora_merge_loss(large) < 0.05
    for m in (small, large):
        assert C.lora_merge_loss(m) == pytest.approx(measured(m), rel=0.15, abs=0.01)
