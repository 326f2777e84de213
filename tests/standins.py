"""
Offline stand-ins for PRESET=small's models: random weights built from the exact configs of
Qwen/Qwen2.5-1.5B-Instruct (teacher), Qwen/Qwen2.5-0.5B-Instruct (student) and
HuggingFaceTB/SmolLM2-135M-Instruct (cross-tokenizer calibration target), written as ordinary HF
folders, plus a local data folder in the form users have it (gsm8k's question/answer columns with
'#### n' answers; a CommonsenseQA-style multiple-choice file). No download anywhere.

    python tests/standins.py runs/small_standins      # -> teacher/ student/ target/ data/
    TEACHER=runs/small_standins/teacher STUDENT=runs/small_standins/student TARGET=runs/small_standins/target \
        DATA=runs/small_standins/data PRESET=small SMOKE=1 bash run_all.sh

What is real and what is not:
- configs: the three models' config.json values, written below; scale() keeps vocabulary size, special
  token ids, head counts, rope, norms and tying, and shrinks depth (2 layers) and head width (4) so a CPU
  runs them in seconds.
- Qwen2.5 tokenizer: the real one. Its vocabulary is its byte-level BPE merge list (the merges.txt
  shipped with Qwen2/Qwen2.5, Apache-2.0), stored xz-compressed in tests/assets; token ids follow from
  it (the 256 byte symbols, then one token per merge in rank order: 151,643 ids, checked against the
  real vocab.json when the asset was made), then Qwen2.5's 22 added tokens from 151,643 on. The
  pre-tokenizer regex, NFC normalizer and byte-level decoder are Qwen2's (transformers'
  Qwen2Tokenizer builds the same). The model's embedding has 151,936 rows, as the real one.
- SmolLM2 tokenizer: a STAND-IN. Its real 49,152-token vocabulary is not available offline here. This
  one has the same size and layout (its 17 special tokens at ids 0-16, the byte symbols next, then BPE
  merges; here the first 48,879 merges of Qwen's list), SmolLM2's pre-tokenizer (single digits, GPT-2
  byte-level regex) and its real chat template: a different tokenization of the same text, which is
  what the cross-tokenizer path needs.
- chat templates: Qwen2.5-Instruct's and SmolLM2-Instruct's, verbatim.
"""
import json
import lzma
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

SMOLLM2_TEMPLATE = (r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    r"{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
                    r"{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                    r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Qwen2.5's added tokens, ids 151643.. in this order (<tool_call> and </tool_call> are not special)
QWEN25_ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
SMOLLM2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
                   "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
                   "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>"]
QWEN2_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# config.json of each model (hub values; architectures and dtype as published)
QWEN25_1_5B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0, "bos_token_id": 151643,
               "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
               "intermediate_size": 8960, "max_position_embeddings": 32768, "max_window_layers": 21,
               "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
               "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
               "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
QWEN25_0_5B = {**QWEN25_1_5B, "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14, "num_hidden_layers": 24,
               "max_window_layers": 21}
SMOLLM2_135M = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "attention_dropout": 0.0,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu", "hidden_size": 576,
                "initializer_range": 0.041666666666666664, "intermediate_size": 1536, "max_position_embeddings": 8192,
                "mlp_bias": False, "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
                "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000,
                "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49152}
# generation_config.json: Qwen2.5-Instruct stops at <|im_end|> or <|endoftext|>
QWEN25_GEN = {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643]}
SMOLLM2_GEN = {"bos_token_id": 1, "pad_token_id": 2, "eos_token_id": 2}


def byte_symbols():
    """GPT-2's bytes -> printable characters, in the order byte-level vocabularies list them."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def qwen2_merges():
    with lzma.open(os.path.join(HERE, "assets", "qwen2_merges.txt.xz"), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(l.split(" ")) for l in lines[1:] if l]  # line 0: '#version: 0.2'


def _bpe_tokenizer(vocab, merges, pre, added, template, eos, pad, bos=None, unk=None, nfc=False):
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer, tk.decoder = pre, decoders.ByteLevel()
    if nfc:
        tk.normalizer = normalizers.NFC()
    tk.add_tokens([AddedToken(t, special=special, normalized=False) for t, special in added])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token=pad, bos_token=bos, unk_token=unk,
                                  additional_special_tokens=[t for t, special in added if special and t not in (eos, pad, bos, unk)])
    tok.chat_template = template
    return tok


def qwen25_tokenizer():
    """The real Qwen2.5 tokenizer (vocabulary from its merges, see the docstring)."""
    from tokenizers import Regex, pre_tokenizers
    merges = qwen2_merges()
    vocab = {s: i for i, s in enumerate(byte_symbols())}
    vocab.update({a + b: 256 + i for i, (a, b) in enumerate(merges)})
    assert len(vocab) == 151643, len(vocab)
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    added = [(t, t not in ("<tool_call>", "</tool_call>")) for t in QWEN25_ADDED]
    tok = _bpe_tokenizer(vocab, merges, pre, added, QWEN25_TEMPLATE, eos="<|im_end|>", pad="<|endoftext|>", nfc=True)
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643 and tok.convert_tokens_to_ids("<|file_sep|>") == 151664
    return tok


def smollm2_standin_tokenizer():
    """SmolLM2's layout and template on a stand-in vocabulary of its size (see the docstring)."""
    from tokenizers import pre_tokenizers
    merges = qwen2_merges()[:49152 - len(SMOLLM2_SPECIAL) - 256]  # ranked: every merge's parts come before it
    vocab = {t: i for i, t in enumerate(SMOLLM2_SPECIAL + byte_symbols() + [a + b for a, b in merges])}
    pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok = _bpe_tokenizer(vocab, merges, pre, [(t, True) for t in SMOLLM2_SPECIAL], SMOLLM2_TEMPLATE,
                         eos="<|im_end|>", pad="<|im_end|>", bos="<|im_start|>", unk="<|endoftext|>")
    assert len(tok) == 49152 and tok.convert_tokens_to_ids("<|im_end|>") == 2
    return tok


def scale(cfg, layers=2, head_dim=4):
    """The config at CPU-test size: same vocabulary, special ids, head counts, rope, norm and tying;
    `layers` layers and heads `head_dim` wide (hidden and MLP widths shrink in proportion)."""
    hidden = cfg["num_attention_heads"] * head_dim
    return {**cfg, "num_hidden_layers": layers, "hidden_size": hidden, "head_dim": head_dim,
            "intermediate_size": max(8, round(cfg["intermediate_size"] * hidden / cfg["hidden_size"])),
            **({"max_window_layers": layers} if "max_window_layers" in cfg else {})}


def write_model(path, cfg, gen, tok, seed):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    torch.manual_seed(seed)
    c = dict(cfg)
    config = AutoConfig.for_model(c.pop("model_type"), **{k: v for k, v in c.items() if k != "torch_dtype"})
    model = AutoModelForCausalLM.from_config(config).eval()
    model.generation_config = GenerationConfig(**gen)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def write_data(path, n_train=120, n_test=40, seed=0):
    """<path>/gsm8k/{train,test}.jsonl (gsm8k's own columns: question, answer '... #### n') and
    <path>/csqa/{train,test}.jsonl (question, choices {label, text}, answer letter)."""
    rng = random.Random(seed)
    names, items = ["Ava", "Ben", "Cleo", "Dev", "Ema"], ["apples", "pens", "stickers", "coins", "books"]
    for split, n in (("train", n_train), ("test", n_test)):
        math_rows, mc_rows = [], []
        for i in range(n):
            who, what, a, b, c = rng.choice(names), rng.choice(items), rng.randint(2, 60), rng.randint(2, 30), rng.randint(2, 5)
            q = f"{who} has {a} {what}, gets {b} more, then gives away a {c}th of them rounded down. How many {what} are left? ({split} {i})"
            left = a + b - (a + b) // c
            math_rows.append({"question": q, "answer": f"{who} has {a} + {b} = {a + b} {what}. {(a + b) // c} are given away.\n#### {left}"})
            opts = rng.sample(["a kitchen", "a library", "a garden", "a garage", "a school", "an office", "a beach"], 5)
            k = rng.randrange(5)
            mc_rows.append({"question": f"Where would you most likely find {what} for {who}? ({split} {i}, hint: {opts[k]})",
                            "choices": {"label": list("ABCDE"), "text": opts}, "answer": "ABCDE"[k]})
        for task, rows in (("gsm8k", math_rows), ("csqa", mc_rows)):
            os.makedirs(os.path.join(path, task), exist_ok=True)
            with open(os.path.join(path, task, f"{split}.jsonl"), "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))


def main(out, layers=2, head_dim=4):
    qtok, stok = qwen25_tokenizer(), smollm2_standin_tokenizer()
    for name, cfg, gen, tok, seed in (("teacher", QWEN25_1_5B, QWEN25_GEN, qtok, 1), ("student", QWEN25_0_5B, QWEN25_GEN, qtok, 2),
                                      ("target", SMOLLM2_135M, SMOLLM2_GEN, stok, 3)):
        write_model(os.path.join(out, name), scale(cfg, layers, head_dim), gen, tok, seed)
    write_data(os.path.join(out, "data"))
    print(f"stand-ins: {out}/teacher (Qwen2.5-1.5B-Instruct config), {out}/student (Qwen2.5-0.5B-Instruct), "
          f"{out}/target (SmolLM2-135M-Instruct, stand-in vocabulary), {out}/data (gsm8k, csqa)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/standins.py OUT_DIR")
    main(sys.argv[1])
