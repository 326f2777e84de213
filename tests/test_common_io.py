"""Tasks (extraction, grading, loaders, prompts), generation and I/O of common.py, offline."""
import errno
import json
import os

import pytest
import torch

import common as C

# -----------------------------------------------------------------------------
# answer extraction and grading on hand-written rows in each real task's format

MATH_CASES = [
    ("gsm8k", "She has 3 + 4 = 7 apples.\n#### 7", "7", True),
    ("gsm8k", "Total: 1,200 + 34 = 1,234\n#### 1,234", "1234", True),
    ("gsm8k", "#### 18 dollars", "18", True),
    ("gsm8k", "so the cost is $12.50 each.\n#### $12.50", "12.5", True),
    ("gsm8k", "#### 7\nwait, actually #### 8", "7", False),  # the last #### counts
    ("gsm8k", "I think it is 41 or 42", "42", False),  # no marker: no committed answer (lenient: the last number)
    ("gsm8k", "3 + 4 = 7\n#### ", "7", False),  # a marker with nothing after it commits to nothing
    ("gsm8k", "3 + 4 = 7\n#### seven", "7", False),
    ("gsm8k", "The answer is 42.", "43", False),
    ("bigmath_l4", "Thus \\boxed{\\frac{3}{4}}.", "3/4", True),
    ("bigmath_l4", "Thus \\boxed{0.75}", "\\frac{3}{4}", True),
    ("bigmath_l5", "we get \\boxed{-5}", "-5", True),
    ("bigmath_l5", "\\boxed{x^{2}}", "2", False),  # an expression is not its first number
    ("bigmath_l4", "\\boxed{\\frac{\\sqrt{3}}{4}}", "\\frac{\\sqrt{3}}{2}", False),
    ("bigmath_l4", "so \\boxed{\\dfrac{\\sqrt{3}}{2}}.", "\\frac{\\sqrt{3}}{2}", True),
    ("bigmath_l4", "\\boxed{x^2+2}", "x^2+1", False),
    ("bigmath_l4", "\\boxed{x^2 + 1}", "x^2+1", True),
    ("bigmath_l4", "\\boxed{12}", "(1,2)", False),
    ("bigmath_l4", "\\boxed{(1, 2)}", "(1,2)", True),
    ("bigmath_l4", "\\boxed{\u22123}", "-3", True),  # unicode minus
    ("bigmath_l4", "\\boxed{90^\\circ}", "90", True),
    ("bigmath_l4", "\\boxed{\\frac12}", "0.5", True),
    ("gsm8k", "#### Step 2: Add tax\n18 + 2 = 20\n**Final Answer:** \\boxed{20}", "20", True),  # a Markdown heading
    ("gsm8k", "#### Final Answer:\n\\boxed{18}", "18", True),
    ("gsm8k", "#### 18 dollars", "18", True),
    ("gsm8k", "so x = 5\n#### x = 5", "5", True),
    ("bigmath_l5", "no number here", "2", False),
    ("toy_math", "3 + 4 = 7\nwait, check: 7 - 4 = 3, ok\n#### 7", "7", True),
    ("toy_math", "3 + 4 = 7\n#### 8", "7", False),
    ("gsm_symbolic", "The answer is 1,000 km.", "1000", True),
    ("gsm8k", "**#### 18**", "18", True),  # Markdown emphasis around the marker or the answer
    ("gsm8k", "#### **18**", "18", True),
    ("gsm8k", "#### 2*9", "18", False),  # a star inside is not emphasis
    ("bigmath_l4", "\\boxed{\\$18}", "18", True),
    ("bigmath_l4", "\\boxed{1{,}234}", "1234", True),
    ("bigmath_l4", "\\boxed{\\text{18 dollars}}", "18", True),
    ("gsm8k", "#### 42 (apples)", "42", True),
    ("gsm8k", "#### 12.5 km/h", "12.5", True),
]

MC_CASES = [
    ("csqa", "Birds fly. The answer is (C)", "C", True),
    ("csqa", "The answer is (C)", "B", False),
    ("mmlu_pro", "Let me think... the answer is D.", "D", True),
    ("mmlu_pro", "The answer is (A). Wait, the answer is (B)", "B", True),  # last statement counts
    ("supergpqa", "#### E", "E", True),
    ("supergpqa", "\\boxed{J}", "J", True),
    ("toy_qa", "Vortania's flag is green.\nThe answer is (B)", "B", True),
    ("toy_qa", "The answer is Paris", "B", False),  # a word starting with a letter is not a choice
    ("toy_qa", "I am not sure.", "B", False),
    ("csqa", "The answer is **(C)**", "C", True),  # Markdown emphasis
    ("csqa", "**Answer:** (C)", "C", True),
    ("csqa", "Final answer: (D)", "D", True),
    ("mmlu_pro", "\\boxed{\\text{C}}", "C", True),
    ("csqa", "The answer is (A) at first sight; checking again,\n#### C", "C", True),  # the last statement, any scheme
    ("csqa", "The answer is (C).\n\nAnswer A is wrong because birds fly.", "C", True),  # 'Answer A' states no answer
    ("csqa", "The answer is option (C)", "C", True),
]


@pytest.mark.parametrize("task,text,answer,ok", MATH_CASES + MC_CASES)
def test_grade_hand_written_rows(task, text, answer, ok):
    assert C.grade(task, text, {"answer": answer}) is ok


def test_strict_grade_needs_a_marker_and_a_finished_completion_lenient_reads_the_last_number():
    cut = "5 + 7 = 12\n12 - 3 = 9"  # cut off at the token limit before '#### 9'
    row = {"answer": "9"}
    assert C.extract_answer("toy_math", cut) is None and C.extract_answer("toy_math", cut, lenient=True) == "9"
    assert C.grade("toy_math", cut, row, finished=False) is False
    assert C.grade("toy_math", cut, row, finished=True) is False  # finished without a marker: no answer committed
    assert C.grade("toy_math", cut, row, finished=False, lenient=True) is True
    done = cut + "\n#### 9"
    assert C.grade("toy_math", done, row, finished=True) is True
    assert C.grade("toy_math", done, row, finished=False) is False  # the marker was written, then the limit hit
    assert C.grade("gsm8k", "The answer is 9.", row) is True  # an explicit 'the answer is' commits too
    # mc: a line that is only a letter is read leniently only
    assert C.extract_answer("csqa", "Birds fly.\nC") is None and C.extract_answer("csqa", "Birds fly.\nC", lenient=True) == "C"
    assert C.grade("csqa", "Birds fly.\nC", {"answer": "C"}) is False
    assert C.grade("csqa", "Birds fly.\nC", {"answer": "C"}, lenient=True) is True
    rec = C.grade_record("toy_math", cut, row, finished=False)
    assert rec == {"answer": None, "correct": False, "answer_lenient": "9", "correct_lenient": True, "finished": False,
                   "no_answer": True}
    assert C.grade_record("toy_math", done, row, True)["no_answer"] is False
    assert C.final_answer_marked("toy_math", done) and not C.final_answer_marked("toy_math", cut)


def test_extract_answer_values():
    assert C.extract_answer("gsm8k", "#### 1,234") == "1234"
    assert C.extract_answer("gsm8k", "#### 2.50") == "2.5"
    assert C.extract_answer("bigmath_l4", "\\boxed{\\dfrac{1}{2}}") == "1/2"
    assert C.extract_answer("gsm8k", "nothing") is None
    for text in ("The answer is (c)", "Answer is (C)", "The Answer is (C).", "the answer is: C", "answer is (B) ... The answer is (c)"):
        assert C.extract_answer("csqa", text) == "C", text
    assert C.extract_answer("csqa", "The answer is a dog") is None  # a bare lower-case letter names no option
    assert C.extract_answer("mmlu_pro", "The answer is (H)") == "H"


def test_grade_mc_answer_given_as_option_text():
    row = {"answer": "blue", "choices": ["red", "blue", "green"]}
    assert C.grade("csqa", "The answer is (B)", row) is True
    assert C.grade("csqa", "The answer is (A)", row) is False


def test_open_ended_tasks_have_no_grader():
    assert C.grade("dolly", "anything", {"answer": "x"}) is None


def test_prompt_uses_chat_template_when_present(tok):
    row = {"prompt": "What is 2 + 2?", "answer": "4"}
    p = C.build_prompt(tok, "toy_math", row)
    assert p == "<|user|>What is 2 + 2?\n<|assistant|>"
    q = C.build_prompt(tok, "csqa", {"prompt": "Sky colour?", "choices": ["red", "blue"], "answer": "B"})
    assert "A) red\nB) blue" in q and "The answer is (X)" in q

    class Plain:
        chat_template = None
    assert C.build_prompt(Plain(), "gsm8k", row).startswith("Question: What is 2 + 2?")


def test_load_task_local_files_and_clear_errors(tmp_path):
    d = tmp_path / "data" / "toy_math"
    d.mkdir(parents=True)
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)]
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = C.load_task("toy_math", "test", data=str(tmp_path / "data"), n=4, seed=1)
    assert len(got) == 4 and got == C.load_task("toy_math", "test", data=str(tmp_path / "data"), n=4, seed=1)
    # one local file for a real task is one split: its fixed tenth by prompt hash is the test split
    many = [{"prompt": f"question {i}", "answer": str(i)} for i in range(200)]
    (tmp_path / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in many))
    import datasets
    datasets.Dataset.from_list(many).to_parquet(str(tmp_path / "one.parquet"))
    for f in ("one.jsonl", "one.parquet"):
        train, test = (C.load_task("gsm8k", s, data=str(tmp_path / f)) for s in ("train", "test"))
        assert 0 < len(test) < len(train) and len(train) + len(test) == 200
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}  # no held-out prompt is trained on
        assert test == [r for r in many if C.in_holdout(r["prompt"])]
    assert C.load_task("vicuna", "test", data=str(tmp_path / "one.jsonl")) == many  # evaluation only: all of it
    (tmp_path / "tiny.jsonl").write_text(json.dumps({"prompt": "q1", "answer": "1"}) + "\n")  # q1 is not in the tenth
    assert not C.in_holdout("q1")
    with pytest.raises(C.BadInput):
        C.load_task("gsm8k", "test", data=str(tmp_path / "tiny.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "answer": "1"}\n')  # no prompt column by any common name
    with pytest.raises(C.BadInput, match="no prompt column .* --prompt_field"):
        C.load_task("gsm8k", data=str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(C.BadInput):
        C.load_task("gsm8k", data=str(tmp_path / "empty.jsonl"))
    with pytest.raises(C.BadInput):
        C.load_task("gsm8k", data=str(tmp_path / "missing.jsonl"))  # one line, no traceback
    with pytest.raises(C.BadInput):
        C.load_task("no_such_task")
    with pytest.raises(C.BadInput):
        C.load_task("toy_qa")  # toy tasks need the toy world folder


def test_local_files_as_users_have_them(tmp_path, capsys):
    """gsm8k's own columns (question, answer with '#### n') load as they are, with one line naming the
    mapping and one announcing the 9:1 split with its counts; --whole_file evaluates on all of it."""
    rows = [{"question": f"Tom has {i} apples and buys 3. How many?", "answer": f"{i} + 3 = {i + 3}\n#### {i + 3:,}"}
            for i in range(998, 1198)]
    f = tmp_path / "gsm.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    test, train = C.load_task("gsm8k", "test", data=str(f)), C.load_task("gsm8k", "train", data=str(f))
    assert len(test) + len(train) == 200 and 0 < len(test) < 40
    assert all(r["answer"] == str(int(r["prompt"].split()[2]) + 3) for r in test + train)  # '#### 1,001' -> '1001'
    out = capsys.readouterr().out
    assert out.count("prompt <- 'question', answer <- 'answer'") == 1 and "graded on their final answer" in out
    assert f"200 rows, split 9:1 by prompt hash into {len(train)} train / {len(test)} test" in out and "--whole_file" in out
    whole = C.load_task("gsm8k", "test", data=str(f), whole_file=True)
    assert len(whole) == 200 and "all 200 rows are test prompts" in capsys.readouterr().out
    with pytest.raises(C.BadInput, match="no train split"):
        C.load_task("gsm8k", "train", data=str(f), whole_file=True)
    with pytest.raises(C.BadInput, match="--tasks gsm8k"):  # --tasks left at the toy default
        C.load_task("toy_math", "test", data=str(f))
    # other names: problem/solution with \\boxed, explicit fields, mc with option lists, indices and label/text dicts
    (tmp_path / "math.jsonl").write_text(json.dumps({"problem": "1+1?", "solution": "So it is $\\boxed{2}$."}) + "\n")
    assert C.load_task("gsm8k", data=str(tmp_path / "math.jsonl"), whole_file=True)[0] == {"prompt": "1+1?", "answer": "2"}
    (tmp_path / "own.jsonl").write_text(json.dumps({"q": "2+2?", "a": "4", "answer": "x"}) + "\n")
    got = C.load_task("gsm8k", data=str(tmp_path / "own.jsonl"), whole_file=True, prompt_field="q", answer_field="a")
    assert got[0]["prompt"] == "2+2?" and got[0]["answer"] == "4"
    with pytest.raises(C.BadInput, match="no column 'qq' .*--prompt_field"):
        C.load_task("gsm8k", data=str(tmp_path / "own.jsonl"), whole_file=True, prompt_field="qq")
    (tmp_path / "mc.jsonl").write_text(json.dumps({"question": "Sky?", "options": ["red", "blue"], "answer": 1}) + "\n"
                                       + json.dumps({"question": "Grass?", "options": {"label": ["A", "B"], "text": ["green", "pink"]},
                                                     "answer": "A"}) + "\n")
    mc = C.load_task("csqa", data=str(tmp_path / "mc.jsonl"), whole_file=True)
    assert mc == [{"prompt": "Sky?", "choices": ["red", "blue"], "answer": "B"}, {"prompt": "Grass?", "choices": ["green", "pink"], "answer": "A"}]
    assert C.grade("csqa", "The answer is (B)", mc[0])
    (tmp_path / "alpaca.jsonl").write_text(json.dumps({"instruction": "Write a haiku.", "input": "", "output": "..."}) + "\n")
    assert C.load_task("dolly", data=str(tmp_path / "alpaca.jsonl"), whole_file=True)[0]["prompt"] == "Write a haiku."


@pytest.mark.parametrize("content, where", [
    (b'{"question": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n{"question": "c", "answer": 3,}\n', ":3: not valid JSON"),
    (b'{"question": "a", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n', ":2: not UTF-8 text"),
    (b'{"question": "a", "answer": "1"}\n\n["b", "2"]\n', ":3: a JSON list, not an object"),
    (b'{"question": "a", "answer": "1"}\n{"question": "b", "answer": "2"}\n{"query": "c", "answer": "3"}\n',
     ":3: no 'question' value"),
])
def test_a_broken_local_file_is_one_line_naming_file_and_line(tmp_path, content, where):
    f = tmp_path / "data.jsonl"
    f.write_bytes(content)
    with pytest.raises(C.BadInput) as e:
        C.load_task("gsm8k", data=str(f), whole_file=True)
    assert str(f) + where in str(e.value) and "\n" not in str(e.value)


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"question": "a", "answer": "1"}\n')
    assert C.read_jsonl(str(f)) == [{"question": "a", "answer": "1"}]


def test_hub_rows_map_to_the_common_schema():
    assert C._hub_row("gsm8k", {"question": "q", "answer": "work\n#### 1,000"}) == {"prompt": "q", "answer": "1000"}
    r = C._hub_row("csqa", {"question": "q", "choices": {"label": list("ABCDE"), "text": list("vwxyz")}, "answerKey": "C"})
    assert r["choices"] == list("vwxyz") and r["answer"] == "C"
    assert C._hub_row("bigmath_l4", {"prompt": "p", "solution": "\\frac{1}{2}", "llama8b_solve_rate": 0.3}) == \
        {"prompt": "p", "answer": "\\frac{1}{2}"}
    assert C._hub_row("vicuna", {"instruction": "Write a poem.", "input": "", "output": "x"}) == {"prompt": "Write a poem.", "answer": ""}


def test_single_split_datasets_hold_out_a_fixed_tenth(monkeypatch):
    """bigmath / supergpqa / dolly have one hub split: train and test are disjoint, the same for any
    seed, about 10% test; vicuna is evaluation only."""
    import datasets
    hub = [{"prompt": f"problem {i}", "solution": str(i)} for i in range(2000)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: hub)
    train = {r["prompt"] for r in C.load_task("bigmath_l5", "train")}
    test = {r["prompt"] for r in C.load_task("bigmath_l5", "test")}
    assert not train & test and len(train | test) == 2000 and 150 < len(test) < 250
    for seed in (0, 1, 7):
        assert {r["prompt"] for r in C.load_task("bigmath_l5", "test", n=50, seed=seed)} <= test
        assert {r["prompt"] for r in C.load_task("bigmath_l5", "train", n=500, seed=seed)} <= train
    with pytest.raises(C.BadInput):
        C.load_task("vicuna", "train")


# -----------------------------------------------------------------------------
# models and I/O


def test_missing_model_is_one_clear_line():
    with pytest.raises(C.BadInput, match="no such folder"):
        C.load_model("/nonexistent/folder")
    with pytest.raises(C.BadInput) as e:
        C.load_model("no-such-org/no-such-model-xyz")
    assert "no-such-org/no-such-model-xyz" in str(e.value) and "local folder" in str(e.value)


def test_library_errors_raise_and_a_stage_prints_one_line(tmp_path):
    """common raises BadInput (a notebook can catch it); a stage's command line turns it, and an OSError a
    user can act on, into one line and exit status 2; a bug keeps its traceback."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "a_file").write_text("x")  # a file where a folder is expected: an OSError even for root
    cases = {"C.load_task('no_such_task')": "unknown task 'no_such_task'",
             f"C.atomic_write_text({str(tmp_path / 'a_file' / 'f.txt')!r}, 'x')": "a_file: File exists",
             "1 / 0": "ZeroDivisionError"}
    for code, want in cases.items():
        script = f"import argparse, common as C\nC.parse_args(argparse.ArgumentParser())\n{code}\n"
        r = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
        assert want in r.stderr, r.stderr
        if code == "1 / 0":
            assert r.returncode == 1 and "Traceback" in r.stderr  # a bug: the full traceback
        else:
            assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr


def test_atomic_writes_and_unknown_flags(tmp_path, capsys):
    import argparse
    p = tmp_path / "a" / "x.json"
    C.atomic_write_json(str(p), {"a": 1})
    assert json.loads(p.read_text()) == {"a": 1} and not [f for f in os.listdir(p.parent) if ".tmp" in f]
    C.append_jsonl(str(tmp_path / "m.jsonl"), {"step": 1})
    C.append_jsonl(str(tmp_path / "m.jsonl"), {"step": 2})
    assert [r["step"] for r in C.read_jsonl(str(tmp_path / "m.jsonl"))] == [1, 2]
    ap = argparse.ArgumentParser()
    ap.add_argument("--lr", type=float, default=1e-3)
    assert C.parse_args(ap, ["--lr", "0.1"]).lr == 0.1
    with pytest.raises(C.BadInput, match="--learning_rate"):
        C.parse_args(ap, ["--learning_rate", "0.1"])
    ap.add_argument("--method", choices=["sft", "rkl"], default="sft")
    for bad in (["--method", "kl"], ["--lr", "fast"]):  # argparse's own errors: one line, no usage block
        with pytest.raises(C.BadInput) as e:
            C.parse_args(ap, bad)
        err = C.error_line(e.value)
        assert err.startswith("error: argument") and "\n" not in err and "usage:" not in err


# -----------------------------------------------------------------------------
# generation


def test_generate_n_samples_lengths_and_greedy_matches_hf(tok, tiny_pair):
    model, _ = tiny_pair
    prompts = ["<|user|>what is 2+3?\n<|assistant|>", "<|user|>hi\n<|assistant|>", "<|user|>a longer prompt here\n<|assistant|>"]
    out = C.generate(model, tok, prompts, n=4, max_new_tokens=9, temperature=1.0, seed=0, batch_size=8)
    assert len(out) == 12 and [o["i"] for o in out] == [0] * 4 + [1] * 4 + [2] * 4
    assert all(len(o["ids"]) <= 9 for o in out)
    assert len({tuple(o["ids"]) for o in out}) > 3  # samples differ
    again = C.generate(model, tok, prompts, n=4, max_new_tokens=9, temperature=1.0, seed=0, batch_size=8)
    assert [o["ids"] for o in out] == [o["ids"] for o in again]  # seeded
    # greedy equals transformers' own greedy decoding, whatever the batch mates (left padding)
    greedy = C.generate(model, tok, prompts, n=1, max_new_tokens=9, greedy=True, batch_size=2)
    for p, o in zip(prompts, greedy):
        ids = tok(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ref = model.generate(ids, max_new_tokens=9, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        eos = (ref == tok.eos_token_id).nonzero()
        ref = ref[: eos[0, 0] + 1] if len(eos) else ref
        assert o["ids"] == ref.tolist()


def test_sampler_hands_over_the_kv_cache_without_a_deprecated_argument(tok, tiny_pair):
    """transformers 5.24+ deprecates `past_key_values` (removed in 5.40): the sampler passes `cache` where the
    model takes it, also through a peft wrapper, and the samples equal HF's greedy decoding (test above)."""
    import warnings
    from peft import LoraConfig, get_peft_model
    from tests.conftest import tiny_llama
    with warnings.catch_warnings():  # peft 0.21's PeftModel.__init__ reads the deprecated is_gradient_checkpointing: not ours
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(tiny_llama(len(tok), tok=tok, seed=5), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for model in (tiny_pair[0], peft_model):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            out = C.generate(model, tok, ["<|user|>hi\n<|assistant|>"], n=2, max_new_tokens=6, seed=0)
        assert len(out) == 2 and all(len(o["ids"]) >= 1 for o in out)


def test_generate_stops_at_eos_and_padding_side_does_not_matter(tok):
    from tests.conftest import tiny_llama
    m = tiny_llama(len(tok), tok=tok)
    # a model that prefers eos everywhere: every completion is exactly [eos], marked finished
    hook = m.lm_head.register_forward_hook(lambda mod, inp, out: out.index_add(
        -1, torch.tensor([tok.eos_token_id]), torch.full(out.shape[:-1] + (1,), 1e4)))
    out = C.generate(m, tok, ["<|user|>hello\n<|assistant|>", "<|user|>x\n<|assistant|>"], n=3, max_new_tokens=20, temperature=1.0)
    assert all(o["finished"] for o in out)
    assert all(o["ids"] == [tok.eos_token_id] and o["text"] == "" for o in out)
    hook.remove()
    for side in ("left", "right"):
        tok.padding_side = side
        g = C.generate(m, tok, ["<|user|>a\n<|assistant|>", "<|user|>longer prompt\n<|assistant|>"], greedy=True, max_new_tokens=5)
        assert [o["ids"] for o in g] == [o["ids"] for o in C.generate(m, tok, ["<|user|>a\n<|assistant|>"], greedy=True, max_new_tokens=5)] + [g[1]["ids"]]
    tok.padding_side = "left"


def test_every_task_has_a_budget_and_the_flag_overrides_it():
    assert all(isinstance(spec["max_new_tokens"], int) and spec["max_new_tokens"] > 0 for spec in C.TASKS.values())
    assert C.task_budget("gsm8k") == C.TASKS["gsm8k"]["max_new_tokens"] and C.task_budget("gsm8k", 64) == 64
    assert C.task_budget("bigmath_l5") > C.task_budget("gsm8k") > C.task_budget("csqa")  # long derivations > word problems > mc
    with pytest.raises(C.BadInput, match="unknown task"):
        C.task_budget("gsm9k")


def test_generate_by_budget_gives_each_prompt_its_own_limit(tok, tiny_pair):
    model, _ = tiny_pair
    prompts = ["<|user|>what is 2+3?\n<|assistant|>", "<|user|>hi\n<|assistant|>", "<|user|>a longer prompt\n<|assistant|>",
               "<|user|>x\n<|assistant|>"]
    one = C.generate_by_budget(model, tok, prompts, [9] * 4, n=2, seed=3, batch_size=8)
    assert [o["ids"] for o in one] == [o["ids"] for o in C.generate(model, tok, prompts, n=2, max_new_tokens=9, seed=3, batch_size=8)]
    budgets = [4, 30, 4, 30]
    out = C.generate_by_budget(model, tok, prompts, budgets, n=2, seed=3, batch_size=8)
    assert [o["i"] for o in out] == [0, 0, 1, 1, 2, 2, 3, 3]  # prompt-major, indices into `prompts`
    assert all(len(o["ids"]) <= budgets[o["i"]] for o in out)
    assert max(len(o["ids"]) for o in out if budgets[o["i"]] == 30) > 4  # the long group was not cut at the short limit
    short = C.generate(model, tok, [prompts[0], prompts[2]], n=2, max_new_tokens=4, seed=3, batch_size=8)  # smallest keeps the seed
    assert [o["ids"] for o in out if budgets[o["i"]] == 4] == [o["ids"] for o in short]
    again = C.generate_by_budget(model, tok, prompts, budgets, n=2, seed=3, batch_size=8)
    assert [o["ids"] for o in out] == [o["ids"] for o in again]


def test_a_long_batch_prints_progress_while_it_runs(tok, tiny_pair, monkeypatch, capsys):
    """Inside one batch (no batch ends before the last token here), a line with tokens, rate and ETA appears."""
    import time
    monkeypatch.setattr(C, "PROGRESS_SECS", 0.0)
    slow_prefill = tiny_pair[0].register_forward_pre_hook(  # a big model's prefill: one forward that takes long
        lambda mod, args, kw: time.sleep(0.3) if kw["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    try:
        C.generate(tiny_pair[0], tok, ["<|user|>hi\n<|assistant|>"] * 2, n=2, max_new_tokens=40, seed=0, batch_size=8, show="sample s")
    finally:
        slow_prefill.remove()
    err = capsys.readouterr().err
    assert "sample s batch 1/1 | prefill of 2 prompts x " in err
    lines = [l for l in err.splitlines() if l.startswith("sample s batch 1/1 | token 8/40 |")]
    assert lines and "tokens |" in lines[0] and "tok/s" in lines[0] and "batch eta <=" in lines[0]
    seen = []
    with C.heartbeat(lambda: seen.append(1) or "scoring: 3/8 seq done", every=0.05):
        time.sleep(0.3)
    assert len(seen) >= 2 and "scoring: 3/8 seq done" in capsys.readouterr().err


def test_make_text_batch_cross_tokenizer(tok):
    from tests.conftest import char_tokenizer
    tb = char_tokenizer(extra="[]")
    ids_a, _, cm_a = C.make_text_batch(tok, ["<|user|>q\n<|assistant|>"], ["abc"], eos=True)
    ids_b, _, cm_b = C.make_text_batch(tb, ["<|user|>q\n<|assistant|>"], ["abc"], eos=False)
    assert int(cm_a.sum()) == 4 and int(cm_b.sum()) == 3
    assert ids_a[0, -1].item() == tok.eos_token_id  # this template puts "\n" (no special token) after an answer


def test_turn_end_is_what_the_chat_template_ends_an_answer_with():
    """Gemma-3-it: eos_token is <eos> but answers end with <end_of_turn>; Qwen3: <|im_end|> (= its eos)."""
    from tests.conftest import char_tokenizer
    g = char_tokenizer()
    g.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    g.chat_template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                       "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    end = g.convert_tokens_to_ids("<end_of_turn>")
    assert C.turn_end_id(g) == end != g.eos_token_id
    ids, _, cm = C.make_text_batch(g, ["<start_of_turn>user\nq<end_of_turn>\n<start_of_turn>model\n"], ["abc"], eos=True)
    assert ids[0, -1].item() == end and int(cm.sum()) == 4
    q = char_tokenizer()
    q.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    q.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    assert C.turn_end_id(q) == q.convert_tokens_to_ids("<|im_end|>")
    q.chat_template = None  # a base model: eos
    C.turn_end_id.cache_clear()
    assert C.turn_end_id(q) == q.eos_token_id


def test_finished_rows_leave_the_batch_without_mixing_rows(tok):
    """Rows that stop early are dropped from the batch and the KV cache; the survivors must keep
    their own cache rows: batched greedy equals one-prompt-at-a-time greedy, with varied lengths."""
    from tests.conftest import tiny_llama
    m = tiny_llama(len(tok), hidden=48, seed=4, tok=tok)
    bias = {"b": 0.0}
    m.lm_head.register_forward_hook(lambda mod, inp, out: out.index_add(
        -1, torch.tensor([tok.eos_token_id]), torch.full(out.shape[:-1] + (1,), bias["b"])))
    prompts = [f"<|user|>{w}\n<|assistant|>" for w in ("a", "bb 12", "what is 3+4?", "xyz", "hello there", "q", "7*8", "long prompt here")]
    bias["b"] = 0.09  # found by a scan: with this eos bias greedy stops at 2, 5, 10 or runs to 24
    alone = [C.generate(m, tok, [p], greedy=True, max_new_tokens=24)[0]["ids"] for p in prompts]
    assert len({len(a) for a in alone}) >= 3
    batched = C.generate(m, tok, prompts, greedy=True, max_new_tokens=24, batch_size=8)
    assert [o["ids"] for o in batched] == alone
    sampled = C.generate(m, tok, prompts, n=4, max_new_tokens=24, batch_size=32, seed=3)
    for o in sampled:  # eos only ever as the last token, and exactly when finished
        assert (tok.eos_token_id in o["ids"]) == o["finished"]
        assert tok.eos_token_id not in o["ids"][:-1]


def test_atomic_save_dir_keeps_the_old_folder_until_the_new_one_is_whole(tmp_path):
    path = str(tmp_path / "model")

    def writer(text, fail=False):
        def write(d):
            with open(os.path.join(d, "w.txt"), "w") as f:
                f.write(text)
            if fail:
                raise RuntimeError("killed mid-save")
        return write
    C.atomic_save_dir(path, writer("one"))
    with pytest.raises(RuntimeError):
        C.atomic_save_dir(path, writer("two", fail=True))
    assert open(os.path.join(path, "w.txt")).read() == "one"  # the half-written save never replaced it
    C.atomic_save_dir(path, writer("three"))
    assert open(os.path.join(path, "w.txt")).read() == "three"
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no .tmp / .old left behind


def test_model_stamp_changes_with_the_weights(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x" * 10)
    a = C.model_stamp(str(d))
    assert a == C.model_stamp(str(d)) and "model.safetensors:10:" in a
    os.utime(d / "config.json", ns=(1, 10**18))  # not a weight file: no effect
    assert C.model_stamp(str(d)) == a
    (d / "model.safetensors").write_bytes(b"y" * 11)  # rewritten weights
    assert C.model_stamp(str(d)) != a
    assert C.model_stamp("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"


def test_sample_cache_is_used_only_under_its_own_key(tmp_path):
    path, key = str(tmp_path / "s.json"), {"model": "m", "tasks": ("a", "b"), "temperature": 1.0, "data": None}
    assert C.load_cached(path, key) is None  # nothing written yet
    C.atomic_write_json(path, {"key": key, "samples": [{"i": 0, "ids": [1, 2]}]})
    assert C.load_cached(path, dict(key)) == [{"i": 0, "ids": [1, 2]}]  # the tuple came back as a list: still equal
    assert C.load_cached(path, {**key, "temperature": 0.9}) is None
    assert C.load_cached(path, {k: v for k, v in key.items() if k != "data"}) is None


def test_vllm_context_is_sized_to_the_prompts_and_checked(tok):
    """The engine's max_model_len covers the longest prompt plus the budget; a request that would not
    fit stops with one line before vLLM is imported (vLLM itself would cut the sequence silently)."""
    import types
    prompts = ["abc", "abcdefgh"]
    assert C.vllm_max_len(tok, prompts, 10) == len(tok("abcdefgh", add_special_tokens=False)["input_ids"]) + 10 == 18
    assert C.vllm_max_len(tok, [], 10) == 10
    with pytest.raises(C.BadInput):
        C.generate(None, tok, prompts, max_new_tokens=11, backend="vllm", engine=types.SimpleNamespace(tg_max_model_len=18))


def test_a_broken_vllm_install_stops_with_one_line(tmp_path, monkeypatch):
    """vLLM missing means the HF backend; vLLM installed but failing at import (as beside PyPI's torchvision
    on a CPU torch) stops with one line instead of silently falling back or erroring deep inside a stage."""
    import sys
    if "vllm" in sys.modules:
        pytest.skip("a real vLLM is already imported in this process")
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(C.BadInput):
        C.vllm_available()
    sys.modules.pop("vllm", None)


# -----------------------------------------------------------------------------
# seeds, checkpoints, divergence band, flag checks, write errors


def test_derive_seed_is_a_stable_hash_of_its_parts_and_separates_streams():
    import hashlib
    want = int.from_bytes(hashlib.sha256(b'[0,"rollouts",3]').digest()[:8], "big") >> 1
    assert C.derive_seed(0, "rollouts", 3) == want  # the same in every process and Python version
    seeds = {C.derive_seed(s, name, k) for s in (0, 1) for name in ("prompt_cursor", "sample_cursor") for k in range(50)}
    assert len(seeds) == 200  # 03's two streams (same name length) no longer share a seed
    assert all(0 <= s < 2**63 for s in seeds) and C.derive_seed(0, "x", bits=52) < 2**52



def test_epoch_stream_is_a_permutation_per_epoch_and_resumes_from_its_cursor():
    """Each epoch of 7 items takes every index once, in that epoch's seeded order; taking 3 then 12 equals
    taking 15 at once (a resume needs only the cursor); other names and seeds give other orders."""
    import numpy as np
    s = C.epoch_stream(0, "prompt_order", 7, 0, 21)
    for e in range(3):
        assert s[7 * e:7 * e + 7] == np.random.default_rng(C.derive_seed(0, "prompt_order", e)).permutation(7).tolist()
    assert C.epoch_stream(0, "prompt_order", 7, 0, 3) + C.epoch_stream(0, "prompt_order", 7, 3, 12) == s[:15]
    assert s != C.epoch_stream(0, "sample_cursor", 7, 0, 21) and s != C.epoch_stream(1, "prompt_order", 7, 0, 21)


def test_in_band_against_the_median_and_its_spread():
    h = [0.04, 0.05, 0.03, 0.04]  # median 0.04, MAD 0.005: band 0.04 +- 10 * 0.045
    assert C.in_band(0.48, h) and not C.in_band(0.5, h)  # |x - m| <= 0.45
    assert C.in_band(0.0001, h)  # a falling loss is progress, never flagged
    assert C.in_band(-0.3, [-0.5, 0.2, -0.1])  # signed values: median -0.1, MAD 0.3 -> band -0.1 +- 4
    assert not C.in_band(float("nan"), h) and not C.in_band(float("inf"), [])
    assert C.in_band(123.0, []) and C.in_band(5.0, [0.0, 0.0])  # nothing to compare with


def test_band_check_keeps_only_good_steps_as_reference_and_waits_for_warmup():
    hist = {}
    assert C.band_check({"loss": 0.04, "g": 0.2}, hist) == []
    assert C.band_check({"loss": 4.5, "g": 23.0}, hist) == ["loss", "g"]  # 03 rkl at --lr 10, step 2
    assert C.band_check({"loss": 5.2, "g": 0.9}, hist) == ["loss"]  # the diverged values never became the reference
    assert hist == {"loss": [0.04], "g": [0.2]}
    h2 = {}
    assert C.band_check({"loss": -0.01}, h2, warmup=3) == [] and C.band_check({"loss": -0.9}, h2, warmup=3) == []
    assert C.band_check({"loss": float("nan")}, h2, warmup=3) == ["loss"]  # non-finite fails even in warmup
    for i in range(30):
        C.band_check({"loss": float(i)}, h2, window=20, factor=1e9)
    assert len(h2["loss"]) == 20 and h2["loss"][-1] == 29.0


def test_checkpoint_round_trip_keeps_the_previous_one_until_the_new_one_is_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt")
    w = {"a": torch.arange(4.0)}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]).state_dict()
    assert C.load_checkpoint(path) is None
    C.save_checkpoint(path, w, opt, {"step": 1, "cursor": 7})
    ck = C.load_checkpoint(path)
    assert ck["meta"] == {"step": 1, "cursor": 7} and torch.equal(ck["weights"]["a"], w["a"]) and ck["optimizer"] == opt
    real_save = torch.save

    def full_disk(obj, f):
        real_save(obj, f)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        C.save_checkpoint(path, w, opt, {"step": 2})
    assert e.value.errno == errno.ENOSPC and e.value.filename == path
    assert C.error_line(e.value).startswith(f"error: {path}: No space left on device (errno ENOSPC)")
    monkeypatch.undo()
    assert C.load_checkpoint(path)["meta"]["step"] == 1 and sorted(os.listdir(tmp_path)) == ["ckpt"]  # no ckpt.tmp left
    os.replace(path, path + ".old")  # a kill between atomic_save_dir's two renames
    assert C.load_checkpoint(path)["meta"]["step"] == 1
    with open(os.path.join(path + ".old", "state.pt"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(C.BadInput, match="does not load"):
        C.load_checkpoint(path)
    os.makedirs(path)
    torch.save({"step": 3, "adapter": {}, "optimizer": {}, "cursor": 0, "rng": None}, os.path.join(path, "state.pt"))
    with pytest.raises(C.BadInput, match="older version"):  # 02's format before save_checkpoint
        C.load_checkpoint(path)


def test_os_error_of_finds_the_errno_behind_library_write_failures():
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    wrapped.__context__ = OSError(errno.ENOSPC, "No space left on device")
    e = C.os_error_of(wrapped, "/x/ckpt")
    assert e.errno == errno.ENOSPC and e.filename == "/x/ckpt"
    e = C.os_error_of(Exception("Error while serializing: I/O error: No space left on device (os error 28)"), "/x/model")
    assert e.errno == errno.ENOSPC and e.filename == "/x/model"
    assert C.os_error_of(ValueError("a bug"), "/x") is None
    line = C.error_line(wrapped)  # an uncaught one still becomes the one line
    assert line.startswith("error: a file: No space left on device (errno ENOSPC)")


def test_rerun_command_changes_only_the_given_flags():
    argv = ["03_distill.py", "--method", "rkl", "--lr", "10", "--out_dir", "runs/a b", "--lr=5", "--steps", "30"]
    assert C.rerun_command(argv, lr="1") == "python 03_distill.py --method rkl --out_dir 'runs/a b' --steps 30 --lr 1"


def test_check_flags_refuses_counts_below_one_and_non_finite_rates():
    import argparse
    ok = argparse.Namespace(steps=1, lr=1e-3, lam=-1.0, temperature=0.0, topk=0)
    C.check_flags(ok, counts=("steps",), positive=("lr",), finite=("lam",), nonneg=("temperature", "topk"))
    for bad, kind in ((dict(steps=0), "counts"), (dict(steps=-3), "counts"), (dict(lr=float("nan")), "positive"),
                      (dict(lr=0.0), "positive"), (dict(lam=float("nan")), "finite"), (dict(temperature=-1.0), "nonneg"),
                      (dict(temperature=float("inf")), "nonneg")):
        name = next(iter(bad))
        with pytest.raises(C.BadInput, match=f"--{name} "):
            C.check_flags(argparse.Namespace(**{**vars(ok), **bad}), **{kind: (name,)})


def test_model_missing_names_what_cannot_load(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    assert "has no config.json" in C.model_missing(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    assert "no weights file" in C.model_missing(str(tmp_path / "m"))
    (tmp_path / "m" / "model.safetensors").write_text("")
    assert C.model_missing(str(tmp_path / "m")) is None
    assert "no such model folder" in C.model_missing(str(tmp_path / "nope"))
    assert "no such model folder" in C.model_missing("runs/nope/00_toy_world/teacher")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "not in the local Hugging Face cache" in C.model_missing("nosuchorg/nosuchmodel")
