"""The playground in a real headless Chromium (Debian's, driven by Playwright) against
`fusion-server serve` with the three real default models and an API key, on loopback."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.processes import free_port, launch

pytestmark = pytest.mark.integration
KEY = "playground-test-key"
SOURCES = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def server_url(model_dirs) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "FUSION_API_KEY": KEY, "FUSION_SERVER__MAX_CONCURRENT": "2"}
    proc, url = launch(
        ["server", "serve", "--config", "config.yaml", "--port", str(port)], port, env=env
    )
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server_url) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(f"{server_url}/playground")
    try:
        yield page
    finally:
        context.close()


# Records, for every segment span added to an answer, when it came and whether that
# answer was still being written: proof that segments stream in rather than land at once.
WATCH = """() => {
  window.__arrivals = [];
  new MutationObserver((muts) => {
    for (const m of muts) for (const n of m.addedNodes) {
      if (n.classList && n.classList.contains('seg')) {
        const box = n.closest('.answer');
        window.__arrivals.push({t: performance.now(), state: box.dataset.state,
                                fused: box.classList.contains('fused')});
      }
    }
  }).observe(document.querySelector('#conversation'), {childList: true, subtree: true});
}"""


def unlock(page) -> None:
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")  # the change event reloads the models with the key
    page.wait_for_function("document.querySelectorAll('#sources input').length === 3")


def ask(page, text: str, max_tokens: int = 40) -> None:
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_selector(".answer[data-state=done]", timeout=240_000)


def test_streams_a_fused_answer_coloured_by_winner_and_opens_its_candidates(page):
    # without the key the page says so, instead of failing silently
    page.wait_for_function("document.querySelector('#status').textContent.includes('API key')")
    assert page.locator("#sources input").count() == 0
    unlock(page)
    assert page.locator("#sources input").evaluate_all("ns => ns.map(n => n.value)") == SOURCES
    page.evaluate(WATCH)

    ask(page, "Explain in two sentences why the sky is blue.")

    arrivals = page.evaluate("window.__arrivals")
    assert len(arrivals) >= 3
    assert all(a["fused"] for a in arrivals)
    assert arrivals[0]["state"] == "streaming"  # the first segment showed before the end
    assert arrivals[-1]["t"] - arrivals[0]["t"] > 100  # they came over time, not in one go
    segs = page.locator(".answer.fused .seg")
    n = segs.count()
    assert n == len(arrivals)
    winners = segs.evaluate_all("ns => ns.map(n => n.dataset.winner)")
    assert set(winners) <= set(SOURCES)
    # each segment is painted in its winner's legend colour
    colours = segs.evaluate_all("ns => ns.map(n => getComputedStyle(n).borderBottomColor)")
    legend = page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('#legend li')].map(li =>
             [li.dataset.model, getComputedStyle(li.querySelector('.swatch')).backgroundColor]))"""
    )
    assert colours == [legend[w] for w in winners]
    assert len(set(legend[s] for s in SOURCES)) == 3
    # legend counts add up to the segments shown
    counts = page.locator("#legend .count").evaluate_all("ns => ns.map(n => +n.textContent)")
    assert sum(counts) == n
    text = page.locator(".answer.fused .text").inner_text()
    assert text.strip() and "".join(segs.all_inner_texts()).strip() == text.strip()

    # clicking a fused segment shows every candidate with each model's perplexity (the
    # default gate lets Qwen write alone where it is sure: those have one scorer)
    fused = page.locator(".answer.fused .seg[data-step=fused]")
    assert fused.count() >= 1
    fused.nth(0).click()
    table = page.locator("#candidates")
    table.wait_for()
    headers = table.locator("th").all_inner_texts()
    assert [h for h in headers if h in ("smollm2", "gemma3", "qwen2.5")] == [
        "smollm2",
        "gemma3",
        "qwen2.5",
    ]
    rows = table.locator("tbody tr")
    assert rows.count() >= 1
    assert table.locator("tr.winner").count() == 1
    # the last column is the rule's score: the lowest among the candidates no filter
    # excluded (the default's consensus may exclude one) won
    scores = table.locator("tbody tr:not(.excluded) td:last-child").all_inner_texts()
    winner_score = table.locator("tr.winner td:last-child").inner_text()
    finite = [float(m) for m in scores if m != "∞"]
    assert float(winner_score) == min(finite)

    # per-model statistics from the server fill the table after the answer
    page.wait_for_function("document.querySelectorAll('#stats tbody tr').length === 3")
    shares = page.locator("#stats tbody td:nth-child(2)").all_inner_texts()
    assert any(s != "0%" for s in shares)
    shot = os.environ.get("PLAYGROUND_SCREENSHOT")
    if shot:
        page.screenshot(path=str(Path(shot)), full_page=False)


def test_compares_a_two_model_fusion_with_one_source_side_by_side(page):
    unlock(page)
    page.uncheck("#sources input[value='gemma3-270m']")
    page.select_option("#compare", "qwen2.5-0.5b")
    ask(page, "Name three colours.", max_tokens=24)
    page.wait_for_function("document.querySelectorAll('.answer[data-state=done]').length === 2")
    fused, single = page.locator(".answer.fused"), page.locator(".answer.single")
    assert "smollm2-135m + qwen2.5-0.5b" in fused.locator("h3").inner_text()
    assert single.locator("h3").inner_text().startswith("qwen2.5-0.5b alone")
    assert single.locator(".text").inner_text().strip()
    winners = fused.locator(".seg").evaluate_all("ns => ns.map(n => n.dataset.winner)")
    assert winners and set(winners) <= {"smollm2-135m", "qwen2.5-0.5b"}
    assert set(single.locator(".seg").evaluate_all("ns => ns.map(n => n.dataset.winner)")) == {
        "qwen2.5-0.5b"
    }


def test_gate_rule_marks_gated_segments_and_counts_them_per_policy(page):
    unlock(page)
    page.select_option("#rule", "gate")
    page.select_option("#leader", "qwen2.5-0.5b")
    ask(page, "What is 12 times 7? Answer briefly.", max_tokens=16)
    fused = page.locator(".answer.fused")
    assert "gate" in fused.locator("h3").inner_text()
    steps = fused.locator(".seg").evaluate_all("ns => ns.map(n => n.dataset.step)")
    assert steps and set(steps) <= {"gated", "fused"} and "gated" in steps
    gated = fused.locator(".seg.gated")
    # a gated segment is the leader's alone, underlined with dashes, one candidate
    assert gated.first.get_attribute("data-winner") == "qwen2.5-0.5b"
    assert gated.first.evaluate("n => getComputedStyle(n).borderBottomStyle") == "dashed"
    gated.first.click()
    page.locator("#candidates").wait_for()
    assert "gated" in page.locator("#details p").first.inner_text()
    assert page.locator("#candidates tbody tr").count() == 1
    page.wait_for_function(
        "[...document.querySelectorAll('#policies li')]"
        ".some(li => li.textContent.startsWith('gate:'))"
    )
    # the statistics table shows all four columns inside its panel
    fits = page.evaluate(
        """() => { const t = document.querySelector('#stats table');
                   const p = document.querySelector('#settings');
                   return t.getBoundingClientRect().right <= p.getBoundingClientRect().right; }"""
    )
    assert fits
