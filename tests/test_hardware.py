"""pykernels.hardware: spec rows, cost formulas against hand-computed values, roofline projection facts, and
device detection on faked device properties."""

import math

import pytest
import torch

from pykernels import hardware

GiB = 2**30


@pytest.mark.parametrize("name,sms,fp8,bf16,hbm_gb,tbps,l2,nvlink", [
    ("H100 SXM5", 132, 1979, 989, 80, 3.35, 50, 450),
    ("H100 PCIe", 114, 1513, 756, 80, 2.0, 50, 300),
    ("H800 SXM5", 132, 1979, 989, 80, 3.35, 50, 200),
    ("H20", 78, 296, 148, 96, 4.0, 60, 450),
    ("H200 SXM", 132, 1979, 989, 141, 4.8, 60, 450),
])
def test_spec_rows(name, sms, fp8, bf16, hbm_gb, tbps, l2, nvlink):
    g = hardware.get(name)
    assert (g.name, g.sms, g.fp8_tflops, g.bf16_tflops, g.hbm_gb, g.hbm_tbps, g.l2_mb, g.nvlink_gbps) == \
        (name, sms, fp8, bf16, hbm_gb, tbps, l2, nvlink)


def test_aliases_and_unknown_names():
    assert hardware.get("H100") is hardware.get("H100 SXM5")
    assert hardware.get("h800") is hardware.get("H800 SXM5")
    assert hardware.get("H200") is hardware.get("H200 SXM")
    with pytest.raises(ValueError, match="gpu: expected one of"):
        hardware.get("A100")


def test_gemm_cost_by_hand():
    # m=3, n=130, k=256: 2 K blocks, 2 N blocks (the second partial)
    c = hardware.cost("fp8_gemm", m=3, n=130, k=256)
    assert c.flops == 2 * 3 * 130 * 256 == 199680
    # A 768 + A scales 3*2*4 = 24 + B 33280 + B scales 2*2*4 = 16 + out 2*3*130 = 780
    assert c.hbm_bytes == 768 + 24 + 33280 + 16 + 780 == 34868
    assert c.link_bytes == 0


def test_grouped_gemm_costs_by_hand():
    contiguous = hardware.cost("fp8_gemm_contiguous", ms=[3, 0, 5], n=130, k=256)
    assert contiguous.flops == 2 * 8 * 130 * 256
    # rows: 8 * (256 + 8); weights of the two groups with rows: 2 * (33280 + 16); out 2*8*130
    assert contiguous.hbm_bytes == 8 * 264 + 2 * 33296 + 2080 == 70784
    masked = hardware.cost("fp8_gemm_masked", masked_m=[3, 0, 5], n=130, k=256)
    assert masked.flops == contiguous.flops
    assert masked.hbm_bytes == 8 * 264 + 3 * 33296 + 2080 == 104080  # every group's weights are read


def test_mla_cost_by_hand():
    c = hardware.cost("mla_decode", batch=2, s_q=1, h_q=16, seqlen=[100, 28])
    assert c.hbm_bytes == 2 * (576 * 128 + 576 * 2 * 16 + 512 * 2 * 16) == 217088
    assert c.flops == 2 * 1 * 16 * 128 * (576 + 512) == 4456448
    assert hardware.cost("mla_decode", batch=2, s_q=1, h_q=16, seqlen=64) == c  # uniform lengths
    fp8 = hardware.cost("mla_decode", batch=2, s_q=1, h_q=16, seqlen=64, kv_dtype="fp8")
    assert fp8.hbm_bytes == 576 * 128 + 2 * (576 + 512) * 32 == 143360  # q and out stay bf16
    assert fp8.flops == c.flops
    with pytest.raises(ValueError, match="seqlen: expected 3 lengths"):
        hardware.cost("mla_decode", batch=3, s_q=1, h_q=16, seqlen=[1, 2])


def test_dispatch_cost_by_hand():
    # top-1 of 4 experts over 2 ranks: every token goes to exactly one rank, half of them remote
    c = hardware.cost("moe_dispatch", tokens=10, hidden=256, topk=1, num_experts=4, world=2, dtype="fp8")
    row = 256 + 4 * 2
    assert c.link_bytes == 5 * row
    assert c.hbm_bytes == 2 * 10 * row
    assert c.flops == 0
    combine = hardware.cost("moe_combine", tokens=10, hidden=256, topk=1, num_experts=4, world=2)
    assert combine.link_bytes == 5 * 512
    single = hardware.cost("moe_dispatch", tokens=10, hidden=256, topk=8, num_experts=16, world=1)
    assert single.link_bytes == 0


def test_occupancy_formula():
    assert hardware.occupied_ranks_per_token(1, 256, 8) == pytest.approx(1.0)
    assert hardware.occupied_ranks_per_token(8, 8, 8) == pytest.approx(8.0)
    expected = 8 * (1 - math.comb(224, 8) / math.comb(256, 8))
    assert hardware.occupied_ranks_per_token(8, 256, 8) == pytest.approx(expected)
    # against sampled uniform routing: 20000 tokens, k distinct experts each
    gen = torch.Generator().manual_seed(1)
    idx = torch.rand(20000, 256, generator=gen).topk(8, dim=-1).indices
    hit = torch.zeros(20000, 8, dtype=torch.bool).scatter_(1, idx // 32, True)
    assert float(hit.sum(1).float().mean()) == pytest.approx(expected, rel=0.01)
    with pytest.raises(ValueError, match="num_experts: expected a multiple of world=3"):
        hardware.occupied_ranks_per_token(8, 256, 3)


def test_projection_bounds_and_units():
    p = hardware.project(hardware.Cost(1979e12, 0, 0), "H100", "fp8")
    assert p == hardware.Projection(pytest.approx(1.0), "compute")
    assert hardware.project(hardware.Cost(989e12, 0, 0), "H100", "bf16").seconds == pytest.approx(1.0)
    assert hardware.project(hardware.Cost(0, 3.35e12, 0), "H100", "bf16") == (pytest.approx(1.0), "memory")
    assert hardware.project(hardware.Cost(0, 1, 200e9), "H800", "bf16") == (pytest.approx(1.0), "interconnect")
    with pytest.raises(ValueError, match="dtype: expected 'fp8' or 'bf16'"):
        hardware.project(hardware.Cost(1, 1, 0), "H100", "fp16")


@pytest.mark.parametrize("op,shape,name", [
    ("fp8_gemm", dict(m=-128, n=4096, k=7168), "m"),
    ("fp8_gemm", dict(m=128, n=4096, k=float("nan")), "k"),
    ("fp8_gemm_contiguous", dict(ms=[128, -1], n=4096, k=7168), "ms"),
    ("fp8_gemm_masked", dict(masked_m=[float("inf")], n=4096, k=7168), "masked_m"),
    ("mla_decode", dict(batch=2, s_q=1, h_q=-16, seqlen=64), "h_q"),
    ("mla_decode", dict(batch=2, s_q=1, h_q=16, seqlen=[64, -3]), "seqlen"),
    ("moe_dispatch", dict(tokens=128, hidden=7168, topk=8, num_experts=256, world=0), "world"),
    ("per_token_group_quant_fp8", dict(m=-1, k=7168), "m"),
])
def test_cost_rejects_negative_and_non_finite_sizes(op, shape, name):
    # A negative size would give negative FLOPs and bytes, and a projection naming the wrong bound.
    with pytest.raises(ValueError, match=f"^{name}: expected a finite number >= "):
        hardware.cost(op, **shape)


def test_cost_rejects_sizes_that_are_not_numbers():
    with pytest.raises(TypeError, match="^n: expected a number or a sequence of numbers, got str"):
        hardware.cost("fp8_gemm", m=1, n="4096", k=128)
    with pytest.raises(TypeError, match="^m: expected a number or a sequence of numbers, got bool"):
        hardware.cost("fp8_gemm", m=True, n=4096, k=128)
    # Integer scalars of torch count as sizes; expected counts may be fractional.
    assert hardware.cost("fp8_gemm", m=torch.tensor(2), n=3, k=128) == hardware.cost("fp8_gemm", m=2, n=3, k=128)
    assert hardware.cost("moe_permute", rows=10, pairs=12.5, hidden=128).hbm_bytes == 22.5 * 128 * 2


@pytest.mark.parametrize("field,value,error", [
    ("hbm_bytes", float("nan"), ValueError), ("flops", -1.0, ValueError), ("link_bytes", float("inf"), ValueError),
    ("flops", "1e12", TypeError),
])
def test_project_rejects_bad_costs(field, value, error):
    # max() over a NaN time names whichever bound comes first: the projection must refuse instead.
    c = hardware.Cost(1e12, 1e9, 0.0)._replace(**{field: value})
    with pytest.raises(error, match=f"^c.{field}: expected"):
        hardware.project(c, "H100", "fp8")
    with pytest.raises(TypeError, match="^c: expected a Cost"):
        hardware.project((1e12, 1e9, 0.0), "H100", "fp8")

def test_fact_mla_decode_h16_faster_on_h20():
    for seqlen in (4096, 8192, 16384):
        c = hardware.cost("mla_decode", batch=128, s_q=1, h_q=16, seqlen=seqlen)
        h100, h20 = hardware.project(c, "H100", "bf16"), hardware.project(c, "H20", "bf16")
        assert h100.bound == h20.bound == "memory"
        assert h20.seconds < h100.seconds
        assert h100.seconds / h20.seconds == pytest.approx(4.0 / 3.35)


def test_fact_large_fp8_gemm_about_6_7x_slower_on_h20():
    for m, n, k in [(4096, 7168, 16384), (4096, 2112, 7168), (8192, 8192, 8192)]:
        c = hardware.cost("fp8_gemm", m=m, n=n, k=k)
        h100, h20 = hardware.project(c, "H100", "fp8"), hardware.project(c, "H20", "fp8")
        assert h100.bound == h20.bound == "compute"
        assert h20.seconds / h100.seconds == pytest.approx(6.7, abs=0.05)
        assert hardware.project(c, "H800", "fp8") == h100  # same compute and HBM


def test_fact_intranode_dispatch_2_25x_slower_on_h800():
    for dtype in ("fp8", "bf16"):
        c = hardware.cost("moe_dispatch", tokens=4096, hidden=7168, topk=8, num_experts=256, world=8, dtype=dtype)
        h100, h800 = hardware.project(c, "H100", "bf16"), hardware.project(c, "H800", "bf16")
        assert h100.bound == h800.bound == "interconnect"
        assert h800.seconds / h100.seconds == pytest.approx(2.25)
        assert hardware.project(c, "H20", "bf16") == h100  # H20 keeps full NVLink


@pytest.mark.parametrize("name,sms,mem,expected", [
    ("NVIDIA H100 80GB HBM3", 132, 80 * GiB, "H100 SXM5"),
    ("NVIDIA H800", 132, 80 * GiB, "H800 SXM5"),
    ("NVIDIA H20", 78, 97285 * 2**20, "H20"),
    ("NVIDIA H200", 132, 141 * GiB, "H200 SXM"),
    ("NVIDIA H100 PCIe", 114, 80 * GiB, "H100 PCIe"),
    ("NVIDIA H100 NVL", 132, 94 * GiB, None),      # no row: other clocks and memory
    ("NVIDIA H800 PCIe", 114, 80 * GiB, None),
    ("NVIDIA H200 NVL", 132, 141 * GiB, None),
    ("NVIDIA Graphics Device", 78, 95 * GiB, "H20"),  # only H20 has 78 SMs
])
def test_identify(name, sms, mem, expected):
    det = hardware.identify(name, sms, mem)
    assert (det.gpu.name if det.gpu else None) == expected, det.reason
    assert name in det.reason


def test_identify_ambiguous_asks_the_user():
    # A renamed device with H100/H800 silicon: nothing but NVLink tells them apart, and no property shows it.
    det = hardware.identify("NVIDIA Graphics Device", 132, 80 * GiB)
    assert det.gpu is None
    assert set(det.candidates) == {"H100 SXM5", "H800 SXM5"}
    assert "--gpu" in det.reason and "PYKERNELS_GPU" in det.reason
    chosen = hardware.identify("NVIDIA Graphics Device", 132, 80 * GiB, override="H800")
    assert chosen.gpu is hardware.get("H800 SXM5") and "named by the user" in chosen.reason


def test_identify_rejects_other_architectures():
    det = hardware.identify("NVIDIA A100-SXM4-80GB", 108, 80 * GiB, capability=(8, 0))
    assert det.gpu is None and "not a Hopper GPU" in det.reason
    assert hardware.identify("Some Hopper", 100, 64 * GiB).gpu is None


def test_detect_from_faked_device_properties(monkeypatch):
    class Props:
        name, multi_processor_count, total_memory, major, minor = "NVIDIA H800", 132, 80 * GiB, 9, 0

    monkeypatch.delenv(hardware.GPU_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    assert hardware.detect(0).gpu is hardware.get("H800")
    monkeypatch.setattr(Props, "name", "NVIDIA H100 80GB HBM3")
    assert hardware.detect(0).gpu is hardware.get("H100")
    monkeypatch.setenv(hardware.GPU_ENV, "H800")
    assert hardware.detect(0).gpu is hardware.get("H800")


def test_detect_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(hardware.GPU_ENV, raising=False)
    det = hardware.detect()
    assert det.gpu is None and "no CUDA GPU" in det.reason
    monkeypatch.setenv(hardware.GPU_ENV, "H20")
    assert hardware.detect().gpu is hardware.get("H20")
