"""Command line: ``fusion-server serve``, ``generate``, ``prepare`` and ``calibrate``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

from fusion.loop import Fuser
from fusion.models import SourceModel
from fusion.sources import SourceError
from fusion.types import (
    METHODS,
    RULES,
    FusionOutcome,
    FusionParams,
    Prompt,
    Segment,
    SelectionPolicy,
    reranks_alone,
)
from server.cli_flags import add_model_arguments, config_file, overrides
from server.config import AppConfig, ConfigError, load_config


class _Intermixed(argparse.ArgumentParser):
    """A subcommand parser that takes options between its positionals, as vLLM's and
    llama.cpp's do (``serve A --api-key K B``)."""

    _mixing = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        if self._mixing:  # the intermixed parse calls this twice
            return super().parse_known_args(args, namespace)
        self._mixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._mixing = False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion-server", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Intermixed)

    serve = sub.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Serve the source models fused under one model name (and each alone "
        "under its own), e.g. `fusion-server serve Qwen/Qwen2.5-7B-Instruct "
        "meta-llama/Llama-3.1-8B-Instruct --api-key K`; without models, config.yaml.",
    )
    add_model_arguments(serve)

    prep = sub.add_parser(
        "prepare",
        help="fetch, convert and cache every model once (the same models and flags as serve)",
    )
    add_model_arguments(prep)

    gen = sub.add_parser("generate", help="print one fused answer")
    gen.add_argument("prompt")
    gen.add_argument("--config", default="config.yaml")
    gen.add_argument("--method", choices=METHODS)
    gen.add_argument("--models", help="comma-separated subset of source models")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--raw", action="store_true", help="complete the text instead of chatting")
    gen.add_argument("--trace", action="store_true", help="show every segment's candidates")
    gen.add_argument("--rule", choices=RULES, help="selection rule (default: the config's)")
    gen.add_argument("--leader", help="leader model for the leader and gate rules")
    _add_calibrate(sub)
    return parser


def _add_calibrate(sub: argparse._SubParsersAction[Any]) -> None:
    cal = sub.add_parser(
        "calibrate",
        help="choose the members to keep and the selection policy on a development set "
        "(docs/SELECTION.md)",
    )
    cal.add_argument("--config", default="config.yaml")
    cal.add_argument(
        "--task",
        choices=("gsm8k", "qa"),
        default="gsm8k",
        help="gsm8k: GSM8K test questions 3-599, 3-shot; qa: short answers to complete, "
        "the 'dev' rows of --data",
    )
    cal.add_argument(
        "--data",
        default="eval/data/qa_wikidata.jsonl",
        help="--task qa: JSONL rows {input, targets, role: shot|dev|heldout}",
    )
    cal.add_argument(
        "--questions",
        type=int,
        default=20,
        help="development questions (gsm8k: 1-597, from index 3; qa: the first N 'dev' rows)",
    )
    cal.add_argument("--max-tokens", type=int, help="answer length cap (default: gsm8k 256, qa 16)")
    cal.add_argument(
        "--gate-thresholds", default="0.5", help="comma-separated gate thresholds to compare"
    )
    cal.add_argument(
        "--max-time-ratio",
        type=float,
        help="only recommend fused systems whose time per answer is at most this many "
        "times the best member's alone (e.g. 1.5); default: no limit",
    )
    cal.add_argument(
        "--no-subsets",
        action="store_true",
        help="with three or more members kept, do not also try each set without one of them",
    )
    cal.add_argument(
        "--leader-margins",
        default="1",
        help="comma-separated leader's-veto margins (nats/token) to compare with each gate "
        "threshold; empty: none",
    )
    cal.add_argument(
        "--vote-settings",
        default="4/0.75/8,4/1/8,8/0.5/8",
        help="method vote's k/threshold/budget settings to compare, comma-separated "
        "(tried with one member kept too: its self-consistency); empty: none",
    )
    cal.add_argument("--out", help="write the fusion: YAML block to this file (else print it)")


def _load(args: argparse.Namespace) -> AppConfig:
    if args.command in ("serve", "prepare"):
        return load_config(config_file(args), **overrides(args))
    return load_config(args.config)


def _check_sources(config: AppConfig) -> None:
    """Hub models that cannot be had (missing, gated, not cached offline) fail before the
    server starts, rather than as a load error behind a listening port."""
    from fusion import hub

    for mc in config.models:
        try:
            hub.check(mc.source)
        except SourceError as exc:
            named = mc.name == hub.default_name(mc.source)  # the message names it already
            raise ConfigError(str(exc) if named else f"model {mc.name}: {exc}") from None


def _selection(config: AppConfig, args: argparse.Namespace) -> SelectionPolicy:
    """The config's selection policy with --rule / --leader on top, checked."""
    chosen = config.fusion.selection.model_copy(
        update={k: v for k, v in (("rule", args.rule), ("leader", args.leader)) if v}
    )
    problems = chosen.problems([m.name for m in config.models])
    if problems:
        raise ConfigError("; ".join(problems))
    return chosen.policy()


def _default_models(config: AppConfig) -> tuple[str, ...] | None:
    return tuple(config.fusion.variant_models(config.fusion.name) or ()) or None


def _print_trace(seg: Segment) -> None:
    print(
        f"\n[segment {seg.index}] winner={seg.winner} {seg.step} by {seg.rule} "
        f"{seg.step_seconds * 1000:.0f} ms",
        file=sys.stderr,
    )
    for c in sorted(seg.candidates, key=lambda c: c.mean_perplexity):
        scores = " ".join(f"{name}={ppl:.2f}" for name, ppl in c.perplexities)
        end = " <end>" if c.ended else ""
        by = ",".join(c.proposers)
        line = f"   {c.mean_perplexity:10.2f}  {c.text!r}{end}  by {by}  [{scores}]"
        print(line, file=sys.stderr)


def _fuser(config: AppConfig, models: list[SourceModel]) -> Fuser:
    """The fused model as the server runs it (its faults policy included)."""
    return Fuser(
        models, window_pieces=config.fusion.window_pieces, faults=config.fusion.faults.policy()
    )


async def _generate(config: AppConfig, args: argparse.Namespace) -> int:
    from server.engines import load_models, shutdown_models

    selection = _selection(config, args)  # a bad --rule/--leader fails before loading
    method = args.method or config.fusion.method
    if method == "vote" and config.fusion.answer is None:
        print(
            "fusion-server: method vote needs fusion.answer in the config (an extractor)",
            file=sys.stderr,
        )
        return 2
    members = args.models.split(",") if args.models else _default_models(config)
    if reranks_alone(method, members or [m.name for m in config.models]):
        print(
            f"fusion-server: method {method} reranks the answers of two or more source "
            "models; give --models two or more, or use cool",
            file=sys.stderr,
        )
        return 2
    models = await load_models(config)
    fuser = _fuser(config, models)
    try:
        params = FusionParams(
            method=method,
            max_tokens=args.max_tokens,
            max_segment_tokens=config.fusion.max_segment_tokens,
            ppl_mode=config.fusion.ppl_mode,
            models=tuple(members) if members else None,
            selection=selection,
            vote=config.fusion.vote.params(config.fusion.answer),
        )
        prompt = (
            Prompt(text=args.prompt)
            if args.raw
            else Prompt(messages=({"role": "user", "content": args.prompt},))
        )
        outcome = FusionOutcome()
        async with contextlib.aclosing(fuser.run(prompt, params, outcome)) as segments:
            async for seg in segments:
                if args.trace:
                    _print_trace(seg)
                print(seg.text, end="", flush=True)
        print()
        wins = ", ".join(f"{n}: {u.segments_won}" for n, u in outcome.usage.items())
        print(
            f"[{outcome.segments} segments, {outcome.completion_tokens} tokens, "
            f"finish={outcome.finish_reason}; segments won: {wins}]",
            file=sys.stderr,
        )
    finally:
        await fuser.close()
        await shutdown_models(models)
    return 0


async def _calibrate(config: AppConfig, args: argparse.Namespace) -> int:
    import datetime

    from fusion.calibration import MAX_QUESTIONS, SHOTS, calibrate, gsm8k_task, qa_task, to_yaml
    from server.engines import load_models, shutdown_models

    if args.task == "gsm8k" and not 1 <= args.questions <= MAX_QUESTIONS - SHOTS:
        print(f"fusion-server: --questions must be 1-{MAX_QUESTIONS - SHOTS}", file=sys.stderr)
        return 2
    if args.questions < 1:
        print("fusion-server: --questions must be at least 1", file=sys.stderr)
        return 2
    if args.max_tokens is not None and args.max_tokens < 1:
        print("fusion-server: --max-tokens must be at least 1", file=sys.stderr)
        return 2
    thresholds = [float(t) for t in args.gate_thresholds.split(",") if t.strip()]
    if not thresholds or not all(0 < t <= 1 for t in thresholds):
        print("fusion-server: --gate-thresholds must lie in (0, 1]", file=sys.stderr)
        return 2
    try:
        margins = [float(m) for m in args.leader_margins.split(",") if m.strip()]
    except ValueError:
        margins = [-1.0]
    if not all(m >= 0 for m in margins):
        print("fusion-server: --leader-margins must be numbers ≥ 0", file=sys.stderr)
        return 2
    votes = _vote_settings(args.vote_settings)
    if votes is None:
        print(
            "fusion-server: --vote-settings must be k/threshold/budget items, e.g. 4/0.75/8 "
            "(k 1-16, budget 1-64, threshold in (0, 1])",
            file=sys.stderr,
        )
        return 2
    if args.max_time_ratio is not None and not args.max_time_ratio >= 1:
        print("fusion-server: --max-time-ratio must be at least 1", file=sys.stderr)
        return 2
    if args.task == "gsm8k":
        task = gsm8k_task(args.questions, args.max_tokens)
    else:
        try:
            task = qa_task(args.data, args.questions, args.max_tokens)
        except (OSError, ValueError, KeyError) as exc:
            print(f"fusion-server: --data {args.data}: {exc}", file=sys.stderr)
            return 2
    models = await load_models(config)
    fuser = _fuser(config, models)
    try:
        rec, lines = await calibrate(
            fuser,
            [m.name for m in models],
            task,
            max_segment_tokens=config.fusion.max_segment_tokens,
            gate_thresholds=thresholds,
            leader_margins=margins,
            subsets=not args.no_subsets,
            max_time_ratio=args.max_time_ratio,
            vote_settings=votes,
            progress=lambda line: logging.getLogger("calibrate").info("%s", line),
        )
    finally:
        await fuser.close()
        await shutdown_models(models)
    print("\n".join(lines), file=sys.stderr)
    print("\nwhy:\n" + "\n".join(f"  {r}" for r in rec.reasons), file=sys.stderr)
    header = [
        f"fusion-server calibrate, {datetime.date.today()}: {task.source}, greedy, "
        f"max_tokens {task.max_tokens}",
        "calibration: a few hyper-parameters chosen on those questions; no weights trained",
    ]
    text = to_yaml(rec, header)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def _vote_settings(text: str) -> list[tuple[int, float, int]] | None:
    """``k/threshold/budget`` items (None when one is malformed or out of range)."""
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            k, threshold, budget = item.split("/")
            setting = (int(k), float(threshold), int(budget))
        except ValueError:
            return None
        # as VoteConfig takes them (a recommendation must load)
        if not (1 <= setting[0] <= 16 and 0 < setting[1] <= 1 and 1 <= setting[2] <= 64):
            return None
        out.append(setting)
    return out


def _prepare(config: AppConfig) -> int:
    from server.engine_registry import plan, prepare

    try:
        planned = plan(list(config.models))
    except SourceError as exc:
        print(f"fusion-server: {exc}", file=sys.stderr)
        return 1
    for p in planned:
        try:
            print(f"{p.config.name}: {prepare(p)}")
        except SourceError as exc:
            print(f"fusion-server: model {p.config.name}: {exc}", file=sys.stderr)
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        config = _load(args)
        if args.command == "generate":
            return asyncio.run(_generate(config, args))
        if args.command == "prepare":
            return _prepare(config)
        if args.command == "calibrate":
            return asyncio.run(_calibrate(config, args))
        from server.app import serve

        _check_sources(config)
        return serve(config)
    except ConfigError as exc:
        print(f"fusion-server: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
