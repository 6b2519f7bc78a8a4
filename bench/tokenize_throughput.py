"""prepare-data throughput vs the tokenizers batch encoder alone (and datatrove, if given).

    python bench/tokenize_throughput.py [--rounds 3] [--datatrove-python PATH]

Builds the demo corpus, shards it into equal JSONL files, then alternates, round by round:
(a) the upper bound: ``tokenizers`` ``encode_batch_fast`` over the same documents already in
memory, same batch size, same cores; (b) ``prepare_data`` with one process (the tokenizer's own
threads); (c) ``prepare_data`` with one single-threaded process per core. Medians are reported,
with overhead = 1 - prepare-data / upper bound. With ``--datatrove-python`` (an interpreter that
has ``datatrove``), datatrove's DocumentTokenizer runs on the same shards with one task per core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

DATATROVE_SCRIPT = r"""
import sys, time, glob
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.tokens import DocumentTokenizer
shards, tokenizer, out, tasks = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
start = time.perf_counter()
LocalPipelineExecutor(pipeline=[
    JsonlReader(shards, glob_pattern="*.jsonl"),
    DocumentTokenizer(output_folder=out, tokenizer_name_or_path=tokenizer,
                      eos_token="<|end_of_text|>", shuffle_documents=False),
], tasks=tasks, workers=tasks, logging_dir=out + "/logs", skip_completed=False).run()
elapsed = time.perf_counter() - start
tokens = sum(open(f, "rb").seek(0, 2) for f in glob.glob(out + "/*.ds")) // 4
print(elapsed, tokens)
"""


def shard_corpus(corpus: Path, out: Path, shards: int) -> list[Path]:
    files = [open(out / f"shard{i}.jsonl", "w") for i in range(shards)]
    count = 0
    for domain in ("prose", "code", "math"):
        for line in open(corpus / f"{domain}.jsonl"):
            files[count % shards].write(line)
            count += 1
    for handle in files:
        handle.close()
    return [Path(h.name) for h in files]


def upper_bound(texts: list[str], backend, eos_id: int) -> tuple[float, int]:
    from megasmol.data.tokenize import BATCH_CHARS

    start = time.perf_counter()
    tokens, batch, size = 0, [], 0
    for text in texts + [None]:
        if text is not None:
            batch.append(text)
            size += len(text)
        if batch and (size >= BATCH_CHARS or text is None):
            tokens += sum(len(e.ids) + 1 for e in backend.encode_batch_fast(batch, add_special_tokens=False))
            batch, size = [], 0
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--code-mb", type=float, default=8.0, help="demo corpus code budget")
    parser.add_argument("--datatrove-python", help="python interpreter with datatrove installed")
    args = parser.parse_args()

    from megasmol.data.demo_corpus import build_demo_corpus
    from megasmol.data.tokenize import prepare_data
    from megasmol.tokenizer import default_tokenizer_dir, load_tokenizer

    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="tokbench-"))
    build_demo_corpus(work / "corpus", code_mb=args.code_mb)
    (work / "shards").mkdir()
    shards = shard_corpus(work / "corpus", work / "shards", cores * 2)
    texts = [json.loads(line)["text"] for s in shards for line in open(s)]
    tok = load_tokenizer()
    backend = tok.backend_tokenizer

    results: dict[str, list[float]] = {"upper bound (encode_batch_fast)": [],
                                       "prepare-data --workers 1": [],
                                       f"prepare-data --workers {cores}": []}
    tokens = 0
    for _ in range(args.rounds):
        seconds, tokens = upper_bound(texts, backend, tok.eos_token_id)
        results["upper bound (encode_batch_fast)"].append(tokens / seconds)
        for workers in (1, cores):
            summary = prepare_data([str(s) for s in shards], str(work / f"out{workers}"),
                                   workers=workers, overwrite=True, show_progress=False)
            assert summary.tokens == tokens, (summary.tokens, tokens)
            results[f"prepare-data --workers {workers}"].append(summary.tokens / summary.seconds)
    if args.datatrove_python:
        runs = []
        for _ in range(args.rounds):
            out = tempfile.mkdtemp(prefix="dt-", dir=work)
            proc = subprocess.run([args.datatrove_python, "-c", DATATROVE_SCRIPT, str(work / "shards"),
                                   str(default_tokenizer_dir() / "tokenizer.json"), out, str(cores)],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                break
            elapsed, dt_tokens = proc.stdout.split()[-2:]
            runs.append(int(dt_tokens) / float(elapsed))
        if runs:
            results[f"datatrove DocumentTokenizer, {cores} tasks"] = runs

    bound = statistics.median(results["upper bound (encode_batch_fast)"])
    print(f"corpus: {len(texts):,} documents, {tokens:,} tokens (EOS included), {cores} cores, "
          f"{args.rounds} rounds, medians")
    print(f"{'method':<44} {'tokens/s':>12} {'vs bound':>9}")
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:<44} {median:>12,.0f} {median / bound:>9.3f}")


if __name__ == "__main__":
    main()
