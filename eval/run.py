"""Runs lm-evaluation-harness against our server for several systems and tasks, one after
another, and records each run's wall time (for seconds per answer).

A *system* is a model name the server serves: a source model alone (``qwen2.5-0.5b``),
the fused model (``fusion``) or one of its variants (``fusion-cool``, ...; config.yaml's
``fusion.variants``). Completion tasks go through lm-eval's ``local-completions``
(``/v1/completions``), tasks whose name has ``_chat`` through ``local-chat-completions``
with ``--apply_chat_template`` (``/v1/chat/completions``); a tag or wildcard goes by its
tasks' names, and is refused when it holds both kinds.

    python eval/run.py --tasks gsm8k_pkg_dev,gsm8k_pkg_chat_dev --limit 200 \\
        --systems qwen2.5-0.5b,smollm2-135m,gemma3-270m,fusion,fusion-cool,fusion-cool-rerank

It starts ``fusion-server serve --config`` itself unless ``--url`` names a running server.
lm-eval lives in a venv of its own (``--lm-eval``, default ``lm_eval`` on PATH). Results go
to ``--out`` (lm-eval's own layout, with ``--log_samples``), plus ``runs.jsonl`` (task,
system, questions, seconds); ``eval/report.py`` turns them into the tables. A finished run
is skipped (``done``), so an interrupted sweep resumes. A long run can be
made in chunks, each with its own ``--out`` (``--start 50 --limit 50``: questions 50-99 of
the task's slice), and reported together (``eval/report.py --out DIR1,DIR2``).
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.server_process import start_server, stop_server
from eval.report import chat_task, read_runs, samples_task

ROOT = Path(__file__).resolve().parent.parent


def lm_eval_command(args: argparse.Namespace, url: str, task: str, system: str) -> list[str]:
    chat = chat_task(task_names(task)[0])  # main refuses an entry mixing the two
    endpoint = "chat/completions" if chat else "completions"
    model_args = ",".join(
        [
            f"base_url={url}/v1/{endpoint}",
            f"model={system}",
            "tokenizer_backend=none",
            "tokenized_requests=False",
            f"num_concurrent={args.concurrency}",
            "max_retries=3",
            "timeout=3600",
        ]
    )
    cmd = [
        args.lm_eval,
        "--model",
        "local-chat-completions" if chat else "local-completions",
        "--model_args",
        model_args,
        "--include_path",
        str(ROOT / "eval" / "tasks"),
        "--tasks",
        task,
        "--output_path",
        str(args.out),
        "--log_samples",
    ]
    if chat:
        cmd.append("--apply_chat_template")
    if args.start:
        # a later chunk of the task's questions: lm-eval takes their indices (not --limit),
        # per task (a tag's tasks by their own names)
        chunk = list(range(args.start, args.start + args.limit))
        cmd += ["--samples", json.dumps({name: chunk for name in task_names(task)})]
    elif args.limit:
        cmd += ["--limit", str(args.limit)]
    return cmd


# the scripts that make the tasks' data files (docs/SELECTION.md)
MADE_BY = {
    "eval/data/gsm8k_test.jsonl": "eval/gsm8k_data.py",
    "eval/data/qa_wikidata.jsonl": "eval/wikidata_data.py",
}


def missing_data(task: str) -> str | None:
    """Why ``task`` cannot run here: a local data file named by the YAML of a task it
    stands for (a task under eval/tasks/, a tag, or a wildcard over them, as lm-eval
    matches ``--tasks``) is not there. None when it can, or when it is not ours."""
    index = _tasks()
    for name in members(task):
        for config in index[name]:
            for path in sorted({p for paths in _data_files(config).values() for p in paths}):
                if not _found(path):
                    script = MADE_BY.get(path)
                    return f"{path} is missing" + (f" (made by {script})" if script else "")
    return None


def members(task: str) -> list[str]:
    """The tasks under eval/tasks/ a ``--tasks`` entry stands for, as lm-eval expands it:
    the task itself, a tag's tasks, or those of every name a wildcard matches. Empty when
    none is ours (lm-eval's own tasks are not read here)."""
    index = _tasks()
    names = fnmatch.filter(index, task) if _pattern(task) else [task]
    found = [str(config["task"]) for name in names for config in index.get(name, [])]
    return list(dict.fromkeys(found))


def task_names(entry: str) -> list[str]:
    """The task names lm-eval runs for a ``--tasks`` entry, as far as known here: its
    tasks under eval/tasks/ (``members``), else the entry itself (lm-eval's own)."""
    return members(entry) or [entry]


def known_tasks(entry: str) -> list[str]:
    """The tasks lm-eval runs for a ``--tasks`` entry when all are known here (tasks of
    ours, by name or tag); empty for a wildcard (it may match lm-eval's tasks too) or one
    of lm-eval's own."""
    return [] if _pattern(entry) else members(entry)


def _pattern(name: str) -> bool:
    """Whether a name is a shell pattern (fnmatch, glob)."""
    return any(c in name for c in "*?[")


def _found(path: str) -> bool:
    """Whether a ``data_files`` entry names something here (a glob: at least one file).
    A URL is not checked here."""
    if "://" in path:
        return True
    try:
        return bool(glob.glob(path, root_dir=ROOT)) if _pattern(path) else (ROOT / path).is_file()
    except ValueError:  # a path no file system holds (a NUL byte)
        return False


class _Rows:
    """The few ``datasets.Dataset`` methods a task's ``process_docs`` calls, over a list."""

    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, indices: Iterable[int]) -> _Rows:
        return _Rows([self.rows[i] for i in indices])

    def filter(self, keep: Callable[[Any], bool]) -> _Rows:
        return _Rows([r for r in self.rows if keep(r)])


class _Function(NamedTuple):
    """A ``!function module.name`` tag, with the folder of the file that holds it (lm-eval
    looks the module up there)."""

    folder: Path
    name: str


def _task_yaml(path: Path, seen: set[Path] | None = None) -> dict[str, Any]:
    """A task file as lm-eval's ``load_yaml`` reads it: its ``include`` files first (their
    ``task_list`` dropped), its own keys on top; a file twice on the way is an error."""
    path = path.expanduser().resolve()
    seen = set() if seen is None else seen
    if path in seen:
        raise ValueError(f"include cycle at {path}")
    seen.add(path)

    class Loader(yaml.SafeLoader):
        pass

    def function(loader: yaml.SafeLoader, node: yaml.Node) -> _Function:
        return _Function(path.parent, str(loader.construct_scalar(node)))  # type: ignore[arg-type]

    Loader.add_constructor("!function", function)
    own = yaml.load(path.read_bytes(), Loader=Loader)
    if not isinstance(own, dict):
        raise ValueError(f"{path} is not a mapping")
    if "include" not in own:
        return own
    merged: dict[str, Any] = {}
    included = own.pop("include")
    for name in included if isinstance(included, list) else [included]:
        config = _task_yaml(path.parent / Path(name), seen)
        config.pop("task_list", None)
        merged |= config
    return merged | own


def _tasks() -> dict[str, list[dict[str, Any]]]:
    """Every task and tag under eval/tasks/, by name, as lm-eval's task index reads them
    (the first file to claim a name has it): a task's name to its config, a tag's to its
    tasks' configs. Groups are not read (their own keys change their tasks' configs), so
    a group's name is not ours here. A file that does not read (bad YAML, a missing
    include) is passed over, as lm-eval passes it over."""
    configs: dict[str, dict[str, Any]] = {}  # the tasks
    tagged: dict[str, list[str]] = {}  # a tag's tasks
    files = (ROOT / "eval" / "tasks").glob("**/*.yaml")
    for path in sorted(files, key=lambda p: p.as_posix()):
        if any(part in ("__pycache__", ".ipynb_checkpoints") for part in path.parts):
            continue
        try:
            config = _task_yaml(path)
        except Exception:  # as lm-eval: a file it cannot read is skipped
            continue
        name, tags = config.get("task"), config.get("tag") or []
        tags = [tags] if isinstance(tags, str) else tags
        if "group" in config or not isinstance(name, str) or not isinstance(tags, list):
            continue
        if name in configs or name in tagged:
            continue
        configs[name] = config
        for tag in tags:
            if isinstance(tag, str) and tag not in configs:
                tagged.setdefault(tag, []).append(name)
    tasks = {name: [config] for name, config in configs.items()}
    return tasks | {tag: [configs[n] for n in names] for tag, names in tagged.items()}


# the dataset builders that read local files (``dataset_path``), as datasets names them
LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow"}


def _data_files(config: dict[str, Any]) -> dict[str, list[str]]:
    """The local files a task reads, by split: its ``dataset_kwargs``' ``data_files`` as
    ``datasets.load_dataset`` takes them (a path, a list, or either per split; bare ones
    are the train split). Empty for a task on a Hub dataset."""
    kwargs = config.get("dataset_kwargs")
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    builder = config.get("dataset_path")
    if not isinstance(builder, str) or builder not in LOCAL_BUILDERS or files is None:
        return {}
    out = {}
    for split, paths in (files if isinstance(files, dict) else {"train": files}).items():
        listed = [paths] if isinstance(paths, str) else paths
        if isinstance(listed, list):
            out[str(split)] = [p for p in listed if isinstance(p, str)]
    return out


def slice_size(task: str) -> int | None:
    """How many questions ``task`` asks: its data file's rows through its own
    ``process_docs``, read as lm-eval reads them. None when that cannot be read here
    (not a task under eval/tasks/, its data file missing or unreadable)."""
    config = next((c for c in _tasks().get(task, []) if c.get("task") == task), None)
    if config is None:
        return None
    paths = _data_files(config).get(str(config.get("test_split")), [])
    if len(paths) != 1 or config["dataset_path"] != "json" or "field" in config["dataset_kwargs"]:
        return None  # not one JSON-lines file (several files, or rows under one JSON key)
    try:
        lines = (ROOT / paths[0]).read_text(encoding="utf-8").splitlines()
        rows = _Rows([json.loads(x) for x in lines if x.strip()])
        process = config.get("process_docs")
        if not isinstance(process, _Function):
            return len(rows)
        module, _, name = process.name.rpartition(".")
        spec = importlib.util.spec_from_file_location(
            f"_eval_{task}_{module}", process.folder / f"{module}.py"
        )
        if spec is None or spec.loader is None:
            return None
        code = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(code)
        return len(getattr(code, name)(rows))
    except Exception:  # data or code this shim does not read as lm-eval would
        return None


def done(out: Path, task: str, system: str) -> bool:
    """Whether ``system`` has run ``task`` in ``out``: its samples are there for every
    task of ours it stands for; for a wildcard (it may match lm-eval's tasks too) or one
    of lm-eval's own (a task, group or tag whose files are named after tasks not known
    here), its run is in ``runs.jsonl`` (written when lm-eval has finished)."""
    names = known_tasks(task)
    if not names:
        return (task, system) in read_runs(out)
    have = {samples_task(path) for path in (out / system).glob("samples_*.jsonl")}
    return all(name in have for name in names)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", required=True, type=lambda s: s.split(","))
    ap.add_argument("--systems", required=True, type=lambda s: s.split(","))
    ap.add_argument("--limit", type=int, help="questions per task (default: all)")
    ap.add_argument(
        "--start",
        type=int,
        default=0,
        help="first question (index in the task's slice): with --limit, one chunk of a "
        "longer run; give each chunk its own --out and report them together",
    )
    ap.add_argument("--config", default="config.yaml", help="server config (if no --url)")
    ap.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--out", type=Path, default=Path("eval/results"))
    ap.add_argument("--lm-eval", default=os.environ.get("LM_EVAL", "lm_eval"))
    ap.add_argument("--concurrency", type=int, default=1, help="lm-eval's num_concurrent")
    args = ap.parse_args()
    if args.start < 0 or (args.limit is not None and args.limit < 1):
        ap.error("--start is a question index (0 or more) and --limit a count (1 or more)")
    if args.start and not args.limit:
        ap.error("--start needs --limit (the chunk's size)")
    if shutil.which(args.lm_eval) is None:
        sys.stderr.write(f"{args.lm_eval} not found: pip install lm-eval (in a venv of its own)\n")
        return 1
    for task in list(args.tasks):
        why = missing_data(task)
        if why is not None:
            sys.stderr.write(f"left out {task}: {why}\n")
            args.tasks.remove(task)
    if not args.tasks:
        sys.stderr.write("no task has its data: nothing to run\n")
        return 1
    for task in args.tasks:
        if len({chat_task(name) for name in task_names(task)}) > 1:
            sys.stderr.write(
                f"{task} holds chat and completion tasks: lm-eval asks one way per run; "
                "give them as separate --tasks entries\n"
            )
            return 1
    if args.start:
        for task in args.tasks:
            if not known_tasks(task):
                sys.stderr.write(
                    f"--start with {task}: lm-eval takes a chunk per task, so --start needs "
                    "tasks or tags under eval/tasks/ (a wildcard may match lm-eval's own "
                    "tasks, and a group of lm-eval's would run whole)\n"
                )
                return 1
        for task in [name for entry in args.tasks for name in known_tasks(entry)]:
            size = slice_size(task)
            if size is None:
                sys.stderr.write(f"cannot read how many questions {task} has: chunk unchecked\n")
                continue
            if args.start >= size:
                held = f"its questions are 0-{size - 1}" if size else "it has no questions"
                sys.stderr.write(f"--start {args.start} is past the end of {task}: {held}\n")
                return 1
            if args.start + args.limit > size:
                sys.stderr.write(
                    f"--start {args.start} --limit {args.limit} runs past the end of {task} "
                    f"({size} questions): give --limit {size - args.start}\n"
                )
                return 1
    args.out.mkdir(parents=True, exist_ok=True)
    proc = None
    url = args.url
    if url is None:
        proc, url = start_server(args.config)
    try:
        for task in args.tasks:
            for system in args.systems:
                if done(args.out, task, system):
                    print(f"skip {task} {system}: done", flush=True)
                    continue
                print(f"run {task} {system}", flush=True)
                started = time.perf_counter()
                subprocess.run(lm_eval_command(args, url, task, system), check=True, cwd=ROOT)
                seconds = time.perf_counter() - started
                row = {
                    "task": task,
                    "system": system,
                    "limit": args.limit,
                    "start": args.start,
                    "seconds": round(seconds, 1),
                    "concurrency": args.concurrency,
                    "config": args.config if args.url is None else args.url,
                    "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
                with (args.out / "runs.jsonl").open("a") as sink:
                    sink.write(json.dumps(row) + "\n")
    finally:
        if proc is not None:
            stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
