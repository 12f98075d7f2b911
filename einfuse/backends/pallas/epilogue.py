"""What runs after a fused group's loop, inside its kernel: the epilogue.

Attention's loop ends with float32 states (the running sum ``l``, ``acc = P·V``); the
program then divides and lays the result out. Where that is one program's business (it
reads only the final states, and every result has the query rank and the grid rows with
nothing reduced over them), the kernel does it and writes the result once, in its own dtype,
instead of writing the float32 states for XLA to read back. Differentiated, the states and
the epilogue's VJP in XLA are used instead (the kernels' backward continues from them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax

from einfuse.backends.blockwise_plan import drop_ranks, squeezed_dims, value_ranks
from einfuse.backends.jax_backend import LoweredCascade, lower_cascade
from einfuse.passes.fuse import fused_groups

if TYPE_CHECKING:
    from einfuse.backends.pallas.attention import PallasBlockwise


def plan_epilogue(loop: PallasBlockwise, options: Mapping[str, Any]) -> LoweredCascade | None:
    """The after-loop program as the kernel runs it (rows dropped), or None where it is not
    one program's business; records its results on ``loop`` for the kernel's layouts."""
    post = loop._typed(loop.plan.post)
    loop.epilogue_cascade, loop.epilogue_outputs = post, ()
    g = loop.plan.group
    keep = {*loop.grid_rows, loop.query}
    if (
        loop.query is None
        or {t.name for t in post.inputs} - set(g.carried)
        or set(post.outputs) != {e.output for e in post.einsums} & set(post.outputs)
        or value_ranks(post)
        or any(fused_groups(post))
    ):
        return None
    for e in post.einsums:
        if not keep <= set(e.output_ranks) or keep & set(e.reduced_ranks):
            return None
    loop.epilogue_outputs = tuple(post.outputs)
    squeezed = squeezed_dims(post, loop.drop)
    loop.squeezed.update({o: d for o, d in squeezed.items() if o in post.outputs})
    dropped = drop_ranks(post, loop.drop, loop.values)
    return lower_cascade(dropped, loop.kernel_sizes, wide_dots=True, **options)


def run_with_epilogue(loop: PallasBlockwise, arrays: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The group's results from the kernel with its epilogue (see the module docstring)."""
    env = dict(arrays)
    if loop.plan.pre.einsums:
        env.update(loop.pre(env))
    raw, top, tmax = loop.loop_inputs(env)
    outputs = loop.epilogue_outputs

    @jax.custom_vjp
    def fused(raw: Any, top: Any, tmax: Any) -> dict[str, jax.Array]:
        outs = loop.checked(raw, top, tmax, epilogue=True)
        return {o: outs[o] for o in outputs}

    def forward(raw: Any, top: Any, tmax: Any) -> tuple[Any, Any]:
        def results(r: Any) -> dict[str, jax.Array]:
            outs = loop.post(loop.run_loop(r, top, tmax))
            return {o: outs[o].astype(loop.dtypes[o]) for o in outputs}

        outs, vjp = jax.vjp(results, raw)
        return outs, (vjp, top, tmax)

    def backward(res: Any, ct: Any) -> tuple[Any, Any, Any]:
        vjp, top, tmax = res
        return vjp(ct)[0], zeros_or_none(top), zeros_or_none(tmax)

    fused.defvjp(forward, backward)
    outs = fused(raw, top, tmax)
    return {o: outs[o].astype(loop.dtypes[o]) for o in outputs}


def zeros_or_none(x: Any) -> Any:
    """The zero cotangent of an optional input (None stays None)."""
    return None if x is None else jax.numpy.zeros_like(x)
