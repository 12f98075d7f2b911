"""The cascade library: named, verified Einsum cascades for attention and transformer layers.

Every function returns a ready ``Cascade`` whose sizes stay symbolic (``M``) unless
bound by keyword (``m=4096``); see each module for its tensors and ranks.
"""

from einfuse.einsum_cascade.attention import FORMS, LibraryError, attention
from einfuse.einsum_cascade.block import transformer_block
from einfuse.einsum_cascade.mlp import gelu_mlp, matmul_chain, swiglu_mlp
from einfuse.einsum_cascade.norms import layernorm, rmsnorm
from einfuse.einsum_cascade.tp_block import shard_weights, tp_block

__all__ = [
    "FORMS",
    "LibraryError",
    "attention",
    "gelu_mlp",
    "layernorm",
    "matmul_chain",
    "rmsnorm",
    "shard_weights",
    "swiglu_mlp",
    "tp_block",
    "transformer_block",
]
