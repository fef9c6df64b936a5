"""The report as a person sees it: opened from disk in real headless Chromium, with the network cut off.

Needs Debian's chromium (`apt-get install chromium`) and the playwright package (`effitune[test]`);
playwright's own browser download is never used. Missing either is a failure, not a skip: this is
the only test that proves the page renders.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_report import SECTIONS, trained_run

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return trained_run(tmp_path_factory) / "report" / "report.html"


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install -e '.[test]'` (it drives Debian's chromium; "
                    "never run `playwright install`).", pytrace=False)
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `apt-get install -y chromium`.", pytrace=False)
    return sync_playwright


def test_report_renders_offline_in_chromium(report):
    sync_playwright = _playwright()
    summary = json.loads((report.parent / "report.json").read_text())
    outside: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            context = browser.new_context(offline=True)
            context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                          else (outside.append(route.request.url), route.abort()))
            page = context.new_page()
            page.goto(report.as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "all => all.map(i => ({figure: i.dataset.figure, complete: i.complete, "
                       "width: i.naturalWidth, height: i.naturalHeight, shown: i.getBoundingClientRect().width}))")
            headings = {s: page.locator(f"section#{s} > h2").inner_text() for s in SECTIONS
                        if page.locator(f"section#{s} > h2").is_visible()}
            cards = page.locator("#summary .card").all_inner_texts()
            metrics_text = page.locator("#metrics").inner_text()
            audit_text = page.locator("#audit").inner_text()
            title = page.title()
        finally:
            browser.close()
    assert outside == []  # the page asked for nothing beyond its own file
    assert "effitune report" in title
    assert set(headings) == set(SECTIONS)
    assert len(images) == len(summary["figures"]) >= 5
    broken = [i for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0 and i["shown"] > 0)]
    assert broken == []
    assert {"curves", "confusion", "reliability", "splits"} <= {i["figure"] for i in images}
    assert any("accuracy" in card for card in cards)
    assert f"{summary['metrics']['accuracy']:.3f}" in cards[0]
    for name in ("blue", "green", "red", "Most confused pairs", "macro f1"):
        assert name in metrics_text
    for heading in ("Likely label errors", "Near duplicates", "Outliers", "Shortcut check"):
        assert heading in audit_text
