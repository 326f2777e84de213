"""Stages 02 and 03 under torchrun (CPU, gloo, 2 ranks) against one process on the same global batch and
seeds: the same per-step losses and the same final weights within 1e-5, and a 2-rank run stopped after a
checkpoint resumes (on 2 ranks, or in one process) to the same numbers. Subprocess runs on the tiny
fixtures; a torchrun launch costs ~10 s of imports here."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


@pytest.fixture(scope="module")
def data(two_task_data):
    return two_task_data


def launch(script, args, nproc=1, check=True):
    """One process, or torchrun with nproc ranks (--standalone: a free port of its own)."""
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run(pre + [os.path.join(ROOT, script), *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    if check:
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r


def load_json(path):
    with open(path) as f:
        return json.load(f)


def train_rows(out):
    return [r for r in common.read_jsonl(os.path.join(out, "metrics.jsonl")) if "eval" not in r]


def assert_same_run(a, b, keys, weights_a, weights_b):
    ra, rb = train_rows(a), train_rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for k in keys:
            assert abs(x[k] - y[k]) <= TOL * max(1.0, abs(x[k])), (k, x["step"], x[k], y[k])
    wa, wb = load_file(weights_a), load_file(weights_b)
    assert wa.keys() == wb.keys()
    diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert diff <= TOL, diff
    return diff


def distill_args(tiny_dirs, data, out, steps):
    # rkl, on-policy every step: the student samples (2 generation batches, one per rank), FSDP2 trains;
    # micro batches of 1 so each rank accumulates over two
    return ["--method", "rkl", "--teacher", tiny_dirs / "teacher", "--student", tiny_dirs / "student", "--data", data,
            "--out_dir", out, "--steps", steps, "--batch_size", 4, "--micro_batch", 1, "--gen_batch", 2, "--n_prompts", 3,
            "--n_eval", 2, "--max_new_tokens", 6, "--lr", 1e-3, "--save_every", 1, "--seed", 0]


def test_03_rkl_on_two_ranks_matches_one_process_and_resumes_on_two_or_one(tiny_dirs, data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    launch("03_distill.py", distill_args(tiny_dirs, data, one, 3))
    # 2 ranks, stopped after step 2 (its checkpoint holds step 1: a step checkpoints the weights it scored) and resumed
    # (--grad_ckpt only here: recomputing the layers inside FSDP2's hooks changes no number)
    r = launch("03_distill.py", distill_args(tiny_dirs, data, two, 3) + ["--stop_after", 2, "--grad_ckpt"], nproc=2)
    assert "stopping after step 2" in r.stdout and not os.path.exists(two / "model")
    assert load_json(two / "config.json")["world_size"] == 2
    assert r.stdout.count("step 1/3 |") == 1  # rank 0 prints, the other rank is quiet
    shutil.copytree(two, tmp_path / "two_then_one")
    r = launch("03_distill.py", distill_args(tiny_dirs, data, two, 3) + ["--grad_ckpt"], nproc=2)
    assert "resumed from" in r.stdout and "at step 1" in r.stdout
    diff = assert_same_run(one, two, ("loss", "grad_norm", "len"), one / "model" / "model.safetensors", two / "model" / "model.safetensors")
    print(f"03 rkl: 2 ranks vs 1 process, max weight diff {diff:.2e}")
    s1, s2 = (load_json(d / "summary.json") for d in (one, two))
    assert s1["acc_after"] == s2["acc_after"] and s1["acc_before"] == s2["acc_before"]
    # the 2-rank checkpoint resumes in one process: the full state dict does not depend on the number of ranks
    launch("03_distill.py", distill_args(tiny_dirs, data, tmp_path / "two_then_one", 3))
    assert_same_run(one, tmp_path / "two_then_one", ("loss", "grad_norm"), one / "model" / "model.safetensors",
                    tmp_path / "two_then_one" / "model" / "model.safetensors")


def test_03_lora_on_two_ranks_matches_one_process_and_resumes(tiny_dirs, data, tmp_path):
    """--lora under torchrun: the student replicated, the adapter's gradients summed over the ranks (02's
    all_sum_grads); the merged model/ and the per-step numbers as one process, and a 2-rank checkpoint resumes."""
    one, two = tmp_path / "one", tmp_path / "two"
    lora = ["--lora", 2, "--lr", 1e-2]  # a larger step than full fine-tuning: the adapter must move the merged weights
    launch("03_distill.py", distill_args(tiny_dirs, data, one, 3) + lora)
    r = launch("03_distill.py", distill_args(tiny_dirs, data, two, 3) + lora + ["--stop_after", 2], nproc=2)
    assert "stopping after step 2" in r.stdout and not os.path.exists(two / "model")
    r = launch("03_distill.py", distill_args(tiny_dirs, data, two, 3) + lora, nproc=2)
    assert "resumed from" in r.stdout and "at step 1" in r.stdout
    diff = assert_same_run(one, two, ("loss", "grad_norm", "len"), one / "model" / "model.safetensors", two / "model" / "model.safetensors")
    print(f"03 rkl --lora: 2 ranks vs 1 process, max merged weight diff {diff:.2e}")
    s1, s2 = (load_json(d / "summary.json") for d in (one, two))
    assert s1["acc_after"] == s2["acc_after"] and s1["acc_before"] == s2["acc_before"]
    moved = load_file(one / "model" / "model.safetensors")
    init = load_file(tiny_dirs / "student" / "model.safetensors")
    assert max((moved[k] - init[k]).abs().max().item() for k in init) > 100 * TOL  # the adapter did train


def test_03_torchrun_refuses_a_batch_that_does_not_split_in_one_line(tiny_dirs, data, tmp_path):
    args = distill_args(tiny_dirs, data, tmp_path / "odd", 1)
    args[args.index("--batch_size") + 1] = 3
    r = launch("03_distill.py", args, nproc=2, check=False)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error: rank")]
    assert len(lines) == 2 and "--batch_size 3 must be a multiple of the 2 ranks" in lines[0], r.stderr[-2000:]


def calibrate_args(tiny_dirs, data, out, steps):
    # 2 prompts x 2 rollouts per step: one whole group per rank, one generation batch per rank (--gen_batch 2)
    return ["--teacher", tiny_dirs / "teacher", "--target", tiny_dirs / "target", "--data", data, "--out_dir", out,
            "--steps", steps, "--prompts_per_step", 2, "--group_size", 2, "--gen_batch", 2, "--max_new_tokens", 6, "--n_eval", 2,
            "--lora_r", 4, "--lora_alpha", 8, "--lora_targets", "q_proj,v_proj", "--lr", 1e-2, "--save_every", 1, "--seed", 0]


def test_02_lora_on_two_ranks_matches_one_process_and_resumes(tiny_dirs, data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    launch("02_calibrate.py", calibrate_args(tiny_dirs, data, one, 3))
    r = launch("02_calibrate.py", calibrate_args(tiny_dirs, data, two, 3) + ["--stop_after", 2], nproc=2)
    assert "stopping after step 2" in r.stdout
    r = launch("02_calibrate.py", calibrate_args(tiny_dirs, data, two, 3), nproc=2)
    assert "resumed from" in r.stdout
    keys = ("loss", "reward_task", "reward_cal", "kl_anchor", "seq_kl_target", "grad_norm", "len", "checked_share")
    diff = assert_same_run(one, two, keys, one / "adapter" / "adapter_model.safetensors", two / "adapter" / "adapter_model.safetensors")
    print(f"02 LoRA: 2 ranks vs 1 process, max adapter diff {diff:.2e}")
    ev1, ev2 = ([r for r in common.read_jsonl(d / "metrics.jsonl") if "eval" in r] for d in (one, two))
    assert [e["eval"] for e in ev1] == [e["eval"] for e in ev2] == ["original", "calibrated"]
    for e1, e2 in zip(ev1, ev2):
        for k, v in e1.items():
            if k != "seconds" and isinstance(v, float):
                assert abs(v - e2[k]) <= TOL * max(1.0, abs(v)), (k, v, e2[k])
    assert load_json(two / "config.json")["world_size"] == 2
