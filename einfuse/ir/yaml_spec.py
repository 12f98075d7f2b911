"""Loading spec files: the ``.ein`` text form, and TeAAL-style YAML.

A ``.ein`` file is the text form (``einfuse.ir.text_parse``). A ``.yaml``/``.yml`` file follows
TeAAL's spec format (FPSG-UIUC/teaal-compiler)::

    einsum:
      declaration:            # every tensor and its ranks (TeAAL writes ranks upper-case)
        A: [K, M]
        B: [K, N]
        Z: [M, N]
      expressions:            # one Einsum each; index variables are lower-case
        - Z[m, n] = A[k, m] * B[k, n]
    mapping:
      rank-order: {A: [M, K]}
      partitioning: {Z: {K: [uniform_shape(128)]}}
      loop-order: {Z: [K1, M, N, K0]}
      spacetime: {Z: {space: [M], time: [K1, N, K0]}}

TeAAL's ``sum(K).(expr)`` is read as ``sum(k) (expr)`` and a declared scalar ``a: []``
may be used bare (``a * T[m, n]``). Inputs are the declared tensors no expression
writes; outputs are the written tensors no expression reads. TeAAL's ``take(...)``
(a sparse intersection filter) is refused: einfuse computes dense tensors.

einfuse's extensions, all optional, under ``einsum``:

- ``shape: {E: 64, M: 4096, M1: "ceiling(M/256)"}``: rank sizes (ints or size
  expressions); undeclared sizes stay symbolic.
- ``inputs: [Q, K, V]`` and ``outputs: [AV]``: explicit lists, in this order.
- ``dtype: {Q: bfloat16}``: input dtypes (default float32).
- ``partitions: ["m -> m1, m0 by 256"]``: rank splits the expressions already use.
- expressions in the full text syntax: ``max(m) ...``, ``exp``, division, ``where``,
  recurrences with their initial value as a separate item (``RM[0, p] = -inf``).

The mapping becomes a ``Schedule`` (``load_with_schedule``): ``uniform_shape(n)`` of a
single rank gives ``tiles``; the loop order of the Einsum writing the first output (or the
only one given) gives ``loop_order``; ``spacetime`` space ranks (optionally ``.coord``)
give ``parallel``. Every other entry, and every top-level section but ``einsum`` and
``mapping`` (``architecture``, ``bindings``, ``format``, ...), is kept in
``Schedule.extra`` as YAML text under a dotted key such as ``rank-order.A`` or
``loop-order.QK``. Errors name the YAML file, the line of the node and the column in it.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from einfuse.ir.cascade import Cascade, Einsum, SourceLoc, TensorDecl
from einfuse.ir.errors import ParseError, SpecError
from einfuse.ir.schedule import Schedule
from einfuse.ir.text_lexer import RANK_RE
from einfuse.ir.text_parse import parse
from einfuse.ir.text_sizes import parse_size
from einfuse.ir.verify import verify

_EINSUM_KEYS = ("declaration", "expressions", "shape", "inputs", "outputs", "dtype", "partitions")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_TEAAL_REDUCE = re.compile(r"(=\s*)(sum|max|min|prod)\(([^)]*)\)\.")
_UNIFORM_SHAPE = re.compile(r"\s*uniform_shape\(\s*(\d+)\s*\)\s*")
_PLACEHOLDER = "__outputs__"
_NULL = "tag:yaml.org,2002:null"


def load(path: str | Path) -> Cascade:
    """Load and verify a ``.ein`` or TeAAL-style ``.yaml`` spec."""
    return load_with_schedule(path)[0]


def load_with_schedule(path: str | Path) -> tuple[Cascade, Schedule]:
    """Load a spec and the Schedule its mapping describes (empty for ``.ein``)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise SpecError(f"cannot read spec: {exc.strerror or exc}", where=str(p)) from None
    if p.suffix == ".ein":
        return verify(parse(text, file=str(p))), Schedule()
    if p.suffix in (".yaml", ".yml"):
        return loads_yaml(text, file=str(p))
    raise SpecError(f"unknown spec format {p.suffix!r}: use .ein, .yaml or .yml", where=str(p))


def loads_yaml(text: str, file: str = "") -> tuple[Cascade, Schedule]:
    """Read a TeAAL-style YAML spec from a string (``file`` names it in errors)."""
    return _YamlSpec(text, file).load()


class _YamlSpec:
    def __init__(self, text: str, file: str) -> None:
        self.text, self.file, self.lines = text, file, text.splitlines()
        self.loader = yaml.SafeLoader("")

    # -- nodes ------------------------------------------------------------------------
    def loc(self, node: yaml.Node, col: int = 0) -> SourceLoc:
        mark = node.start_mark
        line = self.lines[mark.line] if mark.line < len(self.lines) else ""
        return SourceLoc(mark.line + 1, mark.column + 1 + col, line, self.file)

    def error(self, msg: str, node: yaml.Node) -> ParseError:
        return ParseError(msg, self.loc(node), where="yaml")

    def items(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """A mapping's entries as ``(key, key node, value node)``; keys are unique strings."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(f"{what} must be a mapping", node)
        out, seen = [], set()
        for k, v in node.value:
            key = self.value(k)
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise self.error(f"{what}: key {key!r} is not a name", k)
            if str(key) in seen:
                raise self.error(f"{what}: {key} given twice", k)
            seen.add(str(key))
            out.append((str(key), k, v))
        return out

    def seq(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(f"{what} must be a list", node)
        return list(node.value)

    def value(self, node: yaml.Node) -> Any:
        return self.loader.construct_object(node, deep=True)

    def string(self, node: yaml.Node, what: str) -> str:
        v = self.value(node)
        if not isinstance(v, str):
            raise self.error(f"{what} must be a string, not {v!r}", node)
        return v

    def names(self, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node]]:
        return [(self.string(n, what), n) for n in self.seq(node, what)]

    def verbatim(self, node: yaml.Node) -> str:
        """The node's own text when it sits on one line, else its flow-style dump."""
        src = self.text[node.start_mark.index : node.end_mark.index].strip()
        if "\n" not in src:
            return src
        v = self.value(node)
        if isinstance(v, str):
            return v
        return yaml.safe_dump(v, default_flow_style=True, width=1 << 30, sort_keys=False).strip()

    def rank(self, name: str, node: yaml.Node) -> str:
        r = name.lower()
        if not RANK_RE.match(r) or r == "inf":
            raise self.error(f"{name!r} is not a rank name", node)
        return r

    # -- the spec ---------------------------------------------------------------------
    def load(self) -> tuple[Cascade, Schedule]:
        try:
            root = yaml.compose(self.text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = self.lines[mark.line] if mark and mark.line < len(self.lines) else ""
            loc = SourceLoc(mark.line + 1, mark.column + 1, line, self.file) if mark else None
            raise ParseError(f"invalid YAML: {exc.problem or exc}", loc, where="yaml") from None
        if root is None:
            raise ParseError("empty spec: expected an 'einsum' section", where=self.file or "yaml")
        top = {k: (kn, v) for k, kn, v in self.items(root, "the spec")}
        if "einsum" not in top:
            raise self.error("no 'einsum' section (with declaration and expressions)", root)
        cascade = self.cascade(top["einsum"][1])
        extra: dict[str, str] = {}
        for key, (_, node) in top.items():
            if key not in ("einsum", "mapping"):
                extra[key] = self.verbatim(node)
        mapping = top.get("mapping")
        if mapping is None or mapping[1].tag == _NULL:
            return cascade, Schedule.of(extra=extra)
        return cascade, self.schedule(mapping[1], cascade, extra)

    def cascade(self, node: yaml.Node) -> Cascade:
        sec = {k: (kn, v) for k, kn, v in self.items(node, "einsum")}
        for key, (kn, _) in sec.items():
            if key not in _EINSUM_KEYS:
                raise self.error(
                    f"unknown einsum entry {key!r}; known: {', '.join(_EINSUM_KEYS)}", kn
                )
        for required in ("declaration", "expressions"):
            if required not in sec:
                raise self.error(f"einsum has no {required!r}", node)
        declared: dict[str, tuple[tuple[str, ...], yaml.Node]] = {}
        for name, kn, v in self.items(sec["declaration"][1], "einsum.declaration"):
            if not _NAME_RE.match(name):
                raise self.error(f"{name!r} is not a tensor name", kn)
            ranks = tuple(self.rank(r, rn) for r, rn in self.names(v, f"ranks of {name}"))
            declared[name] = (ranks, kn)
        sizes = []
        if "shape" in sec:
            for r, kn, v in self.items(sec["shape"][1], "einsum.shape"):
                size = self.value(v)
                if isinstance(size, bool) or not isinstance(size, int | str) or size == "":
                    raise self.error(f"size of {r} must be an int or a size expression", v)
                sizes.append((self.rank(r, kn), parse_size(str(size), self.loc(v))))
        einsums, partitions = self.statements(sec, declared)
        written = [e.output for e in einsums]
        read = {t for e in einsums for t in e.inputs}
        if "inputs" in sec:
            in_names = self.names(sec["inputs"][1], "einsum.inputs")
        else:
            in_names = [(n, kn) for n, (_, kn) in declared.items() if n not in written]
        dtypes = {}
        if "dtype" in sec:
            dtypes = {
                k: self.string(v, f"dtype of {k}")
                for k, _, v in self.items(sec["dtype"][1], "einsum.dtype")
            }
        inputs = []
        for name, n in in_names:
            if name not in declared:
                raise self.error(f"input {name} has no declaration", n)
            ranks, kn = declared[name]
            inputs.append(TensorDecl(name, ranks, dtypes.get(name, "float32"), loc=self.loc(kn)))
        if "outputs" in sec:
            outputs = tuple(n for n, _ in self.names(sec["outputs"][1], "einsum.outputs"))
        else:
            outputs = tuple(t for t in written if t not in read)
        c = Cascade(tuple(inputs), tuple(einsums), outputs, tuple(sizes), partitions)
        self.check_declarations(c, declared, {r for r, _ in sizes})
        return verify(c)

    def statements(
        self, sec: dict[str, tuple[yaml.Node, yaml.Node]], declared: dict
    ) -> tuple[list[Einsum], tuple]:
        """Parse partitions and expressions as one text, mapping errors back to YAML nodes."""
        scalars = {n for n, (ranks, _) in declared.items() if not ranks}
        lines: list[str] = []
        origin: list[tuple[yaml.Node, list[int]]] = []
        if "partitions" in sec:
            for text, n in self.names(sec["partitions"][1], "einsum.partitions"):
                lines.append(f"partition {text}")
                origin.append((n, [-10] * 10 + list(range(len(text) + 1))))
        expr_nodes = self.seq(sec["expressions"][1], "einsum.expressions")
        if not expr_nodes:
            raise self.error("einsum.expressions is empty", sec["expressions"][1])
        for n in expr_nodes:
            line, cols = self.teaal_to_text(self.string(n, "an expression"), scalars, n)
            lines.append(line)
            origin.append((n, cols))
        lines.append(f"outputs {_PLACEHOLDER}")
        try:
            c = parse("\n".join(lines), file=self.file)
        except ParseError as err:
            if err.loc is None or err.loc.line > len(origin):
                raise
            node, cols = origin[err.loc.line - 1]
            raise ParseError(
                err.message, self.expr_loc(node, cols, err.loc.col), where=err.where
            ) from None
        einsums = []
        for e in c.einsums:
            assert e.loc is not None
            node, cols = origin[e.loc.line - 1]
            einsums.append(replace(e, loc=self.expr_loc(node, cols, e.loc.col)))
        return einsums, c.partitions

    def teaal_to_text(self, expr: str, scalars: set[str], node: yaml.Node) -> tuple[str, list[int]]:
        """Rewrite TeAAL spellings into the text syntax; ``cols[i]`` is the source index of i."""
        take = re.search(r"\btake\s*\(", expr)
        if take:
            raise ParseError(
                "take(...) is TeAAL's sparse intersection filter; einfuse computes dense "
                "tensors: write the expression with where(...) instead",
                self.expr_loc(node, list(range(len(expr) + 1)), take.start() + 1),
                where="yaml",
            )
        m = _TEAAL_REDUCE.search(expr)
        if m and not expr[: m.start()].count("="):
            ranks = m.group(3).lower()
            expr = expr[: m.start(3)] + ranks + ") " + expr[m.end() :]
        out, cols, i = [], [], 0
        pattern = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
        for tok in pattern.finditer(expr):
            out.append(expr[i : tok.end()])
            cols.extend(range(i, tok.end()))
            i = tok.end()
            rest = expr[i:].lstrip()
            if tok.group() in scalars and not rest.startswith(("[", "(")):
                out.append("[]")
                cols.extend([i - 1, i - 1])
        out.append(expr[i:])
        cols.extend(range(i, len(expr) + 1))
        return "".join(out), cols

    def expr_loc(self, node: yaml.Node, cols: list[int], col: int) -> SourceLoc:
        """A location inside an expression: in the file's line when the scalar is one line."""
        src_index = cols[min(col - 1, len(cols) - 1)] if col >= 1 else 0
        expr = self.value(node)
        mark = node.start_mark
        start = mark.column + (1 if node.style in ("'", '"') else 0)
        line = self.lines[mark.line] if mark.line < len(self.lines) else ""
        if src_index < 0:  # in the ``partition`` keyword we added
            src_index = 0
        if isinstance(expr, str) and line[start : start + len(expr)] == expr:
            return SourceLoc(mark.line + 1, start + src_index + 1, line, self.file)
        return SourceLoc(mark.line + 1, src_index + 1, str(expr), self.file)

    def check_declarations(self, c: Cascade, declared: dict, shaped: set[str]) -> None:
        """Every rank must be declared and every declared written tensor written as declared."""
        known = {r for ranks, _ in declared.values() for r in ranks} | shaped
        known |= {r for p in c.partitions for r in (p.rank, p.outer, p.inner)}
        for e in c.einsums:
            stray = [r for r in (*e.output_ranks, *e.ranks) if r not in known]
            if stray:
                raise ParseError(
                    f"rank {stray[0]} is not declared: no declaration, shape or partition names "
                    f"{stray[0].upper()} (a bare name is a rank value; a scalar tensor is "
                    f"declared {stray[0]}: [] or written {stray[0]}[])",
                    e.loc,
                    where="yaml",
                )
            if e.output in declared and c.tensor_ranks(e.output) != declared[e.output][0]:
                want = ", ".join(r.upper() for r in declared[e.output][0])
                raise ParseError(
                    f"{e.output} is declared [{want}] but written with ranks "
                    f"[{', '.join(c.tensor_ranks(e.output))}]",
                    e.loc,
                    where="yaml",
                )

    # -- the mapping ------------------------------------------------------------------
    def schedule(self, node: yaml.Node, c: Cascade, extra: dict[str, str]) -> Schedule:
        tiles: dict[str, int] = {}
        parallel: dict[str, None] = {}
        orders: dict[str, tuple[tuple[str, ...], yaml.Node]] = {}
        for key, _, v in self.items(node, "mapping"):
            if key == "partitioning":
                for tensor, _, tv in self.items(v, "mapping.partitioning"):
                    if tv.tag == _NULL:  # TeAAL allows an Einsum with no partitioning
                        continue
                    for ranks, _, parts in self.items(tv, f"partitioning of {tensor}"):
                        m = _single_uniform_shape(self.value(parts))
                        r = ranks.lower()
                        if m is not None and RANK_RE.match(r) and tiles.get(r, m) == m:
                            tiles[r] = m
                        else:
                            extra[f"partitioning.{tensor}.{ranks}"] = self.verbatim(parts)
            elif key == "loop-order":
                for tensor, _, ov in self.items(v, "mapping.loop-order"):
                    ranks = tuple(self.rank(r, rn) for r, rn in self.names(ov, "a loop order"))
                    orders[tensor] = (ranks, ov)
            elif key == "spacetime":
                for tensor, _, tv in self.items(v, "mapping.spacetime"):
                    for part, _, pv in self.items(tv, f"spacetime of {tensor}"):
                        space = self.value(pv) if part == "space" else None
                        plain = isinstance(space, list) and all(
                            isinstance(s, str) and RANK_RE.match(s.lower().removesuffix(".coord"))
                            for s in space
                        )
                        if plain:
                            parallel.update((s.lower().removesuffix(".coord"), None) for s in space)
                        else:
                            extra[f"spacetime.{tensor}.{part}"] = self.verbatim(pv)
            elif key == "rank-order" and isinstance(v, yaml.MappingNode):
                for tensor, _, rv in self.items(v, "mapping.rank-order"):
                    extra[f"rank-order.{tensor}"] = self.verbatim(rv)
            else:
                extra[key] = self.verbatim(v)
        chosen = c.outputs[0] if c.outputs and c.outputs[0] in orders else None
        if chosen is None and len(orders) == 1:
            chosen = next(iter(orders))
        for tensor, (_, ov) in orders.items():
            if tensor != chosen:
                extra[f"loop-order.{tensor}"] = self.verbatim(ov)
        loop_order = orders[chosen][0] if chosen else ()
        return Schedule.of(tiles=tiles, loop_order=loop_order, parallel=parallel, extra=extra)


def _single_uniform_shape(parts: Any) -> int | None:
    """The tile of ``[uniform_shape(n)]`` (one level, an int), else None."""
    if isinstance(parts, str):
        parts = [parts]
    if isinstance(parts, list) and len(parts) == 1 and isinstance(parts[0], str):
        m = _UNIFORM_SHAPE.fullmatch(parts[0])
        if m and int(m.group(1)) > 0:
            return int(m.group(1))
    return None
