"""Builds eval/data/qa_wikidata.jsonl, the second evaluation task's data, from BIG-bench's
``qa_wikidata`` task as the PyPI sdist ``bigbench==1.0.0`` ships it.

    python eval/wikidata_data.py [--sdist PATH]   # from the repository root

The sdist (358 MB, source only) is fetched with ``pip download --no-deps`` into
~/.cache/fusion-server/eval/ unless ``--sdist`` names a copy; only
``bigbench/benchmark_tasks/qa_wikidata/task.json`` is read out of it (nothing is
installed: the package itself pulls TensorFlow). The task: 20,442 Wikidata facts as a
sentence to complete ("The capital of Occitania is" -> "Toulouse"; some have several
right answers). Written: a seeded sample of 1,000 facts (``index`` 0-999: 0-599 the
development slice, 600-999 held out) and 3 more as the few-shot examples, each row
``{"index", "input", "targets", "role"}``. The BIG-bench canary string is kept in the
file's first row, as the benchmark asks of every copy.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "bigbench==1.0.0"
MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/qa_wikidata/task.json"
CACHE = Path.home() / ".cache" / "fusion-server" / "eval"
TARGET = Path(__file__).resolve().parent / "data" / "qa_wikidata.jsonl"
SEED = 12
QUESTIONS = 1000
SHOTS = 3


def fetch_sdist() -> Path:
    found = sorted(CACHE.glob("bigbench-1.0.0.tar.gz"))
    if found:
        return found[0]
    CACHE.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    fetched = subprocess.run([*command, PACKAGE, "-d", str(CACHE)], check=False)
    if fetched.returncode != 0:
        # seen 2026-12: the registry's bigbench holds only 0.0.1, without the task files
        raise SystemExit(
            f"qa_wikidata: pip could not download {PACKAGE} (the registry may no longer "
            "have it); pass --sdist with a copy of bigbench-1.0.0.tar.gz. The qa_wikidata "
            "tasks cannot run without it; the GSM8K tasks do not need it."
        )
    return CACHE / "bigbench-1.0.0.tar.gz"


def read_task(sdist: Path) -> dict:
    with tarfile.open(sdist, "r:gz") as tar:
        member = tar.extractfile(MEMBER)
        if member is None:
            raise SystemExit(f"{MEMBER} not in {sdist}")
        return json.load(member)


def rows(task: dict) -> list[dict]:
    examples = task["examples"]
    order = random.Random(SEED).sample(range(len(examples)), QUESTIONS + SHOTS)
    out = []
    for k, i in enumerate(order):
        ex = examples[i]
        targets = ex["target"] if isinstance(ex["target"], list) else [ex["target"]]
        role = "shot" if k >= QUESTIONS else ("dev" if k < 600 else "heldout")
        out.append({"index": k, "input": ex["input"], "targets": targets, "role": role})
    out[0]["canary"] = task["canary"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", type=Path, help="a local bigbench-1.0.0.tar.gz")
    args = ap.parse_args()
    sdist = args.sdist or fetch_sdist()
    data = rows(read_task(sdist))
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data))
    sys.stdout.write(f"{TARGET}: {QUESTIONS} questions + {SHOTS} shots from {sdist}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
