"""Roofline estimate of fastclip's fused Triton losses, fwd+bwd, from the kernel report's compile facts.

Not a measurement: an estimate from offline compilation (benchmarks/kernel_report.py), for the case
B = 65536, D = 512, bf16 on A100, H100 and H200 (GPUS). Every term is printed.

The floor: the 4 GEMMs any exact fwd+bwd does (S = I T^T, S again, G T, G^T I), 8 B^2 D FLOP, at the
GPU's peak dense bf16 rate.

The fused loss, as the Triton backend runs it (fastclip/ops/clip_loss_triton.py, siglip_loss_triton.py,
triton_common.chunked_backward):

1. Forward kernel, one launch over the B x B tiles of S (default config and flags of the arch).
2. Backward kernel, once per row chunk: recomputes its S tiles and writes G (chunk x B, bf16). The
   chunk is the most whole row blocks whose G fits the workspace (workspace.rows_per_chunk;
   FASTCLIP_WORKSPACE_MB, default fastclip.ops.workspace.DEFAULT_WORKSPACE_MB).
3. Per chunk, on cuBLAS: grad_image[rows] = G @ T and grad_text += G^T @ I[rows] (fp32 out), the
   grad_text sum costing GRAD_TEXT_FP32_PASSES_IN_GEMM passes over the (B, D) fp32 array per chunk.
4. Once: the fp32 rescale of both gradients (mul_ in place); the O(B) merges are left out.

Each S-tile kernel takes max(memory, compute) with
    compute = t_mma + t_epilogue        (1 CTA per SM: a CTA's exp/store epilogue cannot overlap
                                         its own tile's MMA, and no other CTA is there to fill in)
            = max(t_mma, t_epilogue)    (>= 2 CTAs per SM: another CTA's MMA hides the epilogue)
    t_mma      = 2 B^2 D / peak bf16 FLOP/s
    t_epilogue = B^2 / (SMs x clock) x (mufu/16 + fp32/fp32_lanes + stores/32) per S element,
where mufu, fp32 and stores are the kernel's SASS instruction counts (MUFU.*, the FP32 pipe's F*,
STG.*) divided by the S elements each thread holds (BLOCK_M x BLOCK_N / threads): static counts,
one S tile's worth, as the tile loop body appears once in the SASS. The pipes are summed, not
overlapped: 8 warps on an SM are 2 per scheduler, too few to hide one pipe behind another. Scalar
2-byte G stores are 1 STG per element, 16-byte ones 1/8. Integer and address instructions are not
counted (so this is a lower bound on the epilogue). Memory: the forward reads I once and T once
per wave of resident CTAs (neighbouring row blocks walk the same T tiles, which stay in L2); the
backward reads T once per chunk and writes G once; each cuBLAS call is max(FLOP / peak, bytes / HBM
bandwidth) with its operands and output read/written once. All tensor-core work runs at the same
fraction of peak as the floor's, so the ratio to the floor counts only the extra terms. Not
modelled: spills (configs that spill are not candidates), L2 hits of G (a chunk of G is 128 MiB+,
over the 40-50 MB L2), launch gaps, tail effects of partial waves, and cuBLAS below peak.

The L2 term (issue 16 section 5; the scenarios marked "L2"): every S tile loads its row block and
its column block over all of D from L2 (the loads bypass L1: cp.async / TMA), so a kernel moves
B^2 D elt (1/BLOCK_M + 1/BLOCK_N) bytes from L2 into the SMs (the backward also writes G through
it), against the GPU's measured L2 bandwidth (Gpu.l2_bytes, sources there). At 64 x 128 tiles and
D = 512 a tile does ~43 FLOP per operand byte: ~89 B per clock per SM at the H100's MMA peak,
where L2 delivers ~35-38. Each S-tile kernel then takes max(compute, HBM, L2). The ways out, as the
model weighs them:
  - larger tiles: 1/BLOCK_M + 1/BLOCK_N falls (128 x 128 moves 2/3 of 64 x 128's bytes), among the
    declared configs that compile without spills (the "fastest declared" scenario picks them);
  - a resident row block (FlashAttention's resident Q): the row block is loaded once and kept in
    shared memory while the column tiles stream past, B^2 D elt / BLOCK_M bytes; it needs
    BLOCK_M x D x elt of shared memory beside the column pipeline, so fewer CTAs fit (modelled,
    not implemented: scenario "resident row block");
  - a persistent grid walking the column tiles in an L2-friendly order: it cuts HBM traffic (already
    near one read of T per wave here) but not the L2 -> SM bytes, so the model gives it nothing.

Scenarios (SCENARIOS), first the model without L2 (as before), then with it: the default configs
with grad_text summed outside the GEMM (4 fp32 passes per chunk, as before issue 10 section 3);
the code as compiled and run today (grad_text accumulated in the GEMM: 2 passes; the G stores as
compiled, 16-byte where EVEN_N); the declared configs (non-spilling, same flags) the model finds
fastest; those with a 1 GiB workspace (a quarter of the chunks); with L2: as compiled, the fastest
declared configs, and the resident row block.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

BATCH, DIM, ELEMENT = 65536, 512, 2  # the issue-10 case: bf16
WORKSPACE_ENV = "FASTCLIP_WORKSPACE_MB"  # read by fastclip.ops.workspace.workspace_bytes at call time


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: int  # the arch whose compile facts apply (kernel_report.ARCHS)
    bf16_flops: float  # dense tensor-core bf16, FLOP/s (no sparsity)
    hbm_bytes: float  # bytes/s
    sms: int
    clock_hz: float  # boost clock
    fp32_lanes: int  # FP32 results per clock per SM
    l2_bytes: float  # L2 -> SM read bandwidth, bytes/s, all SMs reading (measured, see below)
    shared_per_sm: int  # shared memory per SM, bytes (kernel_report.SM_LIMITS)


# Peak rates, SXM parts. Sources: NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM: 312 TFLOP/s
# bf16 dense, 2,039 GB/s, 108 SMs, 1410 MHz boost) and the NVIDIA A100 architecture whitepaper (64
# FP32 lanes per SM); NVIDIA H100 datasheet (H100 SXM: 1,979 TFLOP/s bf16 with sparsity = 989 dense,
# 3.35 TB/s, 67 TFLOP/s FP32) and the NVIDIA H100 architecture whitepaper (132 SMs, 128 FP32 lanes per
# SM; 67e12 / (132 x 128 x 2) = 1.98 GHz); NVIDIA H200 datasheet (H200 SXM: same compute as H100 SXM,
# 4.8 TB/s HBM3e). Per-SM pipe rates (CUDA C++ Programming Guide, "Arithmetic Instructions"
# throughput table, cc 8.0 and 9.0): 16 MUFU results per clock (exp2, log2, rcp); 32 load/store
# lanes per SM (4 partitions x 8 LD/ST units, whitepapers' SM diagrams).
# L2 bandwidth, measured with RRZE-HPC/gpu-benches' gpu-l2-cache (every SM reading a data set that
# fits L2; results committed in that repository, gpu-l2-cache/a100_80.txt, h100_pcie.txt, h200.txt at
# commit 1038c5d, plateau between 2 and 30 MB): A100-SXM4-80GB ~5.4 TB/s (35 B per clock per SM
# at 1.41 GHz; NVIDIA's A100 whitepaper gives the peak as 5120 B per clock, 7.2 TB/s); H100 PCIe
# ~7.0 TB/s on 114 SMs at <= 1.755 GHz (35 B/clk/SM), which at the SXM's 132 SMs and 1.98 GHz is
# 9.1 TB/s; H200 ~9.8 TB/s (37.5 B/clk/SM). Not measured on GPU by fastclip.
GPUS = (Gpu("A100-SXM4-80GB", 80, 312e12, 2.039e12, 108, 1.41e9, 64, 5.4e12, 164 * 1024),
        Gpu("H100-SXM5-80GB", 90, 989e12, 3.35e12, 132, 1.98e9, 128, 9.1e12, 228 * 1024),
        Gpu("H200-SXM-141GB", 90, 989e12, 4.8e12, 132, 1.98e9, 128, 9.8e12, 228 * 1024))
MUFU_PER_SM_CLOCK = 16
STORE_LANES_PER_SM_CLOCK = 32
# grad_text += G^T @ I[rows]: summed outside the GEMM (before issue 10 section 3), the GEMM wrote a
# fresh fp32 (B, D) product (1 pass) and add_ read it and grad_text and wrote grad_text (3 passes).
# triton_common.addmm_fp32_ accumulates in the GEMM (beta = 1): it reads and writes grad_text only.
GRAD_TEXT_FP32_PASSES_OUTSIDE_GEMM = 4
GRAD_TEXT_FP32_PASSES_IN_GEMM = 2
LOSSES = {"clip": ("clip_loss_fwd", "clip_loss_bwd"), "siglip": ("siglip_loss_fwd", "siglip_loss_bwd")}


@dataclass(frozen=True)
class TileKernel:
    """What the model needs of one compiled S-tile kernel (a kernel_report row)."""

    block_m: int
    block_n: int
    threads: int
    ctas_per_sm: int
    mufu: float  # per S element
    fp32: float
    stores: float
    block_d: int = 64  # the D slice (16-bit elements) and pipeline depth: the column pipeline's shared memory
    num_stages: int = 3

    def label(self) -> str:
        return (f"{self.block_m}x{self.block_n}x{self.block_d} ({self.threads // 32} warps, {self.num_stages} stages, "
                f"{self.ctas_per_sm} CTA/SM)")

    @classmethod
    def from_row(cls, row: dict) -> "TileKernel":
        per_thread = row["block_m"] * row["block_n"] / row["threads"]
        return cls(row["block_m"], row["block_n"], row["threads"], row["ctas_per_sm"],
                   row["mufu_instructions"] / per_thread, row["fp32_instructions"] / per_thread,
                   row["store_instructions"] / per_thread, row["block_d"], row["num_stages"])


def operand_bytes(kernel: TileKernel, resident_rows: bool = False) -> float:
    """Bytes an S-tile kernel loads from L2 over all B x B tiles: each tile's row and column blocks
    over D; with a resident row block, the rows once per row block and the columns per tile."""
    square = float(BATCH) * BATCH * DIM * ELEMENT
    if resident_rows:
        return BATCH * DIM * ELEMENT + square / kernel.block_m
    return square * (1 / kernel.block_m + 1 / kernel.block_n)


def resident_ctas(gpu: "Gpu", kernel: TileKernel) -> int:
    """CTAs per SM with the row block (BLOCK_M x D) held in shared memory beside the column pipeline."""
    shared = kernel.block_m * DIM * ELEMENT + kernel.num_stages * kernel.block_n * kernel.block_d * ELEMENT
    return min(kernel.ctas_per_sm, gpu.shared_per_sm // shared)


@dataclass(frozen=True)
class Scenario:
    name: str
    grad_text_passes: int = GRAD_TEXT_FP32_PASSES_IN_GEMM
    best_configs: bool = False  # the declared (fwd, bwd) configs the model finds fastest, not the defaults
    workspace_mb: int | None = None  # FASTCLIP_WORKSPACE_MB for this scenario (None: as set, or the default)
    l2: bool = False  # count the L2 -> SM operand bytes (issue 16 section 5)
    resident_rows: bool = False  # the row block held in shared memory across the column loop (not implemented)


# The model without L2 (as before issue 16): the default configs with grad_text summed outside the
# GEMM (as before issue 10 section 3), as compiled and run today, then what the declared configs and
# a larger workspace could still add. Then the same code with the L2 term, and a resident row block.
SCENARIOS = (Scenario("grad_text summed outside the GEMM", GRAD_TEXT_FP32_PASSES_OUTSIDE_GEMM),
             Scenario("as compiled (default configs)"),
             Scenario("+ fastest declared configs", best_configs=True),
             Scenario("+ 1 GiB workspace", best_configs=True, workspace_mb=1024),
             Scenario("L2: as compiled (default configs)", l2=True),
             Scenario("L2: + fastest declared configs", best_configs=True, l2=True),
             Scenario("L2: + resident row block", best_configs=True, l2=True, resident_rows=True))


def _tile_kernel_ms(gpu: Gpu, kernel: TileKernel, ctas: int, elements: float, memory_bytes: float,
                    l2_bytes: float = 0.0) -> dict:
    t_mma = 2 * elements * DIM / gpu.bf16_flops
    per_element = (kernel.mufu / MUFU_PER_SM_CLOCK + kernel.fp32 / gpu.fp32_lanes
                   + kernel.stores / STORE_LANES_PER_SM_CLOCK)
    t_epilogue = elements * per_element / (gpu.sms * gpu.clock_hz)
    compute = t_mma + t_epilogue if ctas < 2 else max(t_mma, t_epilogue)
    t_memory = memory_bytes / gpu.hbm_bytes
    t_l2 = l2_bytes / gpu.l2_bytes
    return {"mma": t_mma * 1e3, "epilogue": t_epilogue * 1e3, "memory": t_memory * 1e3, "l2": t_l2 * 1e3,
            "ms": max(compute, t_memory, t_l2) * 1e3}


def _gemm_ms(gpu: Gpu, flops: float, memory_bytes: float) -> float:
    return max(flops / gpu.bf16_flops, memory_bytes / gpu.hbm_bytes) * 1e3


def chunk_rows(block_m: int, workspace_mb: int | None = None) -> int:
    """Rows per backward chunk (the launcher's own rule) at FASTCLIP_WORKSPACE_MB, or at workspace_mb."""
    from fastclip.ops.workspace import rows_per_chunk

    previous = os.environ.get(WORKSPACE_ENV)
    if workspace_mb is not None:
        os.environ[WORKSPACE_ENV] = str(workspace_mb)
    try:
        return rows_per_chunk(BATCH, block_m * BATCH * ELEMENT, block_rows=block_m, elements_per_block=block_m * BATCH)
    finally:
        if workspace_mb is not None:
            if previous is None:
                del os.environ[WORKSPACE_ENV]
            else:
                os.environ[WORKSPACE_ENV] = previous


def estimate(gpu: Gpu, forward: TileKernel, backward: TileKernel, scenario: Scenario) -> dict:
    """Every term of the fwd+bwd estimate in ms, the total and its ratio to the 4-GEMM floor (None: the
    scenario's resident row block does not fit the shared memory of one SM)."""
    b, d = BATCH, DIM
    elements = float(b) * b
    floor = 8 * elements * d / gpu.bf16_flops * 1e3
    resident = scenario.resident_rows
    fwd_ctas = resident_ctas(gpu, forward) if resident else forward.ctas_per_sm
    bwd_ctas = resident_ctas(gpu, backward) if resident else backward.ctas_per_sm
    if min(fwd_ctas, bwd_ctas) < 1:
        return None  # the row block and the column pipeline do not fit one SM's shared memory
    waves = math.ceil(math.ceil(b / forward.block_m) / (gpu.sms * fwd_ctas))
    fwd_l2 = operand_bytes(forward, resident) if scenario.l2 else 0.0
    terms = {"fwd kernel": _tile_kernel_ms(gpu, forward, fwd_ctas, elements, (1 + waves) * b * d * ELEMENT, fwd_l2)}
    chunk = chunk_rows(backward.block_m, scenario.workspace_mb)
    chunks = math.ceil(b / chunk)
    bwd_bytes = b * d * ELEMENT + chunks * b * d * ELEMENT + elements * ELEMENT  # I, T per chunk, G written
    bwd_l2 = operand_bytes(backward, resident) + elements * ELEMENT if scenario.l2 else 0.0  # + G's stores
    terms["bwd kernel (G)"] = _tile_kernel_ms(gpu, backward, bwd_ctas, elements, bwd_bytes, bwd_l2)
    g_bytes = chunk * b * ELEMENT
    dense_fp32 = b * d * 4
    gemm_flops = 2 * chunk * b * d
    image_gemm = _gemm_ms(gpu, gemm_flops, g_bytes + b * d * ELEMENT + chunk * d * 4)
    in_gemm = scenario.grad_text_passes <= GRAD_TEXT_FP32_PASSES_IN_GEMM
    text_gemm = _gemm_ms(gpu, gemm_flops, g_bytes + chunk * d * ELEMENT + dense_fp32 * (2 if in_gemm else 1))
    terms["G @ T (cuBLAS)"] = {"ms": chunks * image_gemm}
    terms["G^T @ I (cuBLAS)"] = {"ms": chunks * text_gemm}
    extra_passes = max(0, scenario.grad_text_passes - (2 if in_gemm else 1))  # beyond the GEMM's own output
    terms["grad_text fp32 adds"] = {"ms": (chunks - 1) * extra_passes * dense_fp32 / gpu.hbm_bytes * 1e3}
    rescale_bytes = 2 * 2 * dense_fp32 + (2 * chunk * d * 4 * chunks if chunks > 1 else 0)  # mul_, row copies
    terms["rescale, row copies"] = {"ms": rescale_bytes / gpu.hbm_bytes * 1e3}
    total = sum(term["ms"] for term in terms.values())
    return {"gpu": gpu.name, "scenario": scenario.name, "floor_ms": floor, "terms": terms, "total_ms": total,
            "ratio": total / floor, "chunk": chunk, "chunks": chunks,
            "forward": replace(forward, ctas_per_sm=fwd_ctas), "backward": replace(backward, ctas_per_sm=bwd_ctas)}


def candidate_kernels(rows: list[dict], capability: int, loss: str) -> tuple[list, list]:
    """(forward, backward) TileKernels of every compiled config of the loss's default flag set that
    does not spill (the model has no spill term), the default config first; empty lists when the
    report has none for this arch."""
    arch = f"sm{capability}"
    found = []
    for name in LOSSES[loss]:
        flags = next((row["flags"] for row in rows if row["kernel"] == name and row["default"]), None)
        candidates = sorted((row for row in rows if row["arch"] == arch and row["kernel"] == name
                             and row["flags"] == flags and (row["default"] or not row["spill_instructions"])),
                            key=lambda row: row["config_index"])
        found.append([TileKernel.from_row(row) for row in candidates])
    return found[0], found[1]


def estimate_scenario(gpu: Gpu, forwards: list, backwards: list, scenario: Scenario) -> dict:
    if not scenario.best_configs:
        return estimate(gpu, forwards[0], backwards[0], scenario)
    results = [estimate(gpu, forward, backward, scenario) for forward in forwards for backward in backwards]
    return min((result for result in results if result is not None), key=lambda result: result["total_ms"],
               default=None)


def report(rows: list[dict]) -> str:
    """The printed estimate: the GPU table, then per loss and GPU every term of each scenario."""
    from fastclip.ops.workspace import workspace_bytes

    lines = [f"Roofline estimate, B={BATCH}, D={DIM}, bf16, fwd+bwd (estimate from offline compilation; "
             "not measured on GPU)",
             f"workspace bound {workspace_bytes() / 2**20:.0f} MiB (FASTCLIP_WORKSPACE_MB)", "",
             f"{'GPU':<16} {'bf16 TFLOP/s':>12} {'HBM TB/s':>9} {'L2 TB/s':>8} {'L2 B/clk/SM':>11} {'SMs':>4} "
             f"{'GHz':>5} {'FP32/clk/SM':>11}  {'4-GEMM floor ms':>15}"]
    for gpu in GPUS:
        floor = 8 * float(BATCH) ** 2 * DIM / gpu.bf16_flops * 1e3
        per_sm_clock = gpu.l2_bytes / (gpu.sms * gpu.clock_hz)
        lines.append(f"{gpu.name:<16} {gpu.bf16_flops / 1e12:>12.0f} {gpu.hbm_bytes / 1e12:>9.2f} "
                     f"{gpu.l2_bytes / 1e12:>8.1f} {per_sm_clock:>11.1f} {gpu.sms:>4} "
                     f"{gpu.clock_hz / 1e9:>5.2f} {gpu.fp32_lanes:>11}  {floor:>15.1f}")
    for loss in LOSSES:
        for gpu in GPUS:
            forwards, backwards = candidate_kernels(rows, gpu.capability, loss)
            if not forwards or not backwards:
                continue
            forward, backward = forwards[0], backwards[0]
            lines += ["", f"{loss} on {gpu.name}: per S element fwd {forward.mufu:.2f} MUFU, {forward.fp32:.1f} FP32, "
                          f"{forward.stores:.3f} STG; bwd {backward.mufu:.2f} MUFU, {backward.fp32:.1f} FP32, "
                          f"{backward.stores:.3f} STG; CTAs/SM fwd {forward.ctas_per_sm}, bwd {backward.ctas_per_sm}"]
            results = [estimate_scenario(gpu, forwards, backwards, scenario) for scenario in SCENARIOS
                       if len(forwards) * len(backwards) > 1 or not scenario.best_configs]
            results = [result for result in results if result is not None]
            names = list(results[0]["terms"])
            lines.append(f"  {'scenario':<36}" + "".join(f"{name:>26}" for name in names)
                         + f"{'total ms':>10}{'x floor':>9}")
            for result in results:
                cells = []
                for name in names:
                    term = result["terms"][name]
                    detail = (f" ({term['mma']:.1f}+{term['epilogue']:.1f}|{term['memory']:.1f}"
                              + (f"|{term['l2']:.1f})" if term["l2"] else ")") if "mma" in term else "")
                    cells.append(f"{term['ms']:.1f}{detail}".rjust(26))
                lines.append(f"  {result['scenario']:<36}" + "".join(cells)
                             + f"{result['total_ms']:>10.1f}{result['ratio']:>8.2f}x")
            lines.append(f"  floor {results[0]['floor_ms']:.1f} ms; backward in {results[0]['chunks']} chunks of "
                         f"{results[0]['chunk']} rows; kernel cells: ms (mma + epilogue | HBM | L2)")
            for best in results:
                if best["scenario"] in (SCENARIOS[3].name, SCENARIOS[5].name, SCENARIOS[6].name):
                    lines.append(f"  {best['scenario']}: fwd {best['forward'].label()}, bwd {best['backward'].label()} "
                                 f"({best['chunks']} chunks of {best['chunk']} rows)")
    return "\n".join(lines)
