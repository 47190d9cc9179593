"""CPU inference cost of the dense model and of its κ-subnet exports: latency and peak memory.

    python bench/inference.py --central runs/twist_brown/final            # every κ, batch 1 and 8
    python bench/inference.py --quick                                     # a random tiny Llama, seconds

Each model is measured in a fresh child process (this script with --measure DIR), so its memory
is its own: peak resident memory (Linux VmHWM, reset before each phase through
/proc/self/clear_refs) minus the RSS after imports. Python's tracemalloc cannot see tensor
storage, hence RSS. Exports are loaded with
`load_exported`, the deployment path. The machine may be shared: compare within one run, as ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable from a checkout without install


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    """VmHWM: the resident high-water mark since the last reset_peak()."""
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())[1]) / 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def measure(directory: Path, batches: list[int], seq: int, iters: int, threads: int) -> dict:
    """In the child: load one model, then time `iters` forwards per batch size (after one warm-up).

    Peaks are deltas over the RSS after imports: loading (`load_peak_delta_mb`) and, reset before
    each batch size, weights + activations while serving it (`peak_rss_delta_mb`).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from twist_scale.pruning.format import SUBNET_FILE, load_exported

    torch.set_num_threads(threads)
    base = rss_mb()
    reset_peak()
    exported = (directory / SUBNET_FILE).exists()
    model = load_exported(directory) if exported else AutoModelForCausalLM.from_pretrained(directory).eval()
    out = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "load_peak_delta_mb": peak_rss_mb() - base,
    }
    vocab = model.config.vocab_size
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
        times = []
        reset_peak()
        with torch.inference_mode():
            model(input_ids=ids)
            for _ in range(iters):
                start = time.perf_counter()
                model(input_ids=ids)
                times.append(time.perf_counter() - start)
        out[f"batch_{batch}"] = {
            "latency_ms_median": 1000 * statistics.median(times),
            "latency_ms_mean": 1000 * statistics.fmean(times),
            "tokens_per_s": batch * seq / statistics.median(times),
            "peak_rss_delta_mb": peak_rss_mb() - base,
        }
    return out


def quick_central(directory: Path) -> Path:
    """A random tiny Llama saved like a central model, for a seconds-long smoke run of this benchmark."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from twist_scale.central_io import save_central
    from twist_scale.models import build_model

    vocab = {"<unk>": 0, "<eos>": 1}  # inputs are random ids: the tokenizer only has to exist
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>", eos_token="<eos>"
    )
    torch.manual_seed(0)
    model = build_model("llama", "tiny", vocab_size=512)
    save_central(directory, model, tokenizer, {}, {"shared_layers": [], "correction": "none"})
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--central", type=Path, help="central model directory (a run's final/)")
    parser.add_argument("--kappa", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--method", default="random")
    parser.add_argument("--shared_layers", default="auto", help="'auto' (as trained), 'none', or '0,1,4,5'")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    parser.add_argument("--quick", action="store_true", help="random tiny Llama, short sequences, few iterations")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/inference{,_quick}.json)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # child mode: one model
    args = parser.parse_args()
    batches = args.batch
    args.out = args.out or REPO / "bench" / "results" / f"inference{'_quick' if args.quick else ''}.json"
    if args.measure:
        print(json.dumps(measure(args.measure, batches, args.seq, args.iters, args.threads)))
        return
    if args.quick:
        args.seq, args.iters = min(args.seq, 64), min(args.iters, 3)
    elif args.central is None:
        parser.error("pass --central RUN/final (or --quick for a smoke run on a random tiny model)")

    print(
        f"configuration: central {args.central or 'random tiny llama (--quick)'}, method {args.method}, "
        f"shared layers {args.shared_layers}, kappas {args.kappa}, batches {batches}, seq {args.seq}, "
        f"iters {args.iters}, threads {args.threads}",
        flush=True,
    )
    from twist_scale.pruning.pruner import SavedCentral, build_pruner, export_subnet

    with tempfile.TemporaryDirectory() as tmp:
        central_dir = quick_central(Path(tmp) / "central") if args.central is None else args.central
        pruner = build_pruner(SavedCentral.load(central_dir), args.method, args.shared_layers)
        models = [("dense", 1.0, central_dir)]
        models += [(f"kappa_{k:.2f}", k, export_subnet(pruner, Path(tmp) / "exports", k)) for k in args.kappa]
        results = []
        for name, kappa, directory in models:
            cmd = [sys.executable, __file__, "--measure", str(directory), "--seq", str(args.seq)]
            cmd += ["--iters", str(args.iters), "--threads", str(args.threads), "--batch", *map(str, batches)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                sys.exit(f"measuring {name} failed:\n{proc.stderr[-3000:]}")
            row = {"model": name, "kappa": kappa, **json.loads(proc.stdout.strip().splitlines()[-1])}
            results.append(row)
            print(
                f"{name:>12} {row['parameters']:>12,} params  "
                + "  ".join(f"b{b}: {row[f'batch_{b}']['latency_ms_median']:.1f} ms" for b in batches)
            )
    dense = results[0]
    for row in results:
        for b in batches:
            mine, theirs = row[f"batch_{b}"], dense[f"batch_{b}"]
            mine["speedup_vs_dense"] = theirs["latency_ms_median"] / mine["latency_ms_median"]
            mine["memory_vs_dense"] = mine["peak_rss_delta_mb"] / theirs["peak_rss_delta_mb"]
    report = {
        "central": str(args.central) if args.central else "random tiny llama (--quick)",
        "method": args.method,
        "seq": args.seq,
        "iters": args.iters,
        "threads": args.threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    table = markdown(results, batches)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def markdown(results: list[dict], batches: list[int]) -> str:
    head = "| model | params | weights MB | " + " | ".join(
        f"b{b} ms | b{b} × dense speed | b{b} peak MB | b{b} × dense memory" for b in batches
    )
    lines = [head + " |", "| --- |" + " ---: |" * (2 + 4 * len(batches))]
    for row in results:
        cells = [
            f"{r['latency_ms_median']:.1f} | {r['speedup_vs_dense']:.2f} | {r['peak_rss_delta_mb']:.0f} | "
            f"{r['memory_vs_dense']:.2f}"
            for r in (row[f"batch_{b}"] for b in batches)
        ]
        lines.append(
            f"| {row['model']} | {row['parameters']:,} | {row['weights_mb']:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
