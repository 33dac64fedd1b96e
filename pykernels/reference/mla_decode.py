"""MLA decode (DeepSeek-V2/V3 after weight absorption): the definition the kernels are held to.

One latent KV head per token, 576 values: K is all of them (512 latent c_KV + 64 RoPE k_pe), V the first 512.
For request i, query token t (0..s_q-1) and head h:
    keys visible  = [0, L_i)                         without causal (or s_q == 1)
                    [0, L_i - s_q + t]               with causal: the s_q new tokens are the cache's last s_q
    s_j   = softmax_scale * <q[i, t, h, :], K_i[j, :]>          (float32, j over the visible keys)
    out   = sum_j softmax(s)_j * V_i[j, :]           -> q's dtype
    lse   = log(sum_j exp(s_j))                      natural log, float32, [b, h_q, s_q]
A row that sees no key (L_i = 0, or with causal L_i - s_q + t < 0) has out = 0 and lse = +inf (FlashMLA's
rule). NaN in q or in a visible cache row propagates to out and lse.
An FP8 cache holds e4m3 values x with K = x * kv_scale (one float32 scale for the whole cache).
"""

from __future__ import annotations

import torch

PAGE_SIZE = 64
HEAD_DIM_K = 576
HEAD_DIM_V = 512


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, seqlen: int, request: int,
              kv_scale: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The first `seqlen` cache rows of `request`, [seqlen, 576], dequantized to `dtype`. Pages past the
    sequence's end are never touched (they may hold anything, NaN included)."""
    pages = -(-seqlen // PAGE_SIZE)
    ids = block_table[request, :pages].long()
    kv = kv_cache[ids].reshape(pages * PAGE_SIZE, kv_cache.shape[-1])[:seqlen].to(dtype)
    if kv_scale is not None:
        kv = kv * kv_scale.reshape(()).to(dtype)
    return kv


def visible_keys(seqlen: int, s_q: int, causal: bool, device) -> torch.Tensor:
    """[s_q, seqlen] bool: which keys each query token sees."""
    keys = torch.arange(seqlen, device=device)
    if not causal or s_q == 1:
        return torch.ones(s_q, seqlen, dtype=torch.bool, device=device)
    last = seqlen - s_q + torch.arange(s_q, device=device)
    return keys[None, :] <= last[:, None]


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
               head_dim_v: int = HEAD_DIM_V, softmax_scale: float | None = None, causal: bool = False,
               kv_scale: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32):
    """q [b, s_q, h_q, 576] -> (out [b, s_q, h_q, head_dim_v] in q's dtype, lse [b, h_q, s_q] float32).

    compute_dtype=torch.float64 gives the tests' independent high-precision answer."""
    b, s_q, h_q, d = q.shape
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    out = torch.empty(b, s_q, h_q, head_dim_v, dtype=compute_dtype, device=q.device)
    lse = torch.empty(b, h_q, s_q, dtype=compute_dtype, device=q.device)
    lengths = cache_seqlens.tolist()
    for i in range(b):
        kv = gather_kv(kv_cache, block_table, lengths[i], i, kv_scale, compute_dtype)
        qi = q[i].to(compute_dtype)  # [s_q, h_q, 576]
        scores = torch.einsum("thd,nd->thn", qi, kv) * scale
        mask = visible_keys(lengths[i], s_q, causal, q.device)
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        sees_keys = mask.any(dim=-1)[:, None]  # [s_q, 1]: from the lengths alone, so NaN scores stay NaN
        lse_i = torch.logsumexp(scores, dim=-1)  # [s_q, h_q]
        probs = torch.exp(scores - torch.where(sees_keys, lse_i, 0.0)[..., None])
        out[i] = torch.einsum("thn,nd->thd", probs, kv[:, :head_dim_v])
        lse[i] = torch.where(sees_keys, lse_i, float("inf")).transpose(0, 1)
    out_dtype = q.dtype if compute_dtype == torch.float32 else compute_dtype
    return out.to(out_dtype), lse.to(torch.float32 if compute_dtype == torch.float32 else compute_dtype)
