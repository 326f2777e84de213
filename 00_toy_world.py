"""
Offline default world (DESIGN 7): synthetic tasks, two tokenizers and three tiny Llama models
(teacher, student, calibration target) trained from scratch and saved as plain Hugging Face
folders, so every later stage treats them exactly like Qwen3 checkpoints.

    python 00_toy_world.py --out_dir runs/toy/00_toy_world            # ~4 min on 2 CPU cores
    python 00_toy_world.py --out_dir /tmp/tw --smoke                  # ~20 s, for tests

Writes D/config.json (first), D/data/{toy_math,toy_qa}/{train,test}.jsonl, D/teacher, D/student,
D/target (model + tokenizer each), D/summary.json (greedy test accuracy per task, DESIGN 9).

Tasks
- toy_math: arithmetic word problems, easy (2 steps, 1-digit operands, start < 10) and hard
  (3 steps, start 5-15, bags up to 4 x 5; `meta.level`). Completions are a chain of thought in
  one of several styles at different frequencies (`meta.style`: step order, phrasing, number
  words, plus a "wait, check: ..., ok" verification line in ~20%) ending in `#### n`. This is the dark
  knowledge the teacher can pass on or hide (paper section 5); the recheck lines let self-check flips
  appear in stage 05. No test prompt is a training prompt, but the easy space is small: 80 of the
  104 easy test problems share start value and operations with a training problem (other names and
  items); 0 of the 96 hard ones do.
- toy_qa: 4-way multiple choice over invented facts ("What colour is the flag of Vortania?").
  There are more facts than the student can memorize, which gives the capacity gap; test asks
  about facts seen in training, and with 2 phrasings and 12 training rows per fact every test
  question is also a training question (200 of 200 at the defaults): toy_qa measures recall of
  memorized facts, the knowledge a teacher has and a student lacks. Each attribute has 4 values,
  always listed in the same order, so the letter is a memorized fact rather than an in-context
  match (which the tiny models could not learn in the time budget). Chance is 0.25.
Teacher and student share tokenizer A (byte-level BPE, digits split); the target uses tokenizer B
(smaller vocab, digits merged) so the cross-tokenizer code path runs by default.

Training text is `common.build_prompt(tok, task, row) + completion + eos`, loss on completion tokens only.
Sequences are bucketed by length (sorted inside chunks of 16 batches) so padding stays small.

Expected (seed 0, defaults, 2 CPU cores with nothing else running; measured 2026-11-23): 265 s in
all: data + tokenizers 0.6 s, teacher 800 steps 206 s (~8k tok/s), student 700 steps 38 s (~38k
tok/s), target 300 steps 13 s, greedy evals 4 s. Greedy accuracy on the 200 test prompts per task:
    teacher  3.27M params  toy_math 0.610 (easy 0.96, hard 0.23)  toy_qa 0.870
    student  0.46M params  toy_math 0.120 (easy 0.21, hard 0.02)  toy_qa 0.435
    target   0.26M params  toy_math 0.065                         toy_qa 0.340   (chance: 0 / 0.25)
The teacher's lr is 1e-3: at 3e-3 (and 1.5e-3) the 4-layer teacher learned slower per step than the
2-layer student (loss 1.10 vs 0.88 at step 300) and ended below it. An earlier, harder version of
the tasks (2-digit numbers, shuffled options) left a 300-step teacher at chance, so the operands are
1-digit and the option order is fixed (the answer letter is the memorized fact).
Knowledge gap (`--student_qa_known 0.5`, run_all.sh EXTRAS): by default the student trains on the
same ground truth as the teacher, so the teacher knows nothing the student could not have learned
from its own data, and a short distillation has nothing to transfer. With 0.5 the student sees the
toy_qa facts of half the countries only (test prompts still cover all of them): knowledge that only
the teacher holds, as with a real teacher and student. Data, tokenizers and the other models are
unchanged; summary.json records the countries the student saw and each model's train rows.
Departures: the paper's models are Qwen3/Gemma checkpoints; these are 0.3M-3M parameter Llamas
whose only purpose is to make every stage run, and every phenomenon have room to appear, in minutes.
"""
import argparse, math, os, random, sys, time

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (build_prompt, grade, generate: one definition for every stage)

# ----------------------------------------------------------------------------- config
p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out_dir", required=True, help="where everything is written")
p.add_argument("--seed", type=int, default=0, help="data, tokenizers, init and batch order")
p.add_argument("--smoke", action="store_true", help="tiny everything (~20 s), for tests; overrides the size, step and vocab flags")
# data
p.add_argument("--math_train", type=int, default=4000, help="toy_math train problems")
p.add_argument("--math_hard_frac", type=float, default=0.4, help="fraction of hard (3-step, larger operands) problems")
p.add_argument("--qa_entities", type=int, default=40, help="invented countries; facts = 5 x this")
p.add_argument("--qa_repeats", type=int, default=12, help="train questions per fact (one of 2 phrasings at random; options in a fixed order)")
p.add_argument("--n_test", type=int, default=200, help="test prompts per task")
p.add_argument("--check_frac", type=float, default=0.2, help="completions with a 'wait, check' line")
# tokenizers
p.add_argument("--vocab_a", type=int, default=512, help="tokenizer A (teacher, student)")
p.add_argument("--vocab_b", type=int, default=384, help="tokenizer B (target)")
# models: hidden / layers / steps / peak lr per role
p.add_argument("--teacher_hidden", type=int, default=256)
p.add_argument("--teacher_layers", type=int, default=4)
p.add_argument("--teacher_steps", type=int, default=800)
p.add_argument("--teacher_lr", type=float, default=1e-3)  # 3e-3 and 1.5e-3 learn slower at this depth (measured)
p.add_argument("--student_hidden", type=int, default=128)
p.add_argument("--student_layers", type=int, default=2)
p.add_argument("--student_steps", type=int, default=700)
p.add_argument("--student_lr", type=float, default=3e-3)
p.add_argument("--student_qa_known", type=float, default=1.0, help="share of the invented countries whose toy_qa facts the "
               "student trains on (1 = all, as the teacher; < 1 leaves knowledge that only the teacher has)")
p.add_argument("--target_hidden", type=int, default=96)
p.add_argument("--target_layers", type=int, default=2)
p.add_argument("--target_steps", type=int, default=300)
p.add_argument("--target_lr", type=float, default=3e-3)
p.add_argument("--batch_size", type=int, default=32, help="sequences per step")
p.add_argument("--warmup", type=int, default=40, help="linear warmup steps, then cosine to 10%%")
p.add_argument("--log_every", type=int, default=50, help="one progress line every N steps")
p.add_argument("--roles", default="teacher,student,target", help="which models to build (all by default)")
p.add_argument("--eval_batch", type=int, default=100, help="prompts per greedy generate call")
args = common.parse_args(p)
if args.smoke:  # small enough for a ~20 s subprocess test; accuracies are meaningless here
    args.math_train, args.qa_entities, args.qa_repeats, args.n_test = 600, 8, 3, 24
    # head_dim 32 for the models vLLM serves (its CPU attention takes 32, 64, 80, ...: BACKEND=vllm runs on CPU too)
    args.teacher_hidden, args.teacher_layers, args.student_hidden, args.student_layers, args.target_hidden = 64, 2, 64, 1, 32
    args.teacher_steps = args.student_steps = args.target_steps = 6
    args.vocab_a, args.vocab_b, args.warmup, args.log_every = 320, 300, 2, 3
ROLES = {"teacher": "A", "student": "A", "target": "B"}  # each model and its tokenizer
bad_roles = set(args.roles.split(",")) - set(ROLES)
if bad_roles:
    common.die(f"--roles {args.roles}: {','.join(sorted(bad_roles))} is not a role; choose from {','.join(ROLES)}")
for flag in ("warmup", "log_every", "batch_size"):
    if getattr(args, flag) < 1:
        common.die(f"--{flag} {getattr(args, flag)}: must be at least 1")

common.write_config(args.out_dir, args)
# summary.json is run_all.sh's "stage done" file: a rerun rewrites data/ and models first, so an old
# summary must not survive a kill halfway and mark a mixed world as done
if os.path.exists(os.path.join(args.out_dir, "summary.json")):
    os.remove(os.path.join(args.out_dir, "summary.json"))
common.seed_everything(args.seed)
T = {}  # seconds per phase
t0 = time.time()

# ----------------------------------------------------------------------------- toy_math
NAMES = [("Ana", "she"), ("Ben", "he"), ("Cara", "she"), ("Dev", "he"), ("Eli", "he"), ("Fay", "she"),
         ("Gus", "he"), ("Hana", "she"), ("Ivo", "he"), ("Juno", "she")]
ITEMS = ["apples", "pens", "coins", "books", "shells", "stamps", "cards", "eggs"]
WORDS = "zero one two three four five six seven eight nine ten".split()
# solution styles and their frequencies: a majority style and rarer ones a small model won't pick up
MATH_STYLES = {"steps": 0.5, "prose": 0.25, "net": 0.15, "words": 0.10}


def math_ops(rng, level):
    """Start value and op list [("add", g) | ("sub", g) | ("bags", k, m)], never going negative."""
    hard = level == "hard"
    a = rng.randint(5, 15) if hard else rng.randint(2, 9)
    ops, t = [], a
    for _ in range(3 if hard else 2):
        kind = rng.choice(["add", "sub", "bags"])
        if kind == "bags":
            k, m = rng.randint(2, 4 if hard else 3), rng.randint(2, 5 if hard else 3)
            ops.append(("bags", k, m)); t += k * m
        elif kind == "sub" and t >= 1:
            g = rng.randint(1, min(t, 9 if hard else 6)); ops.append(("sub", g)); t -= g
        else:
            g = rng.randint(1, 9 if hard else 6); ops.append(("add", g)); t += g
    return a, ops


def math_answer(start, ops):
    t = start
    for op in ops:
        t += op[1] * op[2] if op[0] == "bags" else (op[1] if op[0] == "add" else -op[1])
    return t


def math_prompt(name, pron, item, start, ops):
    s = [f"{name} has {start} {item}."]
    for i, op in enumerate(ops):
        then = "Then " + pron if i else pron.capitalize()
        if op[0] == "bags":
            s.append(f"{then} buys {op[1]} bags of {op[2]} {item}.")
        elif op[0] == "add":
            s.append(f"{then} finds {op[1]} more {item}.")
        else:
            s.append(f"{then} gives away {op[1]} {item}.")
    s.append(f"How many {item} does {pron} have now?")
    return " ".join(s)


def math_completion(style, check, start, ops, item):
    """Chain of thought in one style, optional verification line, final `#### n`."""
    lines, t = [], start
    if style == "net":  # different step order: total gains and losses first, then apply them
        gains, losses = [], []
        for op in ops:
            if op[0] == "bags":
                lines.append(f"{op[1]}*{op[2]}={op[1] * op[2]}"); gains.append(op[1] * op[2])
            else:
                (gains if op[0] == "add" else losses).append(op[1])
        g, l = sum(gains), sum(losses)
        if len(gains) > 1:
            lines.append(f"gain: {'+'.join(map(str, gains))}={g}")
        if len(losses) > 1:
            lines.append(f"loss: {'+'.join(map(str, losses))}={l}")
        if g:
            lines.append(f"{t}+{g}={t + g}"); t += g
        if l:
            lines.append(f"{t}-{l}={t - l}"); last = ("sub", l, t); t -= l
        else:
            last = ("add", g, t - g)
    else:
        sp = " " if style == "prose" else ""  # spacing differs by style too (and costs tokens)
        for op in ops:
            w = (lambda n: WORDS[n]) if style == "words" else str  # number words for small counts
            if op[0] == "bags":
                p_ = op[1] * op[2]
                pre = f"{w(op[1])} bags of {w(op[2])} is " if style in ("prose", "words") else ""
                lines.append(f"{pre}{op[1]}{sp}*{sp}{op[2]}{sp}={sp}{p_}")
                lines.append(("now " if style == "prose" else "") + f"{t}{sp}+{sp}{p_}{sp}={sp}{t + p_}")
                last, t = ("add", p_, t), t + p_
            elif op[0] == "add":
                lines.append((f"finds {op[1]}, so " if style == "prose" else "") + f"{t}{sp}+{sp}{op[1]}{sp}={sp}{t + op[1]}")
                last, t = ("add", op[1], t), t + op[1]
            else:
                lines.append((f"gives {op[1]}, so " if style == "prose" else "") + f"{t}{sp}-{sp}{op[1]}{sp}={sp}{t - op[1]}")
                last, t = ("sub", op[1], t), t - op[1]
    if check:  # undo the last operation: the recheck behaviour of DESIGN 7
        kind, g, before = last
        lines.append(f"wait, check: {t} {'-' if kind == 'add' else '+'} {g} = {before}, ok")
    lines.append(f"#### {t}")
    return "\n".join(lines)


def make_math(rng, n, seen):
    rows = []
    while len(rows) < n:
        level = "hard" if rng.random() < args.math_hard_frac else "easy"
        (name, pron), item = rng.choice(NAMES), rng.choice(ITEMS)
        start, ops = math_ops(rng, level)
        prompt = math_prompt(name, pron, item, start, ops)
        if prompt in seen:  # test problems never appear in train
            continue
        seen.add(prompt)
        style = rng.choices(list(MATH_STYLES), weights=list(MATH_STYLES.values()))[0]
        check = rng.random() < args.check_frac
        rows.append({"prompt": prompt, "answer": str(math_answer(start, ops)),
                     "completion": math_completion(style, check, start, ops, item),
                     "meta": {"level": level, "style": style + ("+check" if check else ""),
                              "start": start, "ops": [list(o) for o in ops]}})
    return rows


# ----------------------------------------------------------------------------- toy_qa
ATTRS = {  # attribute: (value pool, question templates, statement template)
    "flag": (["red", "blue", "green", "gold"],
             ["What colour is the flag of {e}?", "Which colour does the flag of {e} have?"],
             "The flag of {e} is {v}."),
    "animal": (["fox", "owl", "bear", "crane"],
               ["What is the national animal of {e}?", "Which animal is the symbol of {e}?"],
               "The national animal of {e} is the {v}."),
    "export": (["salt", "tin", "silk", "rice"],
               ["What does {e} export most?", "What is the main export of {e}?"],
               "The main export of {e} is {v}."),
    "currency": (["crown", "mark", "pearl", "shell"],
                 ["What is the currency of {e} called?", "Which currency is used in {e}?"],
                 "The currency of {e} is the {v}."),
    "sport": (["polo", "chess", "rowing", "archery"],
              ["What is the favourite sport in {e}?", "Which sport is most loved in {e}?"],
              "The favourite sport in {e} is {v}."),
}
QA_STYLES = {"statement": 0.5, "short": 0.3, "letter": 0.2}


def make_entities(rng, n):
    on = ["Vor", "Kel", "Zan", "Mir", "Tol", "Bras", "Quen", "Dal", "Fen", "Gor", "Hal", "Ix", "Jor", "Lum", "Nar", "Pel"]
    mid = ["a", "e", "i", "o", "ta", "ri", "lo", "du"]
    end = ["nia", "land", "mar", "via", "stan", "dor", "ria", "heim"]
    names = sorted({a + b + c for a in on for b in mid for c in end})
    return rng.sample(names, n)


def qa_row(rng, ent, attr, value, style=None):
    pool, questions, statement = ATTRS[attr]
    opts = list(pool)  # options always in pool order: the letter is a pure memorized fact
    letter = "ABCD"[opts.index(value)]
    prompt = rng.choice(questions).format(e=ent) + "\n" + "\n".join(f"{'ABCD'[i]}) {o}" for i, o in enumerate(opts))
    row = {"prompt": prompt, "answer": letter, "choices": opts, "meta": {"entity": ent, "attribute": attr, "value": value}}
    if style:
        say = {"statement": statement.format(e=ent, v=value) + "\n", "short": f"It is {value}.\n", "letter": ""}[style]
        row["completion"] = say + f"The answer is ({letter})"
        row["meta"]["style"] = style
    return row


def make_qa(rng):
    ents = make_entities(rng, args.qa_entities)
    facts = [(e, a, rng.choice(ATTRS[a][0])) for e in ents for a in ATTRS]
    train = [qa_row(rng, *f, style=rng.choices(list(QA_STYLES), weights=list(QA_STYLES.values()))[0])
             for f in facts for _ in range(args.qa_repeats)]
    rng.shuffle(train)
    test = [qa_row(rng, *f) for f in rng.sample(facts, min(args.n_test, len(facts)))]
    return train, test, len(facts)


rng = random.Random(args.seed)
seen = set()
math_test = make_math(rng, args.n_test, seen)
math_train = make_math(rng, args.math_train, seen)
qa_train, qa_test, n_facts = make_qa(rng)
DATA = {"toy_math": (math_train, math_test), "toy_qa": (qa_train, qa_test)}
_ents = sorted({r["meta"]["entity"] for r in qa_train})
STUDENT_KNOWS = set(random.Random(args.seed + 1).sample(_ents, round(args.student_qa_known * len(_ents))))
TRAIN_ROWS = {}  # role -> task -> train rows it saw
for task, (tr, te) in DATA.items():
    d = os.path.join(args.out_dir, "data", task)
    # test rows keep the gold completion out: answers come from the grader, not from a reference
    common.write_jsonl(os.path.join(d, "train.jsonl"), tr)
    common.write_jsonl(os.path.join(d, "test.jsonl"), [{k: v for k, v in r.items() if k != "completion"} for r in te])
T["data"] = time.time() - t0

# ----------------------------------------------------------------------------- tokenizers
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>"]


def train_tokenizer(vocab_size, split_digits):
    """Byte-level BPE on the corpus. A splits digits (arithmetic-friendly), B merges them."""
    tok = Tokenizer(models.BPE())
    bl = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bl]) if split_digits else bl
    tok.decoder = decoders.ByteLevel()
    corpus = [r["prompt"] + "\n" + r["completion"] for tr, _ in DATA.values() for r in tr]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", additional_special_tokens=SPECIALS[1:],
                                   chat_template=CHAT_TEMPLATE, padding_side="left", model_max_length=512)


t1 = time.time()
TOK = {"A": train_tokenizer(args.vocab_a, True), "B": train_tokenizer(args.vocab_b, False)}
T["tokenizers"] = time.time() - t1


def encode(tok, task, row):
    """Prompt ids + completion ids + eos; the prompt ends in <|assistant|>, so no merge crosses it."""
    p_ids = tok(common.build_prompt(tok, task, row), add_special_tokens=False)["input_ids"]
    c_ids = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p_ids, c_ids


# ----------------------------------------------------------------------------- training
def batches(examples, bs, steps, seed):
    """Shuffle each epoch, sort by length inside chunks of 16 batches, shuffle the batches."""
    if len(examples) < bs:  # no full batch in an epoch: the loop below would never end
        common.die(f"--batch_size {bs} is more than the {len(examples)} training rows; lower it or make more data")
    g, out = random.Random(seed), []
    while len(out) < steps:
        idx = list(range(len(examples)))
        g.shuffle(idx)
        chunk = bs * 16
        epoch = []
        for i in range(0, len(idx), chunk):
            part = sorted(idx[i:i + chunk], key=lambda j: len(examples[j][0]) + len(examples[j][1]))
            epoch += [part[k:k + bs] for k in range(0, len(part), bs) if len(part[k:k + bs]) == bs]
        g.shuffle(epoch)
        out += epoch
    return out[:steps]


def collate(examples, ids, pad_id):
    L = max(len(examples[j][0]) + len(examples[j][1]) for j in ids)
    x = torch.full((len(ids), L), pad_id, dtype=torch.long)
    y = torch.full((len(ids), L), -100, dtype=torch.long)  # loss on completion tokens only
    att = torch.zeros((len(ids), L), dtype=torch.long)
    for b, j in enumerate(ids):
        p_ids, c_ids = examples[j]
        s = p_ids + c_ids
        x[b, :len(s)], att[b, :len(s)] = torch.tensor(s), 1
        y[b, len(p_ids):len(s)] = torch.tensor(c_ids)
    return x, y, att


def train_model(role, tok, hidden, layers, steps, lr):
    torch.manual_seed(args.seed * 1000 + list(ROLES).index(role))  # own init per role
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                      intermediate_size=int(hidden * 8 / 3) // 8 * 8, num_attention_heads=max(2, hidden // 64),
                      num_key_value_heads=max(2, hidden // 64), max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    keep = [(task, r) for task, (tr, _) in DATA.items() for r in tr
            if role != "student" or task != "toy_qa" or r["meta"]["entity"] in STUDENT_KNOWS]
    TRAIN_ROWS[role] = {t: sum(task == t for task, _ in keep) for t in DATA}
    ex = [encode(tok, task, r) for task, r in keep]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = lambda s: min(1, (s + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    t, ntok, lsum = time.time(), 0, 0.0
    for step, ids in enumerate(batches(ex, args.batch_size, steps, args.seed)):
        x, y, att = collate(ex, ids, tok.pad_token_id)
        for gr in opt.param_groups:
            gr["lr"] = lr * sched(step)
        logits = model(input_ids=x, attention_mask=att).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        ntok += int(att.sum()); lsum += loss.item()
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            dt = time.time() - t
            print(f"{role} step {step + 1}/{steps} | loss {lsum / ((step % args.log_every) + 1):.3f} | "
                  f"{ntok / dt:.0f} tok/s | {dt:.0f}s | eta {dt / (step + 1) * (steps - step - 1):.0f}s", flush=True)
            lsum = 0.0
    model.eval()
    return model


# ----------------------------------------------------------------------------- eval
def greedy(model, tok, prompts, max_new):
    return common.generate(model, tok, prompts, n=1, max_new_tokens=max_new, greedy=True, batch_size=args.eval_batch)


def evaluate(model, tok):
    acc, samples = {}, {}
    for task, (tr, te) in DATA.items():
        longest = max(len(tok(r["completion"])["input_ids"]) for r in tr)
        outs = greedy(model, tok, [common.build_prompt(tok, task, r) for r in te], longest + 8)
        ok = [bool(common.grade(task, o["text"], r, o["finished"])) for o, r in zip(outs, te)]
        acc[task] = round(sum(ok) / len(te), 4)
        if task == "toy_math":  # split by level: the hard level is where the student should break
            for lv in ("easy", "hard"):
                sel = [g for g, r in zip(ok, te) if r["meta"]["level"] == lv]
                acc[f"toy_math_{lv}"] = round(sum(sel) / max(1, len(sel)), 4)
        samples[task] = outs[0]["text"]
    return acc, samples


# ----------------------------------------------------------------------------- run
summary = {"models": {}}
for role, tk in ROLES.items():
    if role not in args.roles.split(","):
        continue
    a = vars(args)
    t1 = time.time()
    model = train_model(role, TOK[tk], a[f"{role}_hidden"], a[f"{role}_layers"], a[f"{role}_steps"], a[f"{role}_lr"])
    T[f"train_{role}"] = time.time() - t1
    t1 = time.time()
    acc, samples = evaluate(model, TOK[tk])
    T[f"eval_{role}"] = time.time() - t1
    def save(d):  # the model and its tokenizer: an HF folder every later stage loads
        model.save_pretrained(d)
        TOK[tk].save_pretrained(d)
    common.atomic_save_dir(os.path.join(args.out_dir, role), save)
    summary["models"][role] = {"params": sum(p_.numel() for p_ in model.parameters()), "tokenizer": tk,
                               "vocab_size": len(TOK[tk]), "hidden": a[f"{role}_hidden"], "layers": a[f"{role}_layers"],
                               "train_steps": a[f"{role}_steps"], "train_rows": TRAIN_ROWS[role], "acc": acc, "sample": samples}
    print(f"{role}: {summary['models'][role]['params']:,} params | acc {acc} | "
          f"train {T[f'train_{role}']:.0f}s eval {T[f'eval_{role}']:.0f}s", flush=True)


def mix(rows):
    out = {}
    for r in rows:
        out[r["meta"]["style"]] = out.get(r["meta"]["style"], 0) + 1
    return {k: round(v / len(rows), 4) for k, v in sorted(out.items())}


summary.update({
    "chance": {"toy_math": 0.0, "toy_qa": 0.25},
    "sizes": {t: {"train": len(tr), "test": len(te)} for t, (tr, te) in DATA.items()} | {"qa_facts": n_facts},
    "student_qa_known": {"share": args.student_qa_known, "entities": sorted(STUDENT_KNOWS)},
    "style_mix": {"toy_math": mix(math_train), "toy_qa": mix(qa_train),
                  "toy_math_check_frac": round(sum("+check" in r["meta"]["style"] for r in math_train) / len(math_train), 4),
                  "toy_math_level_mix": mix([{"meta": {"style": r["meta"]["level"]}} for r in math_train])},
    "tokenizers": {k: {"vocab_size": len(t)} for k, t in TOK.items()},
    "seconds": {k: round(v, 1) for k, v in T.items()} | {"total": round(time.time() - t0, 1)},
    "grader": "common.grade",
})
common.atomic_write_json(os.path.join(args.out_dir, "summary.json"), summary)
print(f"done in {time.time() - t0:.0f}s -> {args.out_dir}/summary.json")
