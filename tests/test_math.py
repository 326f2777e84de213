"""The formulas of common.py against closed forms, exact enumeration and autograd (DESIGN 4).
Each test is built so that a flipped sign, a dropped term or a swapped argument fails it."""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common as C

torch.set_default_dtype(torch.float32)


def brute_kl(p, q):
    return sum(p[i] * (math.log(p[i]) - math.log(q[i])) for i in range(len(p)))


# -----------------------------------------------------------------------------
# token divergence


def test_token_kl_matches_brute_force_sum():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g) * 2, torch.randn(5, 7, generator=g) * 2
    ps, pt = F.softmax(s, -1).tolist(), F.softmax(t, -1).tolist()
    rkl = C.token_divergence(s, t, beta=1.0)
    fkl = C.token_divergence(s, t, beta=0.0)
    for i in range(5):
        assert rkl[i].item() == pytest.approx(brute_kl(ps[i], pt[i]), rel=1e-5)
        assert fkl[i].item() == pytest.approx(brute_kl(pt[i], ps[i]), rel=1e-5)
    assert not torch.allclose(rkl, fkl)  # the directions really differ on this example


def test_jsd_mixture_matches_brute_force_and_limits():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    ps, pt = F.softmax(s, -1), F.softmax(t, -1)
    for beta in (0.1, 0.5, 0.9):
        m = (1 - beta) * ps + beta * pt
        want = [beta * brute_kl(pt[i].tolist(), m[i].tolist()) + (1 - beta) * brute_kl(ps[i].tolist(), m[i].tolist()) for i in range(4)]
        assert C.token_divergence(s, t, beta).tolist() == pytest.approx(want, rel=1e-5)
    # the exact end points are the two KLs (the mixture formula itself would tend to 0 there)
    assert torch.allclose(C.token_divergence(s, t, 0.0), C.token_divergence(t, s, 1.0), atol=1e-6)
    assert (C.token_divergence(s, t, 0.5) >= 0).all()
    assert torch.allclose(C.token_divergence(s, s, 1.0), torch.zeros(4), atol=1e-6)


def test_teacher_topk_forward_kl_renormalizes_over_k():
    s = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 2.0, 0.5, -1.0]])
    pt2 = F.softmax(torch.tensor([3.0, 2.0]), -1)  # teacher's top-2, renormalized
    ls = F.log_softmax(s, -1)[0]
    want = sum(pt2[i] * (math.log(pt2[i]) - ls[i]) for i in range(2))
    assert C.token_divergence(s, t, 0.0, teacher_topk=2).item() == pytest.approx(float(want), rel=1e-5)
    # tied logits: top-1 keeps exactly one token, so FKL is -log p_s(that token) = log 10 under a uniform student
    tied = torch.tensor([[5.0, 5.0, 5.0] + [0.0] * 7])
    assert C.token_divergence(torch.zeros(1, 10), tied, 0.0, teacher_topk=1).item() == pytest.approx(math.log(10), rel=1e-6)


def _pair_batch(tok, student, teacher):
    prompts = ["<|user|>add 2 and 3\n<|assistant|>", "<|user|>hi\n<|assistant|>"]
    comps = [tok("the sum is 5 #### 5")["input_ids"], tok("hello there")["input_ids"]]
    return C.make_batch(tok, prompts, comps)


def test_make_batch_aligns_masks_and_rejects_an_empty_prompt(tok):
    ids, am, cm = C.make_batch(tok, ["ab", "abcd"], [[5, 6, 7], [8]])
    n_a, n_b = len(tok("ab", add_special_tokens=False)["input_ids"]), len(tok("abcd", add_special_tokens=False)["input_ids"])
    assert cm[0].tolist()[:n_a + 3] == [0] * n_a + [1] * 3 and cm[1].tolist()[:n_b + 1] == [0] * n_b + [1]
    assert ids[0, n_a:n_a + 3].tolist() == [5, 6, 7] and am.sum(1).tolist() == [n_a + 3, n_b + 1]
    with pytest.raises(ValueError, match="no ids"):  # its first completion token has no position to be predicted from
        C.make_batch(tok, ["ab", ""], [[5], [6]])


def test_chunked_equals_unchunked_values_and_gradients(tok, tiny_pair):
    student, teacher = tiny_pair
    ids, am, cm = _pair_batch(tok, student, teacher)
    for beta in (0.0, 0.5, 1.0):
        student.zero_grad()
        naive = C.naive_token_divergence(student, teacher, ids, am, cm, beta)
        naive.mean().backward()
        g_naive = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        chunk = C.chunked_token_divergence(student, teacher, ids, am, cm, beta, chunk=7)
        chunk.mean().backward()
        g_chunk = [p.grad.clone() for p in student.parameters()]
        assert chunk.shape == (int(cm.sum()),)
        assert torch.allclose(naive, chunk, atol=1e-5)
        for a, b in zip(g_naive, g_chunk):
            assert torch.allclose(a, b, atol=1e-5)
    student.zero_grad()


def test_chunked_divergence_at_qwen_vocab_size():
    """A random-weight Qwen3 config with the real 151,936-token vocabulary."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    cfg = dict(vocab_size=151_936, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True)
    s, t = Qwen3ForCausalLM(Qwen3Config(**cfg)).eval(), Qwen3ForCausalLM(Qwen3Config(**cfg)).eval()
    ids = torch.randint(0, 151_936, (2, 24))
    am = torch.ones_like(ids)
    cm = torch.zeros_like(ids)
    cm[:, 8:] = 1
    with torch.no_grad():
        a = C.chunked_token_divergence(s, t, ids, am, cm, 1.0, chunk=5)
        b = C.naive_token_divergence(s, t, ids, am, cm, 1.0)
    assert a.shape == (32,) and torch.isfinite(a).all() and (a >= 0).all()
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_soft_capped_heads_match_the_model_forward(tok):
    """Gemma-style final logit soft-capping (cap * tanh(logits / cap)): our chunked heads against
    the HF model's own logits, for the divergence and for completion log-probs. A small cap so the
    capping matters (with none, the values differ by far more than the tolerance)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16, max_position_embeddings=128, final_logit_softcapping=1.5,
               attn_logit_softcapping=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    s, t = Gemma2ForCausalLM(Gemma2Config(**cfg)).eval(), Gemma2ForCausalLM(Gemma2Config(**cfg)).eval()
    for m in (s, t):  # random init is small: scale the head so raw logits exceed the cap
        m.get_output_embeddings().weight.data.mul_(40.0)
    ids, am, cm = _pair_batch(tok, s, t)
    with torch.no_grad():
        full = s(input_ids=ids, attention_mask=am).logits
        assert full.abs().max() <= 1.5 + 1e-5  # HF applies the cap
        a = C.chunked_token_divergence(s, t, ids, am, cm, 1.0, chunk=5)
        b = C.naive_token_divergence(s, t, ids, am, cm, 1.0)
        lp = C.completion_logprobs(s, ids, am, cm, chunk=5)
        want = torch.log_softmax(full.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert torch.allclose(lp[:, 1:][cm[:, 1:].bool()], want[cm[:, 1:].bool()], atol=1e-5)
    s.config.final_logit_softcapping = None  # our heads without the cap no longer match HF's capped logits
    with torch.no_grad():
        assert not torch.allclose(C.chunked_token_divergence(s, t, ids, am, cm, 1.0, chunk=5), b, rtol=1e-2)


def test_padded_vocab_rows_are_sliced_and_different_vocabs_rejected(tok):
    from tests.conftest import tiny_llama, char_tokenizer
    s = tiny_llama(len(tok), seed=1, tok=tok)
    t = tiny_llama(len(tok) + 16, seed=2, tok=tok)  # same tokenizer, 16 padding rows (as Qwen 151,936 vs 152,064)
    assert C.shared_vocab(s, t, tok, tok) == len(tok)
    ids, am, cm = C.make_batch(tok, ["<|user|>x\n<|assistant|>"], [tok("abc")["input_ids"]])
    with torch.no_grad():
        d = C.chunked_token_divergence(s, t, ids, am, cm, 1.0, vocab=len(tok))
    assert torch.isfinite(d).all()
    with pytest.raises(ValueError, match="sequence-level"):
        C.shared_vocab(s, t)  # sizes differ and no tokenizers to prove they agree
    other = char_tokenizer(extra="[]")
    with pytest.raises(ValueError, match="sequence-level"):
        C.shared_vocab(s, tiny_llama(len(other), seed=3, tok=other), tok, other)


def test_completion_logprobs_match_full_logits(tok, tiny_pair):
    student, _ = tiny_pair
    ids, am, cm = _pair_batch(tok, student, None)
    with torch.no_grad():
        lp = C.completion_logprobs(student, ids, am, cm, chunk=3)
        full = F.log_softmax(student(input_ids=ids, attention_mask=am).logits.float(), -1)
    want = torch.zeros_like(lp)
    want[:, 1:] = full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(lp, want * cm, atol=1e-5)
    assert (lp[cm == 0] == 0).all() and (lp[cm == 1] < 0).all()


# -----------------------------------------------------------------------------
# sequence KL by exact enumeration on a tiny vocabulary (paper Eq. 1 vs Eq. 2)

V, T = 3, 3


def _table(seed):
    """An autoregressive 'model' as a table of next-token logits for every prefix."""
    g = torch.Generator().manual_seed(seed)
    return {pre: torch.randn(V, generator=g) * 1.5 for n in range(T) for pre in itertools.product(range(V), repeat=n)}


def _seq_logp(tab, y):
    return sum(F.log_softmax(tab[y[:i]], -1)[y[i]].item() for i in range(len(y)))


def test_sequence_kl_monte_carlo_converges_to_exact_and_token_kl_has_lower_variance():
    s, t = _table(0), _table(1)
    exact = sum(math.exp(_seq_logp(s, y)) * (_seq_logp(s, y) - _seq_logp(t, y)) for y in itertools.product(range(V), repeat=T))
    g = torch.Generator().manual_seed(2)
    n = 4000
    seq_est, tok_est = [], []
    for _ in range(n):
        y, lps, lpt, tok_kl = (), [], [], 0.0
        for _i in range(T):
            ls, lt = s[y], t[y]
            tok_kl += C.token_divergence(ls, lt, 1.0).item()  # exact sum over V at this prefix (Eq. 2)
            v = torch.multinomial(F.softmax(ls, -1), 1, generator=g).item()
            lps.append(F.log_softmax(ls, -1)[v].item())
            lpt.append(F.log_softmax(lt, -1)[v].item())
            y = y + (v,)
        seq_est.append(C.sequence_kl(torch.tensor([lps]), torch.tensor([lpt]), torch.ones(1, T)).item())
        tok_est.append(tok_kl)
    seq_est, tok_est = np.array(seq_est), np.array(tok_est)
    assert exact > 0.1
    assert abs(seq_est.mean() - exact) < 4 * seq_est.std() / math.sqrt(n)
    assert abs(tok_est.mean() - exact) < 4 * tok_est.std() / math.sqrt(n) + 1e-9
    assert tok_est.var() < 0.5 * seq_est.var()  # Rao-Blackwell: same mean, lower variance
    # padding: masked positions add nothing, whatever their log-probs
    lp, lq = torch.tensor([[-1.0, -2.0, -7.0], [-0.5, -9.0, -9.0]]), torch.tensor([[-3.0, -1.0, 0.0], [-2.5, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert C.sequence_kl(lp, lq, m).tolist() == pytest.approx([2.0 - 1.0, 2.0])


def test_offpolicy_estimators_converge_on_teacher_samples():
    """IS and weighted-K3 estimates of KL(s||t) from teacher samples agree with the exact value
    when the two policies are close; when they are far apart the weights blow up and say so."""
    s, t = _table(3), _table(3)
    for k in t:
        t[k] = t[k] + 0.3 * torch.randn(V, generator=torch.Generator().manual_seed(len(k) * 7 + sum(k)))
    seqs = list(itertools.product(range(V), repeat=T))
    exact = sum(math.exp(_seq_logp(s, y)) * (_seq_logp(s, y) - _seq_logp(t, y)) for y in seqs)
    pt = torch.tensor([math.exp(_seq_logp(t, y)) for y in seqs])
    idx = torch.multinomial(pt, 40_000, replacement=True, generator=torch.Generator().manual_seed(4))
    lps = torch.tensor([_seq_logp(s, seqs[i]) for i in idx])
    lpt = torch.tensor([_seq_logp(t, seqs[i]) for i in idx])
    est = C.offpolicy_seq_rkl(lps, lpt)
    fkl = sum(math.exp(_seq_logp(t, y)) * (_seq_logp(t, y) - _seq_logp(s, y)) for y in seqs)
    assert exact - fkl > 0.012  # the wrong direction (e.g. unweighted k3 on teacher samples) is 3x the tolerance away
    assert est["is_mean"] == pytest.approx(exact, abs=0.004)
    assert est["k3_mean"] == pytest.approx(exact, abs=0.004)
    assert est["nonfinite_share"] == 0
    far = C.offpolicy_seq_rkl(torch.tensor([900.0, -5.0]), torch.tensor([0.0, 0.0]))
    assert far["nonfinite_share"] == 0.5  # exp(900) overflows even in float64
    assert C.offpolicy_seq_rkl(torch.tensor([-300.0]), torch.tensor([0.0]))["k3_mean"] == pytest.approx(1.0)


# -----------------------------------------------------------------------------
# appendix B: sequence RKL ignores the teacher on unrealized tokens


def _seq_rkl_grad(student_logits_TV, teacher_logits_TV, y):
    """Single-sample gradient of E_s[log s(y) - log t(y)] w.r.t. the student logits:
    (J + 1) * grad log s(y), written as the surrogate sg(J) * log s(y) + J (Appendix B, Eq. 13-16)."""
    z = student_logits_TV.clone().requires_grad_(True)
    ls = F.log_softmax(z, -1).gather(-1, y[:, None]).sum()
    lt = F.log_softmax(teacher_logits_TV, -1).gather(-1, y[:, None]).sum()
    J = ls - lt
    (J.detach() * ls + J).backward()
    return z.grad


def _tok_rkl_grad(student_logits_TV, teacher_logits_TV):
    z = student_logits_TV.clone().requires_grad_(True)
    C.token_divergence(z, teacher_logits_TV, 1.0).sum().backward()
    return z.grad


def test_appendix_b_sequence_rkl_gradient_ignores_teacher_prob_of_unrealized_tokens():
    g = torch.Generator().manual_seed(5)
    zs, zt = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    y = torch.tensor([0, 1, 2, 0])
    zt2 = zt.clone()
    zt2[:, [4, 5]] = zt[:, [5, 4]]  # swap the teacher's probability of two tokens never realized
    assert not torch.allclose(F.softmax(zt, -1)[:, 4], F.softmax(zt2, -1)[:, 4])
    assert torch.allclose(_seq_rkl_grad(zs, zt, y), _seq_rkl_grad(zs, zt2, y), atol=1e-6)
    # the token-level KL does see the change: dark knowledge reaches the student only this way
    assert not torch.allclose(_tok_rkl_grad(zs, zt), _tok_rkl_grad(zs, zt2), atol=1e-4)
    # and the sequence gradient on an unrealized token v is -(J+1) * p_s(v) (Eq. 16, case 2)
    grad = _seq_rkl_grad(zs, zt, y)
    J = (F.log_softmax(zs, -1) - F.log_softmax(zt, -1)).gather(-1, y[:, None]).sum()
    assert torch.allclose(grad[:, 4], -(J + 1) * F.softmax(zs, -1)[:, 4], atol=1e-5)


# -----------------------------------------------------------------------------
# RL


def test_reinforce_gradient_equals_exact_policy_gradient():
    """Enumerable policy over length-2 sequences, vocab 3. The gradient of reinforce_loss (with a
    detached reward) on many samples matches -grad E[r] computed exactly by enumeration."""
    theta = torch.randn(1 + V, V, generator=torch.Generator().manual_seed(6))  # logits: step 0, step 1 given y0
    r = {y: float(y[0] == 1) + 0.5 * y[1] - 0.3 * (y == (2, 2)) for y in itertools.product(range(V), repeat=2)}

    def logp_tok(th, y):  # per-token log-probs of y under the policy
        return torch.stack([F.log_softmax(th[0], -1)[y[0]], F.log_softmax(th[1 + y[0]], -1)[y[1]]])

    th = theta.clone().requires_grad_(True)
    exact_J = sum(logp_tok(th, y).sum().exp() * r[y] for y in r)
    exact_grad = torch.autograd.grad(exact_J, th)[0]

    g = torch.Generator().manual_seed(7)
    n = 20_000
    with torch.no_grad():
        y0 = torch.multinomial(F.softmax(theta[0], -1), n, replacement=True, generator=g)
        y1 = torch.stack([torch.multinomial(F.softmax(theta[1 + a], -1), 1, generator=g)[0] for a in y0.tolist()])
    th = theta.clone().requires_grad_(True)
    lp0 = F.log_softmax(th[0], -1)[y0]
    lp1 = F.log_softmax(th[1:], -1)[y0, y1]
    logp = torch.stack([lp0, lp1], 1)  # (n, 2)
    adv = torch.tensor([r[(a, b)] for a, b in zip(y0.tolist(), y1.tolist())])
    loss = C.reinforce_loss(logp, torch.ones_like(logp), adv)
    mc_grad = -torch.autograd.grad(loss, th)[0] * 2  # loss divides by n*2 tokens
    assert torch.allclose(mc_grad, exact_grad, atol=0.03), (mc_grad, exact_grad)
    assert exact_grad.abs().max() > 0.1


def test_group_normalize():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 1.0])
    a = C.group_normalize(r, 4).view(3, 4)
    assert torch.allclose(a[0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(a[0].std(unbiased=False), torch.tensor(1.0), atol=1e-5)
    assert (a[1] == 0).all()  # zero-variance group: no signal, no NaN
    assert a[2].tolist() == pytest.approx([-1 / math.sqrt(3)] * 3 + [math.sqrt(3)], rel=1e-5)
    assert torch.isfinite(C.group_normalize(torch.full((6,), 1e9), 3)).all()
    # float-rounding differences of a large reward are no signal (identical completions' log-probs)
    assert (C.group_normalize(torch.tensor([-50.0, -50.00001, -50.0, -50.0]), 4) == 0).all()
    assert C.group_normalize(torch.tensor([-50.0, -50.1, -50.0, -50.0]), 4).abs().max() > 1  # a real difference is kept
    assert a[0, 3] > a[0, 0]  # order preserved (a sign flip fails here)
    for bad in (float("nan"), float("-inf")):  # NaN would otherwise zero its group silently
        with pytest.raises(ValueError, match="non-finite"):
            C.group_normalize(torch.tensor([1.0, bad, 3.0, 4.0]), 4)


def test_combine_advantages_by_hand():
    r_task = [1.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # group 2 all correct: task advantage 0
    r_cal = [-10.0, -20.0, -30.0, 2.0, 4.0, 6.0]
    a = C.combine_advantages(r_task, r_cal, lam=-1.0, group_size=3)
    s6 = math.sqrt(2 / 3)
    want_task = [(1 - 2 / 3) / (math.sqrt(2) / 3), (0 - 2 / 3) / (math.sqrt(2) / 3), (1 - 2 / 3) / (math.sqrt(2) / 3), 0, 0, 0]
    want_cal = [1 / s6, 0, -1 / s6, -1 / s6, 0, 1 / s6]
    assert a.tolist() == pytest.approx([wt - wc for wt, wc in zip(want_task, want_cal)], rel=1e-5)
    assert C.combine_advantages(r_task, r_cal, 0.0, 3).tolist() == pytest.approx(want_task, rel=1e-5)


def test_k3_anchor_is_unbiased_and_nonnegative():
    g = torch.Generator().manual_seed(8)
    zp, zq = torch.randn(5, generator=g), torch.randn(5, generator=g)
    lp, lq = F.log_softmax(zp, -1), F.log_softmax(zq, -1)
    y = torch.multinomial(lp.exp(), 50_000, replacement=True, generator=g)
    est = C.k3_kl(lp[y][None], lq[y][None], torch.ones(1, len(y)))
    assert est.item() == pytest.approx(brute_kl(lp.exp().tolist(), lq.exp().tolist()), abs=0.02)
    assert C.k3_kl(lp[y][None], lp[y][None], torch.ones(1, len(y))).item() == pytest.approx(0.0, abs=1e-7)
    # one token, closed form: log p = -2, log ref = -1 -> r = e, k3 = e - 1 - 1 (k1 would be -1 < 0)
    one = C.k3_kl(torch.tensor([[-2.0, -9.0]]), torch.tensor([[-1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
    assert one.item() == pytest.approx(math.e - 2, rel=1e-6)


# -----------------------------------------------------------------------------
# pilot-study statistics


def test_wrong_trace_preference_by_hand():
    # prompt 0: correct rkl [1, 5], wrong [3]: pairs (1,3) no, (5,3) yes -> 1/2
    # prompt 1: correct [2], wrong [1, 0.5, 9] -> 2/3; prompt 2: all correct -> skipped
    rkl = [1, 5, 3, 2, 1, 0.5, 9, 4, 4]
    cor = [1, 1, 0, 1, 0, 0, 0, 1, 1]
    grp = [0, 0, 0, 1, 1, 1, 1, 2, 2]
    rate, n = C.wrong_trace_preference(rkl, cor, grp)
    assert n == 2 and rate == pytest.approx((1 / 2 + 2 / 3) / 2)
    # ties: a wrong trace as likely as a correct one is not preferred (strictly lower only)
    assert C.wrong_trace_preference([2, 2, 1], [1, 0, 0], [0, 0, 0]) == (pytest.approx(0.5), 1)


def test_tail_noise_matches_brute_force_loop():
    g = torch.Generator().manual_seed(9)
    N, Vt = 6, 8
    s, t = torch.randn(N, Vt, generator=g) * 2, torch.randn(N, Vt, generator=g) * 2
    acc = C.tail_noise_update({}, s[:4], t[:4], ks=(1, 3, None))
    acc = C.tail_noise_update(acc, s[4:], t[4:], ks=(1, 3, None))  # accumulates over chunks
    ps, pt = F.softmax(s, -1), F.softmax(t, -1)
    for k, key in ((1, "1"), (3, "3"), (Vt, "all")):
        want, count = np.zeros(Vt), np.zeros(Vt)
        for i in range(N):
            top = sorted(range(Vt), key=lambda v: -ps[i, v].item())[:k]
            for v in top:
                want[v] += ps[i, v].item() * (math.log(ps[i, v].item()) - math.log(pt[i, v].item()))
                count[v] += 1
        assert np.allclose(acc[key].numpy(), want, atol=1e-6)
        assert np.allclose(C.tail_contribution(acc, key), want / N, atol=1e-7)  # per position (DESIGN 4)
        # per member: v's mean over the positions where it is a top-k candidate (0 where never)
        assert np.allclose(C.tail_contribution(acc, key, per="member"), np.where(count > 0, want / np.maximum(count, 1), 0), atol=1e-7)
    assert acc["n"] == N and acc["#all"].tolist() == [N] * Vt and acc["#1"].sum() == N and acc["#3"].sum() == 3 * N


def test_spearman():
    assert C.spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
    assert C.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks [0.5,0.5,2,3], y ranks [0,1,2,3]
    assert C.spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.corrcoef([0.5, 0.5, 2, 3], [0, 1, 2, 3])[0, 1])


# -----------------------------------------------------------------------------
# metrics


def test_pass_at_k_matches_combinatorial_formula():
    for n in (1, 5, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert C.pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert C.pass_at_k(16, 0, 16) == 0.0 and C.pass_at_k(16, 1, 16) == 1.0
    with pytest.raises(ValueError):
        C.pass_at_k(4, 1, 8)


def test_maj_at_k_ties_and_missing_answers():
    assert C.maj_at_k(["3", "4", "4", "3"], [True, False, False, True]) is True  # tie: "3" seen first
    assert C.maj_at_k(["4", "3", "4", "3"], [False, True, False, True]) is False
    assert C.maj_at_k([None, None, "5"], [False, False, True]) is True  # no-answer never wins the vote
    assert C.maj_at_k([None, None], [False, False]) is False
    assert C.maj_at_k(["1", "2", "2"], [True, False, False]) is False
    # equal values spelled differently vote together (the grader counts both as correct)
    assert C.maj_at_k(["5", "5", "3/4", "0.75", "0.75"], [False, False, True, True, True]) is True
    assert C.maj_at_k(["0.75", "3/4", "1", "1"], [True, True, False, False]) is True  # 2-2 tie, 0.75 seen first


def test_bootstrap_ci():
    v = np.r_[np.ones(30), np.zeros(70)]
    lo, hi = C.bootstrap_ci(v, seed=0)
    assert lo < 0.3 < hi and hi - lo < 0.25 and lo > 0.15
    assert C.bootstrap_ci(v, seed=0) == [lo, hi]
    assert C.bootstrap_ci(np.ones(10)) == [1.0, 1.0]
