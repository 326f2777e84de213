"""PRESET=small's models as config-built stand-ins (tests/standins.py): Qwen2.5-1.5B/0.5B-Instruct with the
real Qwen2.5 vocabulary and chat template, SmolLM2-135M-Instruct with its chat template on a stand-in vocabulary
of its size. 01 and 04 run end to end on a local jsonl in gsm8k's own columns with the task's own budget."""
import json
import os
import subprocess
import sys

import pytest

import common as C
from tests import standins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    standins.main(str(root))
    return root


def test_qwen25_stand_ins_have_the_real_vocabulary_and_special_ids(small):
    tok = C.load_tokenizer(str(small / "student"))
    assert len(tok) == 151665 and tok.eos_token == "<|im_end|>" and tok.pad_token_id == 151643
    # token ids of the real tokenizer (published in Qwen's docs and issues)
    assert tok("Hello, world!", add_special_tokens=False)["input_ids"] == [9707, 11, 1879, 0]
    assert tok("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", add_special_tokens=False)["input_ids"] == \
        [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert tok("#### 72", add_special_tokens=False)["input_ids"][-2:] == [22, 17]  # Qwen2 splits numbers into digits
    for name, cfg in (("student", standins.QWEN25_0_5B), ("teacher", standins.QWEN25_1_5B)):
        m = C.load_model(str(small / name))
        assert m.config.vocab_size == cfg["vocab_size"] == 151936 and m.config.num_attention_heads == cfg["num_attention_heads"]
        assert m.config.num_key_value_heads == 2 and m.config.tie_word_embeddings
        assert sorted(C._eos_ids(tok, m).tolist()) == [151643, 151645]  # generation_config: <|im_end|> or <|endoftext|>
    tgt = C.load_tokenizer(str(small / "target"))
    assert len(tgt) == C.load_model(str(small / "target")).config.vocab_size == 49152
    assert [tgt.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<empty_output>")] == [0, 1, 2, 16]


def test_chat_templates_render_as_the_real_ones_and_end_turns_with_im_end(small):
    row = {"prompt": "Tom has 3 apples and buys 4. How many?", "answer": "7"}
    q = C.format_question("gsm8k", row)
    qwen, smol = C.load_tokenizer(str(small / "student")), C.load_tokenizer(str(small / "target"))
    assert C.build_prompt(qwen, "gsm8k", row) == f"{QWEN_SYSTEM}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    assert C.build_prompt(smol, "gsm8k", row) == f"{SMOL_SYSTEM}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    assert C.turn_end_id(qwen) == 151645 and C.turn_end_id(smol) == 2
    # cross-tokenizer: the same text is other ids for the target, scored on its own template's turn end
    text = "3 + 4 = 7 apples.\n#### 7"
    assert qwen(text, add_special_tokens=False)["input_ids"] != smol(text, add_special_tokens=False)["input_ids"]
    ids, am, cm = C.make_text_batch(smol, [C.build_prompt(smol, "gsm8k", row)], [text], eos=True)
    assert ids[0][am[0].bool()][-1].item() == 2 and cm.sum() == len(smol(text, add_special_tokens=False)["input_ids"]) + 1


def run(args, **env):
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PROGRESS_SECS": "0.5", **env})
    return r


def test_01_and_04_on_local_question_answer_files_with_the_tasks_budgets(small, tmp_path):
    """A user's gsm8k file as it comes (question, answer '... #### n'): no renaming, the split announced, the
    task's budget (512 new tokens), progress lines while generating and scoring, the finished share reported and
    a warning naming --max_new_tokens when completions are cut off (random weights never end a turn)."""
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text((small / "data" / "gsm8k" / "train.jsonl").read_text() + (small / "data" / "gsm8k" / "test.jsonl").read_text())
    out1 = tmp_path / "p01"
    r = run(["01_pilot_kl.py", "--teacher", str(small / "teacher"), "--student", str(small / "student"), "--tasks", "gsm8k",
             "--data", str(gsm), "--n_prompts", "1", "--n_samples", "2", "--out_dir", str(out1)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "prompt <- 'question', answer <- 'answer'" in r.stdout and "split 9:1 by prompt hash into" in r.stdout
    assert json.load(open(out1 / "config.json"))["max_new_tokens_per_task"] == {"gsm8k": 512}
    err = r.stderr.replace("\r", "\n")
    assert "sample student gsm8k batch 1/1 | token " in err and "tok/s | batch eta <=" in err  # inside the batch
    assert "score student samples: " in err  # while scoring
    rolls = [json.loads(l) for l in open(out1 / "rollouts.jsonl")]
    assert len(rolls) == 4 and all(x["n_tokens"] <= 512 for x in rolls) and max(x["n_tokens"] for x in rolls) == 512
    row = json.load(open(out1 / "table1.json"))[0]
    assert row["finished_student"] == 0.0 and "Finished before the token limit" in (out1 / "table1.md").read_text()
    assert "cut off at 512 new tokens" in r.stdout and "raise --max_new_tokens" in r.stdout
    assert row["onpolicy_token_rkl"] is not None  # shared vocabulary: token-level rows

    out4 = tmp_path / "e04"  # a folder of gsm8k/ and csqa/ files, csqa with {label, text} choices; a Qwen and a SmolLM2 model
    r = run(["04_eval.py", "--models", f"student={small / 'student'},target={small / 'target'}", "--tasks", "gsm8k,csqa",
             "--data", str(small / "data"), "--n_prompts", "1", "--k", "2", "--out_dir", str(out4)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(out4 / "config.json"))["max_new_tokens_per_task"] == {"gsm8k": 512, "csqa": 256}
    for task, budget in (("gsm8k", 512), ("csqa", 256)):
        s = [json.loads(l) for l in open(out4 / "samples" / f"student__{task}.jsonl")]
        assert max(x["n_tokens"] for x in s) == budget and json.load(open(out4 / "samples" / f"student__{task}.meta.json"))["max_new_tokens"] == budget
    table = json.load(open(out4 / "table2.json"))
    assert {(t["model"], t["task"]) for t in table} == {(m, t) for m in ("student", "target") for t in ("gsm8k", "csqa")}
    assert all(t["finished"] == 0.0 and t["no_answer"] is not None for t in table)
    assert "student csqa: 100% of completions were cut off at 256 new tokens" in r.stdout


def test_a_broken_data_file_stops_a_stage_with_one_line(small, tmp_path):
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text('{"question": "q1", "answer": "#### 1"}\n{"question": "q2", "answer": "#### 2"\n')
    r = run(["04_eval.py", "--models", f"student={small / 'student'}", "--tasks", "gsm8k", "--data", str(bad), "--whole_file",
             "--out_dir", str(tmp_path / "e")])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {bad}:2: not valid JSON"), r.stderr
