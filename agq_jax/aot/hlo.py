"""Loop-aware FLOPs, HBM bytes and collective bytes of a compiled XLA program, read from its optimized HLO.

Why not `compiled.cost_analysis()` alone: XLA's cost analysis counts a while loop's body once, and every
program here is loops (the scan over layers, the scan over micro-batches, the decode loop), so its totals
are 1/L-1/(L·n_micro) of the work. Here each instruction's cost is multiplied by the trip counts of the
loops around it (`known_trip_count` in the while op's backend config, which XLA sets for scans).

Counted per instruction executed at the top level of a computation (entry, loop bodies, conditional
branches, calls), which is what runs as one kernel on a TPU:
- flops: 2 x output elements x contracted elements of every `dot` / `convolution` (also inside fusions);
  a Pallas kernel (`tpu_custom_call`) adds the flops of its own cost estimate when it gives one.
- bytes: operands read + result written of every top-level kernel (fusion, dot, copy, custom call, ...),
  as HloCostAnalysis does, plus the same for the collectives.
- collective bytes: the result size of all-gather / all-to-all / collective-permute and the operand size
  of all-reduce / reduce-scatter (the data one device sends or receives, within a factor (n-1)/n).
"""
from __future__ import annotations

import dataclasses
import math
import re

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}
_SHAPE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64|c64|c128|f8e4m3fn|f8e5m2)"
                    r"\[([0-9,]*)\]")
_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "all-gather-start", "all-reduce-start", "collective-permute-start", "ragged-all-to-all")
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all", "partition-id",
         "replica-id", "iota", "while", "conditional", "call", "all-gather-done", "all-reduce-done",
         "collective-permute-done", "copy-start", "copy-done", "opt-barrier", "get-dimension-size",
         "add-dependency", "domain"}


def _shapes_bytes(text: str) -> float:
    total = 0.0
    for dt, dims in _SHAPE.findall(text):
        n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
        total += n * _DTYPE_BYTES[dt]
    return total


def _first_shape(text: str) -> tuple[str, tuple[int, ...]] | None:
    m = _SHAPE.search(text)
    if not m:
        return None
    return m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)


@dataclasses.dataclass
class _Instr:
    name: str
    opcode: str
    result: str                 # result type text
    operands: tuple[str, ...]   # operand instruction names
    attrs: str                  # everything after the operand list
    calls: tuple[str, ...]      # computations it calls
    index: int | None = None    # parameter number (parameter instructions)
    root: bool = False          # the computation's result


@dataclasses.dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0
    collective_bytes: float = 0.0
    collectives: dict = dataclasses.field(default_factory=dict)  # opcode -> bytes
    custom_calls: dict = dataclasses.field(default_factory=dict)  # kernels without a cost estimate -> count
    unknown_loops: int = 0                                        # while loops whose trip count was not found

    def add(self, other: "Cost", times: float = 1.0):
        self.flops += times * other.flops
        self.bytes += times * other.bytes
        self.collective_bytes += times * other.collective_bytes
        for k, v in other.collectives.items():
            self.collectives[k] = self.collectives.get(k, 0.0) + times * v
        for k, v in other.custom_calls.items():
            self.custom_calls[k] = self.custom_calls.get(k, 0) + times * v
        self.unknown_loops += other.unknown_loops


_LAYOUT = re.compile(r"\]\{[^}]*\}")
_COMMENT = re.compile(r"/\*.*?\*/")


def _split_call(rest: str) -> tuple[str, str, str, str] | None:
    """'TYPE opcode(OPERANDS), attrs' -> (type, opcode, operands, attrs); layouts and comments dropped."""
    rest = _COMMENT.sub("", _LAYOUT.sub("]", rest))
    if rest.startswith("("):
        depth, i = 0, 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        result, tail = rest[:i + 1], rest[i + 1:]
    else:
        result, _, tail = rest.partition(" ")
    m = re.match(r"\s*([a-z][\w\-]*)\(", tail)
    if not m:
        return None
    opcode, start = m.group(1), m.end()
    depth, i = 1, start
    while i < len(tail) and depth:
        depth += {"(": 1, ")": -1}.get(tail[i], 0)
        i += 1
    return result, opcode, tail[start:i - 1], tail[i:]


_CALL_ATTR = re.compile(r"(?:calls|body|condition|to_apply|branch_computations|true_computation|"
                        r"false_computation)=\{?(%?[\w.\-]+(?:,\s*%?[\w.\-]+)*)\}?")


def parse(hlo_text: str) -> tuple[dict[str, list[_Instr]], dict[str, dict[str, str]], str]:
    """An HLO module -> (computation -> instructions, computation -> {instruction: result type}, entry name)."""
    comps: dict[str, list[_Instr]] = {}
    types: dict[str, dict[str, str]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMP_HEADER.match(line)
            if m and "=" not in line.split("(")[0]:
                current = m.group(2)
                comps[current], types[current] = [], {}
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        parts = _split_call(m.group(2))
        if parts is None:
            continue
        result, opcode, operands, attrs = parts
        calls = tuple(c.strip().lstrip("%") for group in _CALL_ATTR.findall(attrs) for c in group.split(","))
        names = tuple(re.findall(r"%([\w.\-]+)", operands))
        index = int(operands) if opcode == "parameter" and operands.strip().isdigit() else None
        comps[current].append(_Instr(m.group(1), opcode, result, names, attrs, calls, index,
                                     line.lstrip().startswith("ROOT ")))
        types[current][m.group(1)] = result
    return comps, types, entry


def _conv_flops(ins: _Instr, table: dict[str, str]) -> float:
    """dot: 2 x out x contracted. convolution (how TPU HLO spells most matmuls): 2 x out x kernel input
    features x window taps that touch real (not dilation-inserted) input."""
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
    kernel = _first_shape(table.get(ins.operands[1], "")) if len(ins.operands) > 1 else None
    labels = re.search(r"dim_labels=\w+_(\w+)->", ins.attrs)
    if kernel is None or labels is None:
        return 0.0
    rhs = labels.group(1)
    in_feat = kernel[1][rhs.index("i")] if "i" in rhs else 1
    window = re.search(r"window=\{size=([0-9x]+)", ins.attrs)
    sizes = [int(v) for v in window.group(1).split("x")] if window else []
    dil = re.search(r"lhs_dilate=([0-9x]+)", ins.attrs)
    dils = [int(v) for v in dil.group(1).split("x")] if dil else [1] * len(sizes)
    taps = math.prod(-(-w // d) for w, d in zip(sizes, dils)) if sizes else 1
    return 2.0 * math.prod(out[1]) * in_feat * taps


def _custom_call_cost(ins: _Instr) -> tuple[float, float] | None:
    """(flops, bytes) a Pallas / Mosaic TPU kernel declares in its backend config (cost_estimate), if any."""
    m = re.search(r'"cost_estimate":\{([^}]*)\}', ins.attrs)
    if not m:
        return None
    fl = re.search(r'"flops":"?(\d+)', m.group(1))
    by = re.search(r'"bytes_accessed":"?(\d+)', m.group(1))
    return float(fl.group(1)) if fl else 0.0, float(by.group(1)) if by else 0.0


_SLICING = ("dynamic-slice", "slice", "gather")


def _io_bytes(ins: _Instr, table: dict[str, str], comps=None, types=None) -> float:
    """Bytes a top-level kernel reads and writes. For a fusion, like HloCostAnalysis: an operand the fused
    code only slices (one layer of the stacked weights in a scan body) costs the slices it reads, and a
    result made by a dynamic-update-slice (an in-place write into a loop buffer) costs the update."""
    operands = [_shapes_bytes(table.get(o, "")) for o in ins.operands]
    result = _shapes_bytes(ins.result)
    if ins.opcode == "fusion" and comps is not None and ins.calls:
        fused = comps.get(ins.calls[0], ())
        ftypes = types.get(ins.calls[0], {})
        users: dict[str, list[_Instr]] = {}
        for i in fused:
            for o in i.operands:
                users.setdefault(o, []).append(i)
        for p in fused:
            if p.opcode == "parameter" and p.index is not None and p.index < len(operands):
                us = users.get(p.name, [])
                if us and all(u.opcode in _SLICING and u.operands and u.operands[0] == p.name for u in us):
                    operands[p.index] = sum(_shapes_bytes(u.result) for u in us)
                elif us and all(u.opcode == "dynamic-update-slice" and u.operands[0] == p.name for u in us):
                    operands[p.index] = 0.0  # updated in place: its bytes are the update's
        root = next((i for i in fused if i.root), None)
        if root is not None and root.opcode == "dynamic-update-slice" and len(root.operands) > 1:
            result = 2 * _shapes_bytes(ftypes.get(root.operands[1], ""))
    return result + sum(operands)


def analyze(hlo_text: str) -> Cost:
    """Loop-aware cost of the module's entry computation (see the module docstring)."""
    comps, types, entry = parse(hlo_text)
    consts = _constants(hlo_text)
    top_memo: dict[str, Cost] = {}
    inner_memo: dict[str, Cost] = {}

    def op_cost(ins: _Instr, table) -> Cost:
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
            est = _custom_call_cost(ins)
            target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
            tname = target.group(1) if target else "?"
            if est is not None:
                cost.flops += est[0]
            elif tname == "tpu_custom_call":
                cost.custom_calls[tname] = cost.custom_calls.get(tname, 0) + 1
        if op not in ("while",):
            for c in ins.calls:
                cost.add(inner(c))
        return cost

    def inner(name: str) -> Cost:
        if name not in inner_memo:
            inner_memo[name] = Cost()
            total = Cost()
            for ins in comps.get(name, ()):
                total.add(op_cost(ins, types.get(name, {})))
            inner_memo[name] = total
        return inner_memo[name]

    def walk(name: str) -> Cost:
        if name in top_memo:
            return top_memo[name]
        cost = Cost()
        top_memo[name] = cost  # recursion guard
        table = types.get(name, {})
        for ins in comps.get(name, ()):
            op = ins.opcode
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", ins.attrs)
                cond = re.search(r"condition=%?([\w.\-]+)", ins.attrs)
                n = _loop_trip(comps, consts, cond.group(1), ins.attrs) if cond else None
                if n is None:
                    cost.unknown_loops += 1
                    n = 1
                if body:
                    cost.add(walk(body.group(1)), n)
                if cond:
                    cost.add(walk(cond.group(1)), n + 1)
                continue
            if op in ("conditional", "call"):
                for c in ins.calls:  # every branch counted: an upper bound for conditionals
                    cost.add(walk(c))
                continue
            if op in _FREE:
                continue
            est = _custom_call_cost(ins) if op == "custom-call" else None
            cost.bytes += est[1] if est and est[1] else _io_bytes(ins, table, comps, types)
            cost.add(op_cost(ins, table))
        return cost

    return walk(entry)


_CONST = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*s32\[\]\{?[^}]*\}?\s*constant\((-?\d+)\)", re.M)


def _constants(hlo_text: str) -> dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in _CONST.finditer(hlo_text)}


def _loop_trip(comps, consts: dict[str, int], cond: str, attrs: str = "") -> int | None:
    """Trip count of a counted loop: XLA's `known_trip_count` when it says so, else a condition `i < N`
    with N a scalar constant (scans start at 0 with step 1), the compare possibly wrapped in a fusion."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
    if m:
        return int(m.group(1))
    for ins in comps.get(cond, ()):
        if ins.opcode == "compare" and "direction=LT" in ins.attrs:
            for op in ins.operands:
                if op in consts:
                    return consts[op]
        if ins.opcode == "fusion" and ins.calls:
            inner = comps.get(ins.calls[0], ())
            order = [i.name for i in inner if i.opcode == "parameter"]
            for cmp in inner:
                if cmp.opcode == "compare" and "direction=LT" in cmp.attrs and len(cmp.operands) == 2:
                    rhs = cmp.operands[1]
                    if rhs in order:
                        idx = _param_index(inner, rhs)
                        if idx is not None and idx < len(ins.operands) and ins.operands[idx] in consts:
                            return consts[ins.operands[idx]]
    return None


def _param_index(instrs, name: str) -> int | None:
    for i in instrs:
        if i.name == name and i.opcode == "parameter":
            return i.index
    return None
