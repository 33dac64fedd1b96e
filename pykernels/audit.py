"""Static SASS and resource audit of every kernel, for sm_90a, with no GPU needed.

    python -m pykernels.audit [--json] [--cuda-only | --triton-only] [--match TEXT]

For each kernel in the built extension (pykernels._C) and each Triton config listed in the ops'
AOT_KERNELS (compiled ahead of time for sm_90), it reports registers, stack and local memory, static shared
memory, tensor-core instructions (QGMMA = FP8 wgmma, HGMMA = 16-bit wgmma, HMMA = mma.sync), bulk-copy and
TMA instructions (UTMALDG, UTMASTG, UBLKCP, ...), stmatrix (STSM), 16-byte vector loads and an occupancy estimate, and checks
them against what each kernel is meant to be:
  - every kernel: no local memory, no stack, no ptxas performance warning (C7510: wgmma serialized;
    C7508: setmaxnreg ignored) in the build log;
  - every CUDA kernel's hot loops (the shortest loops around its FP8 wgmma, QGMMA) promote with pure FFMA:
    per 128-K step one FFMA per accumulator element, no FSEL and at most 4 FMUL (the sa * sb products).
    A select or an extra multiply per element there means the scale split was left to run time. Their
    shared-memory loads (the A scales) lie between the stage's mbarrier wait and its release;
  - per kernel, the expectations its op declares (CUDA_AUDIT in pykernels/<op>.py, `expect` in the Triton
    AOT_KERNELS): minimum and maximum instruction counts, a shared-memory ceiling, the bytes the loop
    around its MMAs loads from global memory per iteration (mma_loop_load_bytes: the MLA page loop must
    fetch one page, K's 576 columns once, with V taken from them rather than loaded again), that this
    loop keeps cp.async copies in flight across iterations (mma_loop_pipelined: one wait per iteration,
    never for all copies), and for an epilogue that stages its output with stmatrix and stores it by TMA,
    the order of fences, barriers and waits around the store (tma_store_protocol_failures).
The exit status is 1 when any check fails. All figures are static: read from the binary, not measured.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Hopper (sm_90) per-SM limits used by the occupancy estimate.
SM90_REGISTERS = 65536
SM90_MAX_THREADS = 2048
SM90_MAX_BLOCKS = 32
SM90_SHARED_BYTES = 233472  # 228 KB per SM
SM90_MAX_SHARED_PER_BLOCK = 232448  # 227 KB opt-in per block
SM90_RESERVED_SHARED = 1024  # per block, taken by the system

PERF_WARNINGS = ("C7510", "C7508")
INSTRUCTION_CLASSES = {
    "QGMMA": "FP8 wgmma",
    "HGMMA": "16-bit wgmma",
    "HMMA": "mma.sync",
    "UTMALDG": "TMA load",
    "UTMALDG.MULTICAST": "TMA load multicast to the CTAs of a cluster",
    "SYNCS.ARRIVE.LOCAL": "mbarrier arrive on the CTA's own barrier",
    "SYNCS.ARRIVE.REMOTE": "mbarrier arrive through a cluster address (mapa), on any CTA of the cluster",
    "UCGABAR_WAIT": "cluster barrier wait",
    "UTMASTG": "TMA store",
    "UBLKCP": "bulk copy",
    "STSM": "stmatrix",
    "LDGSTS": "cp.async",
    "SYNCS": "mbarrier",
    "LDG.128": "16-byte global load",
    "STG.128": "16-byte global store",
    "LDL": "local load",
    "STL": "local store",
}

OPS = ("fp8_quant", "fp8_gemm", "mla_decode", "moe")  # pykernels.<op> modules that declare CUDA_AUDIT


@dataclass
class KernelReport:
    name: str  # demangled (CUDA) or config label (Triton)
    source: str  # "cuda" or "triton"
    registers: int = 0
    stack_bytes: int = 0
    local_bytes: int = 0
    shared_bytes: int = 0  # static (CUDA) or total (Triton) shared memory
    threads_per_block: int | None = None
    occupancy: float | None = None  # resident warps / 64, estimated
    instructions: dict = field(default_factory=dict)  # class -> count
    hot_loops: list = field(default_factory=list)  # hot_loops() entries, in address order
    mma_loop: dict | None = None  # mma_loop_loads(), for the kernels whose op audits it (mma_loop_* rules)
    tma_store_order: list = field(default_factory=list)  # tma_store_protocol_failures() of the SASS
    failures: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def find_cuobjdump() -> str:
    """cuobjdump from the triton wheel, PATH, or the nvidia-cuda-cuobjdump wheel."""
    try:
        import triton

        candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia.cuda_cuobjdump as wheel  # type: ignore[import-not-found]

        candidate = Path(wheel.__path__[0]) / "bin" / "cuobjdump"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    raise RuntimeError("cuobjdump not found: install triton (it ships one) or nvidia-cuda-cuobjdump")


def _run(args) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def demangle(names):
    names = list(names)
    tool = shutil.which("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def parse_resource_usage(text: str) -> dict:
    """cuobjdump -res-usage -> {mangled name: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}}."""
    usage, current = {}, None
    for line in text.splitlines():
        header = re.match(r"\s*Function (\S+):\s*$", line)
        if header:
            current = header.group(1)
            continue
        if current and "REG:" in line:
            usage[current] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            current = None
    return usage


def classify(mnemonic: str) -> list:
    """The instruction classes a SASS mnemonic (opcode with modifiers) belongs to."""
    parts = mnemonic.split(".")
    base = parts[0]
    classes = [c for c in ("QGMMA", "HGMMA", "HMMA", "UTMALDG", "UTMASTG", "UBLKCP", "STSM", "LDGSTS", "SYNCS", "LDL",
                           "STL") if base == c]
    if base == "UTMALDG" and "MULTICAST" in parts:
        classes.append("UTMALDG.MULTICAST")
    # A plain arrive (A1T0: count 1, no transaction bytes); RED marks the shared::cluster form.
    if base == "SYNCS" and "ARRIVE" in parts and "A1T0" in parts:
        classes.append("SYNCS.ARRIVE.REMOTE" if "RED" in parts else "SYNCS.ARRIVE.LOCAL")
    if base == "UCGABAR_WAIT":
        classes.append("UCGABAR_WAIT")
    if base == "LDG" and "128" in parts:
        classes.append("LDG.128")
    if base == "STG" and "128" in parts:
        classes.append("STG.128")
    return classes


def parse_sass(text: str) -> dict:
    """cuobjdump -sass -> {mangled name: Counter of instruction classes}."""
    counts, current = {}, None
    for line in text.splitlines():
        header = re.match(r"\s*Function : (\S+)", line)
        if header:
            current = header.group(1)
            counts[current] = collections.Counter()
            continue
        instr = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if current and instr:
            for c in classify(instr.group(1)):
                counts[current][c] += 1
    return counts


SASS_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)\s*([^;]*);")
LOOP_MIX = ("FFMA", "FMUL", "FSEL", "QGMMA")
# QGMMA instructions per 128-K promotion step: K = 128 in wgmma steps of k32.
QGMMA_PER_K_STEP = 4
MAX_FMUL_PER_K_STEP = 4  # sa[row] * sb[column block] for two rows and at most two column blocks


def parse_listing(text: str) -> dict:
    """cuobjdump -sass -> {mangled name: [(address, mnemonic, operands), ...]}."""
    listing, current = {}, None
    for line in text.splitlines():
        header = re.match(r"\s*Function : (\S+)", line)
        if header:
            current = header.group(1)
            listing[current] = []
            continue
        instr = SASS_LINE.match(line)
        if current and instr:
            listing[current].append((int(instr.group(1), 16), instr.group(2), instr.group(3).strip()))
    return listing


def hot_loops(instructions: list) -> list:
    """The loops (a backward branch and its target) around QGMMA instructions, with their instruction
    mix: {"start", "end", "encloses", "instructions", "k_steps", "FFMA", "FMUL", "FSEL", "QGMMA", "qgmma_n"}.
    Addresses are byte offsets in the function; "instructions" counts the loop body once (per warp) less
    the hot loops it encloses ("encloses" of them), "k_steps" the 128-K steps it holds (QGMMA /
    QGMMA_PER_K_STEP: the compiler may unroll a k-loop, or peel an iteration into the tile loop)."""
    loops = _loops(instructions)
    # Each QGMMA's hot loop is the shortest loop around it. Shortest, not innermost: a wait retried in
    # out-of-line code branches back into the loop from past its end, forming a longer overlapping "loop".
    chosen = set()
    for address, mnemonic, _ in instructions:
        if mnemonic.split(".")[0] == "QGMMA":
            around = [(end - start, start, end) for start, end in loops if start <= address <= end]
            if around:
                chosen.add(min(around)[1:])
    result = []
    for start, end in chosen:
        # A loop around another hot loop (k-loop iterations the compiler peeled into the tile loop) counts
        # only its own instructions.
        inner = [(s, e) for s, e in chosen if start <= s and e <= end and (s, e) != (start, end)]
        body = [m for a, m, _ in instructions if start <= a <= end and not any(s <= a <= e for s, e in inner)]
        mix = collections.Counter(m.split(".")[0] for m in body)
        shapes = {int(x.group(1)) for m in body if (x := re.match(r"QGMMA\.64x(\d+)x", m))}
        steps = max(1, -(-mix.get("QGMMA", 0) // QGMMA_PER_K_STEP))
        result.append({"start": start, "end": end, "encloses": len(inner), "instructions": len(body), "k_steps": steps,
                       **{c: mix.get(c, 0) for c in LOOP_MIX}, "qgmma_n": max(shapes) if shapes else 0,
                       "unordered_lds": unordered_shared_loads(body)})
    return sorted(result, key=lambda loop: loop["start"])


def unordered_shared_loads(body: list) -> int:
    """Shared-memory loads (LDS, or generic LD where the compiler lost the address space) of a k-loop body
    (mnemonics in address order) that do not sit between a stage's mbarrier wait and its release: walking back around the loop from the load, the nearest
    mbarrier instruction must be a wait (SYNCS.PHASECHK), not an arrive (SYNCS.ARRIVE). A load hoisted
    above the wait reads a stage before it is filled; one sunk below the arrive races with the refill.
    0 for loops without mbarrier waits (their shared memory is ordered otherwise)."""
    def barrier_kind(mnemonic):
        return next((kind for kind in ("PHASECHK", "ARRIVE") if mnemonic.startswith(f"SYNCS.{kind}")), None)

    if not any(barrier_kind(m) == "PHASECHK" for m in body):
        return 0
    unordered = 0
    for i, mnemonic in enumerate(body):
        if mnemonic.split(".")[0] not in ("LDS", "LD"):
            continue
        before = (barrier_kind(body[(i - j) % len(body)]) for j in range(1, len(body)))
        if next((kind for kind in before if kind), None) != "PHASECHK":
            unordered += 1
    return unordered


def promotion_failures(loops: list) -> list:
    """Why a kernel's FP8 hot loops do not promote with pure FFMA (empty when they do): per 128-K step,
    N/2 FFMA per thread (one per accumulator element of an m64nN fragment), no FSEL, at most
    MAX_FMUL_PER_K_STEP FMUL; and no shared-memory load outside the stage (unordered_shared_loads)."""
    failures = []
    for loop in loops:
        steps = loop["k_steps"]
        where = f"hot loop at {loop['start']:#x}-{loop['end']:#x}"
        if loop["FSEL"]:
            failures.append(f"{where}: {loop['FSEL']} FSEL in promotion (expected none)")
        if loop["FMUL"] > MAX_FMUL_PER_K_STEP * steps:
            failures.append(f"{where}: {loop['FMUL']} FMUL in promotion (expected at most "
                            f"{MAX_FMUL_PER_K_STEP * steps})")
        if loop.get("unordered_lds"):
            failures.append(f"{where}: {loop['unordered_lds']} shared-memory loads outside the stage's mbarrier "
                            "wait and release")
        if loop["FFMA"] < loop["qgmma_n"] // 2 * steps:
            failures.append(f"{where}: {loop['FFMA']} FFMA (expected {loop['qgmma_n'] // 2 * steps}, one per "
                            f"accumulator element per K step)")
    return failures


MMA_OPCODES = ("HMMA", "HGMMA", "QGMMA")


def _loops(instructions: list) -> list:
    """(start, end) of every backward branch in a listing from parse_listing."""
    loops = []
    for address, mnemonic, operands in instructions:
        target = re.match(r"(?:P\w+,\s*)?0x([0-9a-f]+)", operands) if mnemonic.split(".")[0] == "BRA" else None
        if target and int(target.group(1), 16) <= address:
            loops.append((int(target.group(1), 16), address))
    return loops


def global_load_bytes(mnemonic: str) -> int:
    """Bytes one thread fetches with a global load (LDG, or LDGSTS: cp.async to shared memory); 0 for others."""
    parts = mnemonic.split(".")
    if parts[0] not in ("LDG", "LDGSTS"):
        return 0
    for suffix, size in (("128", 16), ("64", 8), ("U8", 1), ("S8", 1), ("U16", 2), ("S16", 2)):
        if suffix in parts[1:]:
            return size
    return 4


def mma_loop_loads(instructions: list) -> dict | None:
    """The shortest loop holding every MMA (HMMA, HGMMA, QGMMA) of a kernel and the global loads in it:
    {"start", "end", "vector_bytes", "loads", "nested_loads", "copy_waits"}: "vector_bytes" sums, per thread
    and per iteration, the loads wider than 4 bytes (tiles; a 4-byte load is a scalar such as a page id),
    "nested_loads" counts loads inside a loop within it, where one static instruction runs many times per
    iteration, and "copy_waits" lists the cp.async waits in it (DEPBAR.LE SB0, N: wait until at most N
    copy groups are pending). None when no loop holds the MMAs."""
    mmas = [a for a, m, _ in instructions if m.split(".")[0] in MMA_OPCODES]
    around = [(e - s, s, e) for s, e in _loops(instructions) if mmas and s <= min(mmas) and max(mmas) <= e]
    if not around:
        return None
    _, start, end = min(around)
    inner = [(s, e) for s, e in _loops(instructions) if start <= s and e <= end and (s, e) != (start, end)]
    loads = [(a, global_load_bytes(m)) for a, m, _ in instructions if start <= a <= end and global_load_bytes(m)]
    nested = [a for a, _ in loads if any(s <= a <= e for s, e in inner)]
    waits = [int(w.group(1), 16) for a, m, ops in instructions
             if start <= a <= end and m.startswith("DEPBAR.LE") and (w := re.match(r"SB0,\s*0x([0-9a-f]+)", ops))]
    return {"start": start, "end": end, "vector_bytes": sum(b for _, b in loads if b > 4), "loads": len(loads),
            "nested_loads": len(nested), "copy_waits": waits}


def mma_loop_load_failures(loop: dict | None, threads: int, expected_bytes: int) -> list:
    """Why the MMA loop does not load exactly `expected_bytes` per iteration (all threads together), e.g.
    one KV page: more means a tile read twice (V loaded apart from K), less or nested loads mean the page
    is not fetched whole once per iteration."""
    if loop is None:
        return [f"no loop holds the MMAs, expected one loading {expected_bytes} B per iteration"]
    where = f"MMA loop at {loop['start']:#x}-{loop['end']:#x}"
    if loop["nested_loads"]:
        return [f"{where}: {loop['nested_loads']} global loads in an inner loop, expected {expected_bytes} B loaded "
                "once per iteration"]
    got = loop["vector_bytes"] * threads
    if got != expected_bytes:
        return [f"{where}: loads {got} B per iteration ({loop['vector_bytes']} B per thread), expected "
                f"{expected_bytes} B"]
    return []


def mma_loop_pipeline_failures(loop: dict | None) -> list:
    """Why the MMA loop does not keep copies in flight across its iterations: it must wait for its cp.async
    copies exactly once per iteration and leave at least one group pending (DEPBAR.LE SB0, N with N >= 1).
    A wait for all copies (N = 0) means each iteration's tiles arrive while nothing else runs."""
    if loop is None:
        return ["no loop holds the MMAs, expected one that keeps its copies in flight"]
    where = f"MMA loop at {loop['start']:#x}-{loop['end']:#x}"
    if len(loop["copy_waits"]) != 1:
        return [f"{where}: {len(loop['copy_waits'])} cp.async waits per iteration, expected 1"]
    if loop["copy_waits"][0] == 0:
        return [f"{where}: waits for all its cp.async copies (DEPBAR.LE SB0, 0x0), expected the next tile's to "
                "stay in flight"]
    return []


def parse_threads(elf_text: str) -> dict:
    """cuobjdump -elf -> {mangled name: threads per block} from __launch_bounds__ / .reqntid attributes."""
    threads, current, pending = {}, None, False
    for line in elf_text.splitlines():
        if line.startswith(".nv.info."):
            current = line[len(".nv.info."):].strip()
            continue
        if "EIATTR_REQNTID" in line or "EIATTR_MAX_THREADS" in line:
            pending = True
            continue
        if pending and line.strip().startswith("Value:") and current:
            x, y, z = (int(v, 16) for v in line.split()[1:4])
            threads[current] = x * y * z
            pending = False
    return threads


def occupancy(registers: int, shared_bytes: int, threads: int | None) -> float | None:
    """Resident warps per SM / 64, from the per-SM limits (registers allocated per warp in units of 256)."""
    if not threads:
        return None
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = SM90_REGISTERS // (regs_per_warp * warps)
    by_smem = SM90_SHARED_BYTES // max(shared_bytes + SM90_RESERVED_SHARED, 1)
    by_threads = SM90_MAX_THREADS // (warps * 32)
    blocks = min(by_regs, by_smem, by_threads, SM90_MAX_BLOCKS)
    return round(blocks * warps / 64, 3)


def tma_store_protocol_failures(instructions: list) -> list:
    """Why a kernel's stmatrix -> shared memory -> TMA store epilogue is not ordered as the async proxy needs
    (empty when it is, or when the kernel has no TMA store), from parse_listing's instructions in address
    order (a tile loop's epilogue lies in address order within its body):
      - each UTMASTG: after the last STSM before it, a proxy fence (FENCE.VIEW.ASYNC.S) and then a barrier
        (BAR.SYNC), so every thread's stmatrix writes are visible to the async proxy before one thread
        issues the store;
      - each run of STSM: a barrier before it, and before that barrier (back to the previous STSM, UTMASTG
        or the function's start) a wait for all bulk groups (DEPBAR.LE SB0, 0x0), so no store still reads
        the tile being rewritten;
      - an EXIT right after such a wait, so the block's shared memory outlives its last stores.
    A missing fence, barrier or wait compiles and passes every CPU test; on a GPU it is a rare race."""
    def kind(mnemonic, operands):
        base = mnemonic.split(".")[0]
        if base in ("STSM", "UTMASTG", "EXIT"):
            return base
        if mnemonic.startswith("FENCE.VIEW.ASYNC.S"):
            return "FENCE"
        if base == "BAR" and ".SYNC" in mnemonic:
            return "BAR"
        if mnemonic.startswith("DEPBAR.LE") and re.fullmatch(r"SB0\s*,\s*0x0", operands):
            return "WAIT"
        return None

    seq = [(address, k) for address, mnemonic, operands in instructions if (k := kind(mnemonic, operands))]
    if not any(k == "UTMASTG" for _, k in seq):
        return []
    failures = []
    for i, (address, k) in enumerate(seq):
        if k == "UTMASTG":
            last_stsm = next((j for j in range(i - 1, -1, -1) if seq[j][1] == "STSM"), None)
            if last_stsm is None:
                failures.append(f"UTMASTG at {address:#x}: no stmatrix (STSM) before it")
                continue
            between = [kk for _, kk in seq[last_stsm + 1:i]]
            fence = between.index("FENCE") if "FENCE" in between else None
            if fence is None or "BAR" not in between[fence + 1:]:
                failures.append(f"UTMASTG at {address:#x}: expected FENCE.VIEW.ASYNC.S then BAR.SYNC after the "
                                f"stmatrix at {seq[last_stsm][0]:#x}")
        elif k == "STSM":
            before = next((j for j in range(i - 1, -1, -1) if seq[j][1] in ("STSM", "BAR", "UTMASTG", "FENCE")), None)
            if before is not None and seq[before][1] == "STSM":
                continue  # the same run of stmatrix
            if before is None or seq[before][1] != "BAR":
                failures.append(f"STSM at {address:#x}: no barrier before it")
                continue
            wait = next((seq[j][1] for j in range(before - 1, -1, -1) if seq[j][1] in ("WAIT", "STSM", "UTMASTG")),
                        None)
            if wait != "WAIT":
                failures.append(f"STSM at {address:#x}: the barrier at {seq[before][0]:#x} before it follows no wait "
                                "for the TMA stores' reads (DEPBAR.LE SB0, 0x0)")
    if not any(k == "EXIT" and i > 0 and seq[i - 1][1] == "WAIT" for i, (_, k) in enumerate(seq)):
        failures.append("no EXIT right after a wait for the TMA stores (DEPBAR.LE SB0, 0x0)")
    return failures


def check_expectations(report: KernelReport, expect: dict) -> None:
    if expect.get("no_local_memory", True) and (report.local_bytes or report.stack_bytes or
                                                report.instructions.get("LDL") or report.instructions.get("STL")):
        report.failures.append(f"local memory in use: {report.local_bytes} B local, {report.stack_bytes} B stack, "
                               f"{report.instructions.get('LDL', 0)} LDL / {report.instructions.get('STL', 0)} STL")
    for cls, minimum in expect.get("min_instructions", {}).items():
        have = report.instructions.get(cls, 0)
        if have < minimum:
            report.failures.append(f"expected at least {minimum} {cls}, found {have}")
    for cls, maximum in expect.get("max_instructions", {}).items():
        have = report.instructions.get(cls, 0)
        if have > maximum:
            report.failures.append(f"expected at most {maximum} {cls}, found {have}")
    if "mma_loop_load_bytes" in expect:
        report.failures += mma_loop_load_failures(report.mma_loop, report.threads_per_block or 0,
                                                  expect["mma_loop_load_bytes"])
    if expect.get("mma_loop_pipelined"):
        report.failures += mma_loop_pipeline_failures(report.mma_loop)
    if "mma_loop_load_bytes" not in expect and not expect.get("mma_loop_pipelined"):
        report.mma_loop = None  # reported where an op audits it: elsewhere (TMA, wait loops) it means nothing
    limit = expect.get("max_shared_bytes", SM90_MAX_SHARED_PER_BLOCK)
    if report.shared_bytes > limit:
        report.failures.append(f"shared memory {report.shared_bytes} B exceeds {limit} B")
    if expect.get("tma_store_protocol"):
        report.failures += [f"TMA store order: {f}" for f in report.tma_store_order]


def _reports_from_binary(path: str, source: str, names: dict | None = None) -> list:
    """KernelReports for every function in a cubin or a library with embedded cubins."""
    tool = find_cuobjdump()
    usage = parse_resource_usage(_run([tool, "-res-usage", path]))
    sass_text = _run([tool, "-sass", path])
    sass = parse_sass(sass_text)
    listing = parse_listing(sass_text)
    threads = parse_threads(_run([tool, "-elf", path]))
    names = names or demangle(usage)
    reports = []
    for mangled, res in usage.items():
        r = KernelReport(name=names.get(mangled, mangled), source=source, registers=res.get("REG", 0),
                         stack_bytes=res.get("STACK", 0), local_bytes=res.get("LOCAL", 0),
                         shared_bytes=res.get("SHARED", 0), threads_per_block=threads.get(mangled),
                         instructions=dict(sorted(sass.get(mangled, {}).items())),
                         hot_loops=hot_loops(listing.get(mangled, [])),
                         mma_loop=mma_loop_loads(listing.get(mangled, [])),
                         tma_store_order=tma_store_protocol_failures(listing.get(mangled, [])))
        r.occupancy = occupancy(r.registers, r.shared_bytes, r.threads_per_block)
        reports.append(r)
    return reports


def cuda_expectations() -> dict:
    expectations = {}
    for op in OPS:
        expectations.update(getattr(importlib.import_module(f"pykernels.{op}"), "CUDA_AUDIT", {}))
    return expectations


def build_log_warnings(ext_file: str):
    """The ptxas performance warnings in the build log beside the extension, or None when there is no log."""
    log = Path(ext_file).parent / "_C_build.log"
    if not log.is_file():
        return None
    return sorted({line.strip() for line in log.read_text().splitlines()
                   if "warning" in line.lower() and any(code in line for code in PERF_WARNINGS)})


def audit_cuda() -> tuple:
    """(reports, problems) for the built extension; problems are audit-wide failures."""
    from pykernels import _backend

    ext, why = _backend.extension()
    if ext is None:
        return [], [f"CUDA extension not audited: {why}"]
    reports = _reports_from_binary(ext.__file__, "cuda")
    expectations = cuda_expectations()
    for r in reports:
        merged = {"no_local_memory": True, "min_instructions": {}, "max_instructions": {}}
        for pattern, expect in expectations.items():
            if pattern in r.name:
                merged["min_instructions"].update(expect.get("min_instructions", {}))
                merged["max_instructions"].update(expect.get("max_instructions", {}))
                merged.update({k: v for k, v in expect.items() if k not in ("min_instructions", "max_instructions")})
        check_expectations(r, merged)
        r.failures += promotion_failures(r.hot_loops)
    for pattern in expectations:
        if not any(pattern in r.name for r in reports):
            reports.append(KernelReport(name=pattern, source="cuda",
                                        failures=["no kernel in the extension matches this audit expectation"]))
    warnings = build_log_warnings(ext.__file__)
    if warnings is None:
        problems = ["note: no _C_build.log beside the extension, so ptxas warnings (C7510, C7508) were not checked"]
    else:
        problems = [f"ptxas performance warning: {w}" for w in warnings]
    return reports, problems


def audit_triton(match: str = "") -> list:
    """Reports for the Triton AOT configs whose names contain `match` (all by default)."""
    from pykernels import triton as triton_ops
    from pykernels.triton.aot import compile_sm90

    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for op in triton_ops.OPS:
            module = importlib.import_module(f"pykernels.triton.{op}")
            for kernel in [k for k in module.AOT_KERNELS if match in k.name]:
                cubin, metadata = compile_sm90(kernel)
                path = os.path.join(tmp, f"{len(reports)}.cubin")
                Path(path).write_bytes(cubin)
                (r,) = [x for x in _reports_from_binary(path, "triton") if x.name == metadata.name] or \
                    _reports_from_binary(path, "triton")[:1]
                r.name = kernel.name
                r.shared_bytes = max(r.shared_bytes, int(metadata.shared))
                r.threads_per_block = kernel.num_warps * 32
                r.occupancy = occupancy(r.registers, r.shared_bytes, r.threads_per_block)
                check_expectations(r, {"no_local_memory": True, **kernel.expect})
                reports.append(r)
    return reports


def run(cuda: bool = True, triton: bool = True, match: str = "") -> dict:
    reports, problems = [], []
    if cuda:
        cuda_reports, cuda_problems = audit_cuda()
        cuda_reports = [r for r in cuda_reports if match in r.name]
        reports += cuda_reports
        problems += cuda_problems
    if triton:
        reports += audit_triton(match)
    failed = [r for r in reports if not r.ok] or bool([p for p in problems if p.startswith("ptxas")])
    return {"kernels": [asdict(r) for r in reports], "problems": problems, "ok": not failed,
            "note": "static figures read from sm_90a binaries, not measurements"}


def hot_loop_summary(loops: list) -> str:
    """'count x instructions/FFMA/FMUL/FSEL' per 128-K step of the innermost FP8 hot loop with the most
    instructions per step, '-' when there is none. (A tile loop holding a peeled k-step is counted by the
    rule but not shown: its instructions are mostly the tile's, not the step's.)"""
    innermost = [loop for loop in loops if not loop["encloses"]]
    if not innermost:
        return "-"
    worst = max(innermost, key=lambda loop: loop["instructions"] / loop["k_steps"])
    per_step = "/".join(f"{worst[c] / worst['k_steps']:.4g}" for c in ("instructions", "FFMA", "FMUL", "FSEL"))
    return f"{len(innermost)}x {per_step}"


def mma_loop_summary(kernel: dict) -> str:
    loop, threads = kernel["mma_loop"], kernel["threads_per_block"]
    if loop is None or not threads:
        return "-"
    return str(loop["vector_bytes"] * threads) + ("+n" if loop["nested_loads"] else "")


def format_table(result: dict) -> str:
    cols = ["QGMMA", "HGMMA", "HMMA", "UTMALDG", "UTMASTG", "STSM", "UBLKCP", "LDGSTS", "LDG.128"]
    header = f"{'kernel':70} {'src':6} {'regs':>4} {'stack':>5} {'local':>5} {'smem':>7} {'thr':>4} {'occ':>5} " + \
        " ".join(f"{c:>7}" for c in cols) + f" {'hot loops':>20} {'loop ld B':>9}  status"
    lines = [header, "-" * len(header)]
    for k in result["kernels"]:
        name = k["name"] if len(k["name"]) <= 70 else k["name"][:67] + "..."
        occ = "-" if k["occupancy"] is None else f"{k['occupancy']:.2f}"
        thr = "-" if k["threads_per_block"] is None else str(k["threads_per_block"])
        counts = " ".join(f"{k['instructions'].get(c, 0):>7}" for c in cols)
        counts += f" {hot_loop_summary(k['hot_loops']):>20} {mma_loop_summary(k):>9}"
        status = "ok" if not k["failures"] else "FAIL: " + "; ".join(k["failures"])
        lines.append(f"{name:70} {k['source']:6} {k['registers']:>4} {k['stack_bytes']:>5} {k['local_bytes']:>5} "
                     f"{k['shared_bytes']:>7} {thr:>4} {occ:>5} {counts}  {status}")
    lines.append("loop ld B: bytes the loop around the MMAs loads from global memory per iteration, all threads, "
                 "in loads wider than 4 bytes")
    lines.append("hot loops: FP8 wgmma loops, 'count x instructions/FFMA/FMUL/FSEL' per 128-K step per warp (the "
                 "loop with the most instructions per step)")
    lines += [f"problem: {p}" for p in result["problems"]]
    lines.append(f"{len(result['kernels'])} kernels audited for sm_90a (static figures); "
                 f"{'all checks pass' if result['ok'] else 'CHECKS FAILED'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pykernels.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cuda-only", action="store_true", help="audit only the built CUDA extension")
    group.add_argument("--triton-only", action="store_true", help="audit only the Triton AOT configs")
    parser.add_argument("--match", default="", help="audit only the kernels whose names contain this text")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("note: TRITON_INTERPRET is set; Triton kernels are still compiled for sm_90", file=sys.stderr)
    result = run(cuda=not args.triton_only, triton=not args.cuda_only, match=args.match)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
