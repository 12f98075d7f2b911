"""Row-wise groups (RMSNorm, LayerNorm and the matmul after them) as one Pallas kernel each.

``rowwise_plan`` finds the groups; here each runs as one ``pallas_call`` whose grid is
(row blocks, output-feature blocks): a program loads a block of whole rows, computes the
norm's statistics and the normalized rows, and multiplies them with one block of the
weight's columns, applying the epilogue (bias, activation, residual) on the way out. Its
body is the JAX backend's lowering of the group with the row ranks flattened to one
(``kernel_cascade``), so its dtypes are the JAX emitter's: a bfloat16 model's float32
statistics stay float32, its dots accumulate in float32. What is not in a group runs as
the JAX backend emits it, in the same order.

One kernel is written; ``lax.platform_dependent`` picks how it runs: interpreted on the CPU
(so the tests check it against the float64 reference), through Triton on CUDA and ROCm,
through Mosaic on TPU. A platform whose limits a group's blocks do not meet (Triton's
power-of-two shapes, Mosaic's (8, 128) tiles, the on-chip memory a program holds whole
rows in) runs that group as XLA instead, so no block size is ever silently wrong. Rows
that do not divide the block are zero-padded (rows are independent; padded rows are
dropped), as are output features (never reduced in the group). The backward pass is the
JAX lowering's (``jax.vjp`` of it), so ``jax.grad`` equals the JAX backend's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from einfuse.backends.jax_backend import LoweredCascade, lower_cascade, with_dtype
from einfuse.backends.jax_values import BackendUnsupported, canonical_dtype
from einfuse.backends.pallas.kernel_compat import compatible
from einfuse.backends.pallas.rowwise_layout import Blocks, Layout
from einfuse.backends.rowwise_plan import ROW, RowGroup, RowwisePlan, kernel_cascade, plan_rowwise
from einfuse.ir.cascade import Cascade
from einfuse.ir.dtypes import FLOAT_DTYPES, ITEMSIZE, expr_dtype, tensor_dtypes
from einfuse.ir.errors import EinfuseError
from einfuse.ir.expr import CAST_OPS, Op

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# Bytes a program may hold (``RowKernel.footprint``): Triton keeps a program's tensors in
# registers and shared memory (227 KiB per block on H100/H200); Mosaic's default scoped
# VMEM is 16 MiB (v5e), some of it Mosaic's own.
BUDGET = {"cuda": 192 * 1024, "rocm": 192 * 1024, "tpu": 12 * 1024 * 1024}


def lower_rowwise(
    cascade: Cascade,
    sizes: Mapping[str, int],
    *,
    block_rows: int | None = None,
    block_cols: int | None = None,
    interpret: bool = True,
    **options: Any,
) -> RowwiseProgram | None:
    """``cascade`` with each row-wise group one kernel, the rest the JAX backend's; None if
    it has no row-wise group (the caller emits it with ``lower_cascade`` then).

    ``options`` are ``lower_cascade``'s; ``block_rows``/``block_cols`` fix the blocks
    (default: per platform, see ``RowKernel.blocks``). On the CPU the kernel is interpreted
    (how its numerics are tested), or with ``interpret=False`` left to XLA (faster there)."""
    c = with_dtype(cascade, options.get("dtype"))
    if options.get("dtype") is not None:
        c = pin_weak(c, canonical_dtype(options["dtype"]).name)
    plan = plan_rowwise(c)
    if plan is None:
        return None
    typed = {k: v for k, v in options.items() if k != "dtype"}  # declared from here on
    blocks = (block_rows, block_cols)
    return RowwiseProgram(c, plan, dict(sizes), blocks, interpret, typed)


def pin_weak(c: Cascade, weak: str) -> Cascade:
    """``c`` with each Einsum that reads no typed value (constants, rank values) cast to
    ``weak``: the steps are lowered apart, each with the default weak dtype, so an Einsum
    read across steps must say its dtype itself."""
    dtypes = tensor_dtypes(c, weak)
    einsums = []
    for e in c.einsums:
        if expr_dtype(e.expr, dtypes.get) is None and weak in CAST_OPS:
            e = replace(e, expr=Op(weak, (e.expr,)))
        einsums.append(e)
    return c.with_einsums(einsums)


class RowwiseProgram:
    """The plan's steps in order: a dict of inputs in, a dict of the cascade's outputs out."""

    def __init__(
        self,
        cascade: Cascade,
        plan: RowwisePlan,
        sizes: dict[str, int],
        blocks: tuple[int | None, int | None],
        interpret: bool,
        options: dict[str, Any],
    ) -> None:
        self.cascade, self.plan = cascade, plan
        self.steps: list[LoweredCascade | RowKernel] = [
            RowKernel(s, sizes, blocks, interpret, options)
            if isinstance(s, RowGroup)
            else lower_cascade(s, sizes, **options)
            for s in plan.steps
        ]
        self.inputs = tuple(
            (t.name, tuple(sizes[r] for r in t.ranks), canonical_dtype(t.dtype))
            for t in cascade.inputs
        )
        self.outputs = cascade.outputs

    def __call__(self, arrays: Mapping[str, Any]) -> dict[str, jax.Array]:
        env = {}
        for name, shape, dtype in self.inputs:
            x = jnp.asarray(arrays[name])
            if tuple(x.shape) != shape:
                raise EinfuseError(f"input {name} has shape {tuple(x.shape)}, expected {shape}")
            env[name] = x.astype(dtype)
        for step in self.steps:
            env.update(step(env))
        return {o: env[o].astype(canonical_dtype(self.plan.dtypes[o])) for o in self.outputs}

    def describe(self) -> str:
        """One line for ``explain``: how many row-wise kernels and over which ranks."""
        kernels = [s for s in self.steps if isinstance(s, RowKernel)]
        groups = ", ".join(
            f"rows {' x '.join(k.group.rows)}"
            + (f" x {k.group.cols} blocks" if k.group.cols else "")
            for k in kernels
        )
        return f"{len(kernels)} Pallas row-wise kernel(s) ({groups})"

    def source(self, fn_name: str = "cascade") -> str:
        """Each step as it runs: a kernel's body (one block of rows), or plain JAX."""
        return "\n".join(s.source(f"{fn_name}_{k}") for k, s in enumerate(self.steps))


class RowKernel:
    """One row-wise group as a ``pallas_call`` over (row blocks, output-feature blocks)."""

    def __init__(
        self,
        group: RowGroup,
        sizes: dict[str, int],
        blocks: tuple[int | None, int | None],
        interpret: bool,
        options: dict[str, Any],
    ) -> None:
        self.group, self.sizes, self.options = group, sizes, options
        self.fixed, self.interpret = blocks, interpret
        self.names = tuple(t.name for t in group.cascade.inputs)
        self.kernel = kernel_cascade(group)
        self.dtypes = tensor_dtypes(self.kernel)
        self.xla = lower_cascade(group.cascade, sizes, **options)
        self.n_rows = math.prod(sizes[r] for r in group.rows)
        self.n_cols = sizes[group.cols] if group.cols else 1
        self._bodies: dict[Blocks, LoweredCascade] = {}

    def __call__(self, env: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        args = {n: env[n] for n in self.names}

        @jax.custom_vjp
        def run(args: dict[str, jax.Array]) -> dict[str, jax.Array]:
            return lax.platform_dependent(
                **{p: functools.partial(self._on, p, args) for p in PLATFORMS}
            )

        def forward(args: Any) -> tuple[Any, Any]:
            return run(args), args

        def backward(args: Any, ct: Any) -> tuple[Any]:
            return (jax.vjp(self.xla, args)[1](ct)[0],)

        run.defvjp(forward, backward)
        return run(args)

    # -- blocks and what a platform can take ------------------------------------------------
    def blocks(self, platform: str) -> Blocks:
        """The blocks given, else of those ``platform`` can run the one that reads the least:
        the weight is read once per row block, the rows once per feature block, so traffic
        goes as ``1/rows + 1/cols`` (if none can run, the smallest, and XLA runs the group)."""
        rows, cols = self.fixed
        options = [
            Blocks(rows or b.rows, (cols or b.cols) if self.group.cols else 1)
            for b in Blocks.candidates(platform, self.n_rows, self.n_cols)
        ]
        fits = [b for b in options if self.refusal(platform, b) is None]
        if not fits:
            return options[-1]
        return min(fits, key=lambda b: 1 / b.rows + (1 / b.cols if self.group.cols else 0))

    def body(self, b: Blocks) -> LoweredCascade:
        """The group for one program: a block of rows, a block of output features; its sums
        and contractions accumulate in at least float32 (Mosaic's dots must), and in the
        widest float it holds, its statistics are kept so too."""
        if b not in self._bodies:
            acc = jnp.result_type(
                self.options.get("accumulate_dtype") or jnp.float32,
                *(d for d in self.dtypes.values() if d in FLOAT_DTYPES),
            )
            options = {**self.options, "accumulate_dtype": canonical_dtype(acc)}
            self._bodies[b] = lower_cascade(self.kernel, self.block_sizes(b), **options)
        return self._bodies[b]

    def block_sizes(self, b: Blocks) -> dict[str, int]:
        sizes = {**self.sizes, ROW: b.rows}
        if self.group.cols:
            sizes[self.group.cols] = b.cols
        return sizes

    def shapes(self, b: Blocks) -> dict[str, tuple[int, ...]]:
        """Every tensor of one program, by name: its inputs' blocks and intermediates."""
        sizes, c = self.block_sizes(b), self.kernel
        names = [t.name for t in c.inputs] + [e.output for e in c.einsums]
        return {n: tuple(sizes[r] for r in c.tensor_ranks(n)) for n in names}

    def refusal(self, platform: str, b: Blocks) -> str | None:
        """Why ``platform`` cannot run the kernel with blocks ``b`` (None: it can)."""
        shapes = list(self.shapes(b).values())
        cols = b.cols if self.group.cols else None
        if platform in ("cuda", "rocm"):
            odd = [s for s in shapes if any(d & (d - 1) for d in s)]
            if odd:
                return f"Triton takes power-of-two shapes only, not {odd[0]}"
            if b.rows < 16 or (cols is not None and cols < 16):
                return "Triton's dot takes blocks of at least 16"
        whole_rows = b.rows >= self.n_rows
        tiled = not (b.rows % 8 and not whole_rows) and (
            cols is None or cols % 128 == 0 or cols >= self.n_cols
        )
        if platform == "tpu" and not tiled:
            return f"Mosaic tiles rows by 8 and columns by 128, not {b.rows} x {b.cols}"
        held = self.footprint(platform, b)
        if platform in BUDGET and held > BUDGET[platform]:
            return f"a program holds {held} bytes, over {BUDGET[platform]} on {platform}"
        return None

    def footprint(self, platform: str, b: Blocks) -> int:
        """Bytes one program holds. Mosaic: its blocks and outputs, double-buffered, and
        every intermediate; Triton: blocks and outputs once (no pipelined loop) and the two
        largest intermediates (the rest are fused in registers)."""
        shapes, c = self.shapes(b), self.kernel
        size = {n: math.prod(s) * ITEMSIZE[self.dtypes[n]] for n, s in shapes.items()}
        io = sum(size[t.name] for t in c.inputs) + sum(size[o] for o in c.outputs)
        inner = sorted((size[e.output] for e in c.einsums), reverse=True)
        if platform == "tpu":
            return 2 * io + sum(inner)
        return io + sum(inner[:2])

    # -- one platform -------------------------------------------------------------------
    def _on(self, platform: str, args: dict[str, jax.Array]) -> dict[str, jax.Array]:
        b = self.blocks(platform)
        if platform == "cpu" and not self.interpret:
            return self.xla(args)
        if platform != "cpu" and self.refusal(platform, b) is not None:
            return self.xla(args)
        try:
            self.body(b)
        except BackendUnsupported:  # a block's Einsum the JAX lowering will not materialize
            return self.xla(args)
        return self._kernel(platform, b, args)

    def _kernel(self, platform: str, b: Blocks, args: dict[str, jax.Array]) -> dict[str, Any]:
        g, body = self.group, self.body(b)
        row_blocks = -(-self.n_rows // b.rows)
        col_blocks = -(-self.n_cols // b.cols)
        layouts = {n: self._layout(n, b, row_blocks, col_blocks) for n in self.names}
        layouts |= {o: self._layout(o, b, row_blocks, col_blocks) for o in g.cascade.outputs}
        operands = [layouts[n].to_kernel(args[n]) for n in self.names]
        outs = [
            jax.ShapeDtypeStruct(layouts[o].padded, d)
            for o, d in zip(g.cascade.outputs, body.out_dtypes)
        ]
        revisited = any(layouts[o].col_dim is None for o in g.cascade.outputs)
        triton = platform in ("cuda", "rocm")
        run = compatible(body, widen=triton, unbatch=True) if platform != "cpu" else body
        finals = pl.pallas_call(
            functools.partial(self._program, body, run),
            out_shape=outs,
            grid=(row_blocks, col_blocks),
            in_specs=[layouts[n].spec() for n in self.names],
            out_specs=[layouts[o].spec() for o in g.cascade.outputs],
            interpret=platform == "cpu",
            compiler_params=_compiler_params(platform, revisited and col_blocks > 1),
            name="einfuse_rowwise",
        )(*operands)
        dtypes = dict(zip(self.xla.outputs, self.xla.out_dtypes))  # every branch's, the same
        return {
            o: layouts[o].from_kernel(y).astype(dtypes[o])
            for o, y in zip(g.cascade.outputs, finals)
        }

    def _program(self, body: LoweredCascade, run: Any, *refs: Any) -> None:
        """One program: rows block ``program_id(0)``, output features ``program_id(1)``;
        ``run`` is ``body`` made ``compatible`` with the platform's compiler."""
        ins, outs = refs[: len(self.names)], refs[len(self.names) :]
        values = {}
        for (name, info), ref in zip(body.inputs, ins):
            x = ref[...]
            values[name] = x if x.shape == info.shape else x.reshape(info.shape)
        res = run(values)
        for o, ref in zip(body.outputs, outs):
            y = res[o].astype(ref.dtype)
            ref[...] = y if y.shape == ref.shape else y.reshape(ref.shape)

    def _layout(self, name: str, b: Blocks, row_blocks: int, col_blocks: int) -> Layout:
        g = self.group
        ranks = g.cascade.tensor_ranks(name)
        row_dims = [ranks.index(r) for r in g.rows] if g.is_row_tensor(name) else []
        rest = [k for k in range(len(ranks)) if k not in row_dims]
        col = g.col_dims.get(name)
        col_dim = None if col is None else (1 if row_dims else 0) + rest.index(col)
        return Layout(
            tuple(row_dims),
            tuple(self.sizes[r] for r in g.rows),
            tuple(self.sizes[ranks[k]] for k in rest),
            col_dim,
            b,
            row_blocks,
            col_blocks,
        )

    def source(self, fn_name: str = "cascade") -> str:
        g = self.group
        lines = [f"# row-wise kernel over rows ({', '.join(g.rows)})"]
        if g.cols:
            lines[0] += f" and output features {g.cols}"
        for p in ("cuda", "tpu"):
            b = self.blocks(p)
            why = self.refusal(p, b)
            lines.append(f"#   {p}: " + (f"XLA ({why})" if why else f"blocks {b.rows} x {b.cols}"))
        b = self.blocks("cpu")
        return "\n".join(lines) + "\n" + self.body(b).source(fn_name)


def _compiler_params(platform: str, revisited: bool) -> Any:
    """Triton: Pallas' defaults; Mosaic: row blocks parallel, feature blocks too unless a
    prologue output (one block per row block) is written again by each of them."""
    if platform in ("cuda", "rocm"):
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams()
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pl_tpu

        cols = "arbitrary" if revisited else "parallel"
        return pl_tpu.CompilerParams(dimension_semantics=("parallel", cols))
    return None
