"""Grammar libraries for fused structured outputs: llguidance and xgrammar side by side on
the three default members' tokenizers, to choose one by measurement.

Per library x tokenizer: tokenizer-info build and JSON-schema compile; a walk over a valid
answer in that tokenizer's tokens (fill the bitmask, check the token is allowed, consume
it); rollback of k tokens and re-consume; a 5-token committed segment consumed at once (as
tokens, and as text); non-canonical tokenizations of the same answer (consumed? allowed by
the mask?); the longest valid prefix of byte strings; the accepting state; and masking
numpy float32 logits with the int32 bitmask. Library thread options are ``--threads``
(0: the libraries' defaults); OS threads are counted, including a compile's peak.

    .venv/bin/python bench/grammar_masks.py [--threads 1] [--repeats 5] [--plot masks.png]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

CACHE = Path("/root/.cache/fusion-server")
TOKENIZERS = ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}
ANSWER = '{"name": "Ada Lovelace", "age": 36, "city": "London", "tags": ["math", "poetry"]}'
CUT = ANSWER.index('"age"')
HALF, REST = ANSWER.encode()[:CUT], ANSWER.encode()[CUT:]
ZOE = '{"name": "Zoë'.encode()[:-1]  # ends inside a UTF-8 character
# (committed text, candidate bytes, the candidate's longest valid prefix)
CANDIDATES = [
    (b"", ANSWER.encode() + b" That is all.", ANSWER.encode()),
    (b"", b'{"name": "Ada", "age": "36"}', b'{"name": "Ada", "age": '),
    (b"", ZOE, ZOE),
    (b"", b'{"nam": 1}', b'{"nam'),
    (HALF, REST, REST),
    (HALF, b'"age": 36, "city": 5}', b'"age": 36, "city": '),
]


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def peak_threads(fn: Any) -> int:
    """Most OS threads seen while fn runs (not counting the sampling thread)."""
    peak, done = [threads()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], threads() - 1)
            time.sleep(0.0002)

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return peak[0]


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tokenizer_dir(name: str) -> Path:
    for root in ("tokenizers", "models"):
        if (CACHE / root / name / "tokenizer.json").exists():
            return CACHE / root / name
    raise SystemExit(f"no tokenizer.json for {name} under {CACHE}")


def model_vocab(name: str, fallback: int) -> int:
    """The logits width: the model's config vocab_size (Qwen's exceeds its tokenizer's)."""
    cfg = CACHE / "models" / name / "config.json"
    if not cfg.exists():
        return fallback
    c = json.loads(cfg.read_text())
    return int(c.get("vocab_size") or c.get("text_config", {}).get("vocab_size") or fallback)


def timed(fn: Any, *a: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    r = fn(*a)
    return r, time.perf_counter() - t0


def allowed(bm: Any, t: int) -> bool:
    return bool((int(bm[0, t >> 5]) >> (t & 31)) & 1)


class Llg:
    """llguidance: no compiled-grammar object; each LLMatcher compiles the grammar string."""

    name, prefix_how = "llguidance", "byte-level matcher"

    def __init__(self, threads: int | None, no_forcing: bool = False) -> None:
        import llguidance

        self.llg, self.no_forcing = llguidance, no_forcing
        self.name += " no_forcing" * no_forcing
        self.executor = llguidance.LLExecutor(num_threads=threads)  # batch fills only

    def build_info(self, hf: Any, vocab: int) -> None:
        import llguidance.hf

        self.tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
        self.byte_tok = self.llg.LLTokenizer("byte")  # token id == byte value

    def compile(self, schema: dict) -> Any:
        if self.no_forcing:  # the JSON schema inlined in Lark, to set the grammar option
            lark = '%llguidance {"no_forcing": true}\nstart: %json ' + json.dumps(schema)
            self.grammar = self.llg.LLMatcher.grammar_from_lark(lark)
        else:
            self.grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        m = self.new_matcher()
        if m.is_error():
            raise RuntimeError(m.get_error())
        return m

    def new_matcher(self) -> Any:
        return self.llg.LLMatcher(self.tok, self.grammar, log_level=0)

    def stop_tokens(self) -> list[int]:
        return list(self.tok.eos_tokens)

    def fill(self, m: Any, bm: Any) -> None:
        m.unsafe_compute_mask_ptr(bm.ctypes.data, bm.nbytes)

    def consume(self, m: Any, t: int) -> bool:
        return bool(m.consume_token(t))

    def consume_many(self, m: Any, toks: list[int]) -> bool:
        return bool(m.consume_tokens(toks))

    def consume_text(self, m: Any, text: bytes) -> bool:
        """LLMatcher takes no bytes: tokenize in this member's tokens, then consume."""
        return bool(m.consume_tokens(self.tok.tokenize_bytes(text)))

    def rollback(self, m: Any, k: int) -> None:
        assert m.rollback(k)

    def accepting(self, m: Any) -> bool:
        return bool(m.is_accepting())

    def fork(self, m: Any) -> Any:
        return m.deep_copy()

    def prefix_checker(self) -> Any:
        return self.llg.LLMatcher(self.byte_tok, self.grammar, log_level=0)

    def advance(self, m: Any, committed: bytes) -> None:
        assert m.consume_tokens(list(committed))

    def prefix_len(self, m: Any, data: bytes) -> int:
        return int(m.validate_tokens(list(data)))  # does not move the matcher


class Xgr:
    """xgrammar: a CompiledGrammar per (tokenizer, schema), a GrammarMatcher per sequence."""

    name, prefix_how = "xgrammar", "accept_string + rollback"

    def __init__(self, threads: int) -> None:
        import xgrammar

        self.xgr, self.threads = xgrammar, threads

    def build_info(self, hf: Any, vocab: int) -> None:
        self.info = self.xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
        # cache off: repeated compiles are measured, not looked up
        self.compiler = self.xgr.GrammarCompiler(
            self.info, max_threads=self.threads, cache_enabled=False
        )

    def compile(self, schema: dict) -> Any:
        self.compiled = self.compiler.compile_json_schema(schema)
        return self.new_matcher()

    def new_matcher(self) -> Any:
        return self.xgr.GrammarMatcher(self.compiled)

    def stop_tokens(self) -> list[int]:
        return list(self.info.stop_token_ids)

    def fill(self, m: Any, bm: Any) -> None:
        m.fill_next_token_bitmask(bm)  # a numpy array goes in through DLPack

    def consume(self, m: Any, t: int) -> bool:
        return bool(m.accept_token(t))

    def consume_many(self, m: Any, toks: list[int]) -> bool:
        return all(m.accept_token(t) for t in toks)

    def consume_text(self, m: Any, text: bytes) -> bool:
        return bool(m.accept_string(text))  # one rollback step for the whole string

    def rollback(self, m: Any, k: int) -> None:
        m.rollback(k)

    def accepting(self, m: Any) -> bool:
        return bool(m.is_completed())

    def fork(self, m: Any) -> Any:
        return m.fork()

    def prefix_checker(self) -> Any:
        return self.new_matcher()

    def advance(self, m: Any, committed: bytes) -> None:
        assert m.accept_string(committed)

    def prefix_len(self, m: Any, data: bytes) -> int:
        """Binary search; a refused accept_string leaves the matcher as it was."""
        lo, hi = 0, len(data)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if m.accept_string(data[:mid]):
                m.rollback(1)
                lo = mid
            else:
                hi = mid - 1
        return lo


def walk(lib: Any, ids: list[int], bm: Any, repeats: int) -> dict[str, Any]:
    """Fill, check, consume token by token; fill times over all repeats."""
    fills, per_step, masks = [], [0.0] * len(ids), []
    denied = early_accept = 0
    first = 0.0
    for r in range(repeats):
        m = lib.new_matcher()
        for i, t in enumerate(ids):
            _, dt = timed(lib.fill, m, bm)
            fills.append(dt)
            per_step[i] += dt / repeats
            if r == 0:
                first = first or dt  # the first mask of the first matcher: lazy set-up
                masks.append(bm.copy())
            denied += not allowed(bm, t)
            early_accept += i > 0 and lib.accepting(m)
            assert lib.consume(m, t), f"{lib.name}: token {i} refused"
        assert lib.accepting(m), f"{lib.name}: not accepting after the answer"
    fills.sort()
    return {
        "fill_med": statistics.median(fills) * 1e6,
        "fill_p90": fills[int(0.9 * len(fills))] * 1e6,
        "first_fill": first * 1e3,
        "denied": denied // repeats,
        "accepting_ok": early_accept == 0,
        "per_step": per_step,
        "masks": masks,
    }


def rollback_and_segments(lib: Any, ids: list[int], bm: Any, k: int, hf: Any, np: Any) -> dict:
    """Roll back k tokens at every position and re-consume (the mask must come back the
    same); consume 5-token segments at once, as tokens and as their text; fork."""
    m, masks = lib.new_matcher(), []
    for t in ids:
        lib.fill(m, bm)
        masks.append(bm.copy())
        lib.consume(m, t)
    rb, rc, same = [], [], True
    for end in range(len(ids), k - 1, -1):  # m holds ids[:end]
        rb.append(timed(lib.rollback, m, k)[1])
        lib.fill(m, bm)
        same &= bool(np.array_equal(bm, masks[end - k]))
        ok, dt = timed(lib.consume_many, m, ids[end - k : end])
        assert ok, f"{lib.name}: re-consume refused"
        rc.append(dt)
        lib.rollback(m, 1)
    seg, seg_text = [], []
    for start in range(0, len(ids) - 5, 5):
        m = lib.new_matcher()
        assert lib.consume_many(m, ids[:start])
        ok, dt = timed(lib.consume_many, m, ids[start : start + 5])
        assert ok, f"{lib.name}: segment refused"
        seg.append(dt)
        lib.rollback(m, 5)
        text = hf.decode(ids[start : start + 5], clean_up_tokenization_spaces=False).encode()
        ok, dt = timed(lib.consume_text, m, text)
        assert ok, f"{lib.name}: segment text refused"
        seg_text.append(dt)
    us = lambda xs: statistics.median(xs) * 1e6  # noqa: E731
    fork = timed(lib.fork, m)[1] * 1e6
    return {
        "rollback": us(rb),
        "reconsume": us(rc),
        "rollback_same_mask": same,
        "seg5": us(seg),
        "seg5_text": us(seg_text),
        "fork": fork,
    }


def tokenizations(hf: Any, text: str) -> dict[str, list[list[int]]]:
    """Non-canonical tokenizations: two pieces at every char boundary, and char by char."""
    enc = lambda s: hf.encode(s, add_special_tokens=False)  # noqa: E731
    same = lambda t: hf.decode(t, clean_up_tokenization_spaces=False) == text  # noqa: E731
    canon = enc(text)
    splits = [enc(text[:k]) + enc(text[k:]) for k in range(1, len(text))]
    chars = [[t for ch in text for t in enc(ch)]]
    return {
        "split": [t for t in splits if t != canon and same(t)],
        "chars": [t for t in chars if same(t)],
    }


def check_noncanonical(lib: Any, seqs: list[list[int]], bm: Any) -> tuple[int, int, int]:
    """(consumed to an accepting end, also every token allowed by the mask, of n)."""
    consumed = in_mask = 0
    for ids in seqs:
        m = lib.new_matcher()
        consumed += all(lib.consume(m, t) for t in ids) and lib.accepting(m)
        m, good = lib.new_matcher(), True
        for t in ids:
            lib.fill(m, bm)
            if not (allowed(bm, t) and lib.consume(m, t)):
                good = False
                break
        in_mask += good
    return consumed, in_mask, len(seqs)


def prefixes(lib: Any) -> tuple[bool, float, float]:
    """Longest valid prefix of each candidate after its committed text: all as expected?,
    median µs to advance the checker over the committed text, median µs to search."""
    ok, setup, search = True, [], []
    for committed, data, want in CANDIDATES:
        m = lib.prefix_checker()
        if committed:
            setup.append(timed(lib.advance, m, committed)[1])
        n, dt = timed(lib.prefix_len, m, data)
        search.append(dt)
        if data[:n] != want:
            ok = False
            print(f"  {lib.name}: {data!r} -> {data[:n]!r}, want {want!r}", file=sys.stderr)
    return ok, statistics.median(setup) * 1e6, statistics.median(search) * 1e6


def apply_bitmask_numpy(logits: Any, bitmask: Any, np: Any) -> None:
    """-inf where the int32 bitmask has a 0 bit; bit t&31 of word t>>5 is token t.

    On a little-endian host the words' bytes hold bits 0-7, 8-15, ..., so the uint8 view
    unpacked little-endian is in token order. Branch-free on the float bits (a dropped
    entry gets -inf's bits): the same cost whatever the mask, where ``np.copyto(where=)``
    is ~10x slower on a fragmented (random) mask and xgrammar's torch CPU kernel on a
    sparse one.
    """
    keep = np.unpackbits(bitmask.view(np.uint8), count=logits.shape[-1], bitorder="little")
    drop = keep.astype(np.uint32).reshape(logits.shape)
    drop -= np.uint32(1)  # 0 keep, 0xFFFFFFFF drop
    bits = logits.view(np.uint32)
    bits &= ~drop
    bits |= drop & np.uint32(0xFF800000)


def apply_copyto(logits: Any, bitmask: Any, np: Any) -> None:
    keep = np.unpackbits(bitmask.view(np.uint8), count=logits.shape[-1], bitorder="little")
    np.copyto(logits, np.float32(-np.inf), where=~keep.view(bool).reshape(logits.shape))


def apply_costs(vocab: int, masks: list, np: Any, reps: int = 30) -> dict[str, str]:
    """µs to mask one float32 logits row, on the walk's densest and sparsest masks."""
    import llguidance.numpy
    import torch
    import xgrammar

    counts = [int(np.unpackbits(m.view(np.uint8)).sum()) for m in masks]
    dense = masks[counts.index(max(counts))]
    sparse = masks[counts.index(min(c for c in counts if c > 1))]
    base = np.random.default_rng(0).standard_normal((1, vocab)).astype(np.float32)
    torch_apply = lambda x, bm: xgrammar.apply_token_bitmask_inplace(  # noqa: E731
        torch.from_numpy(x), torch.from_numpy(bm)
    )
    ways = {
        "numpy bit ops": lambda x, bm: apply_bitmask_numpy(x, bm, np),
        "numpy copyto where": lambda x, bm: apply_copyto(x, bm, np),
        "llguidance.numpy helper": llguidance.numpy.apply_token_bitmask_inplace,
        "xgrammar torch cpu": torch_apply,
    }
    out = {}
    for name, fn in ways.items():
        cells = []
        for bm in (dense, sparse):
            ref = base.copy()
            torch_apply(ref, bm)
            times = []
            for _ in range(reps):
                x = base.copy()
                times.append(timed(fn, x, bm)[1])
            assert np.array_equal(x, ref), f"{name} differs from xgrammar's kernel"
            cells.append(f"{statistics.median(times) * 1e6:.0f}")
        out[name] = " / ".join(cells)
    return out


def run_lib(lib: Any, hf: Any, vocab: int, ids: list[int], seqs: dict, args: Any, np: Any) -> dict:
    bm = np.full((1, (vocab + 31) // 32), -1, dtype=np.int32)
    row: dict[str, Any] = {"lib": lib.name, "prefix_how": lib.prefix_how}
    n_threads, rss0 = [threads()], rss_mb()
    row["info_ms"] = float("nan")  # the no_forcing row shares the default row's
    if not hasattr(lib, "tok"):
        row["info_ms"] = timed(lib.build_info, hf, vocab)[1] * 1e3
    n_threads.append(threads())
    row["compile_ms"] = timed(lib.compile, SCHEMA)[1] * 1e3
    row["recompile_ms"] = statistics.median(timed(lib.compile, SCHEMA)[1] for _ in range(3)) * 1e3
    row["matcher_ms"] = statistics.median(timed(lib.new_matcher)[1] for _ in range(5)) * 1e3
    n_threads.append(threads())
    row.update(walk(lib, ids, bm, args.repeats))
    row.update(rollback_and_segments(lib, ids, bm, args.k, hf, np))
    for kind, s in seqs.items():
        row[kind] = check_noncanonical(lib, s, bm)
    row["prefix_ok"], row["prefix_setup_us"], row["prefix_us"] = prefixes(lib)
    row["rss_mb"] = rss_mb() - rss0
    n_threads += [threads(), peak_threads(lambda: lib.compile(SCHEMA))]
    row["threads"] = "/".join(map(str, n_threads))
    row["stop"] = lib.stop_tokens()
    return row


def run_tokenizer(name: str, libs: list[Any], args: Any, np: Any) -> list[dict]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir(name)))
    vocab = model_vocab(name, len(hf))
    ids = hf.encode(ANSWER, add_special_tokens=False)
    assert hf.decode(ids) == ANSWER, f"{name}: the answer does not round-trip"
    seqs = tokenizations(hf, ANSWER)
    rows = []
    for lib in libs:
        if getattr(lib, "no_forcing", False):
            lib.tok, lib.byte_tok = libs[0].tok, libs[0].byte_tok
        print(f"  {name} / {lib.name} ...", file=sys.stderr, flush=True)
        rows.append(run_lib(lib, hf, vocab, ids, seqs, args, np))
        rows[-1].update(tok=name, vocab=vocab, n_tokens=len(ids))
    for lib in libs:  # per-tokenizer state goes before the next tokenizer
        for attr in ("tok", "byte_tok", "info", "compiler", "compiled", "grammar"):
            lib.__dict__.pop(attr, None)
    rows[0]["apply"] = apply_costs(vocab, rows[0]["masks"], np)
    special = [i for i, t in hf.added_tokens_decoder.items() if t.special]
    for r in rows:  # special tokens in the densest mask (inside a string), stop tokens aside
        dense = max(r["masks"], key=lambda m: int(np.unpackbits(m.view(np.uint8)).sum()))
        r["special"] = sum(allowed(dense, i) for i in special if i not in r["stop"])
    for r in rows:  # step by step, the same mask as the last library's?
        r["agree"] = sum(np.array_equal(a, b) for a, b in zip(r["masks"], rows[-1]["masks"]))
    return rows


def cell(x: Any) -> str:
    if isinstance(x, float):
        return "shared" if x != x else f"{x:.1f}"
    if isinstance(x, tuple):  # (consumed, allowed by mask, n)
        return f"{x[0]}/{x[2]}, {x[1]}/{x[2]}"
    return str(x)


def table(columns: list[tuple[str, Any]], rows: list[dict]) -> list[str]:
    out = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    return [*out, *("| " + " | ".join(cell(f(r)) for _, f in columns) + " |" for r in rows), ""]


def both(r: dict, i: int) -> str:
    """Non-canonical sequences, split and chars together: i=0 consumed, i=1 in the masks."""
    return f"{r['split'][i] + r['chars'][i]}/{r['split'][2] + r['chars'][2]}"


def yes(ok: bool, how: str = "") -> str:
    return ("yes" + how) if ok else "WRONG"


MAIN = [
    ("library", lambda r: r["lib"]),
    ("tokenizer", lambda r: r["tok"]),
    ("logits vocab", lambda r: r["vocab"]),
    ("tokenizer info ms", lambda r: r["info_ms"]),
    ("compile ms", lambda r: r["compile_ms"]),
    ("mask fill median µs", lambda r: r["fill_med"]),
    ("p90 µs", lambda r: r["fill_p90"]),
    ("apply to numpy logits µs, dense / sparse mask", lambda r: r["apply_us"]),
    ("non-canonical consumed", lambda r: both(r, 0)),
    ("non-canonical allowed by mask", lambda r: both(r, 1)),
    ("special tokens allowed in a string", lambda r: r["special"]),
    ("rollback", lambda r: yes(r["rollback_same_mask"])),
    ("valid-prefix check", lambda r: yes(r["prefix_ok"], ", " + r["prefix_how"])),
    ("accepting state", lambda r: yes(r["accepting_ok"])),
]
DETAIL = [
    ("library", lambda r: r["lib"]),
    ("tokenizer", lambda r: r["tok"]),
    ("recompile ms", lambda r: r["recompile_ms"]),
    ("new matcher ms", lambda r: r["matcher_ms"]),
    ("first mask ms", lambda r: r["first_fill"]),
    ("answer tokens", lambda r: r["n_tokens"]),
    ("canonical denied", lambda r: r["denied"]),
    ("split: consumed, in mask", lambda r: r["split"]),
    ("chars: consumed, in mask", lambda r: r["chars"]),
    ("masks equal to the last row's", lambda r: f"{r['agree']}/{r['n_tokens']}"),
    ("rollback k µs", lambda r: r["rollback"]),
    ("re-consume k µs", lambda r: r["reconsume"]),
    ("consume 5 tokens µs", lambda r: r["seg5"]),
    ("consume 5-token text µs", lambda r: r["seg5_text"]),
    ("fork µs", lambda r: r["fork"]),
    (f"advance prefix checker {CUT} bytes µs", lambda r: r["prefix_setup_us"]),
    ("longest valid prefix µs", lambda r: r["prefix_us"]),
    ("RSS +MB", lambda r: r["rss_mb"]),
    ("stop tokens", lambda r: r["stop"]),
    ("OS threads start/info/compile/walk/compile peak", lambda r: r["threads"]),
]
NOTES = """Non-canonical: the answer tokenized as two pieces at each char boundary where that
differs from its canonical tokens (split), and char by char (chars). Consumed: every
token accepted and the matcher accepting at the end; in mask: also in each step's mask.
Special tokens: the tokenizer's special added tokens (stop tokens aside) allowed by the
mask inside a JSON string. RSS +MB: indicative only (freed memory is reused by later rows;
run one --tokenizers/--libs alone for a clean figure).
"""


def report(rows: list[dict], command: str, env: str) -> str:
    apply = {r["tok"]: r["apply"] for r in rows if "apply" in r}
    for r in rows:
        r["apply_us"] = apply[r["tok"]]["numpy bit ops"]
    ways = [(f"{w} µs", lambda a, w=w: a[w]) for w in next(iter(apply.values()))]
    vocab = {r["tok"]: r["vocab"] for r in rows}
    apply_rows = [{"tok": t, "vocab": vocab[t], **a} for t, a in apply.items()]
    return "\n".join(
        [
            f"Command: `{command}`",
            "",
            env,
            "",
            *table(MAIN, rows),
            NOTES,
            *table(DETAIL, rows),
            *table(
                [("tokenizer", lambda a: a["tok"]), ("logits vocab", lambda a: a["vocab"]), *ways],
                apply_rows,
            ),
            "Apply: one float32 logits row, the walk's densest / sparsest mask, same result.",
        ]
    )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    toks = list(dict.fromkeys(r["tok"] for r in rows))
    fig, axes = plt.subplots(len(toks), 1, figsize=(9, 3 * len(toks)), squeeze=False)
    for ax, tok in zip(axes[:, 0], toks):
        for r in (r for r in rows if r["tok"] == tok):
            ax.plot([x * 1e6 for x in r["per_step"]], marker=".", label=r["lib"])
        ax.set(title=tok, xlabel="answer token", ylabel="mask fill µs", yscale="log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="library thread options (0: defaults)")
    ap.add_argument("--repeats", type=int, default=5, help="walks per library x tokenizer")
    ap.add_argument("--k", type=int, default=3, help="tokens to roll back")
    ap.add_argument("--tokenizers", type=lambda s: s.split(","), default=TOKENIZERS)
    ap.add_argument("--libs", type=lambda s: s.split(","), default=["llg", "llg-noforce", "xgr"])
    ap.add_argument("--plot", type=Path, help="write per-token mask fill times here (PNG)")
    args = ap.parse_args()
    if args.threads:  # before any pool starts
        for var in ("RAYON_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    t0 = threads()
    from importlib.metadata import version

    import llguidance
    import numpy as np
    import torch
    import xgrammar  # noqa: F401  (imports torch itself)

    if args.threads:
        torch.set_num_threads(args.threads)
    assert sys.byteorder == "little", "apply_bitmask_numpy assumes a little-endian host"
    n = args.threads or None  # None: each library's default
    make = {
        "llg": lambda: Llg(n),
        "llg-noforce": lambda: Llg(n, no_forcing=True),
        "xgr": lambda: Xgr(n or 8),
    }
    libs = [make[x]() for x in args.libs]
    env = (
        f"llguidance {llguidance.__version__}, xgrammar {version('xgrammar')}, "
        f"transformers {version('transformers')}, numpy {np.__version__}, torch "
        f"{torch.__version__}; {os.cpu_count()} CPUs; OS threads {t0} before imports, "
        f"{threads()} after"
    )
    rows = []
    for name in args.tokenizers:
        rows += run_tokenizer(name, libs, args, np)
    print(report(rows, " ".join(["bench/grammar_masks.py", *sys.argv[1:]]), env))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
