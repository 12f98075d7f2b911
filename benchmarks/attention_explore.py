"""Which plain-JAX blockwise attention is fastest on this CPU? Side-by-side exploration.

Every variant computes softmax(Q K^T / sqrt(d)) V for float32 [batch, heads, seq, head_dim]
inputs (the XLA baseline gets [batch, seq, heads, head_dim], its own layout). Per sequence length
and causality, each candidate first runs alone in its own process (peak memory, one run),
then all candidates that fit are timed together in one process, interleaved in shuffled rounds
(einfuse.autotune.timing). Findings: benchmarks/NOTES-attention-cpu.md.

    python -m benchmarks.attention_explore --quick
    python -m benchmarks.attention_explore --seqs 4096 --causal yes \
        --variants xla_sdpa,reference:512x512,reference:1024x1024
    python -m benchmarks.attention_explore --check     # numerics of every variant vs float64
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from einfuse.autotune.timing_steal import cpu_steal_fraction
from einfuse.autotune.timing_subprocess import measure_in_subprocess, timings_from_result
from einfuse.autotune.timing_table import format_table

Array = jax.Array
AttentionFn = Callable[[Array, Array, Array], Array]
HEADS, HEAD_DIM = 8, 64
_MODULE = "benchmarks.attention_explore"  # what measuring children import, even under -m


def _check_blocks(seq: int, block_q: int, block_k: int) -> None:
    if seq % block_q or seq % block_k:
        raise ValueError(f"blocks {block_q}x{block_k} must divide the sequence length {seq}")


def blockwise_attention(
    q: Array, k: Array, v: Array, *, causal: bool, block_q: int = 512, block_k: int = 512
) -> Array:
    """Flash / FuseMax 1-pass attention for [batch, heads, seq, head_dim] inputs, in plain JAX.

    The fastest structure measured on this 2-core CPU (NOTES-attention-cpu.md):

    * ``lax.map`` over the batch*heads rows, one head at a time, so every dot below is a plain
      2-D GEMM and a [block_q, block_k] score block (1 MiB at 512x512) stays in L2; batching
      the heads into each dot took 1.1-1.5x the CPU time;
    * ``lax.map`` over query blocks, and for each a ``lax.fori_loop`` over key/value blocks
      carrying the running row max ``m``, row sum ``l`` and unnormalised output ``acc`` (the
      online softmax), so no [seq, seq] tensor exists: memory is O(seq * dim + block_q * block_k);
    * causal: the loop's upper bound depends on the query block's index (a dynamic trip
      count), so fully masked key blocks cost nothing, and only the blocks that straddle the
      diagonal pay for the mask, in a second loop.

    ``block_q`` and ``block_k`` must divide ``seq``.
    """
    batch, heads, seq, dim = q.shape
    _check_blocks(seq, block_q, block_k)
    n_q = seq // block_q
    q = q * jnp.asarray(1.0 / math.sqrt(dim), q.dtype)  # scale Q once, not every score block
    rows = (
        q.reshape(batch * heads, n_q, block_q, dim),
        k.reshape(batch * heads, seq, dim),
        v.reshape(batch * heads, seq, dim),
    )

    def attend_row(row: tuple[Array, Array, Array]) -> Array:
        q_blocks, k_row, v_row = row  # [n_q, block_q, dim], [seq, dim], [seq, dim]

        def attend_query_block(index_and_block: tuple[Array, Array]) -> Array:
            i, q_i = index_and_block

            def kv_step(j: Array, carry: tuple[Array, Array, Array], masked: bool) -> tuple:
                k_j = lax.dynamic_slice_in_dim(k_row, j * block_k, block_k)
                v_j = lax.dynamic_slice_in_dim(v_row, j * block_k, block_k)
                s = q_i @ k_j.T  # [block_q, block_k]
                if masked:
                    q_pos = i * block_q + jnp.arange(block_q)[:, None]
                    s = jnp.where(j * block_k + jnp.arange(block_k) <= q_pos, s, -jnp.inf)
                return _online_update(carry, s, v_j, jnp.matmul, False)

            init = _online_init((block_q,), dim, q.dtype)
            _, l, acc = _loop_key_blocks(kv_step, init, i, causal, block_q, block_k, seq)
            return acc / l[:, None]

        return lax.map(attend_query_block, (jnp.arange(n_q), q_blocks))  # [n_q, block_q, dim]

    return lax.map(attend_row, rows).reshape(batch, heads, seq, dim)


# --- The alternatives compared ---------------------------------------------------------------


def xla_sdpa(q: Array, k: Array, v: Array, *, causal: bool) -> Array:
    """The baseline: jax.nn.dot_product_attention's XLA implementation, [b, s, h, d] inputs."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")


def naive_attention(q: Array, k: Array, v: Array, *, causal: bool) -> Array:
    """softmax(Q K^T / sqrt(d)) V with the whole [seq, seq] score matrix in memory."""
    seq, dim = q.shape[2], q.shape[3]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(dim)
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), s, -jnp.inf)
    return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


def _online_update(
    carry: tuple[Array, Array, Array],
    s: Array,
    v_j: Array,
    pv: Callable[[Array, Array], Array],
    rowsum_via_dot: bool,
) -> tuple[Array, Array, Array]:
    """One online-softmax step on a score block ``s`` [..., q, k]; ``pv`` contracts p with v_j."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(axis=-1))
    # A row that has seen no visible key keeps m = -inf; shift it by 0, not by -inf, so exp
    # gives 0 instead of NaN (needed once padding masks whole rows).
    m_shift = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    p = jnp.exp(s - m_shift[..., None])
    alpha = jnp.exp(m - m_shift)  # rescales what the earlier blocks accumulated
    if rowsum_via_dot:  # V gets a column of ones: the P V dot also yields the row sums
        pv_ext = pv(p, v_j)
        return m_new, l * alpha + pv_ext[..., -1], acc * alpha[..., None] + pv_ext[..., :-1]
    return m_new, l * alpha + p.sum(axis=-1), acc * alpha[..., None] + pv(p, v_j)


def _online_init(rows: tuple[int, ...], dim: int, dtype: Any) -> tuple[Array, Array, Array]:
    """The online softmax's carry before the first key block: max -inf, sum 0, output 0."""
    return (
        jnp.full(rows, -jnp.inf, dtype),
        jnp.zeros(rows, dtype),
        jnp.zeros((*rows, dim), dtype),
    )


def _loop_key_blocks(
    kv_step: Callable[[Array, Any, bool], Any],
    init: Any,
    i: Array,
    causal: bool,
    block_q: int,
    block_k: int,
    seq: int,
) -> Any:
    """Run ``kv_step(j, carry, masked)`` over the key blocks that query block ``i`` sees.

    Causal: key blocks [0, n_full) lie wholly at or below the diagonal and need no mask, those
    up to n_visible straddle it and are masked, and the rest are skipped (a dynamic trip count).
    """
    if not causal:
        return lax.fori_loop(0, seq // block_k, lambda j, c: kv_step(j, c, False), init)
    n_full = (i * block_q + 1) // block_k
    n_visible = ((i + 1) * block_q + block_k - 1) // block_k
    carry = lax.fori_loop(0, n_full, lambda j, c: kv_step(j, c, False), init)
    return lax.fori_loop(n_full, n_visible, lambda j, c: kv_step(j, c, True), carry)


def blockwise_family(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool,
    block_q: int,
    block_k: int,
    skip_masked: bool = True,
    layout: str = "bhsd",
    precision: lax.Precision | None = None,
    dot_dtype: Any = None,
    rowsum_via_dot: bool = False,
) -> Array:
    """lax.map over Q blocks x fori_loop over KV blocks, with the knobs under study.

    ``skip_masked=False`` runs every KV block and masks (the static-trip-count version);
    ``layout="bshd"`` keeps inputs [b, s, h, d] and lets the einsums transpose; ``dot_dtype``
    casts dot operands (bfloat16 trades accuracy for speed) with float32 accumulation.
    """
    seq_axis = 2 if layout == "bhsd" else 1
    seq, dim = q.shape[seq_axis], q.shape[3]
    _check_blocks(seq, block_q, block_k)
    qk_spec, pv_spec = (
        ("bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd")
        if layout == "bhsd"
        else ("bqhd,bkhd->bhqk", "bhqk,bkhd->bhqd")
    )
    cast = (lambda x: x.astype(dot_dtype)) if dot_dtype is not None else (lambda x: x)

    def dot(spec: str, a: Array, b: Array) -> Array:
        return jnp.einsum(
            spec, cast(a), cast(b), precision=precision, preferred_element_type=jnp.float32
        )

    q = q * jnp.asarray(1.0 / math.sqrt(dim), q.dtype)
    if rowsum_via_dot:
        v = jnp.concatenate([v, jnp.ones((*v.shape[:3], 1), v.dtype)], axis=3)
    n_q = seq // block_q
    q_blocks = jnp.moveaxis(
        q.reshape(*q.shape[:seq_axis], n_q, block_q, *q.shape[seq_axis + 1 :]), seq_axis, 0
    )
    batch, heads = q.shape[0], q.shape[1 if layout == "bhsd" else 2]

    def attend_query_block(index_and_block: tuple[Array, Array]) -> Array:
        i, q_i = index_and_block

        def kv_step(j: Array, carry: tuple, masked: bool) -> tuple:
            k_j = lax.dynamic_slice_in_dim(k, j * block_k, block_k, axis=seq_axis)
            v_j = lax.dynamic_slice_in_dim(v, j * block_k, block_k, axis=seq_axis)
            s = dot(qk_spec, q_i, k_j)
            if masked:
                q_pos = i * block_q + jnp.arange(block_q)[:, None]
                k_pos = j * block_k + jnp.arange(block_k)[None, :]
                s = jnp.where(k_pos <= q_pos, s, -jnp.inf)
            return _online_update(carry, s, v_j, lambda p, w: dot(pv_spec, p, w), rowsum_via_dot)

        init = _online_init((batch, heads, block_q), dim, jnp.float32)
        if causal and not skip_masked:  # every key block, all masked: a static trip count
            carry = lax.fori_loop(0, seq // block_k, lambda j, c: kv_step(j, c, True), init)
        else:
            carry = _loop_key_blocks(kv_step, init, i, causal, block_q, block_k, seq)
        _, l, acc = carry
        return acc / l[..., None]

    out = lax.map(attend_query_block, (jnp.arange(n_q), q_blocks))  # [n_q, b, h, bq, d]
    out = out.transpose(1, 2, 0, 3, 4).reshape(batch, heads, seq, dim)
    return out if layout == "bhsd" else out.transpose(0, 2, 1, 3)


def blockwise_2d(
    q: Array, k: Array, v: Array, *, causal: bool, block_q: int, block_k: int, chains: int = 1
) -> Array:
    """One head at a time, so every dot is a plain 2-D GEMM and a score block is L2-sized.

    lax.map over groups of ``chains`` heads, lax.map over Q blocks, fori_loop over KV blocks
    (causal: dynamic bound, diagonal blocks masked). With ``chains > 1`` the loop body holds
    that many independent per-head chains, which XLA's thunk executor may run concurrently.
    """
    batch, heads, seq, dim = q.shape
    _check_blocks(seq, block_q, block_k)
    rows = batch * heads
    if rows % chains:
        raise ValueError(f"chains={chains} must divide batch*heads={rows}")
    q = q * jnp.asarray(1.0 / math.sqrt(dim), q.dtype)
    q, k, v = (x.reshape(rows // chains, chains, seq, dim) for x in (q, k, v))
    n_q = seq // block_q

    def attend_group(group: tuple[Array, Array, Array]) -> Array:
        q_g, k_g, v_g = group  # [chains, seq, dim]
        q_blocks = q_g.reshape(chains, n_q, block_q, dim).transpose(1, 0, 2, 3)

        def attend_query_block(index_and_block: tuple[Array, Array]) -> Array:
            i, q_i = index_and_block

            def kv_step(j: Array, carry: tuple, masked: bool) -> tuple:
                new = []
                for c in range(chains):
                    k_j = lax.dynamic_slice_in_dim(k_g[c], j * block_k, block_k)
                    v_j = lax.dynamic_slice_in_dim(v_g[c], j * block_k, block_k)
                    s = q_i[c] @ k_j.T
                    if masked:
                        q_pos = i * block_q + jnp.arange(block_q)[:, None]
                        s = jnp.where(j * block_k + jnp.arange(block_k) <= q_pos, s, -jnp.inf)
                    new.append(_online_update(carry[c], s, v_j, jnp.matmul, False))
                return tuple(new)

            init = tuple(_online_init((block_q,), dim, q.dtype) for _ in range(chains))
            carry = _loop_key_blocks(kv_step, init, i, causal, block_q, block_k, seq)
            return jnp.stack([acc / l[:, None] for _, l, acc in carry])

        out = lax.map(attend_query_block, (jnp.arange(n_q), q_blocks))  # [n_q, chains, bq, d]
        return out.transpose(1, 0, 2, 3).reshape(chains, seq, dim)

    return lax.map(attend_group, (q, k, v)).reshape(batch, heads, seq, dim)


def per_head_groups(
    q: Array, k: Array, v: Array, *, groups: int, sequential: bool, **options: Any
) -> Array:
    """Split the heads into ``groups``: one after another in a lax.map (smaller, cache-resident
    score blocks) or as independent loops XLA's executor may run concurrently on two cores."""
    split = [jnp.stack(jnp.split(x, groups, axis=1)) for x in (q, k, v)]  # [g, b, h/g, s, d]
    if sequential:
        out = lax.map(lambda qkv: blockwise_family(*qkv, **options), tuple(split))
    else:
        out = jnp.stack(
            [blockwise_family(*(x[g] for x in split), **options) for g in range(groups)]
        )
    return jnp.concatenate(list(out), axis=1)


def scan_kv_whole_q(q: Array, k: Array, v: Array, *, causal: bool, block_k: int) -> Array:
    """lax.scan over KV blocks with the whole Q at once (causal: every block masked)."""
    batch, heads, seq, dim = q.shape
    _check_blocks(seq, seq, block_k)
    q = q * jnp.asarray(1.0 / math.sqrt(dim), q.dtype)
    n_k = seq // block_k
    kv_blocks = (
        jnp.arange(n_k),
        k.reshape(batch, heads, n_k, block_k, dim).transpose(2, 0, 1, 3, 4),
        v.reshape(batch, heads, n_k, block_k, dim).transpose(2, 0, 1, 3, 4),
    )

    def step(carry: tuple, block: tuple[Array, Array, Array]) -> tuple:
        j, k_j, v_j = block
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k_j)
        if causal:
            visible = j * block_k + jnp.arange(block_k)[None, :] <= jnp.arange(seq)[:, None]
            s = jnp.where(visible, s, -jnp.inf)
        pv = lambda p, w: jnp.einsum("bhqk,bhkd->bhqd", p, w)  # noqa: E731
        return _online_update(carry, s, v_j, pv, False), None

    init = (
        jnp.full((batch, heads, seq), -jnp.inf, q.dtype),
        jnp.zeros((batch, heads, seq), q.dtype),
        jnp.zeros((batch, heads, seq, dim), q.dtype),
    )
    (_, l, acc), _ = lax.scan(step, init, kv_blocks)
    return acc / l[..., None]


def map_q_full_softmax(q: Array, k: Array, v: Array, *, causal: bool, block_q: int) -> Array:
    """lax.map over Q blocks, each an exact softmax over all keys: no online rescaling."""
    batch, heads, seq, dim = q.shape
    _check_blocks(seq, block_q, block_q)
    q = q * jnp.asarray(1.0 / math.sqrt(dim), q.dtype)
    q_blocks = q.reshape(batch, heads, seq // block_q, block_q, dim).transpose(2, 0, 1, 3, 4)

    def attend(index_and_block: tuple[Array, Array]) -> Array:
        i, q_i = index_and_block
        s = jnp.einsum("bhqd,bhkd->bhqk", q_i, k)
        if causal:
            s = jnp.where(
                jnp.arange(seq)[None, :] <= i * block_q + jnp.arange(block_q)[:, None], s, -jnp.inf
            )
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)

    out = lax.map(attend, (jnp.arange(seq // block_q), q_blocks))
    return out.transpose(1, 2, 0, 3, 4).reshape(batch, heads, seq, dim)


# --- Registry, measurement, CLI ---------------------------------------------------------------

# name -> (input layout, builder(causal, block_q, block_k) -> attention function)
Builder = Callable[[bool, int, int], AttentionFn]
VARIANTS: dict[str, tuple[str, Builder]] = {
    "xla_sdpa": ("bshd", lambda c, bq, bk: lambda q, k, v: xla_sdpa(q, k, v, causal=c)),
    "naive": ("bhsd", lambda c, bq, bk: lambda q, k, v: naive_attention(q, k, v, causal=c)),
    "scan_kv": (
        "bhsd",
        lambda c, bq, bk: lambda q, k, v: scan_kv_whole_q(q, k, v, causal=c, block_k=bk),
    ),
    "map_softmax": (
        "bhsd",
        lambda c, bq, bk: lambda q, k, v: map_q_full_softmax(q, k, v, causal=c, block_q=bq),
    ),
    "reference": (
        "bhsd",
        lambda c, bq, bk: (
            lambda q, k, v: blockwise_attention(q, k, v, causal=c, block_q=bq, block_k=bk)
        ),
    ),
}
_FAMILY_OPTIONS: dict[str, dict[str, Any]] = {
    "map_fori": {},
    "map_scan": {"skip_masked": False},
    "map_fori_bshd": {"layout": "bshd"},
    "map_fori_highest": {"precision": lax.Precision.HIGHEST},
    "map_fori_bf16": {"dot_dtype": jnp.bfloat16},
    "map_fori_rowsum_dot": {"rowsum_via_dot": True},
}
for _chains in (1, 2, 4):
    VARIANTS[f"heads2d_x{_chains}"] = (
        "bhsd",
        lambda c, bq, bk, n=_chains: (
            lambda q, k, v: blockwise_2d(q, k, v, causal=c, block_q=bq, block_k=bk, chains=n)
        ),
    )
for _name, _groups, _sequential in [
    ("perhead_map_fori", HEADS, True),
    ("split2_map_fori", 2, False),
]:
    VARIANTS[_name] = (
        "bhsd",
        lambda c, bq, bk, g=_groups, seq=_sequential: (
            lambda q, k, v: per_head_groups(
                q, k, v, groups=g, sequential=seq, causal=c, block_q=bq, block_k=bk
            )
        ),
    )
for _name, _options in _FAMILY_OPTIONS.items():
    VARIANTS[_name] = (
        _options.get("layout", "bhsd"),
        lambda c, bq, bk, o=_options: (
            lambda q, k, v: blockwise_family(q, k, v, causal=c, block_q=bq, block_k=bk, **o)
        ),
    )
LOSSY = {"map_fori_bf16"}  # numerics differ from float32 beyond rounding noise


def parse_candidate(label: str, seq: int) -> tuple[str, int, int]:
    """``name``, ``name:B`` (both blocks B) or ``name:BQxBK``; blocks are clamped to ``seq``."""
    name, _, blocks = label.partition(":")
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    bq, _, bk = (blocks or "512").partition("x")
    return name, min(int(bq), seq), min(int(bk or bq), seq)


def make_inputs(seq: int, layout: str, seed: int = 0) -> tuple[Array, Array, Array]:
    rng = np.random.default_rng(seed)
    shape = (1, HEADS, seq, HEAD_DIM) if layout == "bhsd" else (1, seq, HEADS, HEAD_DIM)
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for _ in range(3))


def make_group(labels: list[str], seq: int, causal: bool) -> dict[str, Callable[[], Array]]:
    """Measuring-child target: inputs created here, one jitted zero-argument call per label."""
    inputs = {layout: make_inputs(seq, layout) for layout in {"bhsd", "bshd"}}
    candidates = {}
    for label in labels:
        name, bq, bk = parse_candidate(label, seq)
        layout, build = VARIANTS[name]
        fn, args = jax.jit(build(causal, bq, bk)), inputs[layout]
        candidates[label] = lambda fn=fn, args=args: fn(*args)
    return candidates


def make_single(label: str, seq: int, causal: bool) -> Callable[[], Array]:
    """Measuring-child target for one candidate alone: compiled here, so that the child's
    baseline includes compilation and the peak's rise is what running it needs."""
    name, bq, bk = parse_candidate(label, seq)
    layout, build = VARIANTS[name]
    args = make_inputs(seq, layout)
    compiled = jax.jit(build(causal, bq, bk)).lower(*args).compile()
    return lambda: compiled(*args)


def check_numerics(labels: list[str], seq: int = 512) -> list[dict[str, Any]]:
    """Max abs error of each variant against a float64 NumPy softmax, causal and not."""
    rows = []
    q, k, v = (np.asarray(x, np.float64) for x in make_inputs(seq, "bhsd", seed=1))
    for causal in (False, True):
        s = np.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(HEAD_DIM)
        if causal:
            s = np.where(np.tril(np.ones((seq, seq), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        want = np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v)
        for label in labels:
            name, bq, bk = parse_candidate(label, seq)
            layout, build = VARIANTS[name]
            args = [jnp.asarray(x, jnp.float32) for x in (q, k, v)]
            if layout == "bshd":
                args = [x.transpose(0, 2, 1, 3) for x in args]
            got = np.asarray(jax.jit(build(causal, bq, bk))(*args), np.float64)
            got = got.transpose(0, 2, 1, 3) if layout == "bshd" else got
            err = float(np.abs(got - want).max())
            ok = err < (3e-2 if name in LOSSY else 1e-4)
            rows.append({"variant": label, "causal": causal, "max_abs_err": err, "ok": ok})
    return rows


def run_config(
    labels: list[str], seq: int, causal: bool, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Probe each candidate alone (memory), then time the survivors together (speed)."""
    rows: dict[str, dict[str, Any]] = {}
    for label in labels:
        row: dict[str, Any] = {"seq": seq, "causal": causal, "variant": label}
        if not args.skip_probe:
            probe = measure_in_subprocess(
                f"{_MODULE}:make_single",
                {"label": label, "seq": seq, "causal": causal},
                args.timeout,
                repeats=0,
                memory_limit_mib=args.mem_limit_mib,
            )
            row |= {
                "peak_mib": probe.get("peak_rss_mib"),
                "rise_mib": probe.get("rise_mib"),
                "solo_run_s": (probe.get("first_call_s") or {}).get("main"),  # compiled in setup
                "error": probe["error"] and probe["error"].splitlines()[-1][:60],
            }
        rows[label] = row
    xla_peak = rows.get("xla_sdpa", {}).get("peak_mib")
    for row in rows.values():
        if xla_peak and row.get("peak_mib"):
            row["peak_vs_xla"] = row["peak_mib"] / xla_peak
    runnable = [label for label in labels if not rows[label].get("error")]
    if not runnable or args.probe_only:
        return list(rows.values())
    for attempt in range(2):  # one re-run when the hypervisor stole CPU during the group
        group = measure_in_subprocess(
            f"{_MODULE}:make_group",
            {"labels": runnable, "seq": seq, "causal": causal},
            args.timeout,
            warmup=args.warmup,
            repeats=args.repeats,
            rng_seed=attempt,
            memory_limit_mib=args.mem_limit_mib,
        )
        if group["steal_fraction"] <= args.max_steal or attempt == 1:
            break
    timings = timings_from_result(group)
    baseline = timings.get("xla_sdpa")
    for label in runnable:
        t = timings.get(label)
        if t is None:
            rows[label]["error"] = (group["error"] or "not timed").splitlines()[-1][:60]
            continue
        rows[label] |= {
            "first_call_s": group["first_call_s"][label],  # trace + compile + one run
            "median_ms": t.median * 1e3,
            "cpu_ms": t.cpu_median * 1e3,
            "iqr_pct": 100 * t.iqr / t.median,
            "speedup_vs_xla": baseline.median / t.median if baseline else None,
            "steal_pct": 100 * group["steal_fraction"],
        }
    return list(rows.values())


QUICK_VARIANTS = "xla_sdpa,naive,map_fori:512x512,reference:512x512"
# The main table of NOTES-attention-cpu.md (heads2d_x1 there is the same algorithm as reference).
MAIN_VARIANTS = (
    "xla_sdpa,naive,scan_kv:512,map_scan:512x512,map_fori:512x512,heads2d_x2:512x512,"
    "reference:512x512,map_fori_bf16:512x512"
)
# Everything, for --check: every variant and blocks that do not match.
CHECK_VARIANTS = (
    MAIN_VARIANTS + ",map_softmax:256,map_fori_bshd:512x512,map_fori_rowsum_dot:512x512,"
    "map_fori_highest:512x512,perhead_map_fori:256x128,split2_map_fori:128x256,"
    "heads2d_x1:128x256,heads2d_x4:256x128,map_fori:128x256,map_fori:256x128,reference:128x256,"
    "reference:256x128"
)
COLUMNS = [
    "seq", "causal", "variant", "median_ms", "iqr_pct", "cpu_ms", "speedup_vs_xla",
    "peak_mib", "peak_vs_xla", "rise_mib", "solo_run_s", "first_call_s", "steal_pct", "error",
]  # fmt: skip
FORMATS = {
    "median_ms": ".1f", "cpu_ms": ".1f", "iqr_pct": ".0f", "speedup_vs_xla": ".2f",
    "peak_mib": ".0f", "peak_vs_xla": ".3f", "rise_mib": ".0f", "solo_run_s": ".2f",
    "first_call_s": ".2f", "steal_pct": ".1f",
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seq 1024 and 2048, 4 variants")
    parser.add_argument("--seqs", default="4096", help="comma-separated")
    parser.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    parser.add_argument("--variants", help=f"comma-separated labels; default {MAIN_VARIANTS}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="calls after the first one")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per process")
    parser.add_argument("--mem-limit-mib", type=float, default=10240.0)
    parser.add_argument("--max-steal", type=float, default=0.05)
    parser.add_argument("--skip-probe", action="store_true", help="no per-variant memory run")
    parser.add_argument("--probe-only", action="store_true", help="one isolated run each")
    parser.add_argument("--check", action="store_true", help="numerics vs float64 only")
    parser.add_argument("--json", type=Path, help="append result rows to this JSON-lines file")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--report", type=Path, help="only print the table of a --json file")
    args = parser.parse_args(argv)
    if args.report:
        rows = [json.loads(line) for line in args.report.read_text().splitlines() if line]
        print(format_table(rows, COLUMNS, formats=FORMATS, markdown=args.markdown))
        return
    if args.check:
        rows = check_numerics((args.variants or CHECK_VARIANTS).split(","))
        print(format_table(rows, ["variant", "causal", "max_abs_err", "ok"]))
        if not all(r["ok"] for r in rows):
            raise SystemExit("some variants are numerically wrong")
        return
    seqs = [1024, 2048] if args.quick else [int(s) for s in args.seqs.split(",")]
    if args.quick:
        args.repeats = min(args.repeats, 3)
    labels = (args.variants or (QUICK_VARIANTS if args.quick else MAIN_VARIANTS)).split(",")
    causals = {"yes": [True], "no": [False], "both": [False, True]}[args.causal]
    print(f"steal before start: {100 * cpu_steal_fraction(0.5):.1f}%")
    start, rows = time.perf_counter(), []
    for seq in seqs:
        for causal in causals:
            config_rows = run_config(labels, seq, causal, args)
            rows += config_rows
            if args.json:
                with args.json.open("a") as out:
                    out.writelines(json.dumps(r) + "\n" for r in config_rows)
            print(format_table(config_rows, COLUMNS, formats=FORMATS), "\n", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.markdown:
        print(format_table(rows, COLUMNS, formats=FORMATS, markdown=True))


if __name__ == "__main__":
    main()
