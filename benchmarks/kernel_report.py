"""What every Triton kernel of fastclip compiles to on sm80 and sm90, without a GPU, and a roofline
estimate of the fused loss built from those facts.

    python benchmarks/kernel_report.py                     # every declared config; scratch folder
    python benchmarks/kernel_report.py --update-results    # writes benchmarks/results/kernel_report.csv/.json
    python benchmarks/kernel_report.py --defaults-only     # the default config of each kernel (what CI checks)

Each kernel of ``fastclip.kernels`` (KERNELS below; a kernel missing there is an error) is compiled
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32))`` for every config its
launcher may pick (the lists in kernels/clip_loss.py and kernels/siglip_loss.py, imported, with the
block_d / dot flags of ``fastclip.ops.triton_common.launch_options``) and each flag set the launcher
passes. The argument types, the 16-divisibility hints and the heuristics' flags come from Triton's own
launch-time specialisation (its binder, fed stand-ins for the tensors and sizes of the roofline case
B = 65536, D = 512, bf16), so each compile is the one a launch of that case would make.

From the cubin, with the cuobjdump shipped in the Triton wheel (``fastclip.cuda_toolkit``): registers
per thread, shared memory (Triton's dynamic allocation + static), local memory and STL/LDL
instructions (spills), tensor-core instructions (HMMA on sm80; HGMMA, or HMMA, on sm90), MUFU and FP32
instructions, and the width of the global stores (the G stores of the backward kernels:
STG.E.U16 = 2 bytes per thread per instruction, STG.E.128 = 16). CTAs per SM follow from those and
the limits in ``SM_LIMITS``. The roofline model is in ``roofline.py``; it prints after the table
and goes to ``kernel_report_roofline.txt`` beside the CSV/JSON. ``compile_s`` is the wall time of
``triton.compile``: near 0 where Triton's cache (~/.triton/cache) already held that kernel.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import os
import pkgutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _results  # noqa: E402
import roofline  # noqa: E402

NAME = "kernel_report"
BATCH, DIM, DTYPE = 65536, 512, "bfloat16"  # the roofline case (issue 10); sizes only steer specialisation
ARCHS = {"sm80": 80, "sm90": 90}
CUDA_WARP = 32


@dataclass(frozen=True)
class SmLimits:
    """Per-SM occupancy limits of one compute capability.

    Source: CUDA C++ Programming Guide, "Compute Capabilities", table "Technical Specifications per
    Compute Capability" (8.0: A100; 9.0: H100/H200), and the Occupancy Calculator's allocation rules
    (registers are allocated per warp in units of 256; each CTA also takes 1 KiB of shared memory
    reserved by the system from sm80 on). sm86/sm89 parts have 100 KiB of shared memory per SM, not
    sm80's 164: the sm80 tile lists stay under that (kernels/clip_loss.py).
    """

    registers: int = 65536
    max_registers_per_thread: int = 255
    threads: int = 2048
    ctas: int = 32
    shared_bytes: int = 164 * 1024
    shared_per_cta: int = 163 * 1024
    reserved_shared_per_cta: int = 1024
    register_unit_per_warp: int = 256


SM_LIMITS = {80: SmLimits(), 90: SmLimits(shared_bytes=228 * 1024, shared_per_cta=227 * 1024)}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel of fastclip.kernels, the config list its launcher picks from (None: no list, the
    kernel's own block constants) and the flag sets (constexprs) the launcher passes, default first."""

    name: str
    module: str
    kernel: str
    configs: str | None  # attribute of ``module`` holding {"sm80": (...), "sm90": (...)}, or None
    variants: tuple = ({},)
    rows: str = "all"  # n_rows of a launch: "all" rows, or a backward "chunk" of the workspace
    s_tiles: bool = True  # computes S tiles (tl.dot): must use tensor cores
    writes_g: bool = False  # writes the (chunk, n) G workspace: its store width is checked
    fixed: dict = field(default_factory=dict)  # constexprs of kernels without a config list

    def jit(self):
        """The kernel as launched (a triton.heuristics wrapper or the JITFunction itself)."""
        return getattr(importlib.import_module(self.module), self.kernel)

    def jit_function(self):
        """The JITFunction under any wrappers: its parameters, signature and _pack_args."""
        from triton.runtime.jit import JITFunction

        function = self.jit()
        while not isinstance(function, JITFunction):
            function = function.fn
        return function

    def config_lists(self) -> dict:
        return getattr(importlib.import_module(self.module), self.configs) if self.configs else {}


KERNELS = (
    KernelSpec("clip_loss_fwd", "fastclip.kernels.clip_loss", "_clip_loss_fwd_kernel", "CLIP_FWD_CONFIGS",
               variants=({"HAS_EXPECTATIONS": False, "LOCKED_COLUMNS": True},
                         {"HAS_EXPECTATIONS": False, "LOCKED_COLUMNS": False})),
    KernelSpec("clip_loss_fwd_expect", "fastclip.kernels.clip_loss", "_clip_loss_fwd_kernel",
               "CLIP_FWD_EXPECTATION_CONFIGS",
               variants=({"HAS_EXPECTATIONS": True, "LOCKED_COLUMNS": True},
                         {"HAS_EXPECTATIONS": True, "LOCKED_COLUMNS": False})),
    KernelSpec("clip_loss_bwd", "fastclip.kernels.clip_loss", "_clip_loss_bwd_kernel", "CLIP_BWD_CONFIGS",
               rows="chunk", writes_g=True),
    KernelSpec("siglip_loss_fwd", "fastclip.kernels.siglip_loss", "_siglip_loss_fwd_kernel", "SIGLIP_FWD_CONFIGS"),
    KernelSpec("siglip_loss_bwd", "fastclip.kernels.siglip_loss", "_siglip_loss_bwd_kernel", "SIGLIP_BWD_CONFIGS",
               rows="chunk", writes_g=True),
    KernelSpec("lse_merge", "fastclip.kernels.common", "_lse_merge_kernel", None, s_tiles=False,
               variants=({"HAS_RUNNING": False, "FINALIZE": True, "HAS_EXPECTATIONS": False},
                         {"HAS_RUNNING": True, "FINALIZE": False, "HAS_EXPECTATIONS": True}),
               fixed={"BLOCK": "MERGE_BLOCK"}),
)


def declared_kernels() -> set[tuple[str, str]]:
    """(module, name) of every launchable Triton kernel (a ``*_kernel`` JIT object) in fastclip.kernels."""
    import fastclip.kernels as package
    from triton.runtime.jit import KernelInterface

    found = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if name.endswith("_kernel") and isinstance(value, KernelInterface) and \
                    getattr(value, "__module__", module.__name__) == module.__name__:
                found.add((module.__name__, name))
    return found


def unreported_kernels() -> list[str]:
    reported = {(spec.module, spec.kernel) for spec in KERNELS}
    return sorted(f"{module}.{name}" for module, name in declared_kernels() - reported)


# ------------------------------------------------------------------------------------ compiling offline


def compiler_unavailable_reason() -> str | None:
    """Why this machine cannot compile for NVIDIA GPUs (no triton, no nvidia backend, no ptxas, no
    cuobjdump), or None. TRITON_INTERPRET is checked by main (a test process sets it for its own use)."""
    try:
        import triton.backends
    except ImportError:
        return "triton is not installed (pip install triton)"
    if "nvidia" not in triton.backends.backends:
        return f"triton {triton.__version__} has no nvidia backend (backends: {sorted(triton.backends.backends)})"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as error:  # knobs raise RuntimeError / FileNotFoundError variants across versions
        return f"triton's nvidia backend has no ptxas: {error}"
    if not Path(ptxas).exists():
        return f"ptxas {ptxas} does not exist"
    from fastclip import cuda_toolkit

    if cuda_toolkit.cuobjdump() is None:
        return "no cuobjdump (the Triton wheel ships one in triton/backends/nvidia/bin)"
    return None


def _size_arguments(rows: int) -> dict:
    """The non-constexpr integer arguments of the kernels, for one launch of the roofline case.

    Sizes the kernels mark do_not_specialize only feed the heuristics (e.g. EVEN_D, or an EVEN_N on
    the column count); strides are specialised (16-divisibility, == 1) exactly as a launch does.
    """
    return {"n_rows": rows, "n_cols": BATCH, "dim": DIM, "positive_offset": 0, "tiles_per_split": BATCH,
            "stride_image_row": DIM, "stride_image_dim": 1, "stride_text_row": DIM, "stride_text_dim": 1,
            "stride_grad_row": BATCH, "n_parts": 4, "length": BATCH, "stride_part": BATCH}


def _pointer_dtype(name: str):
    import torch

    if name in ("image_ptr", "text_ptr", "grad_logits_ptr"):
        return getattr(torch, DTYPE)
    return torch.int32 if "lock" in name else torch.float32


def launch_arguments(spec: KernelSpec, config, variant: dict, rows: int) -> dict:
    """Every argument and launch option of one launch, by name (constexprs included)."""
    import torch
    from triton.runtime.jit import MockTensor

    from fastclip.ops import triton_common

    fn = spec.jit_function()
    sizes = _size_arguments(rows)
    arguments = {}
    for param in fn.params:
        if param.is_constexpr:
            continue
        if param.name.endswith("_ptr"):
            arguments[param.name] = MockTensor(_pointer_dtype(param.name))
        elif param.name in sizes:
            arguments[param.name] = sizes[param.name]
        else:
            raise ValueError(f"kernel_report does not know what argument {param.name!r} of {fn.__name__} holds: "
                             "add its value for the roofline case to _size_arguments")
    arguments.update(variant)
    if config is not None:
        arguments.update(triton_common.launch_options(config, getattr(torch, DTYPE), DIM))
    module = importlib.import_module(spec.module)
    arguments.update({name: getattr(module, value) for name, value in spec.fixed.items()})
    for name, rule in getattr(spec.jit(), "values", {}).items():  # triton.heuristics, as a launch applies them
        arguments[name] = rule(arguments)
    missing = [param.name for param in fn.params if param.name not in arguments and not param.has_default]
    if missing:
        raise ValueError(f"kernel_report passes no value for {fn.__name__}'s {missing}: add them to the flag sets "
                         f"(variants) of its KernelSpec {spec.name!r}, as its launcher passes them")
    return arguments


def compile_kernel(spec: KernelSpec, capability: int, arguments: dict):
    """triton.compile of one launch for GPUTarget("cuda", capability, 32), specialised as a launch is."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = spec.jit_function()
    target = GPUTarget("cuda", capability, CUDA_WARP)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(**arguments)
    options, signature, constexprs, attrs = fn._pack_args(backend, arguments, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


# ------------------------------------------------------------------------------------ reading the SASS

_STORE_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}
_FP32_PIPE = ("FADD", "FMUL", "FFMA", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "FRND")


def store_bytes(opcode: str) -> int:
    """Bytes per thread of one global store instruction (STG.E = 4, STG.E.U16 = 2, STG.E.128 = 16)."""
    parts = opcode.split(".")[1:]
    return next((_STORE_BYTES[part] for part in parts if part in _STORE_BYTES), 4)


def sass_facts(cubin: bytes) -> dict:
    """Resource usage and instruction counts of one compiled kernel (static counts over its SASS)."""
    from fastclip import cuda_toolkit

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        (row,) = cuda_toolkit.kernel_resources(path)
    opcodes: collections.Counter = row["opcodes"]
    stores = collections.Counter()
    for opcode, count in opcodes.items():
        if opcode.startswith("STG"):
            stores[store_bytes(opcode)] += count
    tensor = {name: count for name, count in opcodes.items() if name.startswith(("HMMA", "HGMMA"))}
    return {"registers": row["registers"], "static_shared_bytes": row["shared_bytes"],
            "local_bytes": row["local_bytes"], "stack_bytes": row["stack_bytes"],
            "spill_instructions": row["spill_instructions"],  # STL/LDL: spills go to the stack frame
            "tensor_core_instructions": sum(tensor.values()),
            "tensor_core_kind": "/".join(sorted({name.split(".")[0] for name in tensor})),
            "mufu_instructions": sum(c for name, c in opcodes.items() if name.startswith("MUFU")),
            "fp32_instructions": sum(c for name, c in opcodes.items() if name.startswith(_FP32_PIPE)),
            "store_instructions": sum(stores.values()),
            "global_stores": " ".join(f"{width}B:{count}" for width, count in sorted(stores.items())),
            # the G stores are the bulk of a backward kernel's stores (one or two fp32 partials beside them)
            "main_store_bytes": stores.most_common(1)[0][0] if stores else 0,
            "instructions": row["instructions"]}


def ctas_per_sm(capability: int, registers: int, shared_bytes: int, threads: int) -> tuple[int, str]:
    """(resident CTAs per SM, the limiting resource) from SM_LIMITS."""
    limits = SM_LIMITS[capability]
    warps = -(-threads // CUDA_WARP)
    unit = limits.register_unit_per_warp
    registers_per_warp = -(-registers * CUDA_WARP // unit) * unit
    bounds = {"ctas": limits.ctas, "threads": limits.threads // threads,
              "registers": limits.registers // (registers_per_warp * warps),
              "shared": limits.shared_bytes // (shared_bytes + limits.reserved_shared_per_cta)
              if shared_bytes <= limits.shared_per_cta else 0}
    limiter = min(bounds, key=bounds.get)
    return bounds[limiter], limiter


# ------------------------------------------------------------------------------------ the report


def compile_row(spec: KernelSpec, arch: str, config, index: int, variant: dict) -> dict:
    """Compile one (kernel, arch, config, flag set) and read what it uses and issues."""
    rows = roofline.chunk_rows(config.block_m) if spec.rows == "chunk" else BATCH  # a launch's rows
    arguments = launch_arguments(spec, config, variant, rows)
    start = time.perf_counter()
    compiled = compile_kernel(spec, ARCHS[arch], arguments)
    seconds = time.perf_counter() - start
    facts = sass_facts(compiled.asm["cubin"])
    threads = compiled.metadata.num_warps * CUDA_WARP
    shared = compiled.metadata.shared + facts["static_shared_bytes"]  # Triton's dynamic + static
    ctas, limiter = ctas_per_sm(ARCHS[arch], facts["registers"], shared, threads)
    return {"arch": arch, "kernel": spec.name, "triton_kernel": spec.kernel, "config_list": spec.configs or "",
            "flags": " ".join(f"{k}={int(v)}" for k, v in variant.items()),
            "config_index": index, "default": index == 0 and variant == spec.variants[0],
            "block_m": arguments.get("BLOCK_M", ""), "block_n": arguments.get("BLOCK_N", ""),
            "block_d": arguments.get("BLOCK_D", ""), "num_warps": compiled.metadata.num_warps,
            "num_stages": compiled.metadata.num_stages, "threads": threads, "launch_rows": rows,
            "s_tiles": spec.s_tiles, "writes_g": spec.writes_g, **facts, "shared_bytes": shared,
            "ctas_per_sm": ctas, "cta_limiter": limiter,
            "heuristics": " ".join(f"{k}={int(arguments[k])}" for k in getattr(spec.jit(), "values", {})),
            "compile_s": round(seconds, 2), "batch": BATCH, "dim": DIM, "dtype": DTYPE}


def report_rows(defaults_only: bool = False, archs=tuple(ARCHS), log=print) -> list[dict]:
    """One row per (arch, kernel, flag set, config); defaults_only: each kernel's default config and flags."""
    rows = []
    for arch in archs:
        for spec in KERNELS:
            configs = spec.config_lists()[arch] if spec.configs else (None,)
            for variant in spec.variants[:1] if defaults_only else spec.variants:
                for index, config in enumerate(configs[:1] if defaults_only else configs):
                    row = compile_row(spec, arch, config, index, variant)
                    rows.append(row)
                    log(f"{arch} {spec.name:<20} {row['flags'] or '-':<36} "
                        f"{row['block_m']}x{row['block_n']}x{row['block_d']} w{row['num_warps']} s{row['num_stages']}  "
                        f"regs {row['registers']:>3}  smem {row['shared_bytes']:>6} B  "
                        f"STL/LDL {row['spill_instructions']}  CTAs/SM {row['ctas_per_sm']} ({row['cta_limiter']})  "
                        f"TC {row['tensor_core_instructions']} {row['tensor_core_kind']}  "
                        f"stores {row['global_stores']}  {row['compile_s']:.1f} s")
    return rows


def toolchain() -> dict:
    """Versions of what compiled and read the kernels (stamped on every row beside _results')."""
    import subprocess

    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    from fastclip import cuda_toolkit

    def version(tool) -> str:
        lines = subprocess.run([str(tool), "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        return lines[-1] if lines else "unknown"

    return {"triton_compiler": triton.__version__, "ptxas": version(get_ptxas(90).path),
            "cuobjdump": version(cuda_toolkit.cuobjdump())}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--defaults-only", action="store_true",
                        help="only the default config and flag set of each kernel (about 10 compiles)")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    _results.add_output_arguments(parser)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("TRITON_INTERPRET is set: the kernels would be interpreted, not compiled; unset it")
    reason = compiler_unavailable_reason()
    if reason:
        print(f"kernel_report: cannot compile here: {reason}", file=sys.stderr)
        return 2
    missing = unreported_kernels()
    if missing:
        print(f"kernel_report: kernels without a KERNELS entry: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = report_rows(args.defaults_only, args.archs)
    stamp = toolchain()
    # A snapshot: the CSV/JSON hold this run's rows only (a re-run replaces them, never duplicates them).
    path = _results.write_snapshot(NAME, [], _results.output_dir(args), stamped=[{**row, **stamp} for row in rows])
    from fastclip.io import atomic_write

    estimate = roofline.report(rows)
    estimate_path = path.with_name(f"{NAME}_roofline.txt")  # this run's estimate, from the same rows
    with atomic_write(estimate_path) as handle:
        handle.write(f"python benchmarks/kernel_report.py {' '.join(argv if argv is not None else sys.argv[1:])}\n"
                     f"{stamp} {_results.environment_info()['date']}\n\n{estimate}\n")
    print(f"results: {path}, {estimate_path.name}\n")
    print(estimate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
