"""Stage 04 (04_eval.py): metrics against hand-computed values on a fixture of graded samples (the
script reuses samples on disk, so no model is loaded), the markdown layout, reward-model scoring
against one-at-a-time scoring, and a subprocess run on the tiny random models (toy_math + an
open task scored by a tiny random reward model)."""
import json, math, os, subprocess, sys

import numpy as np
import pytest
import torch

import common
from conftest import char_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "04_eval.py")


def run(*argv, ok=True):
    r = subprocess.run([sys.executable, SCRIPT, *map(str, argv)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    if ok:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


MATH_ROWS = [{"prompt": "p0", "answer": "5"}, {"prompt": "p1", "answer": "3"}, {"prompt": "p2", "answer": "9"}]
# per prompt: extracted answers of 4 samples. Hand-computed:
#   p0: 5,5,7,-  -> acc 2/4, majority 5 right -> maj 1, pass 1
#   p1: 4,4,3,-  -> acc 1/4, majority 4 wrong -> maj 0, pass 1
#   p2: 2,9,9,2  -> acc 2/4, tie 2 vs 9 goes to the first seen (2, wrong) -> maj 0, pass 1
MATH_ANS = [["5", "5", "7", None], ["4", "4", "3", None], ["2", "9", "9", "2"]]


def fixture_samples(rows, answers, task):
    out = []
    for i, (r, ans) in enumerate(zip(rows, answers)):
        for j, a in enumerate(ans):
            text = f"#### {a}" if a is not None else "no answer"
            out.append({"i": i, "j": j, "question": r["prompt"], "row": r, "completion": text, "answer": a,
                        "correct": common.grade(task, text, r), "finished": a is not None, "n_tokens": 3, "rm_raw": None})
    return out


def write_fixture(out, name, path, answers, k=4):
    """A sample file and the meta 04_eval.py would have written with it (default settings, hf backend)."""
    write_jsonl(out / "samples" / f"{name}__toy_math.jsonl", fixture_samples(MATH_ROWS, answers, "toy_math"))
    meta = {"model": path, "stamp": path, "task": "toy_math", "split": "test", "k": k, "temperature": 1.0,
            "max_new_tokens": common.task_budget("toy_math"), "seed": 0, "backend": "hf", "reward_model": None}
    json.dump(meta, open(out / "samples" / f"{name}__toy_math.meta.json", "w"))


def test_metrics_and_markdown_from_samples(tmp_path):
    data, out = tmp_path / "data", tmp_path / "eval"
    write_jsonl(data / "toy_math" / "test.jsonl", MATH_ROWS)
    write_fixture(out, "mis", "/nonexistent/a", MATH_ANS)
    write_fixture(out, "stu", "/nonexistent/b", [["5"] * 4, ["3"] * 4, ["9"] * 4])
    write_fixture(out, "tea", "/nonexistent/c", [["1"] * 4, ["3"] * 4, ["9"] * 4])
    # model paths do not exist: everything comes from samples/, so a load would fail the run
    r = run("--models", "mis=/nonexistent/a,stu=/nonexistent/b,tea=/nonexistent/c", "--tasks", "toy_math", "--data", data,
            "--n_prompts", 3, "--k", 4, "--out_dir", out, "--labels", "mis=S:Misled,stu=S:Student,tea=T:Teacher")
    assert "reusing" in r.stdout
    rows = {x["model"]: x for x in json.load(open(out / "table2.json"))}
    m = rows["mis"]
    for key in ("model", "task", "k", "n_prompts", "acc", "acc_ci", "maj", "pass", "rm_score"):
        assert key in m
    assert (m["k"], m["n_prompts"], m["rm_score"]) == (4, 3, None)
    assert m["acc"] == pytest.approx((2 / 4 + 1 / 4 + 2 / 4) / 3)
    assert m["maj"] == pytest.approx(1 / 3)
    assert m["pass"] == pytest.approx(1.0)
    assert m["acc_ci"][0] <= m["acc"] <= m["acc_ci"][1] and m["acc_ci"][0] >= 0.25 - 1e-9 and m["acc_ci"][1] <= 0.5 + 1e-9
    assert rows["stu"]["acc"] == rows["stu"]["maj"] == rows["stu"]["pass"] == 1.0 and rows["stu"]["acc_ci"] == [1.0, 1.0]
    assert rows["tea"]["acc"] == pytest.approx(2 / 3) and rows["tea"]["maj"] == pytest.approx(2 / 3)
    # markdown: paper order (teacher side, rule, then student, misled) whatever the --models order; cells acc [maj, pass]
    md = open(out / "table2.md").read().splitlines()
    body = [l for l in md if l.startswith("| ")]
    assert body[0] == "| Base | Method | toy_math |"
    assert body[1] == "| T | Teacher | 0.667 [0.667, 0.667] |"
    assert body[2].replace(" ", "") == "||||"
    assert body[3] == "| S | Student | 1.000 [1.000, 1.000] |"
    assert body[4] == "| S | Misled | 0.417 [0.333, 1.000] |"
    assert any(l.startswith("| S | Misled | [") for l in md)  # the interval table
    # reused samples are graded again by the current grader (and the file follows): a stale grade does not survive
    stale = common.read_jsonl(out / "samples" / "stu__toy_math.jsonl")
    stale[0]["correct"] = False
    write_jsonl(out / "samples" / "stu__toy_math.jsonl", stale)
    run("--models", "mis=/nonexistent/a,stu=/nonexistent/b,tea=/nonexistent/c", "--tasks", "toy_math", "--data", data,
        "--n_prompts", 3, "--k", 4, "--out_dir", out)
    assert {x["model"]: x for x in json.load(open(out / "table2.json"))}["stu"]["acc"] == 1.0
    assert common.read_jsonl(out / "samples" / "stu__toy_math.jsonl")[0]["correct"] is True


def test_reward_model_scores_match_one_at_a_time(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    tok = char_tokenizer()
    tok.padding_side = "left"  # the function must right-pad on its own
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    rm = LlamaForSequenceClassification(cfg).eval()
    qs, cs = ["What is 2+2?", "Name a colour.", "Hi"], ["4", "Blue, or maybe a long answer about red.", ""]
    got = common.reward_model_scores(rm, tok, qs, cs, batch_size=2)
    assert common.rm_text(tok, qs[0], cs[0]) == "<|user|>What is 2+2?\n<|assistant|>4\n"
    for q, c, g in zip(qs, cs, got):
        ids = torch.tensor([tok(common.rm_text(tok, q, c), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            want = rm(input_ids=ids).logits[0, 0].item()  # one unpadded sequence: its last token
        assert g == pytest.approx(want, abs=1e-5)
    assert len(set(round(g, 6) for g in got)) == 3  # different texts, different scores


def test_reward_model_reads_the_last_token_when_pad_is_the_end_of_turn():
    """Llama-3 RMs pad with <|eot_id|>, the token that ends every scored turn: HF's pooling (last token
    that is not the pad id) then reads one token early. Ours reads each row's last real token, batched
    or alone; and a completion past max_len is cut inside the completion, so the turn still ends."""
    from transformers import LlamaConfig, LlamaForSequenceClassification
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"  # eos ends a turn
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)  # pad id == eos id
    rm = LlamaForSequenceClassification(cfg).eval()
    qs, cs = ["What is 2+2?", "Hi"], ["4", "Hello, a longer answer."]
    got = common.reward_model_scores(rm, tok, qs, cs, batch_size=2)
    for q, c, g in zip(qs, cs, got):
        ids = torch.tensor([tok(common.rm_text(tok, q, c), add_special_tokens=False)["input_ids"]])
        assert ids[0, -1].item() == tok.eos_token_id
        with torch.no_grad():
            want = rm.score(rm.model(input_ids=ids).last_hidden_state[:, -1])[0, 0].item()
            hf = rm(input_ids=ids).logits[0, 0].item()  # pooled one token early
        assert g == pytest.approx(want, abs=1e-5) and abs(hf - want) > 1e-4
    long = common.rm_text(tok, "q?", "x" * 200, max_len=60)
    n = len(tok(long, add_special_tokens=False)["input_ids"])
    assert n <= 60 and long.endswith("<|endoftext|>") and "xxxx" in long


def test_smoke_run_with_reward_model(tmp_path, tiny_dirs):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    data, out = tmp_path / "data", tmp_path / "eval"
    write_jsonl(data / "toy_math" / "test.jsonl", MATH_ROWS)
    write_jsonl(data / "dolly" / "test.jsonl", [{"prompt": "Say hi.", "answer": "hi"}, {"prompt": "Count to 3.", "answer": "1 2 3"}])
    args = ["--models", f"s={tiny_dirs / 'student'},t={tiny_dirs / 'teacher'}", "--tasks", "toy_math,dolly", "--data", data,
            "--n_prompts", 2, "--k", 3, "--max_new_tokens", 6, "--reward_model", tmp_path / "rm", "--out_dir", out]
    run(*args)
    assert json.load(open(out / "config.json"))["k"] == 3
    s = common.read_jsonl(out / "samples" / "s__dolly.jsonl")
    assert len(s) == 6 and [x["i"] for x in s] == [0, 0, 0, 1, 1, 1]
    assert all(x["n_tokens"] <= 6 and x["rm_raw"] is not None and x["correct"] is None for x in s)
    table = {(x["model"], x["task"]): x for x in json.load(open(out / "table2.json"))}
    d = table[("s", "dolly")]
    assert d["acc"] is None and d["rm_score"] == pytest.approx(np.mean([1 / (1 + math.exp(-x["rm_raw"])) for x in s]))
    m = table[("t", "toy_math")]
    sm = common.read_jsonl(out / "samples" / "t__toy_math.jsonl")
    assert m["acc"] == pytest.approx(np.mean([x["correct"] for x in sm])) and m["rm_score"] is None
    assert len(common.read_jsonl(out / "metrics.jsonl")) == 4
    # a rerun reuses every sample file (same rows), and a bad --models entry is one clear line
    before = open(out / "samples" / "s__dolly.jsonl").read()
    r = run(*args)
    assert r.stdout.count("reusing") == 2 and open(out / "samples" / "s__dolly.jsonl").read() == before
    # other settings, or the same path holding retrained weights (a new stamp), are never served old samples
    r = run(*args[:-2], "--temperature", 0.7, "--out_dir", out)
    assert r.stdout.count("other weights or settings; resampling") == 4 and "reusing" not in r.stdout
    r = run(*args[:-2], "--temperature", 0.7, "--out_dir", out)
    assert r.stdout.count("reusing") == 2
    w = tiny_dirs / "student" / "model.safetensors"
    st = os.stat(w)
    try:
        os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # what a retrain at the same path looks like
        r = run(*args[:-2], "--temperature", 0.7, "--out_dir", out)
        assert r.stdout.count("other weights or settings; resampling") == 2 and "t: reusing" in r.stdout
    finally:
        os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    r = run("--models", "bad name=/x", "--data", data, "--out_dir", tmp_path / "e2", ok=False)
    assert r.returncode == 2 and "name=path" in r.stderr
