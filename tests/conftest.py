"""Tiny offline fixtures: a character-level tokenizer with a chat template and random-weight Llama
models built from a config, saved as ordinary HF folders. No hub access anywhere."""
import os
import sys

import pytest
import torch

# tests never touch the network: a hub id fails at once instead of retrying
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import char_tokenizer, checkpoint_file  # noqa: E402  (bench.py uses char_tokenizer too)


def kill_at_first_checkpoint(cmd, ckpt_dir, cwd=None):
    """Start a stage, kill -9 it the moment its first checkpoint is complete (checkpoint_file), and fail the
    test if it finished before that: a resume test must really resume."""
    import subprocess
    import time
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    t0 = time.time()
    while checkpoint_file(str(ckpt_dir)) is None and proc.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)
    killed = proc.poll() is None
    proc.kill()
    proc.wait()
    assert killed, "the run finished before it could be killed"


def tiny_llama(vocab_size, hidden=32, layers=2, seed=0, tok=None, tied=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id if tok else 0, pad_token_id=tok.pad_token_id if tok else 0,
                      bos_token_id=None, tie_word_embeddings=tied)
    m = LlamaForCausalLM(cfg).eval()
    return m


@pytest.fixture(scope="session")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="session")
def tiny_pair(tok):
    """(student, teacher) random Llamas sharing the char tokenizer."""
    return tiny_llama(len(tok), 32, 2, seed=1, tok=tok), tiny_llama(len(tok), 48, 2, seed=2, tok=tok)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tok):
    """HF folders: student, teacher (tokenizer A) and target (a different tokenizer B)."""
    root = tmp_path_factory.mktemp("tiny")
    tok_b = char_tokenizer(extra="[]{}<>")
    for name, (h, seed, t) in {"student": (32, 1, tok), "teacher": (48, 2, tok), "target": (32, 3, tok_b)}.items():
        m = tiny_llama(len(t), h, 2, seed=seed, tok=t)
        m.save_pretrained(root / name)
        t.save_pretrained(root / name)
    return root


@pytest.fixture(scope="session")
def two_task_data(tiny_dirs):
    """A two-task data folder in the toy world's layout (toy_math: '####' answers, toy_qa: letters), shared by
    the distillation and multi-rank tests."""
    import common
    d = tiny_dirs / "two_task_data"
    rows = {"toy_math": [{"prompt": f"Ana has {i} pens and gets {i + 1} more. How many?", "answer": str(2 * i + 1)} for i in range(8)],
            "toy_qa": [{"prompt": f"Colour of flag {i}? A) red B) blue", "answer": "AB"[i % 2], "choices": ["red", "blue"]} for i in range(8)]}
    for task, rs in rows.items():
        os.makedirs(d / task, exist_ok=True)
        for split in ("train", "test"):
            common.write_jsonl(str(d / task / f"{split}.jsonl"), rs)
    return d
