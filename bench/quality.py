"""Quality at an equal token budget: TwIST's zero-cost subnets against post-hoc pruning of a dense model.

    python bench/quality.py --rounds 40     # small Llama (~17M, vocab 4096) on brown/train, 2 processes
    python bench/quality.py --quick         # tiny Llama, a few rounds: checks the pipeline in minutes

Trains, on the same 2 processes and the same tokens: (a) dense data parallel (1 group x 2 ranks),
then pruned post hoc at each kappa with every baseline in twist_scale.prune; (b) TwIST with 2 groups
x 1 rank at kappa 0.5, exported zero-cost with random draws. Perplexity on
brown/test and wikitext-2/test with twist_scale.evaluate's protocol. Writes bench/results/quality.json
and .md. Prints every command it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()
RESULTS = REPO / "bench" / "results"
TESTS = {"brown": DATA / "brown" / "test.txt", "wikitext2": DATA / "wikitext-2" / "test.txt"}
BASELINES = ("random", "magnitude", "wanda_sp", "flap")


def sh(cmd: list[str]) -> None:
    print("$", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), cwd=REPO, check=True, env=dict(os.environ, DS_ACCELERATOR="cpu"))


def train(out: Path, config: str, rounds: int, quick: bool, extra: dict[str, object]) -> None:
    args = {
        "out_dir": out,
        "twist.rounds": rounds,
        "data.cache_dir": out.parent / "cache",
        "data.tokenizer": out.parent / "tokenizer",
        "checkpoint.every_rounds": 0,
        "eval.every_rounds": 0,
        **extra,
    }
    if quick:
        args |= {"model.size": "tiny", "data.block_size": 64, "data.micro_batch_size": 4, "twist.local_steps": 5}
    sh(
        [
            Path(sys.executable).parent / "deepspeed",
            "--num_gpus",
            2,
            REPO / "launch" / "train.py",
            "--config",
            REPO / "configs" / config,
            *[f"--{k}={v}" for k, v in args.items()],
        ]
    )


def evaluate(central: Path, method: str, kappas: list[float], draws: int, window: int, tests: list[str]) -> dict:
    out = {}
    for name in tests:
        path = TESTS[name]
        target = central.parent / f"eval_{method}_{name}.json"
        sh(
            [
                sys.executable,
                REPO / "launch" / "evaluate.py",
                central,
                "--data",
                path,
                "--method",
                method,
                "--kappa",
                *kappas,
                "--draws",
                draws,
                "--window",
                window,
                "--label",
                f"{method}_{name}",
                "--json",
                target,
            ]
        )
        out[name] = json.loads(target.read_text())
    return out


def summarise(sweep: dict) -> dict[str, dict]:
    """kappa -> {"mean": ..., "std": ..., "params": ...} from one evaluate --json file."""
    rows = {}
    for r in sweep["results"]:
        ppls = r["ppls"]
        mean = sum(ppls) / len(ppls)
        std = (sum((p - mean) ** 2 for p in ppls) / max(1, len(ppls) - 1)) ** 0.5
        rows[f"{r['kappa']:.2f}"] = {
            "ppl": mean,
            "std": std,
            "min": min(ppls),
            "max": max(ppls),
            "draws": len(ppls),
            "params": r["parameters"],
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=40, help="rounds of 15 steps (both runs)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_quality")
    parser.add_argument("--draws", type=int, default=3, help="random draws per kappa (random method)")
    parser.add_argument("--kappa", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--tests", nargs="+", default=list(TESTS), choices=list(TESTS), help="held-out sets")
    args = parser.parse_args()
    rounds = 4 if args.quick else args.rounds
    window = 64 if args.quick else 256
    kappas = args.kappa
    dense, twist = args.out / "dense", args.out / "twist_k0.5_g2"
    train(dense, "dense_brown.toml", rounds, args.quick, {"twist.groups": 1, "twist.kappa": 1.0})
    train(twist, "twist_brown.toml", rounds, args.quick, {"twist.groups": 2, "twist.kappa": 0.5})
    cfg = json.loads((dense / "config.json").read_text())
    tokens = rounds * cfg["twist"]["local_steps"] * cfg["data"]["micro_batch_size"] * cfg["data"]["block_size"] * 2
    results: dict = {"token_budget": tokens, "quick": args.quick, "window": window, "methods": {}}
    for method in BASELINES:
        sweeps = evaluate(dense / "final", method, kappas, args.draws, window, args.tests)
        results["methods"][f"dense + {method}"] = {k: summarise(v) for k, v in sweeps.items()}
    sweeps = evaluate(twist / "final", "random", kappas, args.draws, window, args.tests)
    results["methods"]["TwIST k=0.5 zero-cost (random)"] = {k: summarise(v) for k, v in sweeps.items()}

    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS / f"quality{suffix}.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"Token budget per run: {tokens:,} tokens. Perplexity (random: mean over draws) on " + " / ".join(args.tests),
        "",
        "| method | " + " | ".join(f"κ={k}" for k in kappas) + " |",
        "| --- |" + " ---: |" * len(kappas),
    ]
    for method, by_test in results["methods"].items():
        cells = [" / ".join(f"{by_test[t][f'{k:.2f}']['ppl']:.1f}" for t in args.tests) for k in kappas]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    (RESULTS / f"quality{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
