"""Static reading of a compiled kernel's machine code (SASS), with no GPU.

`disassemble(cubin)` runs nvdisasm (the one triton ships, else the CUDA toolkit's) on a cubin;
`analyse(text)` parses it into instructions and basic blocks, counts instruction classes
(tensor-core MMA, TMA, shuffles, barriers, local-memory spills), finds loops from backward
branches, and enumerates the paths through one iteration of the outermost loop with inner
loops collapsed to one iteration each (`Path.loops` says which were entered), so that a cost
model can multiply each inner loop by its trip count. Used by `compile_check --gate` and
`cost_report` (docs/performance.md, "Static cost report").
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

# opcode (before the first '.') -> class; anything else is "other"
TENSOR_CORE = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BGMMA", "DMMA",
               "UTCHMMA", "UTCQMMA", "UTCIMMA", "UTCMMA", "UTCOMMA", "OMMA", "QMMA")
TMA = ("UTMALDG", "UTMASTG", "UTMAPF", "UTMACCTL", "UTMAREDG", "UBLKCP", "UBLKRED", "UBLKPF")
CLASSES = {
    "tensor_core": TENSOR_CORE,
    "tma": TMA,
    "shuffle": ("SHFL",),
    "barrier": ("BAR", "SYNCS", "WARPSYNC"),
    "select_compare": ("SEL", "FSEL", "ISETP", "FSETP", "DSETP", "IMNMX", "FMNMX", "VIMNMX", "VIMNMX3"),
    "shared_mem": ("LDS", "STS", "LDSM", "STSM", "ATOMS"),
    "global_mem": ("LDG", "STG", "LDGSTS", "RED", "ATOMG", "LDGDEPBAR"),
    "local_mem_spill": ("LDL", "STL"),
    "branch": ("BRA", "BRX", "JMP", "EXIT", "RET", "CALL", "BSSY", "BSYNC"),
}
_OP_CLASS = {op: cls for cls, ops in CLASSES.items() for op in ops}

_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):")
_TARGET = re.compile(r"`\((\.L_\w+)\)")
_PRED = re.compile(r"^(@!?U?P[0-9T])\s+")


@dataclass
class Instr:
    addr: int
    op: str  # opcode without modifiers, e.g. "HMMA"
    text: str
    pred: Optional[str] = None
    target: Optional[str] = None  # branch target label

    @property
    def cls(self) -> str:
        return _OP_CLASS.get(self.op, "other")


@dataclass
class Block:
    start: int  # index of the first instruction
    end: int  # one past the last
    succ: list[int] = field(default_factory=list)  # block indices


@dataclass
class Loop:
    head: int  # instruction index of the loop head (the backward branch's target)
    latch: int  # instruction index of the backward branch
    depth: int = 0  # 0 = outermost

    def contains(self, i: int) -> bool:
        return self.head <= i <= self.latch


@dataclass
class Path:
    blocks: list[int]
    instructions: int  # instructions outside inner loops, per warp, one iteration of the outer loop
    mix: dict[str, int]  # the same by class
    loops: list[int]  # indices (into Analysis.loops) of inner loops entered (each body counted separately)


def tool(name: str) -> str:
    """Path of cuobjdump / nvdisasm: triton's bundled copy, else the one on PATH / in the CUDA toolkit."""
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - any triton layout problem: fall back to the toolkit
        pass
    for cand in (shutil.which(name), f"/usr/local/cuda/bin/{name}"):
        if cand and os.path.exists(cand):
            return cand
    raise FileNotFoundError(f"{name} not found: expected triton's bundled copy or the CUDA toolkit's on PATH")


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin (nvdisasm -c: code sections only, with branch-target labels)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool("nvdisasm"), "-c", f.name], check=True, capture_output=True, text=True).stdout


def parse(text: str) -> tuple[list[Instr], dict[str, int]]:
    """(instructions in address order, label -> instruction index)."""
    instrs: list[Instr] = []
    pending: list[str] = []
    labels: dict[str, int] = {}
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        body = m.group(2).strip()
        pred = None
        pm = _PRED.match(body)
        if pm:
            pred, body = pm.group(1), body[pm.end():]
        op = body.split()[0].split(".")[0]
        tm = _TARGET.search(body)
        for lab in pending:
            labels[lab] = len(instrs)
        pending = []
        instrs.append(Instr(int(m.group(1), 16), op, body, pred, tm.group(1) if tm else None))
    for lab in pending:  # labels past the last instruction (the function's end)
        labels[lab] = len(instrs)
    return instrs, labels


def _unconditional(ins: Instr) -> bool:
    # `BRA.U !UP0, target` (sm_100) is conditional on a uniform predicate although unpredicated
    return ins.pred is None and not re.match(r"^\S+\s+!?UP\d", ins.text)


def blocks_of(instrs: list[Instr], labels: dict[str, int]) -> list[Block]:
    """Basic blocks and their successors."""
    n = len(instrs)
    leaders = {0} | {i for i in labels.values() if i < n}
    for i, ins in enumerate(instrs):
        if ins.op in ("BRA", "EXIT", "RET", "BRX", "JMP") and i + 1 < n:
            leaders.add(i + 1)
    starts = sorted(leaders)
    index = {s: b for b, s in enumerate(starts)}
    out = []
    for b, s in enumerate(starts):
        e = starts[b + 1] if b + 1 < len(starts) else n
        last = instrs[e - 1]
        succ = []
        if last.op == "BRA" and last.target in labels and labels[last.target] in index:
            succ.append(index[labels[last.target]])
            if not _unconditional(last) and e < n:
                succ.append(index[e])
        elif last.op in ("EXIT", "RET"):
            if last.pred is not None and e < n:
                succ.append(index[e])
        elif e < n:
            succ.append(index[e])
        out.append(Block(s, e, succ))
    return out


def loops_of(instrs: list[Instr], labels: dict[str, int]) -> list[Loop]:
    """Loops = backward branches (target at or before the branch), with their nesting depth."""
    loops = [Loop(labels[ins.target], i) for i, ins in enumerate(instrs)
             if ins.op == "BRA" and ins.target in labels and labels[ins.target] <= i
             and labels[ins.target] != i]  # `.L: BRA .L` after EXIT is the trap loop, not a loop
    for lp in loops:
        lp.depth = sum(1 for o in loops if o is not lp and o.head <= lp.head and lp.latch <= o.latch)
    return sorted(loops, key=lambda lp: lp.head)


def mix(instrs: list[Instr], lo: int = 0, hi: Optional[int] = None) -> dict[str, int]:
    """Instruction counts by class (plus "total") over instructions lo..hi-1."""
    c = Counter(ins.cls for ins in instrs[lo:hi])
    c["total"] = sum(v for k, v in c.items() if k != "total")
    return dict(sorted(c.items()))


def opcodes(instrs: list[Instr], lo: int = 0, hi: Optional[int] = None, top: int = 12) -> dict[str, int]:
    return dict(Counter(ins.op for ins in instrs[lo:hi]).most_common(top))


@dataclass
class Analysis:
    instrs: list[Instr]
    labels: dict[str, int]
    blocks: list[Block]
    loops: list[Loop]

    def counts(self) -> dict:
        """Whole-kernel counts of the instruction classes the gate and the report read."""
        ops = Counter(i.op for i in self.instrs)
        return dict(
            instructions=len(self.instrs),
            tensor_core={op: ops[op] for op in TENSOR_CORE if ops[op]},
            tma={op: ops[op] for op in TMA if ops[op]},
            wgmma=ops["HGMMA"] + ops["QGMMA"] + ops["IGMMA"] + ops["BGMMA"],
            spill_instructions=ops["LDL"] + ops["STL"],
            mix=mix(self.instrs))

    def loop_table(self) -> list[dict]:
        """Each loop: address range, nesting depth, instructions per iteration (whole body, every
        branch of it counted once), class mix and top opcodes."""
        return [dict(head=f"0x{self.instrs[lp.head].addr:x}", latch=f"0x{self.instrs[lp.latch].addr:x}",
                     depth=lp.depth, instructions=lp.latch - lp.head + 1,
                     mix=mix(self.instrs, lp.head, lp.latch + 1),
                     opcodes=opcodes(self.instrs, lp.head, lp.latch + 1))
                for lp in self.loops]

    def outer_paths(self, limit: int = 256) -> list[Path]:
        """Paths through one iteration of the outermost loop (head -> its backward branch), inner loops
        entered once each and listed in `Path.loops`; instruction counts exclude inner-loop bodies."""
        outer = [lp for lp in self.loops if lp.depth == 0]
        if not outer:
            return []
        top = max(outer, key=lambda lp: lp.latch - lp.head)
        inner = [j for j, lp in enumerate(self.loops)
                 if lp is not top and top.head <= lp.head and lp.latch <= top.latch]
        block_at = {b.start: k for k, b in enumerate(self.blocks)}

        def in_inner(i: int) -> Optional[int]:
            best = None
            for j in inner:  # the outermost inner loop holding instruction i
                lp = self.loops[j]
                if lp.contains(i) and (best is None or self.loops[best].depth > lp.depth):
                    best = j
            return best

        paths: list[Path] = []

        def walk(b: int, seen: list[int], entered: list[int]) -> None:
            if len(paths) >= limit:
                return
            blk = self.blocks[b]
            if not (top.head <= blk.start <= top.latch):
                return  # left the loop (exit path): not an iteration
            lp_j = in_inner(blk.start)
            if lp_j is not None and lp_j not in entered:
                entered = entered + [lp_j]
            seen = seen + [b]
            if blk.start <= top.latch < blk.end:  # the latch block: iteration done
                paths.append(self._path(seen, entered, in_inner))
                return
            for s in blk.succ:
                sb = self.blocks[s]
                if sb.start <= blk.start:  # a backward edge: inner loop repeats, counted by trip counts
                    continue
                walk(s, seen, entered)

        walk(block_at[top.head], [], [])
        return paths

    def _path(self, blocks: list[int], entered: list[int], in_inner) -> Path:
        idx = [i for b in blocks for i in range(self.blocks[b].start, self.blocks[b].end) if in_inner(i) is None]
        c = Counter(self.instrs[i].cls for i in idx)
        c["total"] = len(idx)
        return Path(blocks, len(idx), dict(sorted(c.items())), entered)

    def loop_mix(self, j: int) -> dict[str, int]:
        lp = self.loops[j]
        return mix(self.instrs, lp.head, lp.latch + 1)


def guarded_instructions(instrs: list[Instr], labels: dict[str, int], op: str) -> int:
    """Instructions skipped by a forward conditional branch whose skipped range holds an `op` instruction
    (outermost ranges only): the filter's per-entry append path (ATOMG), which a warp runs only when one of
    its lanes has a candidate."""
    ranges = []
    for i, ins in enumerate(instrs):
        if ins.op == "BRA" and ins.pred and ins.target in labels:
            end = labels[ins.target]
            if end > i + 1 and any(instrs[j].op == op for j in range(i + 1, end)):
                ranges.append((i + 1, end))
    total, reach = 0, -1
    for lo, hi in sorted(ranges):
        if lo >= reach:
            total += hi - lo
            reach = hi
        elif hi > reach:
            total += hi - reach
            reach = hi
    return total


def analyse(text: str) -> Analysis:
    instrs, labels = parse(text)
    return Analysis(instrs, labels, blocks_of(instrs, labels), loops_of(instrs, labels))
