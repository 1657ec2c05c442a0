"""Loop-aware FLOPs, HBM bytes and collective bytes of a compiled XLA program, read from its optimized HLO.

Why not `compiled.cost_analysis()` alone: XLA's cost analysis counts a while loop's body once, and every
program here is loops (the scan over layers, the scan over micro-batches, the decode loop), so its totals
are 1/L-1/(L·n_micro) of the work. Here each instruction's cost is multiplied by the trip counts of the
loops around it (`known_trip_count` in the while op's backend config, which XLA sets for scans).

Counted per instruction executed at the top level of a computation (entry, loop bodies, conditional
branches, calls), which is what runs as one kernel on a TPU:
- flops: 2 x output elements x contracted elements of every `dot` / `convolution` (also inside fusions;
  for a convolution only the window taps that land on real input, not padding); a Pallas kernel
  (`tpu_custom_call`) adds the flops of its own cost estimate when it gives one, and splash attention's
  kernels (which give none) their causal attention FLOPs from their shapes.
- bytes: operands read + result written of every top-level kernel (fusion, dot, copy, custom call, ...),
  as HloCostAnalysis does (sliced operands cost their slices, in-place updates their update), plus the
  same for the collectives. Checked against XLA's own cost_analysis() on loop-free TPU programs
  (tests/test_aot.py): FLOPs within 1%, bytes within ~25% (XLA also counts traffic this walk leaves out).
- collective bytes: the result size of all-gather / all-to-all / collective-permute and the operand size
  of all-reduce / reduce-scatter (the data one device sends or receives, within a factor (n-1)/n).
"""
from __future__ import annotations

import dataclasses
import math
import re

from agq_jax.aot.hlo_parse import (_DTYPE_BYTES, _FREE, _SHAPE, COLLECTIVES, _constants, _first_shape, _Instr,
                                   _loop_trip, _shapes_bytes, parse)

__all__ = ["Cost", "analyze", "measure", "top_kernels", "parse"]


@dataclasses.dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0
    collective_bytes: float = 0.0
    collectives: dict = dataclasses.field(default_factory=dict)  # opcode -> bytes
    custom_calls: dict = dataclasses.field(default_factory=dict)  # kernels without a cost estimate -> count
    unknown_loops: int = 0                                        # while loops whose trip count was not found
    analytic_flops: float = 0.0                                   # of `flops`: splash kernels, from their shapes

    def add(self, other: "Cost", times: float = 1.0):
        self.flops += times * other.flops
        self.analytic_flops += times * other.analytic_flops
        self.bytes += times * other.bytes
        self.collective_bytes += times * other.collective_bytes
        for k, v in other.collectives.items():
            self.collectives[k] = self.collectives.get(k, 0.0) + times * v
        for k, v in other.custom_calls.items():
            self.custom_calls[k] = self.custom_calls.get(k, 0) + times * v
        self.unknown_loops += other.unknown_loops


def _real_taps(in_size: int, size: int, out_size: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
    """(output position, window tap) pairs of one spatial dim whose input element is real: neither padding nor
    a hole of a dilated input. XLA:TPU spells sharded einsums as convolutions whose window mostly hangs over
    padding (size=8 pad=7_7 over an input of 1), so counting every tap would overstate them 8x."""
    hi = (in_size - 1) * lhs_dil
    count = 0
    for t in range(size):
        first = t * rhs_dil - pad_lo  # input index of output 0 for tap t; output o adds o * stride
        lo_o = max(0, -(-(-first) // stride)) if first < 0 else 0
        hi_o = min(out_size - 1, (hi - first) // stride) if hi >= first else -1
        if lhs_dil == 1:
            count += max(0, hi_o - lo_o + 1)
        else:
            count += sum(1 for o in range(lo_o, hi_o + 1) if (first + o * stride) % lhs_dil == 0)
    return count


def _conv_flops(ins: _Instr, table: dict[str, str]) -> float:
    """dot: 2 x out x contracted. convolution (how TPU HLO spells most matmuls): 2 x (out elements / out
    spatial positions) x kernel input features x the (output position, tap) pairs that read real input."""
    out = _first_shape(ins.result)
    if out is None or not ins.operands:
        return 0.0
    if ins.opcode == "dot":
        lhs = _first_shape(table.get(ins.operands[0], ""))
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
        if lhs is None:
            return 0.0
        contracted = math.prod(lhs[1][int(d)] for d in m.group(1).split(",") if d) if m else 1
        return 2.0 * math.prod(out[1]) * contracted
    lhs = _first_shape(table.get(ins.operands[0], ""))
    kernel = _first_shape(table.get(ins.operands[1], "")) if len(ins.operands) > 1 else None
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if lhs is None or kernel is None or labels is None:
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    in_feat = kernel[1][rhs_l.index("i")] if "i" in rhs_l else 1
    spatial = sorted(c for c in lhs_l if c.isdigit())
    window = re.search(r"window=\{([^}]*)\}", ins.attrs)
    text = window.group(1) if window else ""

    def field(name: str, default: str) -> list[str]:
        m = re.search(name + r"=([0-9_x\-]+)", text)
        return m.group(1).split("x") if m else [default] * len(spatial)

    sizes, strides, pads = field("size", "1"), field("stride", "1"), field("pad", "0_0")
    lhs_dil, rhs_dil = field("lhs_dilate", "1"), field("rhs_dilate", "1")
    pairs, out_positions = 1, 1
    for j, d in enumerate(spatial):
        out_size = out[1][out_l.index(d)]
        pairs *= _real_taps(lhs[1][lhs_l.index(d)], int(sizes[j]), out_size, int(strides[j]),
                            int(pads[j].split("_")[0]), int(lhs_dil[j]), int(rhs_dil[j]))
        out_positions *= out_size
    return 2.0 * math.prod(out[1]) / max(out_positions, 1) * in_feat * pairs


def _custom_call_cost(ins: _Instr, table: dict[str, str] | None = None) -> tuple[float, float] | None:
    """(flops, bytes) a Pallas / Mosaic TPU kernel declares in its backend config (cost_estimate), if any; for
    megablox scaled to the device's own experts (`_megablox_share`)."""
    m = re.search(r'"cost_estimate":\{([^}]*)\}', ins.attrs)
    if not m:
        return None
    fl = re.search(r'"flops":"?(\d+)', m.group(1))
    by = re.search(r'"bytes_accessed":"?(\d+)', m.group(1))
    flops, nbytes = float(fl.group(1)) if fl else 0.0, float(by.group(1)) if by else 0.0
    share = _megablox_share(ins, table) if table is not None else None
    if share is not None:
        local, weights = share
        flops, nbytes = flops * local, max(nbytes * local, weights)
    return flops, nbytes


def _megablox_share(ins: _Instr, table: dict[str, str]) -> tuple[float, float] | None:
    """(share of the routed rows a device's experts get, bytes of its expert weights) of a megablox `gmm` /
    `tgmm` call on an expert shard (group_offset: it holds G_local of the G experts). The kernel's declared
    cost covers every row of the sorted buffer, but it only visits the tiles of its own groups: G_local / G
    of the rows on average (uniform routing), reading its weights at least once."""
    if not (ins.name.startswith("gmm") or ins.name.startswith("tgmm")):
        return None
    shapes = [_first_shape(table.get(o, "")) for o in ins.operands]
    offsets = [sh for sh in shapes if sh and sh[0] == "s32" and len(sh[1]) == 1 and sh[1][0] > 1]
    weights = [sh for sh in ([_first_shape(ins.result)] if ins.name.startswith("tgmm") else shapes)
               if sh and len(sh[1]) == 3]
    if not offsets or not weights:
        return None
    groups, local = offsets[0][1][0] - 1, weights[-1][1][0]
    if not 0 < local < groups:
        return None
    return local / groups, math.prod(weights[-1][1]) * _DTYPE_BYTES[weights[-1][0]]


# Splash attention (Pallas, models/attention.py) gives no cost estimate. Its kernels are named by what they
# compute: matmuls per (query row, visited key) pair in each: forward QK^T and PV; dq recomputes QK^T, then
# dO V^T and dS K; dkv recomputes QK^T, then P^T dO, dO V^T and dS^T Q.
_SPLASH_MATMULS = {"splash_mqa_fwd": 2, "splash_mha_fwd": 2, "splash_mqa_dq": 3, "splash_mha_dq": 3,
                   "splash_mqa_dkv": 4, "splash_mha_dkv": 4}


def _splash_cost(ins: _Instr, table: dict[str, str]) -> tuple[float, float] | None:
    """(flops, bytes) of a splash attention kernel from its operand shapes, for the causal mask this project
    uses (a query row visits T/2 keys on average). Bytes: operands and results once, plus the blocks the
    kernel streams again for every block of the other side (keys / values per query block in the forward
    and dq kernels, queries / output gradients per key block in dkv): half the blocks on average."""
    kind = next((k for k in _SPLASH_MATMULS if ins.name.startswith(k)), None)
    if kind is None:
        return None
    floats = [(o, sh) for o in ins.operands
              if (sh := _first_shape(table.get(o, ""))) and sh[0] in ("bf16", "f32", "f16")]
    if len(floats) < 3:
        return None
    (_, q), (k_name, k), (v_name, _) = floats[:3]  # q [..., T, D], k / v [..., S, D] (vmapped dims may be gone)
    t_q, t_kv, d = q[1][-2], k[1][-2], q[1][-1]
    flops = _SPLASH_MATMULS[kind] * 2.0 * math.prod(q[1][:-1]) * (t_kv / 2) * d
    scratch = _first_shape(ins.result)  # the (block, head_dim) accumulator scratch comes first
    block = scratch[1][-2] if scratch and len(scratch[1]) >= 2 else max(t_q, t_kv)
    passes = max(t_q, t_kv) / max(block, 1)
    if "dkv" in kind:  # queries and output gradients (q-shaped) stream past each key block
        streamed = sum(_shapes_bytes(table.get(o, "")) for o, sh in floats if sh == q)
    else:
        streamed = _shapes_bytes(table.get(k_name, "")) + _shapes_bytes(table.get(v_name, ""))
    return flops, streamed * max(passes - 1, 0) / 2


_SLICING = ("dynamic-slice", "slice", "gather")
_IN_PLACE = ("dynamic-update-slice", "scatter")


def _users(instrs) -> dict[str, list[_Instr]]:
    users: dict[str, list[_Instr]] = {}
    for i in instrs:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    return users


def _read_bytes(name: str, instrs, comps, types, depth: int = 0) -> float | None:
    """Bytes the fused code reads of value `name` when it only slices it (through bitcasts and nested
    fusions) or only updates it in place; None when some use reads it whole."""
    total = 0.0
    for u in _users(instrs).get(name, []):
        if u.opcode in _SLICING and u.operands[0] == name:
            total += _shapes_bytes(u.result)
        elif u.opcode in _IN_PLACE and u.operands[0] == name:
            continue  # the target of an in-place write: costed as its update (see _io_bytes)
        elif u.opcode == "bitcast" and depth < 8:
            sub = _read_bytes(u.name, instrs, comps, types, depth + 1)
            if sub is None:
                return None
            total += sub
        elif u.opcode == "fusion" and u.calls and depth < 8:
            inner = comps.get(u.calls[0], ())
            for k, o in enumerate(u.operands):
                if o != name:
                    continue
                p = next((i for i in inner if i.opcode == "parameter" and i.index == k), None)
                sub = None if p is None else _read_bytes(p.name, inner, comps, types, depth + 1)
                if sub is None:
                    return None
                total += sub
        else:
            return None
    return total


def _written_bytes(root: _Instr | None, instrs, ftypes) -> float | None:
    """Bytes a fusion's result costs when it is an in-place update of one of its parameters (a
    dynamic-update-slice or scatter into a loop buffer): the update, read and written; else None."""
    by_name = {i.name: i for i in instrs}
    if root is None or root.opcode not in _IN_PLACE or len(root.operands) < 2:
        return None
    target = by_name.get(root.operands[0])
    while target is not None and target.opcode == "bitcast":
        target = by_name.get(target.operands[0])
    if target is None or target.opcode != "parameter":
        return None
    update = root.operands[-1] if root.opcode == "scatter" else root.operands[1]
    return 2 * _shapes_bytes(ftypes.get(update, ""))


def _io_bytes(ins: _Instr, table: dict[str, str], comps=None, types=None) -> float:
    """Bytes a top-level kernel reads and writes. For a fusion, like HloCostAnalysis: an operand the fused
    code only slices (one layer of the stacked weights or saved activations in a scan body, also through
    bitcasts and nested fusions) costs the slices it reads, and a result made by an in-place
    dynamic-update-slice / scatter into a parameter (a loop buffer, the KV cache) costs the update."""
    operands = [_shapes_bytes(table.get(o, "")) for o in ins.operands]
    result = _shapes_bytes(ins.result)
    if ins.opcode in ("dynamic-slice", "slice"):
        return 2 * result
    if ins.opcode == "slice-start":  # async slice: result ((operand), slice, context); slice-done is free
        shapes = _SHAPE.findall(ins.result)
        return 2 * _shapes_bytes("%s[%s]" % shapes[-2]) if len(shapes) >= 2 else 2 * result
    if ins.opcode == "dynamic-update-slice" and len(operands) > 1:
        return 2 * operands[1] + sum(operands[2:])
    if ins.opcode == "scatter" and len(operands) > 2:
        return 2 * operands[-1] + sum(operands[1:-1])
    if ins.opcode == "fusion" and comps is not None and ins.calls:
        fused = comps.get(ins.calls[0], ())
        ftypes = types.get(ins.calls[0], {})
        for p in fused:
            if p.opcode == "parameter" and p.index is not None and p.index < len(operands):
                read = _read_bytes(p.name, fused, comps, types)
                if read is not None:
                    operands[p.index] = min(read, operands[p.index])
        root = next((i for i in fused if i.root), None)
        roots = [root]
        if root is not None and root.opcode == "tuple":
            by_name = {i.name: i for i in fused}
            roots = [by_name.get(o) for o in root.operands]
        if any(r is not None and r.opcode in _IN_PLACE for r in roots):
            result = sum(w if (w := _written_bytes(r, fused, ftypes)) is not None
                         else (_shapes_bytes(r.result) if r is not None else 0.0) for r in roots)
    return result + sum(operands)


class _Walker:
    """One parsed module: the cost of each top-level kernel (`kernel`) and of whole computations, loops
    multiplied by their trip counts (`walk`)."""

    def __init__(self, hlo_text: str):
        self.comps, self.types, self.entry = parse(hlo_text)
        self.consts = _constants(hlo_text)
        self.top_memo: dict[str, Cost] = {}
        self.inner_memo: dict[str, Cost] = {}
        self.kernel_memo: dict[str, Cost] = {}

    def op_cost(self, ins: _Instr, table) -> Cost:
        """flops and collective bytes of one instruction, including the computations it calls."""
        cost = Cost()
        op = ins.opcode
        base = op[:-len("-start")] if op.endswith("-start") else op
        if op in ("dot", "convolution"):
            cost.flops += _conv_flops(ins, table)
        elif base in COLLECTIVES:
            src = ins.operands if base in ("all-reduce", "reduce-scatter") else ()
            moved = sum(_shapes_bytes(table.get(o, "")) for o in src) if src else _shapes_bytes(ins.result)
            if op.endswith("-start") and base != "all-reduce":
                moved /= 2  # an async start's result is the (operand, result) pair
            cost.collective_bytes += moved
            cost.collectives[base] = cost.collectives.get(base, 0.0) + moved
        elif op == "custom-call":
            est = _custom_call_cost(ins, table)
            target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
            tname = target.group(1) if target else "?"
            splash = _splash_cost(ins, table) if est is None else None
            if est is not None:
                cost.flops += est[0]
            elif splash is not None:
                cost.flops += splash[0]
                cost.analytic_flops += splash[0]
            elif tname == "tpu_custom_call":
                cost.custom_calls[tname] = cost.custom_calls.get(tname, 0) + 1
        if op not in ("while",):
            for c in ins.calls:
                cost.add(self.inner(c))
        return cost

    def inner(self, name: str) -> Cost:
        if name not in self.inner_memo:
            self.inner_memo[name] = Cost()
            total = Cost()
            for ins in self.comps.get(name, ()):
                total.add(self.op_cost(ins, self.types.get(name, {})))
            self.inner_memo[name] = total
        return self.inner_memo[name]

    def kernel(self, ins: _Instr, table) -> Cost:
        """One top-level kernel's cost: its HBM bytes (operands read + result written, or a custom call's
        own estimate) and the flops / collectives of everything it runs (instruction names are unique)."""
        if ins.name not in self.kernel_memo:
            self.kernel_memo[ins.name] = self._kernel(ins, table)
        return self.kernel_memo[ins.name]

    def _kernel(self, ins: _Instr, table) -> Cost:
        cost = Cost()
        op = ins.opcode
        est = _custom_call_cost(ins, table) if op == "custom-call" else None
        cost.bytes += est[1] if est and est[1] else _io_bytes(ins, table, self.comps, self.types)
        splash = _splash_cost(ins, table) if op == "custom-call" and est is None else None
        if splash is not None:
            cost.bytes += splash[1]
        cost.add(self.op_cost(ins, table))
        return cost

    def loops(self, ins: _Instr) -> list[tuple[str, int, bool]]:
        """(computation, times it runs per execution of `ins`, trip count known) of a while / call / branch."""
        if ins.opcode == "while":
            body = re.search(r"body=%?([\w.\-]+)", ins.attrs)
            cond = re.search(r"condition=%?([\w.\-]+)", ins.attrs)
            n = _loop_trip(self.comps, self.consts, cond.group(1), ins.attrs) if cond else None
            trips = 1 if n is None else n
            return ([(body.group(1), trips, n is not None)] if body else []) + (
                [(cond.group(1), trips + 1, n is not None)] if cond else [])
        return [(c, 1, True) for c in ins.calls]  # conditional branches: every one counted (an upper bound)

    def walk(self, name: str) -> Cost:
        if name in self.top_memo:
            return self.top_memo[name]
        cost = Cost()
        self.top_memo[name] = cost  # recursion guard
        table = self.types.get(name, {})
        for ins in self.comps.get(name, ()):
            if ins.opcode in ("while", "conditional", "call"):
                parts = self.loops(ins)
                cost.unknown_loops += not all(known for _, _, known in parts)  # a while without a trip count
                for comp, times, _ in parts:
                    cost.add(self.walk(comp), times)
                continue
            if ins.opcode in _FREE:
                continue
            cost.add(self.kernel(ins, table))
        return cost


def analyze(hlo_text: str) -> Cost:
    """Loop-aware cost of the module's entry computation (see the module docstring)."""
    return measure(hlo_text)[0]


def top_kernels(hlo_text: str, n: int = 10, by: str = "bytes") -> list[dict]:
    """The `n` top-level kernels with the most loop-aware HBM `bytes` (or `flops`) in the whole program:
    what a roofline-bound program spends its time on. Each: opcode, name, result shape, times run, totals."""
    return measure(hlo_text, n, by)[1]


def measure(hlo_text: str, top: int = 0, by: str = "bytes") -> tuple[Cost, list[dict]]:
    """(`analyze`, `top_kernels`) from one parse of the module."""
    w = _Walker(hlo_text)
    total = w.walk(w.entry)
    if not top:
        return total, []
    times: dict[str, float] = {}

    def visit(name: str, mult: float, depth: int = 0):
        times[name] = times.get(name, 0.0) + mult
        for ins in w.comps.get(name, ()):
            if ins.opcode in ("while", "conditional", "call") and depth < 64:
                for comp, k, _ in w.loops(ins):
                    visit(comp, mult * k, depth + 1)

    visit(w.entry, 1.0)
    rows = []
    for name, mult in times.items():
        table = w.types.get(name, {})
        for ins in w.comps.get(name, ()):
            if ins.opcode in _FREE or ins.opcode in ("conditional", "call"):
                continue
            c = w.kernel(ins, table)
            shape = _first_shape(ins.result)
            rows.append(dict(opcode=ins.opcode, name=ins.name, times=mult,
                             shape=f"{shape[0]}[{','.join(map(str, shape[1]))}]" if shape else "",
                             bytes=c.bytes * mult, flops=c.flops * mult))
    rows.sort(key=lambda r: -r[by])
    return total, rows[:top]


