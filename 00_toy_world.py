"""
Offline default world (DESIGN 7): two synthetic tasks, two tokenizers and tiny Llamas (teacher, student,
same-family calibration target; a cross-tokenizer target on request) trained from scratch and saved as
plain Hugging Face folders, so every later stage treats them exactly like Qwen3 checkpoints.

    python 00_toy_world.py --out_dir runs/toy/00_toy_world            # ~9 min on 2 CPU cores
    python 00_toy_world.py --out_dir /tmp/tw --smoke                  # ~20 s, for tests

The world gives the paper's mechanism (sections 6.4-6.5, appendix G) room to act:
- Valid solution styles per task, chosen by the first token of the completion. Direct (E): one line per
  step. Checked (H): "Let me check every ..." then an inverse check per step and a recount by another
  route whose result is the answer (math), or a yes/no per option and a restatement (qa). Checked twice
  (H2, toy_math): H, then the checked steps once more. All are correct; H is ~3x longer than E, H2 ~1.5x H,
  and in them a small model's slips compound. The corpus mixes them (50% checked, 30% of those twice).
- A short context, as a small model has: the student and the targets take 160 tokens (prompt +
  completion, --small_ctx), the teacher 512. H2 never fits 160, so the student never trains on it, and a
  student that imitates a teacher's long checks runs out of room before its final answer (the paper's
  misled students "fail to commit a final answer within the context window").
- Teacher-only knowledge: the student trains on the toy_qa facts of half the countries (--known_share),
  the teacher on all. Distilling from the teacher can therefore help the student.
- A same-family target (the student's tokenizer and shape, another seed, another half of the facts) as
  in the paper (Qwen3-0.6B for Qwen3-1.7B); `--roles ...,target_x` adds a cross-tokenizer target
  (tokenizer B) for run_all.sh's EXTRAS, so the cross-tokenizer reward keeps running.
- A gate in summary.json: each model's sampled accuracy with each style forced (the opener appended to the
  prompt), free sampling, the checked share and P(checked) at the first token, so anyone can check that
  the world has the property (teacher good at both styles, student worse at H) before anything is
  calibrated.

Tasks (chance: toy_math 0, toy_qa 0.25)
- toy_math: "Gus has 2 cards. He buys 5, finds 3, sells 4 and gets 1. How many cards does he have now?",
  3-4 additions/subtractions of 1-6 (--min_ops, --max_ops, --max_operand), never below 0; answer '#### n'.
- toy_qa: 4-way multiple choice over invented facts ("What colour is the flag of Vortania?"), the
  options always in the same order, so the letter is a memorized fact; answer 'The answer is (C)'.
  Test questions ask about every country, including the ones the student never saw.
Teacher, student and the same-family target share tokenizer A (byte-level BPE, whole numbers merged);
the cross-tokenizer target uses tokenizer B (smaller vocab, one digit per token).

Training text is `common.build_prompt(tok, task, row) + completion + eos`, loss on completion tokens
only, summed and divided by a constant (batch size x the corpus's mean completion length) rather than
by each batch's own token count: batches are bucketed by length, and a per-batch mean would weight a
short (direct) completion's first token ~3x more than a long (checked) one's, teaching every model to
open with the short style more often than the data does.

Writes D/config.json (first), D/data/{toy_math,toy_qa}/{train,test}.jsonl (train rows carry their
reference completion; meta.style says which style), D/{teacher,student,target,target_x} (model +
tokenizer), D/summary.json (greedy test accuracy per task as DESIGN 9 asks, and the gate).
Expected time and numbers: see docs/RESULTS.md (measured on 2 CPU cores, seed 0).
Departures: the paper's models are Qwen3/Gemma checkpoints; these are 0.5M-2M parameter Llamas whose only
purpose is to make every stage run, and every phenomenon have room to appear, in minutes. The styles and
the short context are built in, where a real model's are learned: the toy world shows the paper's
mechanism when it exists, it cannot show that real models have it.
"""
import argparse, math, os, random, sys, time

import torch
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
p.add_argument("--math_train", type=int, default=6000, help="toy_math train problems")
p.add_argument("--min_ops", type=int, default=3, help="fewest operations per toy_math problem")
p.add_argument("--max_ops", type=int, default=4, help="most operations per toy_math problem")
p.add_argument("--max_operand", type=int, default=6, help="largest number added or taken away in one toy_math step")
p.add_argument("--checked_frac", type=float, default=0.5, help="share of train completions in the checked (H) style")
p.add_argument("--again_frac", type=float, default=0.3, help="share of checked toy_math completions that verify a second time (H2)")
p.add_argument("--qa_entities", type=int, default=40, help="invented countries; facts = 5 x this")
p.add_argument("--qa_repeats", type=int, default=12, help="train questions per fact (one of 2 phrasings, options in a fixed order)")
p.add_argument("--known_share", type=float, default=0.5, help="share of the countries whose toy_qa facts the student (and, "
               "another draw, the target) trains on; the teacher trains on all")
p.add_argument("--n_test", type=int, default=200, help="test prompts per task")
p.add_argument("--n_gate", type=int, default=100, help="test prompts per task in the style gate")
p.add_argument("--gate_samples", type=int, default=4, help="samples per prompt (T=1) in the style gate")
# tokenizers
p.add_argument("--vocab_a", type=int, default=512, help="tokenizer A (teacher, student, target)")
p.add_argument("--vocab_b", type=int, default=384, help="tokenizer B (target_x)")
p.add_argument("--digits_a", default="merge", choices=["merge", "split"], help="tokenizer A: whole numbers as BPE tokens or one digit per token (B does the other)")
# models: hidden / layers / steps / peak lr per role
p.add_argument("--teacher_hidden", type=int, default=192)
p.add_argument("--teacher_layers", type=int, default=4)
p.add_argument("--teacher_steps", type=int, default=1200)
p.add_argument("--teacher_lr", type=float, default=1.5e-3)
p.add_argument("--student_hidden", type=int, default=128)
p.add_argument("--student_layers", type=int, default=2)
p.add_argument("--student_steps", type=int, default=800)
p.add_argument("--student_lr", type=float, default=3e-3)
p.add_argument("--target_hidden", type=int, default=128, help="same-family target: the student's shape")
p.add_argument("--target_layers", type=int, default=2)
p.add_argument("--target_steps", type=int, default=500)
p.add_argument("--target_lr", type=float, default=3e-3)
p.add_argument("--target_x_hidden", type=int, default=128, help="cross-tokenizer target (tokenizer B)")
p.add_argument("--target_x_layers", type=int, default=2)
p.add_argument("--target_x_steps", type=int, default=800)
p.add_argument("--target_x_lr", type=float, default=3e-3)
p.add_argument("--small_ctx", type=int, default=160, help="context window (max_position_embeddings, prompt + completion) of the "
               "student and the targets; the teacher's is 512. A small model's short context: checked-twice (H2) answers "
               "do not fit it, so a student that imitates them runs out of room")
p.add_argument("--batch_size", type=int, default=32, help="sequences per step")
p.add_argument("--warmup", type=int, default=40, help="linear warmup steps, then cosine to 10 percent")
p.add_argument("--log_every", type=int, default=100, help="one progress line every N steps")
p.add_argument("--roles", default="teacher,student,target", help="which models to build (target_x: the cross-tokenizer target, "
               "for run_all.sh's EXTRAS and SMOKE runs)")
p.add_argument("--eval_batch", type=int, default=200, help="sequences per generate call in the evals")
p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
args = common.parse_args(p)
if args.smoke:  # small enough for a ~20 s subprocess test; accuracies are meaningless here
    args.math_train, args.qa_entities, args.qa_repeats, args.n_test, args.n_gate, args.gate_samples = 600, 8, 3, 24, 8, 2
    # head_dim 32 for the models vLLM serves (its CPU attention takes 32, 64, 80, ...: BACKEND=vllm runs on CPU too)
    for r, (h, l) in {"teacher": (64, 2), "student": (64, 1), "target": (64, 1), "target_x": (32, 1)}.items():
        setattr(args, f"{r}_hidden", h), setattr(args, f"{r}_layers", l), setattr(args, f"{r}_steps", 6)
    args.vocab_a, args.vocab_b, args.warmup, args.log_every, args.small_ctx = 320, 300, 2, 3, 256
ROLES = {"teacher": "A", "student": "A", "target": "A", "target_x": "B"}  # each model and its tokenizer
bad_roles = set(args.roles.split(",")) - set(ROLES)
if bad_roles:
    common.die(f"--roles {args.roles}: {','.join(sorted(bad_roles))} is not a role; choose from {','.join(ROLES)}")
for flag in ("warmup", "log_every", "batch_size", "math_train", "n_test", "n_gate", "gate_samples", "qa_entities", "qa_repeats",
             "min_ops"):
    if getattr(args, flag) < 1:
        common.die(f"--{flag} {getattr(args, flag)}: must be at least 1")
if args.max_ops < args.min_ops or not 0 <= args.checked_frac <= 1 or not 0 < args.known_share <= 1:
    common.die(f"--min_ops {args.min_ops} --max_ops {args.max_ops} --checked_frac {args.checked_frac} --known_share {args.known_share}: "
               "need min_ops <= max_ops, checked_frac in [0, 1], known_share in (0, 1]")

common.write_config(args.out_dir, args)
# summary.json is run_all.sh's "stage done" file: a rerun rewrites data/ and models first, so an old
# summary must not survive a kill halfway and mark a mixed world as done
if os.path.exists(os.path.join(args.out_dir, "summary.json")):
    os.remove(os.path.join(args.out_dir, "summary.json"))
common.seed_everything(args.seed)
if args.threads:
    torch.set_num_threads(args.threads)
T = {}  # seconds per phase
t0 = time.time()

# ----------------------------------------------------------------------------- toy_math
NAMES = [("Ana", "she"), ("Ben", "he"), ("Cara", "she"), ("Dev", "he"), ("Eli", "he"), ("Fay", "she"),
         ("Gus", "he"), ("Hana", "she"), ("Ivo", "he"), ("Juno", "she")]
ITEMS = ["apples", "pens", "coins", "books", "shells", "stamps", "cards", "eggs"]
GAIN = ["finds", "gets", "buys"]
LOSS = ["gives away", "loses", "sells"]
OPENER = {"toy_math": "Let me check every step.", "toy_qa": "Let me check every option."}  # the checked style's first line


def math_ops(rng):
    """Start value and a list of ("add" | "sub", g, verb), the running total never below 0."""
    a, ops = rng.randint(2, 9), []
    t = a
    for _ in range(rng.randint(args.min_ops, args.max_ops)):
        if t >= 3 and rng.random() < 0.45:
            g = rng.randint(1, min(args.max_operand, t)); ops.append(("sub", g, rng.choice(LOSS))); t -= g
        else:
            g = rng.randint(1, args.max_operand); ops.append(("add", g, rng.choice(GAIN))); t += g
    return a, ops, t


def math_prompt(name, pron, item, a, ops):
    """'Gus has 2 cards. He buys 5, finds 3, sells 4 and gets 1. How many cards does he have now?'
    ops: [("add" | "sub", g, verb)]."""
    clauses = [f"{verb} {g}" for _, g, verb in ops]
    return (f"{name} has {a} {item}. {pron.capitalize()} {', '.join(clauses[:-1])} and {clauses[-1]}. "
            f"How many {item} does {pron} have now?")


def apply(x, k, g, verb):
    """One step, written the way every style writes it: the clause it comes from, then the arithmetic."""
    u = x + g if k == "add" else x - g
    return u, f"{verb} {g}: {x}{'+' if k == 'add' else '-'}{g}={u}"


def math_completion(style, a, ops):
    """Direct (E): one line per operation, in the order asked (each line restates its clause, so finding
    the next operand is a copy of the next clause). Checked (H): each step with its inverse, then a
    recount with the gains first and the losses after (the same total through new intermediate values,
    so it cannot be copied from the lines above, and finding the operands means skipping the losses);
    the recount's result is the answer. H2 then goes through the checked steps once more (~1.5x H: longer than a
    small model's window, --small_ctx)."""
    x, lines = a, []
    for k, g, verb in ops:
        u, line = apply(x, k, g, verb)
        inv = f"{u}-{g}={x}" if k == "add" else f"{u}+{g}={x}"
        lines.append(line if style == "E" else f"{line}, check: {inv}")  # H, H2
        x = u
    if style == "E":
        return "\n".join(lines + [f"#### {x}"])
    y, rc = a, []
    for op in [o for o in ops if o[0] == "add"] + [o for o in ops if o[0] == "sub"]:
        y, line = apply(y, *op)
        rc.append(line)
    assert y == x
    more = ["Let me verify again, step by step:"] + lines if style == "H2" else []  # the checked steps once more
    return "\n".join([OPENER["toy_math"]] + lines + ["Let me verify, gains first: " + ", ".join(rc)] + more + [f"#### {y}"])


def make_math(rng, n, seen):
    rows = []
    while len(rows) < n:
        (name, pron), item = rng.choice(NAMES), rng.choice(ITEMS)
        a, ops, t = math_ops(rng)
        prompt = math_prompt(name, pron, item, a, ops)
        if prompt in seen:  # test problems never appear in train
            continue
        seen.add(prompt)
        style = ("H2" if rng.random() < args.again_frac else "H") if rng.random() < args.checked_frac else "E"
        rows.append({"prompt": prompt, "answer": str(t), "completion": math_completion(style, a, ops),
                     "meta": {"style": style, "start": a, "ops": [[k, g] for k, g, _ in ops], "n_ops": len(ops),
                              "reference": {s: math_completion(s, a, ops) for s in ("E", "H", "H2")}}})
    return rows


# ----------------------------------------------------------------------------- toy_qa
ATTRS = {  # attribute: (value pool, question templates, statement template)
    "flag": (["red", "blue", "green", "gold"],
             ["What colour is the flag of {e}?", "Which colour does the flag of {e} have?"], "The flag of {e} is {v}."),
    "animal": (["fox", "owl", "bear", "crane"],
               ["What is the national animal of {e}?", "Which animal is the symbol of {e}?"], "The national animal of {e} is the {v}."),
    "export": (["salt", "tin", "silk", "rice"],
               ["What does {e} export most?", "What is the main export of {e}?"], "The main export of {e} is {v}."),
    "currency": (["crown", "mark", "pearl", "shell"],
                 ["What is the currency of {e} called?", "Which currency is used in {e}?"], "The currency of {e} is the {v}."),
    "sport": (["polo", "chess", "rowing", "archery"],
              ["What is the favourite sport in {e}?", "Which sport is most loved in {e}?"], "The favourite sport in {e} is {v}."),
}


def make_entities(rng, n):
    on = ["Vor", "Kel", "Zan", "Mir", "Tol", "Bras", "Quen", "Dal", "Fen", "Gor", "Hal", "Ix", "Jor", "Lum", "Nar", "Pel"]
    mid = ["a", "e", "i", "o", "ta", "ri", "lo", "du"]
    end = ["nia", "land", "mar", "via", "stan", "dor", "ria", "heim"]
    return rng.sample(sorted({a + b + c for a in on for b in mid for c in end}), n)


def qa_completion(style, ent, attr, value):
    """Direct (E): the fact, then the letter. Checked (H): a yes/no per option, the fact restated, then
    the letter."""
    pool, _, statement = ATTRS[attr]
    letter = "ABCD"[pool.index(value)]
    fact = statement.format(e=ent, v=value)
    if style == "E":
        return f"{fact}\nThe answer is ({letter})"
    checks = [f"{'ABCD'[i]}) {o}: {'yes' if o == value else 'no'}" for i, o in enumerate(pool)]
    return "\n".join([OPENER["toy_qa"]] + checks + [f"Let me verify: {fact[0].lower()}{fact[1:]}", f"The answer is ({letter})"])


def qa_row(rng, ent, attr, value, style=None):
    pool, questions, _ = ATTRS[attr]
    prompt = rng.choice(questions).format(e=ent) + "\n" + "\n".join(f"{'ABCD'[i]}) {o}" for i, o in enumerate(pool))
    row = {"prompt": prompt, "answer": "ABCD"[pool.index(value)], "choices": list(pool),
           "meta": {"entity": ent, "attribute": attr, "value": value, "reference": {s: qa_completion(s, ent, attr, value) for s in "EH"}}}
    if style:
        row["completion"], row["meta"]["style"] = qa_completion(style, ent, attr, value), style
    return row


def make_qa(rng):
    ents = make_entities(rng, args.qa_entities)
    facts = [(e, a, rng.choice(ATTRS[a][0])) for e in ents for a in ATTRS]
    train = [qa_row(rng, *f, style="H" if rng.random() < args.checked_frac else "E") for f in facts for _ in range(args.qa_repeats)]
    rng.shuffle(train)
    test = [qa_row(rng, *f) for f in rng.sample(facts, min(args.n_test, len(facts)))]
    return ents, train, test


rng = random.Random(args.seed)
seen = set()
math_test = make_math(rng, args.n_test, seen)
math_train = make_math(rng, args.math_train, seen)
ENTS, qa_train, qa_test = make_qa(rng)
DATA = {"toy_math": (math_train, math_test), "toy_qa": (qa_train, qa_test)}
# teacher-only knowledge: the student knows the facts of one half of the countries, the target of another draw
n_known = max(1, round(args.known_share * len(ENTS)))
KNOWS = {r: set(random.Random(common.derive_seed(args.seed, "knows", r)).sample(ENTS, n_known)) for r in ("student", "target")}
KNOWS["target_x"] = KNOWS["target"]
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
    """Byte-level BPE on the corpus, numbers either merged (BPE learns a token for each frequent number) or split
    into one token per digit; A and B differ in this, so their token boundaries differ inside every number."""
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
TOK = {"A": train_tokenizer(args.vocab_a, args.digits_a == "split"), "B": train_tokenizer(args.vocab_b, args.digits_a != "split")}
T["tokenizers"] = time.time() - t1


def encode(tok, task, row):
    """Prompt ids, and each style's completion ids + eos; the prompt ends in <|assistant|>, so no merge crosses it."""
    p_ids = tok(common.build_prompt(tok, task, row), add_special_tokens=False)["input_ids"]
    return p_ids, {s: tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s, c in row["meta"]["reference"].items()}


# ----------------------------------------------------------------------------- training
def train_model(role, tok, hidden, layers, steps, lr):
    torch.manual_seed(common.derive_seed(args.seed, "init", role))  # own init per role
    ctx = 512 if role == "teacher" else args.small_ctx
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                      intermediate_size=int(hidden * 8 / 3) // 8 * 8, num_attention_heads=max(2, hidden // 64),
                      num_key_value_heads=max(2, hidden // 64), max_position_embeddings=ctx, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, do_sample=False)
    knows = KNOWS.get(role)  # None: every country (the teacher)
    keep = [(task, r) for task, (tr, _) in DATA.items() for r in tr if task != "toy_qa" or knows is None or r["meta"]["entity"] in knows]
    TRAIN_ROWS[role] = {t: sum(task == t for task, _ in keep) for t in DATA}
    items = [(task, *encode(tok, task, r)) for task, r in keep]  # (task, prompt ids, {style: completion ids})
    # a completion that does not fit the model's window is not trained on (the model could never write it)
    TRAIN_ROWS[role]["beyond_window"] = {s_: sum(len(p_) + len(cs[s_]) > ctx for _, p_, cs in items if s_ in cs) for s_ in ("E", "H", "H2")}
    items = [(t_, p_, {s_: c for s_, c in cs.items() if len(p_) + len(c) <= ctx}) for t_, p_, cs in items]
    # a constant divisor, not each batch's token count: see the docstring (length-bucketed batches)
    g_ = random.Random(0)
    norm = args.batch_size * sum(len(c[common.draw_style(g_, t, args.checked_frac, args.again_frac, c)])
                                 for t, _, c in items) / len(items)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = lambda s: min(1, (s + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    t, ntok, lsum, ltok = time.time(), 0, 0.0, 0
    batches = common.style_mix_batches(items, args.batch_size, steps, common.derive_seed(args.seed, "batches", role),
                                       args.checked_frac, args.again_frac)
    for step, halves in enumerate(batches):
        for gr in opt.param_groups:
            gr["lr"] = lr * sched(step)
        for part in (h for h in halves if h):  # the direct and the checked half, each padded to its own length
            x, y, att = common.lm_batch([(items[i][1], items[i][2][st]) for i, st in part], tok.pad_token_id)
            logits = model(input_ids=x, attention_mask=att).logits  # (b, T, V)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100, reduction="sum")
            (nll / norm).backward()
            ntok += int(att.sum()); lsum += nll.item(); ltok += int((y != -100).sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            dt = time.time() - t
            print(f"{role} step {step + 1}/{steps} | loss {lsum / max(ltok, 1):.3f} | {ntok / dt:.0f} tok/s | {dt:.0f}s | "
                  f"eta {common.fmt_secs(dt / (step + 1) * (steps - step - 1))}", flush=True)
            lsum, ltok = 0.0, 0
    model.eval()
    return model


# ----------------------------------------------------------------------------- evals: greedy accuracy and the style gate
def greedy_acc(model, tok):
    """Greedy strict accuracy per task on every test prompt (DESIGN 9's summary.json field), and one sample."""
    acc, samples = {}, {}
    for task, (_, te) in DATA.items():
        outs = common.generate(model, tok, [common.build_prompt(tok, task, r) for r in te], greedy=True, batch_size=args.eval_batch,
                               max_new_tokens=32 if args.smoke else common.TASKS[task]["max_new_tokens"])
        acc[task] = round(sum(bool(common.grade(task, o["text"], r, o["finished"])) for o, r in zip(outs, te)) / len(te), 4)
        samples[task] = outs[0]["text"]
    return acc, samples


def gate(model, tok):
    """Per task: strict sampled accuracy (T=1) with each style forced (H: the whole first line; E: the first
    token of the row's direct reference), free sampling, and P(first token opens the checked style)."""
    out = {}
    for task, (_, te) in DATA.items():
        rows = te[:args.n_gate]
        openers = {"free": [""] * len(rows), "H": [OPENER[task] + "\n"] * len(rows),
                   "E": [tok.decode(tok(r["meta"]["reference"]["E"], add_special_tokens=False)["input_ids"][:1]) for r in rows]}
        out[task] = common.style_gate(model, tok, task, rows, openers, OPENER[task], k=args.gate_samples,
                                      max_new_tokens=32 if args.smoke else common.TASKS[task]["max_new_tokens"],
                                      seeds={m: common.derive_seed(args.seed, "gate", task, m) for m in openers},
                                      batch_size=args.eval_batch)
        if task == "toy_qa" and KNOWS:  # the knowledge gap: accuracy on countries the student saw vs not
            seen_ = [r["meta"]["entity"] in KNOWS["student"] for r in rows]
            out[task]["student_countries_share"] = round(sum(seen_) / len(seen_), 4)
    return out


# ----------------------------------------------------------------------------- run
summary, TRAIN_ROWS = {"models": {}}, {}
for role, tk in ROLES.items():
    if role not in args.roles.split(","):
        continue
    a = vars(args)
    t1 = time.time()
    model = train_model(role, TOK[tk], a[f"{role}_hidden"], a[f"{role}_layers"], a[f"{role}_steps"], a[f"{role}_lr"])
    T[f"train_{role}"] = time.time() - t1
    t1 = time.time()
    acc, samples = greedy_acc(model, TOK[tk])
    g = gate(model, TOK[tk])
    T[f"eval_{role}"] = time.time() - t1

    def save(d):  # the model and its tokenizer: an HF folder every later stage loads
        model.save_pretrained(d)
        TOK[tk].save_pretrained(d)
    common.atomic_save_dir(os.path.join(args.out_dir, role), save)
    summary["models"][role] = {"params": common.n_params(model), "tokenizer": tk, "vocab_size": len(TOK[tk]),
                               "hidden": a[f"{role}_hidden"], "layers": a[f"{role}_layers"], "train_steps": a[f"{role}_steps"],
                               "train_rows": TRAIN_ROWS[role], "acc": acc, "gate": g, "sample": samples}
    print(f"{role}: {summary['models'][role]['params']:,} params | greedy acc {acc} | train {T[f'train_{role}']:.0f}s "
          f"eval {T[f'eval_{role}']:.0f}s", flush=True)
    for task, r in g.items():
        print(f"  gate {task}: sampled acc free {r['free']['acc']:.3f} (checked {r['free']['checked_share']:.2f}, "
              f"P(first) {r['p_first_checked']:.2f}) | E forced {r['E']['acc']:.3f} | H forced {r['H']['acc']:.3f} "
              f"(len {r['E']['len']:.0f} / {r['H']['len']:.0f}, finished {r['H']['finished']:.2f})", flush=True)


def mix(rows):
    out = {}
    for r in rows:
        out[r["meta"]["style"]] = out.get(r["meta"]["style"], 0) + 1
    return {k: round(v / len(rows), 4) for k, v in sorted(out.items())}


summary.update({
    "chance": {"toy_math": 0.0, "toy_qa": 0.25},
    "sizes": {t: {"train": len(tr), "test": len(te)} for t, (tr, te) in DATA.items()} | {"qa_facts": len(ENTS) * len(ATTRS)},
    "knows": {r: sorted(k) for r, k in KNOWS.items() if r != "target_x"},
    "style_mix": {t: mix(tr) for t, (tr, _) in DATA.items()},
    "tokenizers": {k: {"vocab_size": len(t)} for k, t in TOK.items()},
    "seconds": {k: round(v, 1) for k, v in T.items()} | {"total": round(time.time() - t0, 1)},
    "grader": "common.grade (strict)",
})
common.atomic_write_json(os.path.join(args.out_dir, "summary.json"), summary)
print(f"done in {time.time() - t0:.0f}s -> {args.out_dir}/summary.json")
