"""Memory and speed of one training step of the medium Llama at sequence 1,024, with and without
activation checkpointing, for each attention kernel (and compiled layers where asked).

Each variant runs in a fresh process (peak memory is a process's high-water mark): on a GPU
`torch.cuda.max_memory_allocated`, on the CPU the resident set's high-water mark (VmHWM), each less
what the process held before its first step (the model; the optimizer's moments and the gradients
come with the first step in every variant alike). Tokens/s are over the steps after the first.
`python bench/memory.py [--batch 4] [--steps 3] [--compile]`; writes bench/results/memory{_cuda}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from measure import RESULTS

from twist_scale.config import RunConfig
from twist_scale.engines import build_engine
from twist_scale.models import build_model
from twist_scale.run_model import use_attention

VOCAB, SEQ = 4096, 1024
VARIANTS = {  # name: (attention kernel, activation checkpointing, compiled layers)
    "sdpa": ("sdpa", False, False),
    "sdpa + checkpointing": ("sdpa", True, False),
    "eager": ("eager", False, False),
    "eager + checkpointing": ("eager", True, False),
    "sdpa + compile": ("sdpa", False, True),
    "sdpa + checkpointing + compile": ("sdpa", True, True),
}


def process_bytes(device: torch.device, peak: bool) -> int:
    """What the process holds on `device` now, or at its peak so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
    field = "VmHWM:" if peak else "VmRSS:"
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1]) * 1024


def one_variant(name: str, batch: int, steps: int) -> dict[str, float]:
    """Run `steps` steps of variant `name` in this process."""
    kernel, checkpointing, compiled = VARIANTS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model("llama", "medium", VOCAB)
    use_attention(model, kernel)
    cfg = RunConfig()
    cfg.parallel.engine, cfg.parallel.activation_checkpointing, cfg.parallel.compile = "local", checkpointing, compiled
    cfg.parallel.precision = "bf16" if device.type == "cuda" else "fp32"
    engine = build_engine(model.to(device), cfg, topo=None)
    rows = torch.randint(0, VOCAB, (steps, batch, SEQ), generator=torch.Generator().manual_seed(1)).to(device)
    before = process_bytes(device, peak=False)
    seconds = []
    for step in range(steps):
        start = time.perf_counter()
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            engine.train_step([rows[step]])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    timed = seconds[1:] or seconds
    return {
        "peak_above_model_mib": (process_bytes(device, peak=True) - before) / 2**20,
        "tokens_per_s": batch * SEQ * len(timed) / sum(timed),
        "first_step_s": seconds[0],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--steps", type=int, default=3, help="steps per variant (the first is not timed)")
    parser.add_argument("--compile", action="store_true", help="also the compiled variants")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in this process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one_variant(args.variant, args.batch, args.steps)))
        return
    results = {}
    for name in [v for v in VARIANTS if args.compile or not VARIANTS[v][2]]:
        cmd = [sys.executable, __file__, "--variant", name, "--batch", str(args.batch), "--steps", str(args.steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    device = next(iter(results.values()))["device"]
    suffix = "" if device == "cpu" else "_cuda"
    record = {"model": "llama medium", "sequence": SEQ, "batch": args.batch, "device": device, "variants": results}
    (RESULTS / f"memory{suffix}.json").write_text(json.dumps(record, indent=2))
    base = results["sdpa"]
    lines = [
        f"# One training step, Llama medium, sequence {SEQ}, batch {args.batch}, on {device}",
        "",
        f"`python bench/memory.py --batch {args.batch} --steps {args.steps}{' --compile' if args.compile else ''}`. "
        "Peak: the high-water mark less what the process held before its first step; ratios against `sdpa`.",
        "",
        "| variant | peak above the model (MiB) | × sdpa | tokens/s | × sdpa |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results.items():
        peak, speed = r["peak_above_model_mib"], r["tokens_per_s"]
        lines.append(
            f"| {name} | {peak:.0f} | {peak / base['peak_above_model_mib']:.2f} "
            f"| {speed:.0f} | {speed / base['tokens_per_s']:.2f} |"
        )
    (RESULTS / f"memory{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
