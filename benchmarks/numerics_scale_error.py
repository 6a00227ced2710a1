"""d loss / d logit_scale error against an fp64 truth, as a multiple of open_clip's own fp32 error.

Every local_loss x gather_with_grad combination, both exchanges (gather, ring), per backend, in a
spawned gloo world of W CPU ranks: b = 32 pairs per rank, D = 64, scale 100, 24 seeds; features
text = image + k noise (k = 2: "mid", loss ~0.5-1; k = 1.2: "nearzero", loss ~1e-5), unit norm.

Each figure is RMS(ours - truth) / RMS(open_clip fp32 - truth), the RMS taken over every (seed,
rank) sample, the truth open_clip in fp64. Beside it: "rel", the same ratio of relative errors, and
"rel/rank", the figure once used (the max over ranks of per-rank RMS relative errors over the first 6
seeds). That one is unstable: d loss / d scale crosses 0 as training goes, so a draw whose true
gradient is near 0 dominates a relative RMS, and open_clip's own per-rank RMS over 6 seeds varies
~20x between ranks. Backends: torch, triton (needs TRITON_INTERPRET=1 on CPU), host (csrc/ built
for the CPU by tests/cuda_host.py: the CUDA kernels' tile math). Prints a table; writes nothing.
Tables and their reading: docs/numerics.md.

    TRITON_INTERPRET=1 python benchmarks/numerics_scale_error.py --backends torch,host,triton --worlds 1,2,3,4
"""
from __future__ import annotations

import argparse
import ctypes
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.distributed_utils import loss_and_grads, local_rows, open_clip_loss_module, run_in_world  # noqa: E402

NOISE = {"mid": 2.0, "nearzero": 1.2}


def features(world_size: int, b: int, dim: int, seed: int, data: str):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(world_size * b, dim, generator=generator, dtype=torch.float64)
    text = image + NOISE[data] * torch.randn(image.shape, generator=generator, dtype=torch.float64)
    normalize = torch.nn.functional.normalize
    return normalize(image, dim=-1).float(), normalize(text, dim=-1).float()


def worker(rank, world_size, backends, data, seeds, host_library, b=32, dim=64):
    import fastclip.loss as fastclip_loss

    open_clip = open_clip_loss_module()
    if "host" in backends:
        from tests import cuda_host

        host = cuda_host.HostBackend(cuda_host.HostBuild(ctypes.CDLL(host_library)))
        select = fastclip_loss.select_backend
        fastclip_loss.select_backend = lambda name, inputs: host if name == "host" else select(name, inputs)
    errors: dict = {}
    for seed in range(seeds):
        image_all, text_all = features(world_size, b, dim, 100 + seed, data)
        image, text = local_rows(image_all, rank, world_size), local_rows(text_all, rank, world_size)
        for local_loss in (False, True):
            for gather_with_grad in (False, True):
                reference = open_clip.ClipLoss(local_loss, gather_with_grad, rank=rank, world_size=world_size)
                truth = float(loss_and_grads(reference, image.double(), text.double(), 100.0, None, 1.0)["logit_scale"])
                runs = {"open_clip": reference}
                runs.update({f"{backend}/{impl}": fastclip_loss.ClipLoss(local_loss, gather_with_grad, dist_impl=impl,
                                                                         backend=backend)
                             for backend in backends for impl in ("gather", "ring")})
                for name, loss in runs.items():
                    value = float(loss_and_grads(loss, image, text, 100.0, None, 1.0)["logit_scale"])
                    errors.setdefault((name, local_loss, gather_with_grad), []).append((value - truth, truth))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="torch,host")
    parser.add_argument("--worlds", default="2")
    parser.add_argument("--data", choices=sorted(NOISE), default="mid")
    parser.add_argument("--seeds", type=int, default=24)
    args = parser.parse_args()
    backends = args.backends.split(",")
    rms = lambda values: math.sqrt(sum(v * v for v in values) / len(values))  # noqa: E731
    with tempfile.TemporaryDirectory() as scratch:
        library = ""
        if "host" in backends:
            from tests import cuda_host

            cuda_host.build(Path(scratch))
            library = str(Path(scratch) / "libfastclip_host_reference.so")
        print("W  data      backend/impl     local_loss gather_with_grad  error / open_clip's  (open_clip's RMS)"
              "   rel  rel/rank")
        for world_size in (int(w) for w in args.worlds.split(",")):
            results = run_in_world(worker, world_size, timeout_s=3600, backends=backends, data=args.data,
                                   seeds=args.seeds, host_library=library)
            pooled = lambda key: rms([error for r in results for error, _ in r[key]])  # noqa: E731
            relative = lambda key, r: rms([error / truth for error, truth in r[key][:6]])  # noqa: E731
            pooled_relative = lambda key: rms([error / truth for r in results for error, truth in r[key]])  # noqa: E731
            for name, local_loss, gather_with_grad in results[0]:
                if name == "open_clip":
                    continue
                key, base = (name, local_loss, gather_with_grad), ("open_clip", local_loss, gather_with_grad)
                per_rank = max(relative(key, r) / relative(base, r) for r in results)
                print(f"{world_size}  {args.data:9s} {name:16s} {local_loss!s:10s} {gather_with_grad!s:16s} "
                      f"{pooled(key) / pooled(base):8.2f}  ({pooled(base):.1e})            "
                      f"{pooled_relative(key) / pooled_relative(base):5.2f}  {per_rank:5.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
