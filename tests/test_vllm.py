"""The vLLM backend against the HF one, on a tiny random Llama saved as an HF folder. Runs only where
CUDA and vllm exist (pip install -r requirements-gpu.txt); skipped on CPU machines and in CI.

What it pins down: n samples per prompt with per-request seeds (reproducible, different across
seeds), greedy equal to our HF greedy, an in-place weight push changing the engine's output to the
new weights' greedy output (no rebuild), and a LoRA adapter sent per request equal to the merged
model. fp32 in vLLM so that greedy argmaxes agree with the HF model token for token."""
import copy

import pytest
import torch

import common as C
from conftest import tiny_llama

pytestmark = pytest.mark.skipif(not C.vllm_available(), reason="needs CUDA and vllm")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    path = str(tmp_path_factory.mktemp("vllm") / "m")  # head_dim 64: a size every vLLM attention backend takes
    tiny_llama(len(tok), hidden=256, layers=2, seed=5, tok=tok).save_pretrained(path)
    tok.save_pretrained(path)
    engine = C.make_vllm_engine(path, seed=0, gpu_memory_utilization=0.2, enable_lora=True, max_lora_rank=8,
                                max_model_len=512, dtype="float32", enforce_eager=True, inprocess=True)
    model = C.load_model(path, "cuda", dtype=torch.float32)
    prompts = [C.build_prompt(tok, "toy_math", {"prompt": q}) for q in ("what is 2+3?", "count to five", "a b c")]
    return engine, model, prompts


def greedy_ids(backend, model, tok, prompts, engine, **kw):
    return [o["ids"] for o in C.generate(model, tok, prompts, max_new_tokens=24, greedy=True, backend=backend, engine=engine, **kw)]


def test_samples_and_seeds(setup, tok):
    engine, _, prompts = setup
    a = C.generate(None, tok, prompts, n=4, max_new_tokens=16, seed=1, backend="vllm", engine=engine)
    b = C.generate(None, tok, prompts, n=4, max_new_tokens=16, seed=1, backend="vllm", engine=engine)
    c = C.generate(None, tok, prompts, n=4, max_new_tokens=16, seed=2, backend="vllm", engine=engine)
    assert [o["i"] for o in a] == [i for i in range(3) for _ in range(4)]  # prompt-major, n per prompt
    assert [o["ids"] for o in a] == [o["ids"] for o in b]
    assert [o["ids"] for o in a] != [o["ids"] for o in c]
    assert all(o["text"] == tok.decode(o["ids"], skip_special_tokens=True) for o in a)
    # as in the hf backend, a finished sample's ids end with the eos it sampled (03 trains on it)
    assert all(o["ids"][-1] == tok.eos_token_id for o in a + c if o["finished"])


def test_greedy_matches_hf_and_weight_push(setup, tok):
    engine, model, prompts = setup
    assert greedy_ids("vllm", None, tok, prompts, engine) == greedy_ids("hf", model, tok, prompts, None)
    pushed = copy.deepcopy(model)
    with torch.no_grad():
        for p in pushed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    want = greedy_ids("hf", pushed, tok, prompts, None)
    assert want != greedy_ids("hf", model, tok, prompts, None)  # the push must be visible
    C.vllm_sync_weights(engine, pushed)
    assert greedy_ids("vllm", None, tok, prompts, engine) == want
    C.vllm_sync_weights(engine, model)  # leave the engine as the other tests expect it
    assert greedy_ids("vllm", None, tok, prompts, engine) == greedy_ids("hf", model, tok, prompts, None)


def test_lora_request_equals_merged(setup, tok, tmp_path):
    from peft import LoraConfig, get_peft_model
    from vllm.lora.request import LoRARequest
    engine, model, prompts = setup
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    pm.save_pretrained(tmp_path / "lora")
    merged = pm.merge_and_unload()
    got = greedy_ids("vllm", None, tok, prompts, engine, lora_request=LoRARequest("t", 1, str(tmp_path / "lora")))
    assert got == greedy_ids("hf", merged, tok, prompts, None)
