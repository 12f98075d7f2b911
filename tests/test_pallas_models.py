"""The Pallas backend on a model as users write it: a Llama-style decoder layer in bfloat16
(GQA attention read per head from the projections, RMSNorm + matmul groups) runs its
attention and its row-wise groups as kernels, matches ``jax.jit``, and lowers for GPU and TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import einfuse
from examples import llama


def test_a_llama_layer_runs_as_pallas_kernels_and_lowers_for_gpu_and_tpu():
    cfg = llama.Config(layers=1)
    params = llama.init_params(cfg, dtype=jnp.bfloat16)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 96), 0, cfg.vocab)
    forward = functools.partial(llama.forward, cfg=cfg)
    f = einfuse.jit(forward, passes="fuse{tile=32}", backend="pallas")
    got, want = f(params, tokens), jax.jit(forward)(params, tokens)
    np.testing.assert_allclose(np.float32(got), np.float32(want), atol=0.07, rtol=0.05)
    assert llama.greedy_agreement(got, want) > 0.95
    explain = f.explain(params, tokens)
    assert "emitted: Pallas kernel (grid" in explain and "Pallas row-wise kernel" in explain
    assert "Einsum by Einsum" not in explain
    cuda = f.lower(params, tokens, lowering_platforms=("cuda",)).as_text()
    tpu = f.lower(params, tokens, lowering_platforms=("tpu",)).as_text()
    assert cuda.count("custom_call @__gpu$xla.gpu.triton") >= 2
    assert tpu.count("custom_call @tpu_custom_call") >= 2
