"""Smoke test of 00_toy_world.py: runs it twice on --smoke settings (~10-20 s each) and checks
the DESIGN 9 contract: data schema, summary fields, reloadable HF folders, two different
tokenizers with a chat template, correct-by-construction math answers, determinism."""
import json, os, subprocess, sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "00_toy_world.py")


def run_world(out_dir, seed=0, *extra):
    r = subprocess.run([sys.executable, SCRIPT, "--out_dir", str(out_dir), "--seed", str(seed), "--smoke", *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out_dir


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return run_world(tmp_path_factory.mktemp("tw") / "a")


def recompute(meta):
    """toy_math answer from meta alone: start, then add / sub / bags (k bags of m)."""
    t = meta["start"]
    for op in meta["ops"]:
        t += {"add": lambda o: o[1], "sub": lambda o: -o[1], "bags": lambda o: o[1] * o[2]}[op[0]](op)
    return t


def test_data_schema(world):
    for task in ("toy_math", "toy_qa"):
        for split in ("train", "test"):
            rows = read_jsonl(world / "data" / task / f"{split}.jsonl")
            assert rows, (task, split)
            for r in rows:
                assert isinstance(r["prompt"], str) and isinstance(r["answer"], str) and isinstance(r["meta"], dict)
                assert "<|user|>" not in r["prompt"]  # raw user message, no chat template
                if task == "toy_math":
                    assert r["answer"].lstrip("-").isdigit() and r["meta"]["level"] in ("easy", "hard")
                else:
                    assert r["answer"] in "ABCD" and len(r["choices"]) == 4
                    assert f"{r['answer']}) {r['choices']['ABCD'.index(r['answer'])]}" in r["prompt"]
                    assert r["choices"]["ABCD".index(r["answer"])] == r["meta"]["value"]
                if split == "train":
                    assert "style" in r["meta"]


def test_math_answers_correct_by_construction(world):
    for split in ("train", "test"):
        for r in read_jsonl(world / "data" / "toy_math" / f"{split}.jsonl"):
            assert int(r["answer"]) == recompute(r["meta"])
            if split == "train":
                last = r["completion"].strip().split("\n")[-1]
                assert last.startswith("#### ") and int(last[5:]) == int(r["answer"])
    train = read_jsonl(world / "data" / "toy_math" / "train.jsonl")
    assert any("wait, check:" in r["completion"] for r in train)  # recheck behaviour is in the corpus
    assert {r["meta"]["level"] for r in train} == {"easy", "hard"}


def test_qa_completions_end_with_answer(world):
    for r in read_jsonl(world / "data" / "toy_qa" / "train.jsonl"):
        assert r["completion"].strip().split("\n")[-1] == f"The answer is ({r['answer']})"


def test_summary_fields(world):
    s = json.loads((world / "summary.json").read_text())
    for role, tk in (("teacher", "A"), ("student", "A"), ("target", "B")):
        m = s["models"][role]
        assert isinstance(m["params"], int) and m["params"] > 0 and m["tokenizer"] == tk
        for task in ("toy_math", "toy_qa"):
            assert 0.0 <= m["acc"][task] <= 1.0
    assert s["chance"]["toy_qa"] == 0.25 and "style_mix" in s and "seconds" in s
    assert json.loads((world / "config.json").read_text())["smoke"] is True


def test_models_reload_and_tokenizers_differ(world):
    toks = {}
    for role in ("teacher", "student", "target"):
        model = AutoModelForCausalLM.from_pretrained(world / role)
        tok = AutoTokenizer.from_pretrained(world / role)
        assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
        assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
        assert model.config.pad_token_id == tok.pad_token_id
        text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
        assert text == "<|user|>2+2?\n<|assistant|>"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.convert_tokens_to_ids("<|user|>") == ids[0] and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
        toks[role] = tok
    assert toks["teacher"].get_vocab() == toks["student"].get_vocab()
    assert toks["teacher"].get_vocab() != toks["target"].get_vocab()
    assert len(toks["teacher"]) != len(toks["target"])


def test_deterministic(world, tmp_path):
    other = run_world(tmp_path / "b")
    for task in ("toy_math", "toy_qa"):
        for split in ("train", "test"):
            a = (world / "data" / task / f"{split}.jsonl").read_bytes()
            assert a == (other / "data" / task / f"{split}.jsonl").read_bytes(), (task, split)
    for role in ("teacher", "target"):
        assert (world / role / "tokenizer.json").read_bytes() == (other / role / "tokenizer.json").read_bytes()


def test_student_knowledge_gap(world, tmp_path):
    """--student_qa_known 0.5: the student trains on the toy_qa rows of half the countries only (all of
    toy_math); the teacher on everything. The data files stay the same."""
    gap = run_world(tmp_path / "gap", 0, "--student_qa_known", "0.5", "--roles", "teacher,student")
    s = json.loads((gap / "summary.json").read_text())
    known = set(s["student_qa_known"]["entities"])
    qa = read_jsonl(gap / "data" / "toy_qa" / "train.jsonl")
    n_ent = len({r["meta"]["entity"] for r in qa})
    assert len(known) == round(0.5 * n_ent) and 0 < len(known) < n_ent
    stu, tea = s["models"]["student"]["train_rows"], s["models"]["teacher"]["train_rows"]
    assert stu["toy_qa"] == sum(r["meta"]["entity"] in known for r in qa) < tea["toy_qa"] == len(qa)
    assert stu["toy_math"] == tea["toy_math"] == len(read_jsonl(gap / "data" / "toy_math" / "train.jsonl"))
    assert (gap / "data" / "toy_qa" / "train.jsonl").read_bytes() == (world / "data" / "toy_qa" / "train.jsonl").read_bytes()


def test_bad_settings_stop_with_one_line_and_no_done_file(tmp_path):
    """A typo in --roles used to build nothing and still write summary.json (run_all.sh's done file); a
    batch larger than the data used to loop forever. Both stop before any training, in one line."""
    for extra, msg in ((["--roles", "teachr"], "not a role"), (["--batch_size", "100000", "--roles", "teacher"], "training rows")):
        r = subprocess.run([sys.executable, SCRIPT, "--out_dir", str(tmp_path / "w"), "--smoke", *extra],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not (tmp_path / "w" / "summary.json").exists()
    (tmp_path / "afile").write_text("")
    r = subprocess.run([sys.executable, SCRIPT, "--out_dir", str(tmp_path / "afile"), "--smoke"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is a file" in r.stderr and "Traceback" not in r.stderr
