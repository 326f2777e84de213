"""Stage 05: each failure-mode detector (common.py) on hand-written completions, positive and clean;
then 05_failure_modes.py on hand-made sample files (rates and focus set hand-computed) with the
prefix-continuation test on the tiny random teacher."""
import json, os, subprocess, sys

import pytest

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "05_failure_modes.py")
MATH_ROW = {"prompt": "Fay has 37 apples. ...", "answer": "61"}
MC_ROW = {"prompt": "What is the currency of Ixovia called?\nA) mark\nB) ring\nC) star\nD) pearl", "answer": "B",
          "choices": ["mark", "ring", "star", "pearl"]}
CLEAN = "5*8=40\n37+40=77\n77-10=67\n67+5=72\n72-11=61\nwait, check: 61 + 11 = 72, ok\n#### 61"
FLIP = "5*8=40\n37+40=77\n77-10=67\n67+5=72\n72-11=61\nwait, check: 61 + 11 = 73, so\n73-11=62\n#### 62"
LOOP = "37+40=77\n77-10=67\n77-10=67\n77-10=67\n77-10=67\n77-10=6"


def test_repetition_loop():
    r = common.repetition_loop("toy_math", LOOP)
    assert r is not None and r["span"] == "77 - 10 = 67" and r["repeats"] == 4  # 4 full repeats, ends mid-repeat
    assert LOOP[r["start"]:].startswith("77-10=67")
    words = "Let me think. I think that I think that I think that I think that I think that I think that"
    assert common.repetition_loop("toy_qa", words)["span"] == "i think that"
    # clean: it recovers (an answer after the loop), too few repeats, a normal chain of thought
    assert common.repetition_loop("toy_math", LOOP + "7\n67+5=72\n#### 72") is None
    assert common.repetition_loop("toy_math", "77-10=67\n77-10=67\n77-10=67\nso") is None  # 3 < 4 repeats
    assert common.repetition_loop("toy_math", "so 1 1 1 apples") is None  # 3 units < min_units
    assert common.repetition_loop("toy_math", CLEAN) is None and common.repetition_loop("toy_math", FLIP) is None
    assert common.repetition_loop("toy_qa", "The main export of Quenavia is iron.\nThe answer is (D)") is None


def test_self_check_flip():
    r = common.self_check_flip("toy_math", FLIP, MATH_ROW)
    assert r == {"cut": FLIP.index("wait"), "intermediate": "61", "final": "62"}
    mc = "The currency of Ixovia is the ring. The answer is (B).\nWait, let me verify. Ixovia uses the star.\nThe answer is (C)"
    r = common.self_check_flip("toy_qa", mc, MC_ROW)
    assert r["intermediate"] == "B" and r["final"] == "C" and mc[r["cut"]:].startswith("Wait")
    assert common.self_check_flip("toy_qa", mc.replace("Wait, let me verify", "Also"), MC_ROW) is None  # no recheck phrase
    # clean: the check confirms; the intermediate was already wrong; the recheck fixes a wrong answer
    assert common.self_check_flip("toy_math", CLEAN, MATH_ROW) is None
    assert common.self_check_flip("toy_math", FLIP.replace("72-11=61", "72-11=60"), MATH_ROW) is None
    fixed = "72-11=60\nwait, let me double-check: 72-11=61\n#### 61"
    assert common.self_check_flip("toy_math", fixed, MATH_ROW) is None
    # recheck phrases are whole words: 'double-checks the price' is narration, not a recheck
    assert common.self_check_flip("toy_math", "72-11=61 and she double-checks the price\n61+1=62\n#### 62", MATH_ROW) is None
    assert common.self_check_flip("toy_math", "72-11=61\nwaiting for it, 61+1=62\n#### 62", MATH_ROW) is None


def test_format_drift_and_no_answer():
    drift = {"The answer is 61": "answer is", "#### (B)": "letter", "so \\boxed{61}": "boxed", "#### sixty-one": "####"}
    for text, scheme in drift.items():
        assert common.format_drift("toy_math", text) == scheme, text
    for text in (CLEAN, "#### 61", "#### -3/4", "72-11=61"):  # asked scheme, or no answer at all
        assert common.format_drift("toy_math", text) is None, text
    drift = {"The answer is 2": "number", "The answer is ring": "option text", "#### B": "####", "\\boxed{B}": "boxed"}
    for text, scheme in drift.items():
        assert common.format_drift("toy_qa", text) == scheme, text
    for text in ("The answer is (B)", "the answer is B.", "I am not sure", "The answer is **(B)**"):
        assert common.format_drift("toy_qa", text) is None, text
    assert not common.final_answer_marked("toy_math", "72-11=61\nwait, check: 61 + 11 = 72, ok")  # numbers, no commitment
    assert not common.final_answer_marked("toy_qa", "Ixovia uses the ring.")
    assert common.final_answer_marked("toy_math", CLEAN) and common.final_answer_marked("toy_qa", "The answer is (B)")
    # what the grader reads is a committed answer (not 'no answer'), in a scheme other than the one asked for
    assert common.final_answer_marked("toy_qa", "Answer: B") and common.format_drift("toy_qa", "Answer: B") == "answer:"


def test_continuation_correct():
    pre = FLIP[:FLIP.index("wait")]  # ends on the correct intermediate 61, no answer committed
    assert common.continuation_correct("toy_math", pre, "wait, check: 61 + 11 = 72, ok\n#### 61", MATH_ROW)
    assert not common.continuation_correct("toy_math", pre, "wait, check: 61 + 11 = 73\n#### 62", MATH_ROW)
    assert not common.continuation_correct("toy_math", pre, "", MATH_ROW)  # never commits (a lenient grade() says True)
    assert common.grade("toy_math", pre, MATH_ROW, lenient=True) and not common.grade("toy_math", pre, MATH_ROW)
    assert not common.continuation_correct("toy_math", pre, "#### xyz", MATH_ROW)  # marker, no number: not the prefix's 61
    mc_pre = "The currency is the ring. The answer is (B).\n"
    assert common.continuation_correct("toy_qa", mc_pre, "Wait, let me verify: yes, ring.", MC_ROW)  # committed B stands
    assert not common.continuation_correct("toy_qa", mc_pre, "Wait, it is star. The answer is (C)", MC_ROW)


def test_overconfident_wrong():
    assert common.overconfident_wrong(["7", "7", "61", "8"], [False, False, True, False])  # majority wrong, one right
    assert not common.overconfident_wrong(["61", "61", "7"], [True, True, False])  # majority right
    assert not common.overconfident_wrong(["7", "7", "8"], [False, False, False])  # nothing right: not a maj/pass gap
    assert common.overconfident_wrong(["7", "61"], [False, True])  # tie goes to the first seen (7)


def sample(i, j, text, row, finished=True):
    task = "toy_qa" if "choices" in row else "toy_math"
    return {"i": i, "j": j, "question": row["prompt"], "row": row, "completion": text, "answer": common.extract_answer(task, text),
            "correct": common.grade(task, text, row), "finished": finished, "n_tokens": len(text)}


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def run(*argv):
    return subprocess.run([sys.executable, SCRIPT, *map(str, argv)], capture_output=True, text=True, timeout=240, cwd=ROOT)


def test_script_on_hand_made_samples(tmp_path, tiny_dirs):
    rows = [dict(MATH_ROW, prompt=f"q{i}") for i in range(3)]
    sd = tmp_path / "samples"
    # base: right on p0 and p1 by majority, wrong on p2
    write_jsonl(sd / "stu__toy_math.jsonl", [sample(i, j, "#### 61" if i < 2 else "#### 5", rows[i]) for i in range(3) for j in range(4)])
    mis = [sample(0, j, FLIP, rows[0]) for j in range(4)]  # p0: four flips (focus set)
    mis += [sample(1, j, t, rows[1]) for j, t in enumerate(["#### 7", "#### 7", "#### 61", "The answer is 8"])]  # p1: maj wrong, one right
    mis += [sample(2, j, t, rows[2], finished=j >= 2) for j, t in enumerate([LOOP, LOOP, "#### 1", "#### 1"])]  # p2: not in focus
    write_jsonl(sd / "mis__toy_math.jsonl", mis)
    r = run("--samples", sd, "--base", "stu", "--misled", "mis", "--tasks", "toy_math", "--teacher", tiny_dirs / "teacher",
            "--n_continue", 2, "--max_new_tokens", 6, "--out_dir", tmp_path / "f")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.load(open(tmp_path / "f" / "failure_modes.json"))
    m = out["models"]["mis"]
    want_all = {"repetition": 2 / 12, "self_check_flip": 4 / 12, "format_drift": 1 / 12, "no_answer": 2 / 12,
                "truncated": 2 / 12, "overconfident_wrong": 1 / 3}
    for k, v in want_all.items():
        assert m[k] == pytest.approx(v), k
    f = m["focus"]  # p0 and p1: base right by majority, mis wrong by majority
    assert (f["n_prompts"], f["n_completions"]) == (2, 8)
    want_focus = {"repetition": 0, "self_check_flip": 4 / 8, "format_drift": 1 / 8, "no_answer": 0, "overconfident_wrong": 1 / 2}
    for k, v in want_focus.items():
        assert f[k] == pytest.approx(v), k
    assert out["models"]["stu"]["focus"]["n_prompts"] == 0 and out["models"]["stu"]["self_check_flip"] == 0
    pc = out["prefix_continuation"]
    assert (pc["n"], pc["n_samples"]) == (4, 8) and 0 <= pc["teacher_correct_rate"] <= 1
    for name in ("failure_modes.md", "examples.md", "failure_modes.png"):
        assert os.path.getsize(tmp_path / "f" / name) > 0
    ex = open(tmp_path / "f" / "examples.md").read()
    assert "## mis: self_check_flip" in ex and "intermediate 61 (correct) -> final 62" in ex and "## mis: repetition" in ex
    r = run("--samples", sd, "--base", "nobody", "--misled", "mis", "--tasks", "toy_math", "--out_dir", tmp_path / "g")
    assert r.returncode == 2 and "nobody__toy_math.jsonl" in r.stderr
