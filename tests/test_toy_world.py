"""Smoke test of 00_toy_world.py: runs it on --smoke settings (~30 s) and checks the DESIGN 9 contract
(data schema, summary fields, reloadable HF folders, two tokenizers with a chat template) and the
world's own promises: every style's reference completion grades correct, the style detector agrees
with the generator's label, the student lacks what the teacher knows, the gate is written, and the
world is deterministic given --seed."""
import json, os, subprocess, sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "00_toy_world.py")
ROLES = {"teacher": "A", "student": "A", "target": "A", "target_x": "B"}


def run_world(out_dir, seed=0, *extra):
    r = subprocess.run([sys.executable, SCRIPT, "--out_dir", str(out_dir), "--seed", str(seed), "--smoke", *extra],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out_dir


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # target_x only on request; one thread: the same float reductions on any machine (the committed-copy test)
    return run_world(tmp_path_factory.mktemp("tw") / "a", 0, "--roles", ",".join(ROLES), "--threads", "1")


def recompute(meta):
    """toy_math answer from meta alone: start, then each add / sub."""
    return meta["start"] + sum(g if k == "add" else -g for k, g in meta["ops"])


def test_data_schema(world):
    for task in ("toy_math", "toy_qa"):
        for split in ("train", "test"):
            rows = read_jsonl(world / "data" / task / f"{split}.jsonl")
            assert rows, (task, split)
            for r in rows:
                assert isinstance(r["prompt"], str) and isinstance(r["answer"], str) and isinstance(r["meta"], dict)
                assert "<|user|>" not in r["prompt"]  # raw user message, no chat template
                if task == "toy_math":
                    assert r["answer"].isdigit() and int(r["answer"]) == recompute(r["meta"])
                else:
                    assert r["answer"] in "ABCD" and len(r["choices"]) == 4
                    assert f"{r['answer']}) {r['choices']['ABCD'.index(r['answer'])]}" in r["prompt"]
                    assert r["choices"]["ABCD".index(r["answer"])] == r["meta"]["value"]
                assert ("completion" in r) == (split == "train")  # test rows carry no gold completion
    for task in ("toy_math", "toy_qa"):
        styles = {r["meta"]["style"] for r in read_jsonl(world / "data" / task / "train.jsonl")}
        assert {"E", "H"} <= styles, (task, styles)  # the corpus mixes the styles


def test_every_styles_reference_grades_correct_and_the_detector_agrees(world):
    """Both styles are valid: each reference completion (direct E, checked H, checked twice H2) is graded
    correct by the strict grader, and common.opens_with_check says checked exactly for H and H2."""
    n = 0
    for task in ("toy_math", "toy_qa"):
        for split in ("train", "test"):
            for r in read_jsonl(world / "data" / task / f"{split}.jsonl"):
                for style, text in r["meta"]["reference"].items():
                    assert common.grade(task, text, r, finished=True), (task, style, text)
                    assert common.opens_with_check(text) == (style != "E"), (task, style, text)
                    n += 1
                if split == "train":
                    assert r["completion"] == r["meta"]["reference"][r["meta"]["style"]]
    assert n > 1000
    math = read_jsonl(world / "data" / "toy_math" / "train.jsonl")
    e, h = (sum(len(r["meta"]["reference"][s]) for r in math) / len(math) for s in ("E", "H"))
    assert h > 2.5 * e  # the checked style costs ~3x the text


def test_summary_fields_and_the_gate(world):
    s = json.loads((world / "summary.json").read_text())
    for role, tk in ROLES.items():
        m = s["models"][role]
        assert isinstance(m["params"], int) and m["params"] > 0 and m["tokenizer"] == tk
        for task in ("toy_math", "toy_qa"):
            assert 0.0 <= m["acc"][task] <= 1.0
            g = m["gate"][task]
            for mode in ("free", "E", "H"):
                assert 0.0 <= g[mode]["acc"] <= 1.0 and 0.0 <= g[mode]["finished"] <= 1.0 and g[mode]["len"] > 0
            assert 0.0 <= g["free"]["checked_share"] <= 1.0 and 0.0 <= g["p_first_checked"] <= 1.0
    assert s["chance"] == {"toy_math": 0.0, "toy_qa": 0.25} and "style_mix" in s and "seconds" in s
    assert json.loads((world / "config.json").read_text())["smoke"] is True


def test_smoke_summary_equals_the_committed_copy(world):
    """The whole smoke world (data, tokenizers, four trained models, their evals) is a function of the pinned
    environment and the code: a numerics change in a dependency, or in our code, changes some number here.
    If the change is intended, copy the new summary (without "seconds") over tests/assets/smoke_world_summary.json."""
    got = json.loads((world / "summary.json").read_text())
    got.pop("seconds")
    want = json.loads(open(os.path.join(ROOT, "tests", "assets", "smoke_world_summary.json")).read())
    diff = [k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    assert not diff, f"summary.json differs from the committed copy in {diff}: " + json.dumps({k: got.get(k) for k in diff})[:1500]


def test_the_student_lacks_facts_the_teacher_knows(world):
    """The student trains on the toy_qa facts of a share of the countries only, the same-family target on
    another draw; the teacher on all. Test questions cover every country."""
    s = json.loads((world / "summary.json").read_text())
    qa = read_jsonl(world / "data" / "toy_qa" / "train.jsonl")
    ents = {r["meta"]["entity"] for r in qa}
    known = set(s["knows"]["student"])
    assert 0 < len(known) < len(ents) and set(s["knows"]["target"]) != known
    rows = {r: s["models"][r]["train_rows"] for r in ("teacher", "student")}
    assert rows["student"]["toy_qa"] == sum(r["meta"]["entity"] in known for r in qa) < rows["teacher"]["toy_qa"] == len(qa)
    assert rows["student"]["toy_math"] == rows["teacher"]["toy_math"]
    test_ents = {r["meta"]["entity"] for r in read_jsonl(world / "data" / "toy_qa" / "test.jsonl")}
    assert test_ents - known  # questions the student cannot answer from its own training


def test_models_reload_and_tokenizers_differ(world):
    toks = {}
    for role in ROLES:
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
    assert toks["teacher"].get_vocab() == toks["student"].get_vocab() == toks["target"].get_vocab()  # same family
    assert toks["teacher"].get_vocab() != toks["target_x"].get_vocab() and len(toks["teacher"]) != len(toks["target_x"])


def test_deterministic(world, tmp_path):
    other = run_world(tmp_path / "b", 0, "--roles", "target")
    for task in ("toy_math", "toy_qa"):
        for split in ("train", "test"):
            a = (world / "data" / task / f"{split}.jsonl").read_bytes()
            assert a == (other / "data" / task / f"{split}.jsonl").read_bytes(), (task, split)
    assert (world / "target" / "tokenizer.json").read_bytes() == (other / "target" / "tokenizer.json").read_bytes()
    a, b = (json.loads((w / "summary.json").read_text())["models"]["target"] for w in (world, other))
    assert a["acc"] == b["acc"] and a["gate"] == b["gate"] and a["sample"] == b["sample"]
    seed1 = run_world(tmp_path / "c", 1, "--roles", "target")
    assert (seed1 / "data" / "toy_math" / "test.jsonl").read_bytes() != (world / "data" / "toy_math" / "test.jsonl").read_bytes()


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


# ----------------------------------------------------------------------------- the world's batching and gate (common.py)
def test_draw_style_follows_the_corpus_mix_and_falls_back_to_what_fits():
    """P(E) = 1 - c, P(H2) = c * a on toy_math (no H2 on toy_qa), P(H) the rest; a style that does not fit
    the window becomes the next shorter one. 20,000 draws: a share's standard error is below 0.004."""
    import random
    from collections import Counter
    c, a, n = 0.5, 0.3, 20000

    def shares(task, fits=("E", "H", "H2")):
        g = random.Random(0)
        cnt = Counter(common.draw_style(g, task, c, a, fits) for _ in range(n))
        return {s: cnt[s] / n for s in ("E", "H", "H2")}
    want = {"E": 1 - c, "H": c * (1 - a), "H2": c * a}
    for s, p in shares("toy_math").items():
        assert abs(p - want[s]) < 0.016, (s, p, want[s])
    qa = shares("toy_qa")
    assert qa["H2"] == 0 and abs(qa["H"] - c) < 0.016
    no_h2 = shares("toy_math", ("E", "H"))
    assert no_h2["H2"] == 0 and abs(no_h2["H"] - c) < 0.016
    assert shares("toy_math", ("E",))["E"] == 1.0


def test_style_mix_batches_hold_the_mix_in_every_batch():
    """Every batch: bs - round(bs c) direct and round(bs c) checked rows, distinct rows within a half, each
    row in a style its completions include; a function of the seed; too few rows for one batch is refused."""
    import random
    g = random.Random(1)
    items = [("toy_math" if i % 2 else "toy_qa", [1] * g.randint(3, 9),
              {"E": [2] * g.randint(2, 5), "H": [3] * g.randint(6, 12)} | ({"H2": [4] * 20} if i % 3 else {}))
             for i in range(60)]
    items += [("toy_math", [1, 1], {"E": [2, 2]})] * 4  # rows with only the direct style (the rest did not fit)
    bs, steps = 8, 25
    out = common.style_mix_batches(items, bs, steps, seed=5, checked_frac=0.25, again_frac=0.5)
    assert len(out) == steps
    for direct, checked in out:
        assert len(direct) == 6 and len(checked) == 2
        assert all(st == "E" for _, st in direct) and all(st in ("H", "H2") for _, st in checked)
        for half in (direct, checked):
            assert len({i for i, _ in half}) == len(half)
            assert all(st in items[i][2] for i, st in half)
    assert out == common.style_mix_batches(items, bs, steps, seed=5, checked_frac=0.25, again_frac=0.5)
    assert out != common.style_mix_batches(items, bs, steps, seed=6, checked_frac=0.25, again_frac=0.5)
    with pytest.raises(common.BadInput, match="--batch_size 40 is more than half"):
        common.style_mix_batches(items, 40, 1, seed=0, checked_frac=0.5, again_frac=0.3)


def test_lm_batch_trains_on_completion_tokens_only():
    x, y, att = common.lm_batch([([5, 6], [7, 8, 9]), ([5], [7])], pad_id=0)
    assert x.tolist() == [[5, 6, 7, 8, 9], [5, 7, 0, 0, 0]]
    assert y.tolist() == [[-100, -100, 7, 8, 9], [-100, 7, -100, -100, -100]]
    assert att.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_style_gate_reports_what_its_samples_and_first_token_say(tok):
    """p_first_checked equals the softmax of each prompt's last logits computed alone (no padding), and each
    mode's length and finished share are those of generate() with that mode's seed on prompt + opener."""
    import torch
    from conftest import tiny_llama
    model = tiny_llama(len(tok), 32, 2, seed=4, tok=tok)
    rows = [{"prompt": "1+2?", "answer": "3"}, {"prompt": "What is 12 - 5, written out?", "answer": "7"}]
    openers = {"free": ["", ""], "H": ["Let me check\n"] * 2}
    seeds = {"free": 11, "H": 12}
    res = common.style_gate(model, tok, "toy_math", rows, openers, "Let me check", k=3, max_new_tokens=12, seeds=seeds)
    first = tok("Let me check", add_special_tokens=False)["input_ids"][0]
    p = []
    for r in rows:
        ids = tok(common.build_prompt(tok, "toy_math", r), return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            p.append(torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)[first].item())
    assert abs(res["p_first_checked"] - round(sum(p) / len(p), 4)) < 1e-4
    for mode, ops in openers.items():
        outs = common.generate(model, tok, [common.build_prompt(tok, "toy_math", r) + o for r, o in zip(rows, ops)], n=3,
                               max_new_tokens=12, temperature=1.0, seed=seeds[mode])
        assert res[mode]["len"] == round(sum(len(o["ids"]) for o in outs) / len(outs), 1)
        assert res[mode]["finished"] == round(sum(o["finished"] for o in outs) / len(outs), 4)
        assert 0 <= res[mode]["acc"] <= res[mode]["finished"]
    assert 0 <= res["free"]["checked_share"] <= 1 and "checked_share" not in res["H"]


def test_branch_probs_are_the_next_token_probabilities_where_the_references_part(tok):
    """Batched, left-padded: each row's two probabilities equal a plain forward of that row alone, at the
    first token where its two references differ; a pair that never parts is refused."""
    import torch
    from conftest import tiny_llama
    model = tiny_llama(len(tok), 32, 2, seed=6, tok=tok)
    rows = [{"prompt": "1+2?", "answer": "3", "meta": {"reference": {"H": "ok 3\n#### 3", "H2": "ok 3\nagain 3\n#### 3"}}},
            {"prompt": "a longer question", "answer": "5", "meta": {"reference": {"H": "x\n#### 5", "H2": "x\nmore\n#### 5"}}}]
    pr, keep = common.branch_probs(model, tok, "toy_math", rows, "H", "H2", batch_size=2)
    assert keep == [0, 1] and pr.shape == (2, 2)
    for j, r in enumerate(rows):
        p = tok(common.build_prompt(tok, "toy_math", r), add_special_tokens=False)["input_ids"]
        ia, ib = (tok(r["meta"]["reference"][s], add_special_tokens=False)["input_ids"] for s in ("H", "H2"))
        k = next(i for i in range(len(ia)) if ia[i] != ib[i])
        with torch.no_grad():
            q = torch.softmax(model(input_ids=torch.tensor([p + ia[:k]])).logits[0, -1].float(), -1)
        assert torch.allclose(pr[j], torch.stack([q[ia[k]], q[ib[k]]]), atol=1e-6)
    same = [{"prompt": "q", "answer": "1", "meta": {"reference": {"H": "#### 1", "H2": "#### 1"}}}]
    with pytest.raises(common.BadInput, match="do not part"):
        common.branch_probs(model, tok, "toy_math", same)


def test_probe_writes_each_models_fork_probabilities(world, tmp_path):
    out = tmp_path / "probe"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "probe.py"), "--data", str(world / "data"), "--out_dir", str(out),
                        "--n_prompts", "8", "--models", f"teacher={world / 'teacher'},student={world / 'student'}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "probe.json").read_text())
    for m in ("teacher", "student"):
        assert 0 < res[m]["n"] <= 8 and 0 <= res[m]["p_commit"] + res[m]["p_verify"] <= 1 + 1e-6
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "probe.py"), "--data", str(world / "data"), "--out_dir", str(tmp_path / "b"),
                          "--models", f"student={world / 'nothing'}"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --models student:"), bad.stderr
