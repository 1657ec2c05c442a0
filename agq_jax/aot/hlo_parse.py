"""Reading XLA's optimized HLO text: computations, instructions with their result types, operands, called
computations, and the trip counts of counted loops (what `hlo` costs)."""
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
         "collective-permute-done", "copy-start", "copy-done", "slice-done", "opt-barrier", "get-dimension-size",
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


_CONST = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*[su](?:32|64)\[\]\{?[^}]*\}?\s*constant\((-?\d+)\)", re.M)


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
