"""A check of the kernels' sm_70 (V100) code where CUDA 13, which dropped sm_70, is the only nvcc.

CUDA 13's front end still compiles device code with ``__CUDA_ARCH__=700`` (so every arch macro takes its
sm_70 branch), but only to compute_75 PTX; this script retargets that PTX to sm_70 and assembles it with
a CUDA 12.x ptxas, then reports ptxas's registers / spills / shared memory per kernel and counts Volta
HMMA instructions (opcode 0x236 in the low 12 bits of each 128-bit SASS word; the same count with
Turing's 0x23c on an sm_75 cubin matches cuobjdump's HMMA count, which is how the opcode was checked).
Not a build anyone runs: V100 users build with a CUDA 12.x toolkit (docs/cuda.md).

    pip download --no-deps "nvidia-cuda-nvcc-cu12==12.9.*" -d /tmp/cu12 && (cd /tmp/cu12 && python -m zipfile -e *.whl x)
    python benchmarks/sm70_check_cuda.py --ptxas /tmp/cu12/x/nvidia/cuda_nvcc/bin/ptxas
"""
from __future__ import annotations

import argparse
import os
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from fastclip import cuda_toolkit  # noqa: E402

VOLTA_HMMA = 0x236


def compile_for_sm70(source: Path, ptxas: Path, cubin: Path) -> str:
    """Run nvcc's own steps for compute_75 with the arch macros of sm_70, then ptxas for sm_70."""
    nvcc = cuda_toolkit.find_cuda_home() / "bin" / "nvcc"
    steps = subprocess.run([str(nvcc), "--dryrun", "-std=c++17", "-O3", f"-I{REPO / 'csrc'}", "-gencode",
                            "arch=compute_75,code=sm_75", "-c", str(source), "-o", str(cubin) + ".o"],
                           capture_output=True, text=True).stderr
    environment = dict(os.environ)
    for line in steps.splitlines():
        if not line.startswith("#$ "):
            continue
        command = line[3:]
        assignment = re.match(r"(\w+)=(.*)", command)
        if assignment:
            environment[assignment.group(1)] = os.path.expandvars(assignment.group(2).strip().strip('"'))
            continue
        if command.startswith("ptxas"):
            ptx = re.search(r'"([^"]+\.ptx)"', command).group(1)
            return subprocess.run([str(ptxas), "-arch=sm_70", "-m64", "-v", ptx, "-o", str(cubin)], env=environment,
                                  capture_output=True, text=True, check=True).stderr
        command = command.replace("__CUDA_ARCH__=750", "__CUDA_ARCH__=700").replace("_LIST__=750", "_LIST__=700")
        subprocess.run(os.path.expandvars(command), shell=True, check=True, env=environment)
        if "cicc" in command:
            ptx = Path(re.search(r'-o "([^"]+\.ptx)"', command).group(1))
            text = re.sub(r"^\.target sm_75", ".target sm_70", ptx.read_text(), flags=re.MULTILINE)
            ptx.write_text(re.sub(r"^\.version 9\.\d", ".version 8.8", text, flags=re.MULTILINE))
    raise RuntimeError("nvcc --dryrun printed no ptxas step")


def hmma_per_kernel(cubin: Path, opcode: int = VOLTA_HMMA) -> dict[str, int]:
    """Instructions with `opcode` per .text.<kernel> section of an ELF cubin."""
    data = cubin.read_bytes()
    (section_offset,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, section_offset + i * entry_size) for i in range(count)]
    names_at = sections[names_index][4]
    counts = {}
    for name, _, _, _, offset, size in sections:
        label = data[names_at + name:data.index(b"\0", names_at + name)].decode()
        if label.startswith(".text."):
            words = (struct.unpack_from("<Q", data, at)[0] for at in range(offset, offset + size, 16))
            counts[label[len(".text."):]] = sum(1 for word in words if word & 0xFFF == opcode)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ptxas", type=Path, required=True, help="ptxas of a CUDA 12.x (or older) toolkit")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        for source in ("clip_loss.cu", "siglip_loss.cu"):
            cubin = Path(folder) / source.replace(".cu", ".sm_70.cubin")
            report = compile_for_sm70(REPO / "csrc" / source, args.ptxas, cubin)
            resources = {}
            for function, used in re.findall(r"Compiling entry function '(\w+)'.*?\n(?:.*\n)*?.*?(Used .*)", report):
                resources[function] = used
            spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
            hmma = hmma_per_kernel(cubin)
            for function, count in sorted(hmma.items()):
                label = cuda_toolkit.kernel_label(function)
                print(f"sm_70 {label['kernel']:<24} {label['path']:<9} {label['expectations'] or '-':<3} "
                      f"HMMA {count:>3}  {resources.get(function, '')}")
            print(f"{source}: spill bytes (stores, loads) per kernel: {sorted(set(spills))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
