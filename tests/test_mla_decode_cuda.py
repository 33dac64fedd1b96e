"""MLA decode, CUDA kernels: the index math they run, checked on the host through the binding (TMA box
coordinates, which tokens of a page are zeroed before P V, which requests the combine merges, the planner at
the int32 edge), then the kernels themselves on a GPU against float64 attention computed from the dense rows.

GPU tolerances are FlashMLA's: over a whole output, the cosine difference 1 - 2<x, y> / (|x|^2 + |y|^2) stays
below 5e-6, and every element within 8e-4 + 2.01/128 |ref| (bfloat16 output: one rounding is 2^-9 relative,
P is rounded to bfloat16 before P V, 2^-9 relative per weight). lse is float32 math on the same inputs:
1e-4 relative to 1 + |lse|.
"""

import math
import random
import subprocess

import pytest
import torch

import pykernels
from pykernels import _backend
from pykernels.mla_decode import PAGE_SIZE, num_sm_parts_for, plan_splits

FP8 = torch.float8_e4m3fn
INT32_MAX = 2 ** 31 - 1


def _extension():
    ext, why = _backend.extension()
    if ext is None:
        pytest.skip(f"CUDA extension not built: {why}")
    return ext


# ---- index math on the host -------------------------------------------------------------------------------

@pytest.mark.parametrize("block_id", [0, 1, 7, 12345, INT32_MAX // PAGE_SIZE])
def test_page_boxes_cover_the_page_once(block_id):
    """A page is rows block_id * 64 .. + 63 of the cache seen as [num_blocks * 64, 576]: 9 boxes of 64 columns
    side by side, no column twice, none left out, no coordinate past int32 for the largest id accepted."""
    boxes = _extension().mla_page_boxes(block_id)
    assert len(boxes) == 9
    assert sorted(col for col, _ in boxes) == list(range(0, 576, 64))
    assert {row for _, row in boxes} == {block_id * PAGE_SIZE}
    assert all(0 <= row <= INT32_MAX - (PAGE_SIZE - 1) for _, row in boxes)


@pytest.mark.parametrize("request_index,row_block", [(0, 0), (5, 1), (1000, 7)])
def test_q_boxes_address_one_query_tile(request_index, row_block):
    boxes = _extension().mla_q_boxes(request_index, row_block)
    assert sorted(tuple(b) for b in boxes) == [(c, 64 * row_block, request_index) for c in range(0, 576, 64)]


def _valid_tokens(seqlen, page):
    return max(0, min(PAGE_SIZE, seqlen - PAGE_SIZE * page))


def test_valid_tokens_edges():
    ext = _extension()
    last_page = (INT32_MAX - 1) // PAGE_SIZE
    cases = [(0, 0), (-7, 0), (1, 0), (63, 0), (64, 0), (65, 0), (65, 1), (128, 1), (129, 2), (5, 3),
             (INT32_MAX, last_page), (INT32_MAX, last_page - 1), (INT32_MAX, last_page + 1), (INT32_MAX, 0)]
    for seqlen, page in cases:
        assert ext.mla_valid_tokens(seqlen, page) == _valid_tokens(seqlen, page), (seqlen, page)
    assert ext.mla_valid_tokens(INT32_MAX, last_page) == 63


def test_only_a_requests_last_page_is_zeroed():
    """Under every plan, each page a split walks is full except a request's last (valid tokens 1..64, the
    rest zeroed) and an empty request's one planned page (0 valid: loaded from nowhere, all zeroed)."""
    ext = _extension()
    rng = random.Random(5)
    for _ in range(30):
        lengths = [rng.choice([0, 1, 63, 64, 65, rng.randint(1, 5000)]) for _ in range(rng.randint(1, 12))]
        _, splits, _ = plan_splits(lengths, rng.randint(1, 20))
        for request, first, end, _ in splits:
            n = lengths[request]
            for page in range(first, end):
                valid = ext.mla_valid_tokens(n, page)
                if n == 0:
                    assert valid == 0
                elif page == end - 1 and end == -(-n // PAGE_SIZE):
                    assert valid == n - PAGE_SIZE * page and 1 <= valid <= PAGE_SIZE
                else:
                    assert valid == PAGE_SIZE


def test_combine_merges_exactly_the_split_requests():
    ext = _extension()
    rng = random.Random(9)
    for _ in range(50):
        lengths = [rng.randint(1, 70000) if rng.random() < 0.2 else rng.randint(1, 300)
                   for _ in range(rng.randint(1, 40))]
        num_parts = rng.randint(1, 140)
        _, splits, split_offsets = plan_splits(lengths, num_parts)
        count = [sum(1 for s in splits if s[0] == i) for i in range(len(lengths))]
        assert ext.mla_combined_requests(split_offsets) == [c > 1 for c in count]
    # One part: nothing is split, so no combine CTA merges anything (each waits for the split kernel, then exits).
    _, _, split_offsets = plan_splits([5000, 1, 64, 129], 1)
    assert ext.mla_combined_requests(split_offsets) == [False] * 4
    with pytest.raises(ValueError, match="split_offsets: expected b \\+ 1 >= 2 entries, got 1 entries"):
        ext.mla_combined_requests([0])


@pytest.mark.parametrize("lengths", [[INT32_MAX], [INT32_MAX, 1, INT32_MAX - 64], [2 ** 30, INT32_MAX, 0]])
@pytest.mark.parametrize("num_parts", [1, 3, 132])
def test_planner_at_int32_max_matches_python(lengths, num_parts):
    """ceil((2^31 - 1) / 64) = 2^25 pages: the C++ rounding must not wrap to a negative page count. Length 0
    goes through the device planner only (a replayed graph); the host binding refuses it, so it is planned
    here as what the kernel sees, one masked page."""
    ext = _extension()
    host = [max(n, 1) for n in lengths]
    got = ext.mla_plan_splits(host, num_parts)
    want = plan_splits(host, num_parts)
    assert (list(got[0]), [tuple(s) for s in got[1]], list(got[2])) == want
    assert all(s[1] < s[2] for s in got[1])
    for i, n in enumerate(host):
        mine = [s for s in got[1] if s[0] == i]
        assert mine[0][1] == 0 and mine[-1][2] == -(-n // PAGE_SIZE)


SMEM_PER_CTA = 232448  # 227 KB, the most a Hopper CTA may opt into
BOX_BYTES = 64 * 64 * 2


@pytest.mark.parametrize("fp8,expected", [(False, 223232), (True, 231424)])
def test_shared_plan_fits_and_p_overlays_only_the_rope_box(fp8, expected):
    """The split kernel's shared memory, from the compiled SharedStorage: the launch (struct + 1 KB to align
    the base) fits 227 KB; two bf16 tiles either way; no two regions overlap, except that with a bf16 cache
    P of stage s is the last 8 KB (the RoPE box, columns 512..575) of tile s, so P V's V (the first 64 KB)
    never reads it, and with an e4m3 cache page s's raw bytes land in the back half of tile s (converted in
    place); every swizzled operand starts on a 1024-byte boundary (the 128-byte swizzle is a function of
    address bits 4..9)."""
    plan = _extension().mla_shared_plan(fp8)
    launch = plan.pop("launch")[1]
    assert launch == expected <= SMEM_PER_CTA
    tiles = sorted(k for k in plan if k.startswith("tile"))
    assert len(tiles) == 2 and plan["q"][1] == plan["tile0"][1] == plan["tile1"][1] == 64 * 576 * 2
    for name in ["q", "p0", "p1", *tiles]:
        assert plan[name][0] % 1024 == 0, name
    if fp8:
        assert plan["p0"] == plan["p1"] and plan["p0"][1] == BOX_BYTES
        for s in range(2):
            offset, size = plan[f"tile{s}"]
            assert plan[f"raw{s}"] == (offset + size // 2, size // 2) == (offset + 64 * 576, 64 * 576)
        assert plan["full"][1] == 2 * 8
    else:
        for s in range(2):
            offset, size = plan[f"tile{s}"]
            assert plan[f"p{s}"] == (offset + size - BOX_BYTES, BOX_BYTES)
            assert size - BOX_BYTES == 512 * 64 * 2  # V's columns end where P begins
        assert plan["full"][1] == 2 * 9 * 8  # one barrier per box and stage
    regions = sorted((offset, offset + size, name) for name, (offset, size) in plan.items()
                     if not (not fp8 and name.startswith("p")) and not (fp8 and name in ("p1", "raw0", "raw1")))
    for (_, end, a), (start, _, b) in zip(regions, regions[1:]):
        assert end <= start, (a, b)
    assert regions[-1][1] + 1024 <= launch


class _Stages:
    """Two shared-memory stages with their barriers modelled as phase counters, and every access checked: a
    TMA load completes its stage's barriers some time after it is issued (here: as late as possible, when a
    thread first waits for it); try_wait.parity(P) returns once the phase of parity P has completed, and the
    next phase must not have completed too (the waiter would block, or read the next page)."""

    def __init__(self, ext, part_pages):
        self.ext, self.part_pages = ext, part_pages
        self.completions = [0, 0]
        self.pending = [None, None]    # page whose load is in flight into the stage
        self.occupant = [None, None]   # page the stage holds (landed or in flight)
        self.qk_done, self.p_written, self.released, self.loaded = set(), set(), set(), []

    def load(self, seq):
        stage, _ = self.ext.mla_page_stage(seq)
        prev = self.occupant[stage]
        assert prev is None or prev in self.released, f"page {seq} overwrites page {prev} before its release"
        assert self.pending[stage] is None
        self.pending[stage], self.occupant[stage] = seq, seq
        self.loaded.append(seq)

    def holds(self, seq):
        stage, _ = self.ext.mla_page_stage(seq)
        assert self.occupant[stage] == seq and seq not in self.released, (seq, self.occupant)
        return stage

    def qk(self, seq):  # wait for the page's barriers (box by box, or before the conversion), then QK^T
        stage, parity = self.ext.mla_page_stage(seq)
        self.holds(seq)
        if self.pending[stage] is not None:
            self.pending[stage] = None
            self.completions[stage] += 1
        assert (self.completions[stage] - 1) % 2 == parity and self.completions[stage] - 1 == seq // 2, seq
        self.qk_done.add(seq)

    def write_p(self, seq):  # after the softmax's barrier: both warpgroups' QK^T of the page completed
        self.holds(seq)
        assert seq in self.qk_done
        self.p_written.add(seq)

    def pv(self, seq):
        self.holds(seq)
        assert seq in self.p_written

    def release(self, seq):  # the barrier after both warpgroups' P V
        self.holds(seq)
        self.released.add(seq)

    def finish(self):
        assert self.loaded == list(range(self.part_pages)) and self.released == set(range(self.part_pages))


def _simulate_pipeline(ext, split_pages, fp8, ahead=None):
    """Runs the split kernel's page loop for one part in the kernel's order (bf16: the next page's QK^T and
    softmax inside the step of this page's P V; e4m3: the next page converted in place inside that step),
    with stages, parities and the load distance from the binding."""
    part_pages = sum(split_pages)
    ahead = ext.mla_load_distance() if ahead is None else ahead
    st = _Stages(ext, part_pages)
    for seq in range(min(ahead, part_pages)):
        st.load(seq)
    if fp8:
        st.qk(0)  # the wait before the first page's conversion; its QK^T then reads the converted tile
    seq = 0
    for pages in split_pages:
        if not fp8:
            st.qk(seq)
            st.write_p(seq)
        for index in range(pages):
            if fp8:
                st.write_p(seq)             # QK^T of the converted page, softmax, P
                st.pv(seq)
                if seq + 1 < part_pages:    # the next page (this split's or the next one's) converts meanwhile
                    st.qk(seq + 1)
                    assert st.holds(seq) != st.holds(seq + 1)
            else:
                if index + 1 < pages:
                    st.qk(seq + 1)          # issued before this page's P V ...
                    assert st.holds(seq) != st.holds(seq + 1)
                st.pv(seq)                  # ... which reads the other stage
                if index + 1 < pages:
                    st.write_p(seq + 1)     # while P V runs
            st.release(seq)
            if seq + ahead < part_pages:
                st.load(seq + ahead)
            seq += 1
    st.finish()


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("split_pages", [[n] for n in range(1, 10)] + [[1, 1], [3, 1, 2], [2, 9, 1, 4], [1] * 7])
def test_page_pipeline_protocol(split_pages, fp8):
    _simulate_pipeline(_extension(), split_pages, fp8)


@pytest.mark.parametrize("fp8", [False, True])
def test_page_pipeline_simulation_catches_an_early_load(fp8):
    """The simulation is a check: loading three pages ahead into two stages is refused."""
    assert _extension().mla_load_distance() == 2
    with pytest.raises(AssertionError, match="before its release"):
        _simulate_pipeline(_extension(), [4], fp8, ahead=3)


def test_page_stage_parity_sequence():
    ext = _extension()
    assert [ext.mla_page_stage(s) for s in range(6)] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 0), (1, 0)]
    with pytest.raises(ValueError, match="seq: expected an int >= 0"):
        ext.mla_page_stage(-1)


def _shared_memory_order_failures(instructions):
    """Walks one split kernel's SASS (audit.parse_listing) in address order, which is program order for the
    page loop (straight-line code, wait retries out of line), against the orderings that keep wgmma's
    shared-memory operands intact. ptxas orders registers around wgmma (C7510), not shared memory:
      - no generic shared store (ST, STS) while this warpgroup's QK^T (HGMMA 64x32) may still read: it
        completes at WARPGROUP.DEPBAR.LE 0, or 1 when a P V batch (HGMMA 64x256) was issued after it;
      - from that completion to the next CTA barrier at most 2 stores (each thread's two row maxima): P
        (over the RoPE box QK^T read) follows the barrier, after the other warpgroup's QK^T completed too;
      - a page refill (UTMALDG.2D, UBLKCP) after the first HGMMA follows a CTA barrier at which no batch was
        in flight and every store since the step's first HGMMA was fenced (FENCE.VIEW.ASYNC.S), with no
        HGMMA between (stores between that barrier and the next HGMMA are thread 0's load cursor);
      - a Q refill (UTMALDG.3D) after the first HGMMA follows a CTA barrier at which no QK^T was in flight."""
    failures = []
    scores = pv = pv_after_scores = unfenced = started = in_step = released = q_free = False
    exchange_stores = None  # stores since a QK^T completed, until the next CTA barrier
    for address, mnemonic, operands in instructions:
        base, where = mnemonic.split(".")[0], f"{address:#x} {mnemonic}"
        if base == "HGMMA":
            started = in_step = True
            released = False
            if ".64x32x" in mnemonic:
                scores, pv_after_scores, q_free = True, False, False
            else:
                pv = pv_after_scores = True
        elif mnemonic.startswith("WARPGROUP.DEPBAR"):
            pending = int(operands.rsplit(",", 1)[1], 16)
            if scores and (pending == 0 or (pending == 1 and pv_after_scores)):
                scores, exchange_stores = False, 0
            pv = pv and pending > 0
        elif base in ("ST", "STS"):
            if scores:
                failures.append(f"{where}: shared store while this warpgroup's QK^T may still read")
            if exchange_stores is not None:
                exchange_stores += 1
                if exchange_stores == 3:
                    failures.append(f"{where}: a third store between QK^T's completion and the CTA barrier")
            unfenced = unfenced or in_step
        elif mnemonic.startswith("FENCE.VIEW.ASYNC.S"):
            unfenced = False
        elif mnemonic.startswith("BAR.SYNC"):
            released, q_free, exchange_stores = not (scores or pv or unfenced), not scores, None
            in_step = in_step and not released
        elif started and (mnemonic.startswith("UTMALDG.2D") or base == "UBLKCP") and not released:
            failures.append(f"{where}: page refill without a barrier after wait_group 0 and the proxy fence")
        elif started and mnemonic.startswith("UTMALDG.3D") and not q_free:
            failures.append(f"{where}: Q refill while a QK^T may still read Q")
    return failures


def _split_kernel_listings():
    """{mangled name: parse_listing instructions} of the bf16 and the e4m3 split kernel as built."""
    from pykernels import audit

    ext = _extension()
    try:
        tool = audit.find_cuobjdump()
    except RuntimeError as why:
        pytest.skip(str(why))
    names = ",".join(f"_ZN9pykernels3mla17mla_decode_kernelILb{fp8}EEEv14CUtensorMap_stS2_NS0_6ParamsE"
                     for fp8 in (0, 1))
    sass = subprocess.run([tool, "-sass", "-fun", names, ext.__file__], capture_output=True, text=True).stdout
    kernels = {name: code for name, code in audit.parse_listing(sass).items() if "mla_decode_kernel" in name}
    assert sorted("mla_decode_kernelILb1E" in name for name in kernels) == [False, True], list(kernels)
    return kernels


def test_split_kernels_sass_keeps_shared_memory_ordered():
    """Both split kernels as built: every shared-memory overwrite waits for the wgmma that read the bytes
    and is fenced before wgmma or TMA touch them again (_shared_memory_order_failures)."""
    for name, instructions in _split_kernel_listings().items():
        assert sum(m.startswith("UTMALDG.2D") or m.startswith("UBLKCP") for _, m, _ in instructions) >= 2, name
        assert _shared_memory_order_failures(instructions) == [], name


def test_shared_memory_order_check_catches_reordered_steps():
    """The walk is a check: one bf16 step (QK^T of the next page, P V of this one, wait_group 1, maxima
    exchange, P, fence, wait_group 0, barrier, refill) passes, and each hazard moved into it fails."""
    step = ["HGMMA.64x32x16.F32.BF16 R152, gdesc[UR8], R152, gsb0", "WARPGROUP.ARRIVE",
            "HGMMA.64x256x16.F32.BF16 R24, gdesc[UR48].tnspB, R24, gsb0", "WARPGROUP.DEPBAR.LE gsb0, 0x1",
            "@P0 ST.E [R2.64], R5", "@P0 ST.E [R2.64+0x20], R6", "BAR.SYNC.DEFER_BLOCKING 0x0",
            *[f"ST.E [R{10 + 2 * i}.64], R{40 + i}" for i in range(8)], "MEMBAR.ALL.CTA", "FENCE.VIEW.ASYNC.S",
            "WARPGROUP.DEPBAR.LE gsb0, 0x0", "BAR.SYNC.DEFER_BLOCKING 0x0", "ST.E.64 [R20.64], R22",
            "UTMALDG.2D [UR48], [UR10], desc[UR14]", "UTMALDG.3D [UR8], [UR6], desc[UR14]"]

    def walk(lines):
        from pykernels import audit

        text = "\n".join(["Function : _Zfake"] + [f"  /*{16 * i:04x}*/ {line} ;" for i, line in enumerate(lines)])
        return _shared_memory_order_failures(audit.parse_listing(text)["_Zfake"])

    assert walk(step) == []
    early_p = step[:3] + ["ST.E [R10.64], R40"] + step[3:]
    assert any("while this warpgroup's QK^T may still read" in f for f in walk(early_p))
    no_wait_for_scores = [line.replace("0x1", "0x2") for line in step]
    assert any("while this warpgroup's QK^T may still read" in f for f in walk(no_wait_for_scores))
    exchange, fence = step.index("BAR.SYNC.DEFER_BLOCKING 0x0"), step.index("MEMBAR.ALL.CTA")
    p_before_exchange = step[:exchange] + step[exchange + 1:fence] + [step[exchange]] + step[fence:]
    assert any("third store" in f for f in walk(p_before_exchange))
    unfenced = [line for line in step if "FENCE" not in line]
    assert any("page refill" in f for f in walk(unfenced))
    pv_in_flight = [line for line in step if "DEPBAR.LE gsb0, 0x0" not in line]
    assert any("page refill" in f for f in walk(pv_in_flight))
    closing = len(step) - 1 - step[::-1].index("BAR.SYNC.DEFER_BLOCKING 0x0")
    assert any("page refill" in f for f in walk(step[:closing] + step[closing + 1:]))
    early_q = step[:1] + step[-1:] + step[1:-1]
    assert any("Q refill" in f for f in walk(early_q))


def _host_launch_args(num_parts=1, softmax_scale=0.1):
    """mla_decode's arguments with shapes that pass every shape check, on the CPU: the binding then refuses q
    as not on a GPU, unless an argument checked earlier is refused first."""
    b, rows = 1, 16
    return [torch.zeros(b, 1, rows, 576, dtype=torch.bfloat16), torch.zeros(2, PAGE_SIZE, 1, 576, dtype=torch.bfloat16),
            torch.zeros(b, 1, dtype=torch.int32), torch.ones(b, dtype=torch.int32), None,
            torch.zeros(num_parts + 1, dtype=torch.int32), torch.zeros(b + num_parts, 4, dtype=torch.int32),
            torch.zeros(b + 1, dtype=torch.int32), torch.zeros(b, 1, rows, 512, dtype=torch.bfloat16),
            torch.zeros(b, rows, 1), torch.zeros(b + num_parts, rows, 512), torch.zeros(b + num_parts, rows),
            softmax_scale, False, 0]


def test_launcher_refuses_bad_scale_table_and_grid_before_launch():
    """The binding is public: a scale that is not finite and positive, a block_table without columns, or more
    SM parts than grid y holds (65535), is refused with a ValueError before anything reaches a device. Valid
    values pass these checks and stop at the next one (q not on a GPU)."""
    ext = _extension()
    with pytest.raises(ValueError, match="q: expected a CUDA tensor"):
        ext.mla_decode(*_host_launch_args(num_parts=3, softmax_scale=0.135))
    for scale in (float("nan"), float("inf"), 0.0, -0.5):
        with pytest.raises(ValueError, match="softmax_scale: expected a finite positive float"):
            ext.mla_decode(*_host_launch_args(softmax_scale=scale))
    args = _host_launch_args()
    args[2] = torch.zeros(1, 0, dtype=torch.int32)
    with pytest.raises(ValueError, match="block_table: expected max_blocks \\(dim 1\\) in 1..2147483647"):
        ext.mla_decode(*args)
    args = _host_launch_args()
    args[5] = torch.zeros(65536 + 1, dtype=torch.int32)  # num_parts = 65536; the other shapes are checked later
    with pytest.raises(ValueError, match="part_splits: expected 2..65536 entries"):
        ext.mla_decode(*args)
    args[5] = torch.zeros(65535 + 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="splits: expected size 65536 in dim 0"):
        ext.mla_decode(*args)


# ---- the kernels, on a GPU ------------------------------------------------------------------------------

def make_batch(lengths, s_q, h_q, fp8=False, q_scale=1.0, seed=0):
    """A paged cache on the GPU with pages in a shuffled order, NaN in every unused page and every slot past
    a request's end, garbage block_table entries past the pages a request uses (and in every entry of an
    empty request). Returns (q, cache, table, seqlens, kv_scale, dense): dense[i] is request i's keys [L, 576]
    in float64 as the kernel must see them (after e4m3 and kv_scale)."""
    gen = torch.Generator().manual_seed(seed)
    pages = [-(-n // PAGE_SIZE) for n in lengths]
    max_blocks = max(max(pages), 1) + 2
    num_blocks = sum(pages) + 5
    order = torch.randperm(num_blocks, generator=gen)
    store = FP8 if fp8 else torch.bfloat16
    cache = torch.full((num_blocks, PAGE_SIZE, 1, 576), float("nan")).to(store)
    table = torch.randint(-10 ** 6, 10 ** 6, (len(lengths), max_blocks), dtype=torch.int32, generator=gen)
    kv_scale = torch.tensor([0.0213]) if fp8 else None
    dense, used = [], 0
    for i, n in enumerate(lengths):
        ids = order[used: used + pages[i]]
        used += pages[i]
        table[i, : pages[i]] = ids.int()
        rows = torch.randn(n, 576, generator=gen)
        stored = (rows / kv_scale).clamp(-448, 448).to(FP8) if fp8 else rows.bfloat16()
        dense.append(stored.double() * (float(kv_scale) if fp8 else 1.0))
        padded = torch.full((pages[i] * PAGE_SIZE, 576), float("nan")).to(store)
        padded[:n] = stored
        if pages[i]:
            cache[ids] = padded.reshape(pages[i], PAGE_SIZE, 1, 576)
    q = (torch.randn(len(lengths), s_q, h_q, 576, generator=gen) * q_scale).bfloat16()
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    return (q.cuda(), cache.cuda(), table.cuda(), seqlens.cuda(), None if kv_scale is None else kv_scale.cuda(),
            dense)


def float64_attention(q, dense, causal, scale):
    """(out [b, s_q, h_q, 512], lse [b, h_q, s_q]) in float64 on the GPU; a row that sees no key: 0, +inf."""
    b, s_q, h_q, _ = q.shape
    out = torch.zeros(b, s_q, h_q, 512, dtype=torch.float64, device="cuda")
    lse = torch.full((b, h_q, s_q), math.inf, dtype=torch.float64, device="cuda")
    for i in range(b):
        kv = dense[i].cuda()
        for t in range(s_q):
            visible = kv.shape[0] - s_q + t + 1 if causal and s_q > 1 else kv.shape[0]
            if visible <= 0:
                continue
            scores = q[i, t].double() @ kv[:visible].T * scale
            top = scores.max(dim=-1, keepdim=True).values
            weights = torch.exp(scores - top)
            denom = weights.sum(dim=-1, keepdim=True)
            out[i, t] = (weights / denom) @ kv[:visible, :512]
            lse[i, :, t] = (top + torch.log(denom)).squeeze(-1)
    return out, lse


def assert_flashmla_close(out, lse, want_out, want_lse):
    x, y = out.double(), want_out
    assert torch.isfinite(x).all()
    cos_diff = 1 - 2 * float((x * y).sum()) / max(float((x * x + y * y).sum()), 1e-12)
    assert cos_diff < 5e-6, f"cosine difference {cos_diff:.3g}"
    excess = (x - y).abs() - (8e-4 + 2.01 / 128 * y.abs())
    assert float(excess.max()) <= 0, f"out off by {float((x - y).abs().max()):.3g}"
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite) and bool((lse[~finite] == math.inf).all())
    lse_err = (lse.double()[finite] - want_lse[finite]).abs() - 1e-4 * (1 + want_lse[finite].abs())
    assert lse_err.numel() == 0 or float(lse_err.max()) <= 0, "lse off"


def run_cuda(q, cache, table, seqlens, kv_scale, scale, causal, num_parts=None):
    """Plans on the GPU and runs the CUDA kernels through the binding, outputs and partials poisoned with NaN.
    Returns (out, lse, schedule, out_partial, lse_partial)."""
    ext = _extension()
    b, s_q, h_q, _ = q.shape
    rows = s_q * h_q
    if num_parts is None:
        num_parts = num_sm_parts_for(rows, 1, torch.cuda.get_device_properties(0).multi_processor_count)
    part_splits = torch.zeros(num_parts + 1, dtype=torch.int32, device="cuda")
    splits = torch.zeros(b + num_parts, 4, dtype=torch.int32, device="cuda")
    split_offsets = torch.zeros(b + 1, dtype=torch.int32, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    ext.mla_plan_splits_device(seqlens, part_splits, splits, split_offsets, stream)
    out = torch.full((b, s_q, h_q, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
    lse = torch.full((b, h_q, s_q), float("nan"), device="cuda")
    out_partial = torch.full((b + num_parts, rows, 512), float("nan"), device="cuda")
    lse_partial = torch.full((b + num_parts, rows), float("nan"), device="cuda")
    ext.mla_decode(q, cache, table, seqlens, kv_scale, part_splits, splits, split_offsets, out, lse, out_partial,
                   lse_partial, scale, causal, stream)
    torch.cuda.synchronize()
    return out, lse, (part_splits, splits, split_offsets), out_partial, lse_partial


TAIL_LENGTHS = [1, 63, 64, 65, 127, 129, 1000, 4097, 64 * 9, 7]


@pytest.mark.gpu
@pytest.mark.parametrize("h_q,s_q,causal",
                         [(16, 1, False), (128, 1, False), (128, 2, True), (3, 4, True), (64, 2, False)])
def test_gpu_tma_pages_vs_float64(h_q, s_q, causal):
    """Every tail length against float64, NaN in every unused slot: a NaN that reaches P V fails."""
    lengths = [max(n, s_q) for n in TAIL_LENGTHS]
    q, cache, table, seqlens, _, dense = make_batch(lengths, s_q, h_q, seed=h_q * 10 + s_q)
    out, lse, *_ = run_cuda(q, cache, table, seqlens, None, 576 ** -0.5, causal)
    assert_flashmla_close(out, lse, *float64_attention(q, dense, causal, 576 ** -0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_peaked_softmax(fp8):
    """DeepSeek-V3's scale (about 0.135) with q norms 3x larger: a few keys take nearly all the weight, so an
    error in the max tracking or the rescale shows."""
    q, cache, table, seqlens, kv_scale, dense = make_batch([70, 4096, 1, 300, 8191], 2, 128, fp8=fp8, q_scale=3.0,
                                                           seed=3)
    out, lse, *_ = run_cuda(q, cache, table, seqlens, kv_scale, 0.135, True)
    assert_flashmla_close(out, lse, *float64_attention(q, dense, True, 0.135))


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_empty_requests(fp8):
    """Length-0 requests (their block_table rows are garbage: never read) give out 0 and lse +inf; the other
    requests, split or not, are unaffected. With causal and s_q = 2, a request of length 1 has a first row
    that sees no key: 0 and +inf too."""
    lengths = [0, 5000, 0, 1, 65, 0]
    q, cache, table, seqlens, kv_scale, dense = make_batch(lengths, 2, 16, fp8=fp8, seed=17)
    for causal in (False, True):
        for num_parts in (1, 4, 132):
            out, lse, *_ = run_cuda(q, cache, table, seqlens, kv_scale, 576 ** -0.5, causal, num_parts)
            want_out, want_lse = float64_attention(q, dense, causal, 576 ** -0.5)
            assert_flashmla_close(out, lse, want_out, want_lse)
            assert bool((out[[0, 2, 5]] == 0).all()) and bool((lse[[0, 2, 5]] == math.inf).all())


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_every_pages_per_split_count(fp8):
    """Requests of 1..9 pages (full and partial last pages) under plans of 1, 3 and 7 parts, so that parts run
    splits of every length from one page up, in sequence. The bf16 kernel's step overlaps a page's P V with
    the next page's QK^T and softmax within a split and writes P over the RoPE box of the next page's stage;
    the e4m3 kernel converts the next page (possibly the next split's first) in place under P V; both load
    two pages ahead across split boundaries: a wrong stage, parity or release order shows here."""
    lengths = [64 * k + (0 if k % 2 else 37) for k in range(1, 10)] + [1, 64]
    q, cache, table, seqlens, kv_scale, dense = make_batch(lengths, 2, 32, fp8=fp8, q_scale=2.0, seed=53)
    want = float64_attention(q, dense, True, 576 ** -0.5)
    for num_parts in (1, 3, 7):
        out, lse, *_ = run_cuda(q, cache, table, seqlens, kv_scale, 576 ** -0.5, True, num_parts)
        assert_flashmla_close(out, lse, *want)


@pytest.mark.gpu
def test_gpu_unsplit_batch_skips_the_combine():
    """One SM part: no request is split, so the split kernel writes every output itself and no partial is
    touched (they stay NaN), and the combine's CTAs all exit early."""
    ext = _extension()
    q, cache, table, seqlens, _, dense = make_batch([300, 1, 4096, 65], 1, 64, seed=23)
    out, lse, (_, _, split_offsets), out_partial, lse_partial = run_cuda(q, cache, table, seqlens, None, 576 ** -0.5,
                                                                         False, num_parts=1)
    assert ext.mla_combined_requests(split_offsets.tolist()) == [False] * 4
    assert bool(out_partial.isnan().all()) and bool(lse_partial.isnan().all())
    assert_flashmla_close(out, lse, *float64_attention(q, dense, False, 576 ** -0.5))


@pytest.mark.gpu
@pytest.mark.parametrize("h_q,s_q", [(16, 1), (128, 2), (3, 2)])
def test_gpu_fp8_cache_vs_float64(h_q, s_q):
    lengths = [max(n, s_q) for n in TAIL_LENGTHS]
    q, cache, table, seqlens, kv_scale, dense = make_batch(lengths, s_q, h_q, fp8=True, seed=31 + h_q)
    out, lse, *_ = run_cuda(q, cache, table, seqlens, kv_scale, 576 ** -0.5, True)
    assert_flashmla_close(out, lse, *float64_attention(q, dense, True, 576 ** -0.5))


@pytest.mark.gpu
def test_gpu_graph_capture_and_replay():
    """Planner, split kernel and the programmatically dependent combine captured in one graph; replayed after
    q and the cache change, and again after the lengths change (re-planned inside the graph)."""
    lengths = [4096, 1, 65, 8000, 300] * 4
    q, cache, table, seqlens, _, dense = make_batch(lengths, 2, 64, seed=41)
    pykernels.mla_decode(q, cache, table, seqlens, causal=True, backend="cuda")  # warm-up, checks
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = pykernels.mla_decode(q, cache, table, seqlens, causal=True, backend="cuda")
    q.copy_(torch.randn_like(q, dtype=torch.float32).bfloat16())
    used = torch.isfinite(cache.float())
    cache.copy_(torch.where(used, torch.randn_like(cache, dtype=torch.float32), cache.float()).bfloat16())
    graph.replay()
    torch.cuda.synchronize()
    dense = [cache[table[i, : -(-n // PAGE_SIZE)].long()].reshape(-1, 576)[:n].double().cpu()
             for i, n in enumerate(lengths)]
    assert_flashmla_close(out, lse, *float64_attention(q, dense, True, 576 ** -0.5))
    shorter = [max(2, n // 3) for n in lengths]
    seqlens.copy_(torch.tensor(shorter, dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    dense = [d[:n] for d, n in zip(dense, shorter)]
    assert_flashmla_close(out, lse, *float64_attention(q, dense, True, 576 ** -0.5))
