"""Turning command-line text into things a JAX function can be traced with.

`parse_arg_specs` reads HLO-style shape specs (`f32[2,8,1024,64] i32[]`), `load_function` finds
`path/to/file.py:fn` or `pkg.module:fn`, and `random_inputs` makes values for commands that run
the function (bench, autotune). Every user mistake becomes a `CliError` that names the culprit.
JAX is imported inside the functions, so importing this module stays cheap for `--help`.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from einfuse.cli.errors import CliError

if TYPE_CHECKING:
    import jax

# Short (HLO-like) and long (NumPy) spellings; the values are NumPy/ml_dtypes names.
_SHORT_DTYPES: dict[str, str] = {
    "f16": "float16",
    "bf16": "bfloat16",
    "f32": "float32",
    "f64": "float64",
    "i8": "int8",
    "i16": "int16",
    "i32": "int32",
    "i64": "int64",
    "s8": "int8",
    "s16": "int16",
    "s32": "int32",
    "s64": "int64",
    "u8": "uint8",
    "u16": "uint16",
    "u32": "uint32",
    "u64": "uint64",
    "c64": "complex64",
    "c128": "complex128",
    "pred": "bool",
}
DTYPE_NAMES: dict[str, str] = {
    **_SHORT_DTYPES,
    **{long: long for long in set(_SHORT_DTYPES.values())},
}
_NEEDS_X64 = frozenset({"float64", "int64", "uint64", "complex128"})

# A token is `name[...]` (spaces allowed inside the brackets) or any other run of non-separators;
# tokens are separated by whitespace and/or commas.
_TOKEN_RE = re.compile(r"[^\s,\[]*\[[^\]]*\]|[^\s,]+")
_SPEC_RE = re.compile(r"([A-Za-z][A-Za-z0-9_]*)\[([^\]]*)\]")


def parse_arg_specs(text: str) -> list[jax.ShapeDtypeStruct]:
    """`"f32[2,8] bf16[16] i32[]"` -> one `jax.ShapeDtypeStruct` per token, in order."""
    import jax

    specs = []
    for index, token in enumerate(_TOKEN_RE.finditer(text), start=1):
        where = f"--args token {index} {token.group()!r} (column {token.start() + 1})"
        spec = _SPEC_RE.fullmatch(token.group())
        if spec is None:
            raise CliError(f"{where}: expected DTYPE[dims], e.g. f32[2,3] or i32[]")
        dtype = DTYPE_NAMES.get(spec.group(1).lower())
        if dtype is None:
            known = " ".join(sorted([*_SHORT_DTYPES, "bool"]))
            raise CliError(
                f"{where}: unknown dtype {spec.group(1)!r}; known: {known} (or long names: float32)"
            )
        if dtype in _NEEDS_X64 and not jax.config.read("jax_enable_x64"):
            raise CliError(
                f"{where}: {dtype} needs JAX's 64-bit mode (set JAX_ENABLE_X64=1); "
                "without it JAX would silently use 32 bits"
            )
        dims = spec.group(2).strip()
        shape = tuple(_dimension(d, where) for d in dims.split(",")) if dims else ()
        specs.append(jax.ShapeDtypeStruct(shape, dtype))
    return specs


def _dimension(text: str, where: str) -> int:
    text = text.strip()
    if not text.isdigit():
        raise CliError(f"{where}: dimension {text!r} is not a non-negative integer")
    return int(text)


def random_inputs(specs: Sequence[jax.ShapeDtypeStruct], seed: int = 0) -> list[jax.Array]:
    """Fresh values for `specs`: standard-normal floats, small ints (|x| < 8), fair booleans."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    values = []
    for spec in specs:
        shape, dtype = tuple(spec.shape), jnp.dtype(spec.dtype)
        if dtype == jnp.bool_:
            array: Any = rng.random(shape) < 0.5
        elif jnp.issubdtype(dtype, jnp.complexfloating):
            array = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
        elif jnp.issubdtype(dtype, jnp.floating):
            array = rng.standard_normal(shape)
        elif jnp.issubdtype(dtype, jnp.unsignedinteger):
            array = rng.integers(0, 8, shape)
        elif jnp.issubdtype(dtype, jnp.integer):
            array = rng.integers(-8, 8, shape)
        else:
            raise CliError(f"cannot make random inputs of dtype {dtype}")
        values.append(jax.device_put(np.asarray(array).astype(dtype), spec.sharding))
    return values


def load_function(target: str) -> Callable[..., Any]:
    """The callable named by `path/to/module.py:function` or `pkg.module:function`.

    The attribute may be dotted (`module:Model.forward`). Like `python file.py`, a file's own
    directory goes on sys.path so that it can import its neighbours; like `python -m`, so does
    the current directory for module names.
    """
    module_part, sep, attribute = target.rpartition(":")
    if not sep or not module_part or not attribute:
        raise CliError(f"expected MODULE:FUNCTION or path/to/file.py:FUNCTION, got {target!r}")
    if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
        module = _import_file(Path(module_part))
    else:
        module = _import_module(module_part)
    obj: Any = module
    for depth, name in enumerate(attribute.split(".")):
        if not hasattr(obj, name):
            owner = module_part if depth == 0 else ".".join(attribute.split(".")[:depth])
            raise CliError(f"{owner!r} has no attribute {name!r}")
        obj = getattr(obj, name)
    if not callable(obj):
        raise CliError(f"{target!r} is not callable (it is of type {type(obj).__name__})")
    return obj


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise CliError(f"no such file: {str(path)!r}")
    path = path.resolve()
    module_name = f"_einfuse_user_{path.stem}_{abs(hash(path)) & 0xFFFFFF:06x}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise CliError(f"cannot import {str(path)!r}: not a Python module")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise CliError(f"cannot import {str(path)!r}: {one_line(exc)}") from exc
    return module


def _import_module(name: str) -> Any:
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except Exception as exc:
        raise CliError(f"cannot import {name!r}: {one_line(exc)}") from exc


def one_line(exc: BaseException) -> str:
    """`TypeName: first line of the message`, for error reports that must fit on one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def add_sizes_argument(parser: Any) -> None:
    """``--sizes R=N,...``, the same for every command that binds a spec's ranks."""
    parser.add_argument(
        "--sizes",
        default=None,
        metavar="R=N,...",
        help="rank sizes, e.g. e=64,m=4096,p=1024 (a rank or its size symbol, M); they replace "
        "sizes the spec declares",
    )


def add_passes_argument(parser: Any, help: str) -> None:
    """``--passes P`` (``--pipeline P`` is the same option), as ``einfuse.jit(passes=...)``."""
    parser.add_argument("--passes", "--pipeline", dest="passes", default="", metavar="P", help=help)


def add_backend_argument(parser: Any) -> None:
    """``--backend NAME``: what emits the regions (``einfuse.backends.backend``)."""
    parser.add_argument(
        "--backend", default="jax", metavar="NAME", help="the backend that emits code (jax)"
    )


def parse_sizes(text: str | None) -> dict[str, int]:
    """``"e=64, m=4096"`` -> ``{"e": 64, "m": 4096}``; None (not given) -> ``{}``.

    Given but empty, or an item that is not NAME=POSITIVE_INT, or a name given twice, is a
    `CliError` naming the item.
    """
    if text is None:
        return {}
    sizes: dict[str, int] = {}
    items = [part.strip() for part in text.split(",")]
    if not any(items):
        raise CliError("--sizes is empty; give RANK=N,... (e.g. m=4096,p=4096) or leave it out")
    for item in filter(None, items):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or not value.isdigit() or int(value) <= 0:
            raise CliError(f"--sizes item {item!r}: expected RANK=POSITIVE_INT, e.g. m=4096")
        if name in sizes:
            raise CliError(f"--sizes: {name} given twice")
        sizes[name] = int(value)
    return sizes


def check_sizes(sizes: dict[str, int], *cascades: Any, spec: str) -> None:
    """Every name in ``sizes`` is a rank of one of ``cascades``, or a symbol in an undeclared
    size (``M``): anything else would be ignored, and the user would not know."""
    known: set[str] = set()
    for cascade in cascades:
        for rank in cascade.all_ranks():
            size = cascade.size(rank)
            known |= {rank, *(s.name for s in getattr(size, "free_symbols", ()))}
    unknown = sorted(set(sizes) - known)
    if unknown:
        ranks = sorted({r for c in cascades for r in c.all_ranks()})
        raise CliError(
            f"--sizes names {', '.join(unknown)}, which {spec} does not have; "
            f"its ranks: {', '.join(ranks)}"
        )
