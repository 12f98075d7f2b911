"""Attention on a GPU: cuDNN, Pallas' own kernel, jax.jit, einfuse (jax, pallas, tuned), tokamax.

One command prints the table of issue 11 (TFLOP/s = 4·S²·D·H / t, halved for causal; median
of interleaved, shuffled rounds after warm-up), every row checked against cuDNN's output
(max abs error; within tolerance where every |err| <= atol + rtol·|ref|, about 4 ulps: see
``TOLERANCE``), with the first call (lower + compile + run),
XLA's allocation per row (temp + output MiB, what it needs beyond its inputs) and the shape's
process peak (device allocator on a GPU, RSS on the CPU). Each shape runs in its own process
(``benchmarks.gpu_attention_rows``); a row that fails prints its reason, a shape that dies
prints why, and the run goes on. Results are appended to ``--out`` (JSON lines) and the
Markdown tables rewritten after every shape, so a run cut short keeps what it measured. The
whole run stays inside ``--budget`` seconds: the tuned row's sweep gets what the budget leaves
per shape, and shapes the budget cannot reach are listed as skipped (the headline shapes run
first).

    python -m benchmarks.gpu_attention                     # all shapes, < 5 min on an H200
    python -m benchmarks.gpu_attention --quick             # bf16 4K/16K and one GQA shape
    python -m benchmarks.gpu_attention --sizes 4096 --dtypes bfloat16 --rows cudnn,einfuse_pallas
    python -m benchmarks.gpu_attention --cpu-smoke         # tiny, interpreted, on this CPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from einfuse.autotune.timing_subprocess import measure_in_subprocess

ROWS = ("cudnn", "pallas_mha", "jit", "einfuse_jax", "einfuse_pallas", "pallas_tuned", "tokamax")
LABELS = {
    "cudnn": 'dot_product_attention(implementation="cudnn")',
    "pallas_mha": "Pallas' own ops.gpu.attention.mha (Triton, default blocks)",
    "jit": "jax.jit of a plain softmax attention",
    "einfuse_jax": 'einfuse (jax) passes="fuse{tile=512}"',
    "einfuse_pallas": 'einfuse (pallas) passes="fuse{tile=64}", default config',
    "pallas_tuned": "einfuse (pallas), tuned: best of a fixed sweep",
    "tokamax": "tokamax.dot_product_attention(implementation=None)",
}
JAX_TILE, PALLAS_TILE = 512, 64
# (atol, rtol) per dtype: a few units in the last place of the output, whose rounding alone
# is half an ulp (2^-8 relative in bfloat16, 2^-11 in float16).
TOLERANCE = {"bfloat16": (1e-2, 1.6e-2), "float16": (1e-3, 2e-3), "float32": (1e-5, 1e-5)}


@dataclass(frozen=True, slots=True)
class Case:
    """One shape: [batch, seq, heads, dim] queries; keys and values with ``kv_heads``."""

    dtype: str
    seq: int
    causal: bool
    heads: int = 16
    kv_heads: int = 16
    dim: int = 128
    batch: int = 1

    @property
    def name(self) -> str:
        gqa = f" gqa {self.heads}/{self.kv_heads}" if self.kv_heads != self.heads else ""
        return f"{self.dtype} s={self.seq}{' causal' if self.causal else ''}{gqa}"

    @property
    def flops(self) -> float:
        """4·S²·D·H (two GEMMs), halved for causal."""
        f = 4.0 * self.batch * self.seq**2 * self.dim * self.heads
        return f / 2 if self.causal else f


def as_dict(case: Case) -> dict[str, Any]:
    return asdict(case)


HEADLINE = (4096, 16384, 1024, 32768)  # the order shapes run in: what the issue quotes first


def cases(
    dtypes: list[str], seqs: list[int], gqa_seqs: list[int], masks: list[bool], smoke: bool
) -> list[Case]:
    """Every shape, headline first: bf16 before f16, 4K/16K before 1K/32K, GQA after bf16."""
    h, kvh, d = (2, 2, 64) if smoke else (16, 16, 128)
    gh, gkv = (4, 2) if smoke else (32, 8)
    order = {s: i for i, s in enumerate(HEADLINE)}
    out = []
    for dtype in dtypes:
        for seq in sorted(seqs, key=lambda s: order.get(s, len(order))):
            out += [Case(dtype, seq, causal, h, kvh, d) for causal in masks]
        if dtype == dtypes[0]:
            out += [Case(dtype, s, c, gh, gkv, d) for s in gqa_seqs for c in masks]
    return out


def run_group(group: list[Case], rows: list[str], sweep_s: float, timeout: float,
              repeats: int) -> list[dict]:  # fmt: skip
    """Shapes that share their inputs (the masks of one size) in one fresh process; the side
    file says per row what happened."""
    with tempfile.TemporaryDirectory(prefix="gpu-attention-") as tmp:
        side = os.path.join(tmp, "rows.json")
        kwargs = {"cases": [as_dict(c) for c in group], "rows": rows, "side": side,
                  "sweep_s": sweep_s}  # fmt: skip
        result = measure_in_subprocess(
            "benchmarks.gpu_attention_rows:make", kwargs, timeout=timeout, warmup=1,
            repeats=repeats, max_steal=1.0,
        )  # fmt: skip
        try:
            info = json.loads(Path(side).read_text())
        except (OSError, json.JSONDecodeError):
            info = {}
    timings = result.get("timings") or {}
    out = []
    for i, case in enumerate(group):
        mine = info["cases"][i] if i < len(info.get("cases", [])) else {"rows": {}}
        for row in rows:
            got = mine["rows"].setdefault(row, {})
            if f"{i}:{row}" in timings:
                t = timings[f"{i}:{row}"]
                got["median_s"], got["samples"] = t["median"], len(t["samples"])
            elif "single_s" in got:
                got["median_s"], got["samples"] = got["single_s"], 1
            elif "error" not in got:  # the process died or the timing failed
                got["error"] = result.get("error") or "not timed"
            if "median_s" in got:
                got["tflops"] = case.flops / got["median_s"] / 1e12
        out.append({"case": case.name, "shape": as_dict(case), "error": result.get("error"),
                    "device": info.get("device"), "platform": info.get("platform"),
                    "device_peak_mib": info.get("device_peak_mib"),
                    "rss_peak_mib": result.get("peak_rss_mib"), **mine})  # fmt: skip
    return out


def row_line(row: str, got: dict[str, Any]) -> str:
    """One printed line: TFLOP/s, error, first call, memory; or the row's one-line reason."""
    if "tflops" not in got:
        return f"  {row:15s} {_first_line(got.get('error'), 150) or 'not run'}"
    err = got.get("max_err")
    check = "" if err is None else f" err {err:.1e}{'' if got.get('ok') else ' OVER TOLERANCE'}"
    mem = f" xla {got['temp_mib'] + got['out_mib']:.0f} MiB" if "temp_mib" in got else ""
    label = f"  [{got['label']}]" if "label" in got else ""
    timing = f"{got['tflops']:7.4g} TFLOP/s  {got['median_s'] * 1e3:9.3f} ms (n={got['samples']})"
    return f"  {row:15s} {timing}{check}  first {got.get('first_call_s', 0):.1f} s{mem}{label}"


def markdown(results: list[dict], rows: list[str], device: str) -> str:
    """Per dtype (and GQA) a TFLOP/s table, rows x shapes, then the details of every cell."""
    dims = sorted({(r["shape"]["batch"], r["shape"]["dim"]) for r in results})
    shape = ", ".join(f"B={b}, D={d}" for b, d in dims)
    refs = sorted({r.get("reference", "?") for r in results})
    lines = [f"Device: {device}. TFLOP/s = 4·S²·D·H / t, halved for causal ({shape}); "
             f"errors against {', '.join(refs)}."]  # fmt: skip
    groups: dict[str, list[dict]] = {}
    for r in results:
        s = r["shape"]
        gqa = f" GQA {s['heads']}/{s['kv_heads']} heads" if s["heads"] != s["kv_heads"] else ""
        groups.setdefault(f"{s['dtype']}{gqa}", []).append(r)
    for title, group in groups.items():
        heads = [f"{r['shape']['seq']}{' causal' if r['shape']['causal'] else ''}" for r in group]
        lines += ["", f"| {title} | {' | '.join(heads)} |", "|---" * (len(group) + 1) + "|"]
        for row in rows:
            cells = [_cell(r["rows"].get(row, {})) for r in group]
            lines.append(f"| {LABELS[row]} | {' | '.join(cells)} |")
    lines += ["", "| shape | row | TFLOP/s | ms | max abs err | first call s | XLA MiB | "
              "process peak MiB | note |", "|---" * 9 + "|"]  # fmt: skip
    for r in results:
        peak = r.get("device_peak_mib") or r.get("rss_peak_mib")
        for row in rows:
            g = r["rows"].get(row, {})
            xla = g["temp_mib"] + g["out_mib"] if "temp_mib" in g else None
            vals = [_num(g.get("tflops"), ".3g"), _num(g.get("median_s"), ".3f", 1e3),
                    _num(g.get("max_err"), ".1e"), _num(g.get("first_call_s"), ".1f"),
                    _num(xla, ".0f"), _num(peak, ".0f")]  # fmt: skip
            note = g.get("label") or _first_line(g.get("error"), 120)
            if g.get("ok") is False:
                note = f"over tolerance; {note}"
            lines.append(f"| {r['case']} | {row} | {' | '.join(vals)} | {note} |")
    return "\n".join(lines) + "\n"


def _first_line(text: str | None, width: int) -> str:
    return (text or "").strip().split("\n")[0][:width]


def _cell(got: dict[str, Any]) -> str:
    if "tflops" in got:
        tf = got["tflops"]
        text = f"{tf:.0f}" if tf >= 10 else f"{tf:.2g}"
        return text + ("" if got.get("ok", True) else " (over tolerance)")
    error = got.get("error") or ""
    return next((w for w in ("skipped", "not installed") if error.startswith(w)), "failed")


def _num(x: Any, fmt: str, scale: float = 1.0) -> str:
    return "" if x is None else format(x * scale, fmt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1024,4096,16384,32768", help="sequence lengths")
    ap.add_argument("--masks", default="none,causal", help="none, causal or both")
    ap.add_argument("--gqa-sizes", default="4096,16384", help="lengths of the GQA shapes")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"of {','.join(ROWS)}")
    ap.add_argument("--quick", action="store_true", help="bf16 4K and 16K, GQA at 4K")
    ap.add_argument("--cpu-smoke", action="store_true", help="S=128, H=2, D=64, interpreted")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for the whole run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-sweep-s", type=float, default=25.0, help="cap per shape")
    ap.add_argument("--size-timeout", type=float, default=150.0, help="cap per size's process")
    ap.add_argument("--out", default="gpu_attention", help="writes OUT.jsonl and OUT.md")
    args = ap.parse_args(argv)
    seqs = [int(s) for s in args.sizes.split(",") if s]
    gqa = [int(s) for s in args.gqa_sizes.split(",") if s]
    masks = [m == "causal" for m in args.masks.split(",")]
    dtypes, rows = args.dtypes.split(","), args.rows.split(",")
    if unknown := [r for r in rows if r not in ROWS]:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    if args.quick:
        seqs, gqa, dtypes = [4096, 16384], [4096], dtypes[:1]
    if args.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
        seqs, gqa, dtypes = [128] if seqs else [], [128] if gqa else [], dtypes[:1]
        args.repeats, args.max_sweep_s = 2, min(args.max_sweep_s, 2.0)
    todo = cases(dtypes, seqs, gqa, masks, args.cpu_smoke)
    out_jsonl, out_md = Path(f"{args.out}.jsonl"), Path(f"{args.out}.md")
    out_jsonl.write_text("")
    groups: list[list[Case]] = []
    for case in todo:  # the masks of one size share a process (and its start-up)
        if groups and (groups[-1][0].dtype, groups[-1][0].seq, groups[-1][0].heads) == (
            case.dtype,
            case.seq,
            case.heads,
        ):
            groups[-1].append(case)
        else:
            groups.append([case])
    deadline = time.perf_counter() + args.budget
    base: list[float] = []  # wall seconds per shape of the finished groups, less the sweep
    results: list[dict] = []
    device = "unknown"
    done = 0
    for group in groups:
        left = deadline - time.perf_counter()
        guess = statistics.median(base) if base else (5.0 if args.cpu_smoke else 10.0)
        if left < guess * len(group):
            for case in group:
                print(f"{case.name}: skipped, the budget is spent", flush=True)
            continue
        sweep_s = len(group) * max(0.0, min(args.max_sweep_s, left / (len(todo) - done) - guess))
        names = " | ".join(c.name for c in group)
        print(f"[{done + 1}/{len(todo)}] {names} (sweep budget {sweep_s:.0f} s)", flush=True)
        start = time.perf_counter()
        timeout = max(min(left, args.size_timeout), 10.0)  # a hung compile costs one size
        got = run_group(group, rows, sweep_s, timeout, args.repeats)
        swept = sum(r["rows"].get("pallas_tuned", {}).get("sweep_s", 0.0) for r in got)
        base.append((time.perf_counter() - start - swept) / len(group))
        done += len(group)
        for r in got:
            device = r.get("device") or device
            print(f"  {r['case']}" + (f": {_first_line(r['error'], 200)}" if r["error"] else ""))
            for row in rows:
                print(row_line(row, r["rows"][row]), flush=True)
            results.append(r)
            with out_jsonl.open("a") as f:
                f.write(json.dumps(r) + "\n")
        out_md.write_text(markdown(results, rows, device))
    print(f"\n{markdown(results, rows, device)}\nwrote {out_jsonl} and {out_md}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
