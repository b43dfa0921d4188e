"""The page in real headless Chromium (Debian's package, driven by Playwright's Python API): ask for a
user, read the titles shown, click "watched", see the list change. Saves a screenshot of the page."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# Set to a path to regenerate the README's screenshot (the synthetic version, never MovieLens).
SCREENSHOT_ENV = "RECSYS_GATEWAY_SCREENSHOT"


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                              args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield launched
        launched.close()


def _titles(page) -> list[str]:
    return page.locator("#recommendations tbody td.title").all_inner_texts()


def test_page_shows_titles_and_watched_changes_the_list(stack, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    external: list[str] = []
    page.on("request", lambda request: external.append(request.url)
            if not request.url.startswith(stack.base_url) else None)
    page.goto(f"{stack.base_url}/")
    page.fill("#user", "5")
    page.click("#go")
    page.wait_for_selector("#recommendations tbody tr")
    titles = _titles(page)
    assert len(titles) == 10 and all(t.startswith("Synthetic Movie ") for t in titles), titles
    assert page.locator("#history li .title").count() == 10
    assert page.inner_text("#ranking-version") == "1"
    assert float(page.inner_text("#latency")) > 0

    first = page.locator("#recommendations tbody tr").first
    watched_id, watched_title = first.get_attribute("data-item-id"), titles[0]
    first.get_by_role("button", name="watched").click()
    page.wait_for_function("id => !document.querySelector(`#recommendations tbody tr[data-item-id='${id}']`)",
                           arg=watched_id)
    assert watched_title not in _titles(page)
    newest = page.locator("#history li").first
    assert newest.get_attribute("data-item-id") == watched_id and "just recorded" in newest.inner_text()
    assert external == []          # no CDN, no third-party fetch

    page.screenshot(path=str(tmp_path / "gateway.png"), full_page=True)
    assert (tmp_path / "gateway.png").stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copyfile(tmp_path / "gateway.png", os.environ[SCREENSHOT_ENV])
    page.close()


def test_page_shows_the_problem_for_a_bad_user(stack, browser):
    page = browser.new_page()
    page.goto(f"{stack.base_url}/")
    page.fill("#user", "a{b")
    page.click("#go")
    page.wait_for_selector("#status.error")
    assert "400" in page.inner_text("#status") and "user_id" in page.inner_text("#status")
    page.close()
