"""Reading compiled CUDA kernels without a GPU: nvcc's resource report, SASS loop bodies, PTX address flow.

- ``ptxas_report``: registers, stack and spills per kernel from ``-Xptxas -v``.
- ``loops``: the loops of each kernel in ``nvdisasm`` output, each with the instructions
  of its shortest iteration (the fast path: a slow branch only lengthens an iteration) and the
  bytes that iteration loads and stores; the elements per iteration follow from those bytes.
- ``global_loads_from_shared``: ``ld.global*`` instructions in PTX whose address derives from a
  shared-memory address (``cvta.shared`` or a ``.shared`` symbol), found by forward data flow.
"""

from __future__ import annotations

import heapq
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


def nvdisasm_path() -> str | None:
    """nvdisasm from the PyPI package nvidia-cuda-nvdisasm, or from PATH."""
    try:
        import nvidia

        for root in nvidia.__path__:
            for candidate in sorted(Path(root).glob("cu*/bin/nvdisasm")):
                return str(candidate)
    except ImportError:
        pass
    return shutil.which("nvdisasm")


def ptxas_report(text: str) -> list[dict]:
    """One entry per compiled kernel: name, registers, spill stores and loads, stack frame."""
    kernels, current = [], None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            current = {"kernel": m.group(1)}
            kernels.append(current)
        elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
    return kernels


def demangle(names: list[str]) -> list[str]:
    if shutil.which("c++filt") is None:
        return names
    return subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()


@dataclass
class Insn:
    addr: int
    text: str  # without the predicate

    @property
    def op(self) -> str:
        return self.text.split()[0]


@dataclass
class Block:
    insns: list[Insn] = field(default_factory=list)
    succ: list[int] = field(default_factory=list)


@dataclass
class Loop:
    kernel: str
    header: int  # address of the first instruction
    insns: list[Insn]  # the shortest iteration

    def bytes(self, kinds: tuple[str, ...]) -> int:
        """Bytes moved per iteration by the memory instructions whose opcode starts with one of ``kinds``."""
        total = 0
        for i in self.insns:
            op = i.op
            if op.split(".")[0] in kinds:
                width = re.search(r"\.(128|64|32|U8|S8|U16|S16)\b", op)
                total += {"128": 16, "64": 8, "32": 4, "U8": 1, "S8": 1, "U16": 2, "S16": 2}[width.group(1)] if width else 4
        return total

    def count(self, prefix: str) -> int:
        return sum(i.op.startswith(prefix) for i in self.insns)


_FUNC = re.compile(r"^\.text\.(\S+):$")
_LABEL = re.compile(r"^(\.L_x_\d+):$")
_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?(.*?)\s*;")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def _functions(sass: str) -> dict[str, list]:
    funcs, current = {}, None
    for line in sass.splitlines():
        if m := _FUNC.match(line.strip()):
            current = funcs.setdefault(m.group(1), [])
        elif current is None:
            continue
        elif m := _LABEL.match(line.strip()):
            current.append(("label", m.group(1)))
        elif m := _INSN.match(line):
            current.append(("insn", Insn(int(m.group(1), 16), m.group(3)), m.group(2) is not None))
    return funcs


def _blocks(items: list) -> list[Block]:
    """Basic blocks in address order with their successors (indices)."""
    blocks: list[Block] = [Block()]
    labels: dict[str, int] = {}
    pending: list[tuple[int, str | None, bool, bool]] = []  # (block, target, predicated, ends)
    for item in items:
        if item[0] == "label":
            if blocks[-1].insns:
                blocks.append(Block())
            labels[item[1]] = len(blocks) - 1
            continue
        _, insn, predicated = item
        blocks[-1].insns.append(insn)
        op = insn.op
        if op.startswith(("BRA", "EXIT", "RET", "BRX", "JMX", "JMP")):
            target = _TARGET.search(insn.text)
            pending.append((len(blocks) - 1, target.group(1) if target else None, predicated, op.startswith(("EXIT", "RET"))))
            blocks.append(Block())
    if not blocks[-1].insns:
        blocks.pop()
    ends = {b: (t, p, e) for b, t, p, e in pending}
    for i, block in enumerate(blocks):
        if i in ends:
            target, predicated, is_exit = ends[i]
            if target is not None and not is_exit:
                block.succ.append(labels[target])
            if predicated and i + 1 < len(blocks):
                block.succ.append(i + 1)
        elif i + 1 < len(blocks):
            block.succ.append(i + 1)
    return blocks


def _shortest(blocks: list[Block], body: set[int], head: int, latch: int) -> list[int] | None:
    """Blocks of the cheapest path head -> latch inside the loop body (weights: instruction counts)."""
    dist, prev = {head: len(blocks[head].insns)}, {}
    queue = [(dist[head], head)]
    while queue:
        d, b = heapq.heappop(queue)
        if b == latch:
            break
        if d > dist[b]:
            continue
        for s in blocks[b].succ:
            if s in body and s != head and d + len(blocks[s].insns) < dist.get(s, float("inf")):
                dist[s], prev[s] = d + len(blocks[s].insns), b
                heapq.heappush(queue, (dist[s], s))
    if latch != head and latch not in prev:
        return None
    path, b = [latch], latch
    while b != head:
        b = prev[b]
        path.append(b)
    return path[::-1]


def loops(sass: str) -> list[Loop]:
    """The loops of every kernel, each as its cheapest iteration (an inner loop, such as a wait
    on a barrier, counts once or not at all where a branch skips it)."""
    out = []
    for kernel, items in _functions(sass).items():
        blocks = _blocks(items)
        preds: dict[int, list[int]] = {}
        for i, b in enumerate(blocks):
            for s in b.succ:
                preds.setdefault(s, []).append(i)
        natural = []
        for latch, b in enumerate(blocks):
            for head in b.succ:
                if head <= latch:  # a backward edge
                    body, stack = {head, latch}, [latch]
                    while stack:
                        for p in preds.get(stack.pop(), []):
                            if p not in body:
                                body.add(p)
                                stack.append(p)
                    natural.append((head, latch, body))
        for head, latch, body in natural:
            path = _shortest(blocks, body, head, latch)
            if path is None:
                continue
            out.append(Loop(kernel, blocks[head].insns[0].addr, [i for b in path for i in blocks[b].insns]))
    return out


_REG = re.compile(r"%[a-z]+\d+")
_OP = re.compile(r"(?:@!?%p\d+\s+)?([a-z][\w.:]*)\s+(.*);")
_LOAD = re.compile(r"(?:@!?%p\d+\s+)?(ld\.global[\w.:]*)\s+[^\[]*\[([^\]]+)\]")


def ptx_functions(ptx: str) -> dict[str, str]:
    """The body of every ``.entry`` of a PTX module, by its (mangled) name."""
    parts = re.split(r"^(?:\.visible\s+)?\.entry\s+(\S+)\(", ptx, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


# For pointer_flow: the source operands (1-based among the registers after the destination) through
# which an instruction carries a base address, as nvcc's PTX forms addresses (base + offset); an
# index computed from an address (shifts, masks, remainders, narrowing conversions) does not.
_BASE_OPERANDS = {"mov": (1,), "cvta": (1,), "add": (1, 2), "sub": (1,), "selp": (1, 2), "mad": (3,)}


def tainted_loads(ptx: str, is_source, sink: str, pointer_flow: bool = False) -> list[str]:
    """Loads ``sink*`` (e.g. ``ld.global``) whose address register derives, by forward data flow,
    from a register defined by a line for which ``is_source(line)`` holds: through any instruction
    but loads and stores, or with ``pointer_flow`` only as a base address (``_BASE_OPERANDS``: an
    index computed from an address, such as an alignment head, does not carry it)."""
    lines = [line.strip() for line in ptx.splitlines()]
    users: dict[str, list[str]] = {}  # register -> registers defined from it
    stack = []
    for line in lines:
        m = _OP.match(line)
        if not m:
            continue
        op, args = m.groups()
        regs = _REG.findall(args)
        if not regs:
            continue
        if pointer_flow:
            carriers = [regs[i] for i in _BASE_OPERANDS.get(op.split(".")[0], ()) if i < len(regs)]
        elif op.startswith(("ld.", "st.", "setp", "bra", "cp.", "mbarrier", "red.", "atom.")):
            carriers = []
        else:
            carriers = regs[1:]
        for r in carriers:
            users.setdefault(r, []).append(regs[0])
        if is_source(line):
            stack.append(regs[0])
    tainted: set[str] = set()
    while stack:  # everything reachable from the sources (loops included)
        r = stack.pop()
        if r not in tainted:
            tainted.add(r)
            stack.extend(users.get(r, []))
    return [line for line in lines if (m := _LOAD.match(line)) and m.group(1).startswith(sink)
            and any(r in tainted for r in _REG.findall(m.group(2)))]  # fmt: skip


def global_loads_from_shared(ptx: str) -> list[str]:
    """``ld.global*`` lines whose base address is a shared-memory address (``cvta.shared``, or a
    ``.shared`` symbol moved into a register)."""
    symbols = set(re.findall(r"\.shared\s+(?:\.align\s+\d+\s+)?\.\w+\s+([\w$]+)", ptx))
    # one pattern for all the symbols (a search per symbol and line took 78 s on 620k lines)
    named = re.compile(r"[\s,](?:" + "|".join(map(re.escape, sorted(symbols, key=len, reverse=True))) + r")\b")

    def is_source(line: str) -> bool:
        return line.startswith("cvta.shared") or (bool(symbols) and line.startswith("mov.") and bool(named.search(line)))

    return [line for body in ptx_functions(ptx).values() for line in tainted_loads(body, is_source, "ld.global", pointer_flow=True)]


def nc_loads_of_param(kernel: str, body: str, offset: int) -> list[str]:
    """``ld.global.nc*`` lines of a kernel whose base address is the pointer at byte ``offset`` of
    its first parameter (drkl_args: 0 the student, 8 the teacher), read from the parameter space
    directly or through a register holding the parameter's address."""
    param = re.escape(f"{kernel}_param_0")
    bases = {m.group(1): int(m.group(2) or 0)
             for m in re.finditer(rf"mov\.[bu]64\s+(%rd\d+),\s*{param}(?:\+(\d+))?;", body)}  # fmt: skip
    for m in re.finditer(r"add\.s64\s+(%rd\d+),\s*(%rd\d+),\s*(-?\d+);", body):  # the address moved on
        if m.group(2) in bases:
            bases[m.group(1)] = bases[m.group(2)] + int(m.group(3))

    def is_source(line: str) -> bool:
        m = re.match(rf"ld\.param\.u64\s+%rd\d+,\s*\[(?:{param}(?:\+(\d+))?|(%rd\d+)(?:\+(-?\d+))?)\];", line)
        if not m:
            return False
        if m.group(2) is None:
            return int(m.group(1) or 0) == offset
        return m.group(2) in bases and bases[m.group(2)] + int(m.group(3) or 0) == offset

    return tainted_loads(body, is_source, "ld.global.nc", pointer_flow=True)
