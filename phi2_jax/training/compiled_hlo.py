"""What a compiled XLA program does, read from its HLO text (`compiled.as_text()`): the dry run's evidence.

The text is the program after XLA's own passes (fusion, collective combining,
async conversion), so it names the kernels and collectives that would run:
  * `collectives`: all-gather / reduce-scatter / all-reduce / collective-permute /
    all-to-all, counted as executed per call (an op inside a `while` body counts
    once per trip, from XLA's `known_trip_count`);
  * `attention_kernels`: the cuDNN fused-attention custom calls, their mask type
    and whether they take a bias operand;
  * `dots`: every matrix multiply's operand and result element types and shape.

Only what XLA prints is used; nothing is compiled or run here.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2,
          "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%([\w.\-]+)\s+=\s+(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_MASK_TYPE = re.compile(r'"mask_type"\s*:\s*"([A-Z_]+)"')

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    result: str      # the result type as printed, e.g. "bf16[8,128]{1,0}" or a tuple "(f32[], ...)"
    opcode: str
    operands: tuple[str, ...]
    attributes: str  # everything after the operand list


@dataclasses.dataclass(frozen=True)
class Dot:
    operand_dtypes: tuple[str, ...]  # as stored: looking through a convert inside the fusion that feeds the dot
    result_dtype: str
    result_shape: tuple[int, ...]
    algorithm: str   # XLA's stated dot algorithm (e.g. "dot_bf16_bf16_f32"), "" if none
    count: int       # executions per call of the program


def arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    """The (element type, shape) of every array in a printed HLO type, in order."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(type_text)
            if dtype in _BYTES]


def nbytes(type_text: str) -> int:
    """Bytes of all arrays in a printed HLO type."""
    return int(sum(_BYTES[dtype] * math.prod(shape) for dtype, shape in arrays(type_text)))


def _split_top_level(type_text: str) -> list[str]:
    """'(a, (b, c))' -> ['a', '(b, c)']; a non-tuple type -> [itself]."""
    text = re.sub(r"/\*[^*]*\*/", "", type_text).strip()
    if not text.startswith("("):
        return [text]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(text):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        if ch == "," and depth == 1:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:len(text) - 1].strip())
    return [p for p in parts if p]


def _operands(rest: str) -> tuple[tuple[str, ...], str]:
    """Operand names and the attribute text, from what follows `opcode(`."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return tuple(re.findall(r"%([\w.\-]+)", rest[:i])), rest[i + 1:]
    return tuple(re.findall(r"%([\w.\-]+)", rest)), ""


class HloProgram:
    """A compiled module's HLO text, parsed into computations of instructions, with execution counts."""

    def __init__(self, text: str):
        self.text = text
        self.computations: dict[str, list[Instruction]] = {}
        self.entry = None
        current = None
        for line in text.splitlines():
            if current is None:
                match = _HEADER.match(line)
                if match and not line.startswith(" "):
                    current = match.group(1)
                    self.computations[current] = []
                    if line.startswith("ENTRY"):
                        self.entry = current
                continue
            if line.startswith("}"):
                current = None
                continue
            match = _INSTRUCTION.match(line)
            if match:
                operands, attributes = _operands(match.group(4))
                self.computations[current].append(Instruction(match.group(1), match.group(2), match.group(3),
                                                              operands, attributes))
        self.by_name = {c: {i.name: i for i in body} for c, body in self.computations.items()}
        self.executions = self._executions()

    def _executions(self) -> dict[str, int]:
        """How many times each computation runs per call of the entry (while bodies times their trip count)."""
        counts: dict[str, int] = collections.Counter()

        def visit(name: str, times: int, depth: int = 0) -> None:
            if name not in self.computations or depth > 64:
                return
            counts[name] += times
            for inst in self.computations[name]:
                trips = 1
                if inst.opcode == "while":
                    match = _TRIP_COUNT.search(inst.attributes)
                    trips = int(match.group(1)) if match else 1
                for called in _CALLED.findall(inst.attributes):
                    is_body = inst.opcode == "while" and f"body=%{called}" in inst.attributes
                    visit(called, times * (trips if is_body else 1), depth + 1)
                for branches in _BRANCHES.findall(inst.attributes):
                    for called in re.findall(r"%([\w.\-]+)", branches):
                        visit(called, times, depth + 1)

        if self.entry is not None:
            visit(self.entry, 1)
        return counts

    def instructions(self):
        """(computation, instruction, executions per call) for every instruction that runs."""
        for computation, body in self.computations.items():
            times = self.executions.get(computation, 0)
            for inst in body:
                yield computation, inst, times

    def collectives(self) -> dict[str, dict[str, int]]:
        """{kind: {"count", "bytes"}} per call: bytes of the full buffer each moves (the gathered output,
        the reduce-scatter input, the all-reduced buffer), summed over executions."""
        out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
        for _, inst, times in self.instructions():
            kind = inst.opcode[:-len("-start")] if inst.opcode.endswith("-start") else inst.opcode
            if kind not in out or times == 0:
                continue
            parts = _split_top_level(inst.result)
            if inst.opcode.endswith("-start") and len(parts) >= 2:
                # async start: (operands, outputs[, context]); the gathered output, the scattered input
                size = nbytes(parts[0] if kind in ("reduce-scatter", "collective-permute") else parts[1])
                if kind == "all-reduce":
                    size = nbytes(inst.result)
            else:
                size = nbytes(inst.result)
                if kind == "reduce-scatter":
                    size *= _group_size(inst.attributes)
            out[kind]["count"] += times
            out[kind]["bytes"] += size * times
        return out

    def attention_kernels(self) -> list[dict]:
        """The cuDNN fused-attention custom calls: target, mask type, bias operand, executions per call."""
        found = []
        for _, inst, times in self.instructions():
            if inst.opcode != "custom-call":
                continue
            target = _TARGET.search(inst.attributes)
            if not target or "fmha" not in target.group(1):
                continue
            mask = _MASK_TYPE.search(inst.attributes)
            found.append({"target": target.group(1), "mask_type": mask.group(1) if mask else None,
                          "bias": "Bias" in target.group(1), "operands": len(inst.operands), "count": times})
        return found

    def _stored_dtype(self, computation: str, name: str) -> str:
        """An operand's element type, or its source's where it is a convert (XLA widens bf16 inside a GEMM
        fusion and states the algorithm; the GEMM still reads the bf16 buffer)."""
        inst = self.by_name[computation].get(name)
        if inst is None or not arrays(inst.result):
            return "?"
        if inst.opcode == "convert" and inst.operands and inst.operands[0] in self.by_name[computation]:
            return self._stored_dtype(computation, inst.operands[0])
        return arrays(inst.result)[0][0]

    def dots(self) -> list[Dot]:
        """Every dot (inside fusions too) and cuBLAS GEMM custom call that runs, with its element types."""
        seen: dict[tuple, int] = collections.Counter()
        for computation, inst, times in self.instructions():
            is_gemm = inst.opcode == "custom-call" and re.search(r'custom_call_target="__cublas\$', inst.attributes)
            if inst.opcode != "dot" and not is_gemm:
                continue
            dtype, shape = arrays(inst.result)[0]  # a GEMM custom call returns (output, workspace)
            operands = tuple(self._stored_dtype(computation, o) for o in inst.operands[:2])
            algorithm = re.search(r"algorithm=([\w]+)", inst.attributes)
            seen[(operands, dtype, shape, algorithm.group(1) if algorithm else "")] += times
        return [Dot(*key, n) for key, n in seen.items() if n]


def _group_size(attributes: str) -> int:
    """Devices per replica group, from any of XLA's printed forms."""
    mesh_form = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attributes)
    if mesh_form:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh_form.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", mesh_form.group(2)))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([^}]*)\}", attributes)
    if listed:
        return len(listed.group(1).split(","))
    return 1


def backend_config(inst: Instruction) -> dict:
    """An instruction's backend_config as a dict ({} when absent or not JSON)."""
    match = re.search(r"backend_config=(\{.*\})\s*$", inst.attributes)
    try:
        return json.loads(match.group(1)) if match else {}
    except json.JSONDecodeError:
        return {}
