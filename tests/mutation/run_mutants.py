"""Plant one bug at a time in the code that guards data and numbers, run only the tests meant to catch it,
and list which mutants were caught and which survived.

    python tests/mutation/run_mutants.py              # every mutant (about 10 minutes on 2 CPU cores)
    python tests/mutation/run_mutants.py --list       # the mutants, without running anything
    python tests/mutation/run_mutants.py io-no-fsync-file ckpt-skip-state-checksum   # some of them

The working tree (tracked and untracked, not ignored, files) is copied to a scratch folder; each mutant
edits that copy, runs pytest there (PYTHONPATH points at the copy, so the installed fastclip is not
used), and is undone. The selected tests first run unmutated: a selection that fails then is reported
as "baseline failed", not as a catch. A mutant whose original text is no longer in the file (the code
moved) is reported as "stale" so the list gets updated rather than silently skipped.

Exit status: 0 when every applicable mutant was caught, 1 when some survived or went stale.
Not collected by pytest (no test_ prefix); docs/testing.md says when to run it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    original: str  # exact text, replaced once (its first occurrence)
    mutated: str
    tests: tuple  # pytest arguments that should catch it
    why: str


IO_TESTS = ("tests/test_io.py",)
ACCELERATOR_TESTS = ("tests/test_loss_ops.py", "-k", "accelerator")
CLIP_VALUES = ("tests/test_clip_loss.py", "-k", "values_and_gradients and 37-200 or reductions or tenth or normalize")
CHUNK_TESTS = ("tests/test_loss_ops.py", "tests/test_clip_loss.py", "-k",
               "opcheck or small_workspace or column_far or tenth or low_precision")

MUTANTS = [
    # ---- fastclip/io.py: crash safety (section 1 a and c of issue 21)
    Mutant("io-no-fsync-file", "fastclip/io.py", "            handle.flush()\n            os.fsync(handle.fileno())\n",
           "            handle.flush()\n", IO_TESTS, "atomic_write renames a file it never fsync'ed"),
    Mutant("io-no-fsync-tree", "fastclip/io.py", "            with open(os.path.join(folder, name), \"rb\") as handle:\n"
           "                os.fsync(handle.fileno())\n", "            pass\n", IO_TESTS,
           "atomic_dir renames a staging folder whose files were never fsync'ed"),
    Mutant("io-no-fsync-dir", "fastclip/io.py", "        os.fsync(descriptor)\n    except OSError:", "        pass\n    except OSError:",
           IO_TESTS, "fsync_dir is a no-op: renames are not durable"),
    Mutant("io-delete-old-first", "fastclip/io.py",
           "    retired = Path(tempfile.mkdtemp(dir=final.parent, prefix=temporary_prefix(final.name) + \"old.\"))\n",
           "    shutil.rmtree(final)\n    os.replace(staging, final)\n    return\n", IO_TESTS,
           "atomic_dir(replace=True) deletes the old folder before the new one is in place"),
    Mutant("io-no-restore-on-failure", "fastclip/io.py", "        os.replace(retired / final.name, final)\n", "", IO_TESTS,
           "a failed rename-in leaves the old folder hidden (and later deleted)"),
    Mutant("io-stale-cleanup-deletes-old", "fastclip/io.py",
           '        if match.group("retired") and (entry / original.name).is_dir() and not original.exists():',
           "        if False:", IO_TESTS, "the stale cleanup deletes the old folder a kill left aside"),
    Mutant("io-stale-cleanup-restores-pruned", "fastclip/io.py", 'if match.group("retired") and',
           "if match.group(1) and", ("tests/test_fault_injection.py", "-k", "prune"),
           "the stale cleanup puts back a half-deleted pruned checkpoint (group 1 is the target, always set)"),
    Mutant("io-keep-temporary-on-error", "fastclip/io.py",
           "        with contextlib.suppress(FileNotFoundError):\n            os.unlink(temporary)\n", "        pass\n",
           IO_TESTS, "atomic_write leaves its temporary behind on an error"),
    # ---- the checkpoint format and writer (section 1 a and b)
    Mutant("ckpt-skip-state-checksum", "fastclip/checkpoint_format.py",
           "        if sha256_of(path / name) != manifest[\"sha256\"][name]:",
           "        if name != STATE_FILE and sha256_of(path / name) != manifest[\"sha256\"][name]:",
           ("tests/test_train_checkpoint.py", "-k", "corrupt_latest"), "verify_checkpoint skips state.pt's sha256"),
    Mutant("ckpt-skip-model-checksum", "fastclip/checkpoint_format.py",
           "        if sha256_of(path / name) != manifest[\"sha256\"][name]:",
           "        if name == STATE_FILE and sha256_of(path / name) != manifest[\"sha256\"][name]:",
           ("tests/test_train_checkpoint.py", "-k", "corrupt_latest"), "verify_checkpoint skips the weights' sha256"),
    Mutant("ckpt-retire-no-fsync", "fastclip/train/checkpoint.py",
           "    os.replace(folder, retired / folder.name)\n    fsync_dir(folder.parent)\n",
           "    os.replace(folder, retired / folder.name)\n", ("tests/test_train_checkpoint.py", "-k", "fsynced"),
           "pruning renames a checkpoint away without syncing the folder"),
    Mutant("ckpt-set-aside-no-fsync", "fastclip/train/checkpoint.py", "    os.replace(path, target)\n    fsync_dir(path.parent)\n",
           "    os.replace(path, target)\n", ("tests/test_train_checkpoint.py", "-k", "fsynced"),
           "setting a corrupt checkpoint aside is not synced"),
    # ---- the chunked torch primitives (section 1 d, and their numerics)
    Mutant("torch-16bit-drops-temperature", "fastclip/ops/chunking.py",
           "        out.copy_(matmul_fp32(image_chunk, text.t()))\n    return out.mul_(scale)\n",
           "        out.copy_(matmul_fp32(image_chunk, text.t()))\n        return out\n    return out.mul_(scale)\n",
           ACCELERATOR_TESTS, "the 16-bit GEMM branch forgets the temperature"),
    Mutant("torch-16bit-rounds-logits", "fastclip/ops/gemm.py", "lambda: torch.mm(left, right, out_dtype=torch.float32)",
           "lambda: torch.mm(left, right).to(torch.float32)", ACCELERATOR_TESTS,
           "the 16-bit GEMM rounds the logits to 16 bits (the defect fixed in this branch)"),
    Mutant("torch-merge-lse-weight", "fastclip/ops/chunking.py",
           "weight_a, weight_b = (lse_a - top).exp(), (lse_b - top).exp()",
           "weight_a, weight_b = (lse_a - top).exp(), (lse_a - top).exp()", CHUNK_TESTS,
           "merging two chunks' statistics weighs the second with the first's mass"),
    Mutant("torch-no-exact-column-fallback", "fastclip/ops/clip_loss_torch.py",
           "lost = (chunk_sum < TINY_COLUMN_SUM)", "lost = (chunk_sum < 0)", CHUNK_TESTS,
           "columns far below the chunk max lose their precision"),
    Mutant("torch-grad-scale-0.1-percent", "fastclip/ops/clip_loss_torch.py", "    grad_scale = grad_scale / scale\n",
           "    grad_scale = grad_scale / scale * 1.001\n", CHUNK_TESTS, "d loss / d logit_scale 0.1 % off"),
    Mutant("torch-siglip-positive-sign", "fastclip/ops/siglip_loss_torch.py",
           "grad_logits[rows, cols] = -torch.sigmoid(-positive_logits)",
           "grad_logits[rows, cols] = torch.sigmoid(-positive_logits)",
           ("tests/test_loss_ops.py", "tests/test_siglip_loss.py", "-k", "siglip or values"),
           "SigLIP's positive gradient has the wrong sign"),
    Mutant("torch-scale-before-gemm", "fastclip/ops/chunking.py",
           "    if image_chunk.dtype == out.dtype:\n        torch.mm(image_chunk, text.t(), out=out)\n",
           "    if image_chunk.dtype == out.dtype:\n        return torch.mm(image_chunk * scale, text.t(), out=out)\n",
           ("tests/test_clip_loss.py", "-k", "near_a_zero and torch"),
           "the rows are scaled before the GEMM: d loss / d logit_scale ~2x open_clip's error near a zero loss"),
    Mutant("torch-exact-diagonal", "fastclip/ops/clip_loss_torch.py",
           "        positive_logit[rows + start] = logits[rows, cols]",
           "        positive_logit[rows + start] = ((image[rows + start].double() * text[cols].double()).sum(-1)"
           " * scale).to(accumulate)", ("tests/test_distributed_loss.py", "-k", "logit_scale_gradient"),
           "the local loss's d scale takes an exact diagonal, not the tiles' own (4x open_clip's error)"),
    # ---- the autograd Function
    Mutant("autograd-mean-not-divided", "fastclip/ops/clip_loss.py", "        weights = weights / n\n",
           "        weights = weights\n", CLIP_VALUES, "the mean reduction's backward forgets 1/n"),
    Mutant("autograd-half-coefficient", "fastclip/ops/clip_loss.py", "coef = 0.5 * pair_weights(",
           "coef = pair_weights(", CLIP_VALUES, "the backward drops the 1/2 of the symmetric loss"),
    Mutant("autograd-normalize-text-backward", "fastclip/ops/clip_loss.py",
           "grad_text = normalize_rows_backward(grad_text, text, text_norms) if grad_text is not None else None",
           "grad_text = grad_text", CLIP_VALUES, "normalize=True forgets the text normalisation's Jacobian"),
]


def copy_tree(destination: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def run_tests(copy: Path, arguments: tuple, timeout: int) -> tuple[int, str, float]:
    environment = dict(os.environ, PYTHONPATH=str(copy), TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *arguments],
                              cwd=copy, env=environment, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timed out", time.perf_counter() - start
    failed = [line.split(" ")[1] for line in done.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    last_lines = done.stdout.strip().splitlines() or [""]
    return done.returncode, failed[0] if failed else last_lines[-1], time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per pytest run")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - {mutant.name for mutant in MUTANTS})
    if unknown:
        parser.error(f"unknown mutant(s) {unknown}; --list shows them")
    chosen = [mutant for mutant in MUTANTS if not args.names or mutant.name in args.names]
    if args.list:
        for mutant in chosen:
            print(f"{mutant.name:36s} {mutant.path:32s} {mutant.why}")
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="fastclip-mutants-") as scratch:
        copy = Path(scratch)
        copy_tree(copy)
        probe = subprocess.run([sys.executable, "-c", "import fastclip; print(fastclip.__file__)"], cwd=copy,
                               env=dict(os.environ, PYTHONPATH=str(copy)), capture_output=True, text=True)
        if not probe.stdout.startswith(str(copy)):
            print(f"the copy's fastclip is not the one imported ({probe.stdout.strip() or probe.stderr[-300:]})")
            return 2
        baseline = {}
        for selection in dict.fromkeys(mutant.tests for mutant in chosen):
            code, detail, seconds = run_tests(copy, selection, args.timeout)
            baseline[selection] = code == 0
            print(f"baseline {'ok    ' if code == 0 else 'FAILED'} {seconds:6.1f} s  {' '.join(selection)}"
                  f"{'' if code == 0 else '  ' + detail}", flush=True)
        for mutant in chosen:
            target = copy / mutant.path
            text = target.read_text()
            if mutant.original not in text:
                results.append((mutant, "stale", "original text not found", 0.0))
            elif not baseline[mutant.tests]:
                results.append((mutant, "baseline failed", "", 0.0))
            else:
                target.write_text(text.replace(mutant.original, mutant.mutated, 1))
                try:
                    code, detail, seconds = run_tests(copy, mutant.tests, args.timeout)
                finally:
                    target.write_text(text)
                results.append((mutant, "caught" if code != 0 else "SURVIVED", detail if code != 0 else "", seconds))
            mutant_, verdict, detail, seconds = results[-1]
            print(f"{verdict:15s} {seconds:6.1f} s  {mutant.name:36s} {detail}", flush=True)
    caught = sum(verdict == "caught" for _, verdict, _, _ in results)
    print(f"\n{caught}/{len(results)} caught")
    for mutant, verdict, _, _ in results:
        if verdict != "caught":
            print(f"  {verdict}: {mutant.name} ({mutant.path}): {mutant.why}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
