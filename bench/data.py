"""Data preparation: the old one-process pipeline (every id in a Python list) against token files.

    python bench/data.py                          # 60 MB: old, new with 1 and 2 processes (~4 min on 2 cores)
    python bench/data.py --sizes 60,600 --big_procs 1,2   # and the new one at 600 MB (~15 min)

The corpus is the sample corpora (under the data root: --data.root's default) repeated into /tmp up to
each size. Every cell runs in a fresh process and reports its wall time and its peak resident memory
above what the imports and the tokenizer took (VmRSS then, which forked workers start with): the process's
own peak (VmHWM, which also counts the pages of memory-mapped Arrow files it read), the largest
tokenising worker's whole VmHWM (sampled; a forked worker does not count its parent's pages until it
touches them), and the peak of anonymous memory summed over the
process and its workers (Pss_Anon sampled every 0.1 s: what the corpus costs in RAM, page cache aside).
Then, from the prepared cache, the wall time of a one-step training launch (python launch/train.py, one
process): an upper bound on launch to first step.
Writes bench/results/data.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import data_old_pipeline
from data_probes import AnonPeak, cpu_s, status_mb

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WORK = Path("/tmp/twist-bench-data")
SOURCES = ("brown/train.txt", "tinyshakespeare/input.txt", "wikitext-2/valid.txt", "wikitext-2/test.txt")
BLOCK = 128


def data_root() -> Path:
    from twist_scale.config import DATA_ROOT_ENV, DEFAULT_DATA_ROOT

    root = Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)
    return root if root.is_absolute() else (REPO / root).resolve()


def build_corpus(mb: int) -> Path:
    """The sample corpora, repeated until `mb` MB (whole documents: cut at a line)."""
    path = WORK / f"corpus-{mb}MB.txt"
    if path.exists():
        return path
    text = "".join((data_root() / s).read_text() for s in SOURCES)
    target, written = mb * 2**20, 0
    with open(path.with_suffix(".tmp"), "w") as fh:
        while written < target:
            piece = text[: target - written]
            piece = piece[: piece.rfind("\n") + 1] or piece
            fh.write(piece)
            written += len(piece.encode())
    path.with_suffix(".tmp").rename(path)
    return path


def tokenizer_dir() -> Path:
    from twist_scale.tokenizer import train_tokenizer

    directory = WORK / "tokenizer"
    if not (directory / "tokenizer.model").exists():
        train_tokenizer([str(data_root() / SOURCES[0])], directory, vocab_size=4096)
    return directory


# -- one cell, in its own process --


def child(way: str, corpus: str, procs: int, cache: str) -> None:
    import datasets  # noqa: F401 - imports are the baseline, not the cell
    import numpy  # noqa: F401
    import pyarrow  # noqa: F401

    from twist_scale.data import packed_blocks
    from twist_scale.tokenizer import load_tokenizer

    tokdir = tokenizer_dir()
    tok = load_tokenizer(tokdir, "hello")
    base = status_mb("VmRSS")  # what a forked worker starts with, too
    cpu, start = cpu_s(), time.perf_counter()
    with AnonPeak() as anon:
        if way == "old":
            blocks = data_old_pipeline.packed_blocks([corpus], tok, BLOCK, Path(cache))
        else:
            blocks = packed_blocks([corpus], tok, tokdir, BLOCK, Path(cache), num_proc=procs)
    seconds, cpu = time.perf_counter() - start, cpu_s() - cpu
    row = {
        "way": way,
        "procs": procs,
        "seconds": seconds,
        "cpu_s": cpu,
        "tokens": int(blocks.size),
        "peak_mb": status_mb("VmHWM") - base,
        "worker_peak_mb": anon.worker_hwm,  # whole: a forked worker shares, not counts, its parent's file pages
        "imports_mb": base,
        "load_avg": os.getloadavg()[0],  # the machine may be shared: a busy one slows the 2-process cells most
        "anon_peak_mb": anon.peak - anon.base,
    }
    print("RESULT " + json.dumps(row), flush=True)


def cell(way: str, corpus: Path, procs: int) -> dict:
    cache = WORK / f"cache-{way}-{procs}-{corpus.stem}"
    shutil.rmtree(cache, ignore_errors=True)
    cmd = [sys.executable, __file__, "--child", way, str(corpus), str(procs), str(cache)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{way} x{procs} on {corpus} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    row |= {"mb": round(corpus.stat().st_size / 2**20), "cache": str(cache)}
    if way == "old":
        shutil.rmtree(cache, ignore_errors=True)
    print(row, flush=True)
    return row


def first_step(corpus: Path, cache: Path) -> dict:
    """Wall time of twist-prepare-data on a prepared cache, then of a one-step training launch (one process)."""
    out = WORK / "run"
    shutil.rmtree(out, ignore_errors=True)
    args = [
        "--config",
        str(REPO / "configs" / "tiny_test.toml"),
        "--out_dir",
        str(out),
        "--data.train_files",
        str(corpus),
        "--data.tokenizer",
        str(tokenizer_dir()),
        "--data.cache_dir",
        str(cache),
        "--data.block_size",
        str(BLOCK),
        "--parallel.engine",
        "local",
        "--twist.rounds",
        "1",
        "--twist.local_steps",
        "1",
        "--checkpoint.every_rounds",
        "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    times = {}
    for name, script in (("prepare_data_cached_s", "prepare_data.py"), ("launch_to_end_of_one_step_s", "train.py")):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "launch" / script), *args], cwd=REPO, env=env, text=True,
                              capture_output=True)  # fmt: skip
        if proc.returncode:
            sys.exit(f"{script} failed:\n{proc.stderr[-3000:]}")
        times[name] = time.perf_counter() - start
    print(times, flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="60", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--old_max_mb", type=int, default=60, help="run the old pipeline only up to this size")
    parser.add_argument("--procs", default="1,2", help="--data.num_proc values of the new pipeline")
    parser.add_argument("--big_procs", default="2", help="--data.num_proc values above --old_max_mb")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        way, corpus, procs, cache = args.child
        child(way, corpus, int(procs), cache)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    tokenizer_dir()
    rows, launch = [], {}
    for mb in map(int, args.sizes.split(",")):
        corpus = build_corpus(mb)
        if mb <= args.old_max_mb:
            rows.append(cell("old", corpus, 1))
        for procs in map(int, (args.procs if mb <= args.old_max_mb else args.big_procs).split(",")):
            rows.append(cell("new", corpus, procs))
        if not launch:
            launch = {"mb": mb, **first_step(corpus, Path(rows[-1]["cache"]))}
    write(rows, launch)


def write(rows: list[dict], launch: dict) -> None:
    lines = [
        f"Corpus: the sample corpora repeated; tokenizer: 4096-token BPE; {os.cpu_count()} cores. Peaks are MB "
        f"above the imports and the tokenizer ({rows[0]['imports_mb']:.0f} MB), but a worker's, which is whole; "
        "load avg: the machine's 1-minute load when the cell ended.",
        "",
        "| MB | pipeline | procs | tokens (M) | wall s | CPU s | s/MB | peak RSS MB | largest worker, whole RSS MB | "
        "anon peak MB | load avg |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['mb']} | {'old (Python list)' if r['way'] == 'old' else 'token files'} | {r['procs']} | "
            f"{r['tokens'] / 1e6:.1f} | {r['seconds']:.1f} | {r['cpu_s']:.1f} | {r['seconds'] / r['mb']:.2f} | "
            f"{r['peak_mb']:.0f} | "
            f"{r['worker_peak_mb']:.0f} | {r['anon_peak_mb']:.0f} | {r['load_avg']:.1f} |"
        )
    for mb in sorted({r["mb"] for r in rows}):
        new = {r["procs"]: r["seconds"] for r in rows if r["mb"] == mb and r["way"] == "new"}
        if 1 in new and 2 in new:
            lines.append(f"\n{mb} MB: 2 processes take {new[2] / new[1]:.2f} of one process's time.")
    if launch:
        lines.append(
            f"\nFrom a prepared cache ({launch['mb']} MB corpus): twist-prepare-data "
            f"{launch['prepare_data_cached_s']:.1f} s; "
            f"a one-step, one-process training launch, start to exit {launch['launch_to_end_of_one_step_s']:.1f} s."
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data.json").write_text(json.dumps({"rows": rows, "launch": launch}, indent=2) + "\n")
    (RESULTS / "data.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
