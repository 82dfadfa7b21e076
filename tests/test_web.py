"""The node's web page in a real headless Chromium (Debian's `chromium`, driven by playwright-python)."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.nodes import SMOLLM2_ID, RunningNode, start_node

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright-python is not installed (pip install playwright)")
expect = sync_api.expect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"
WAIT_MS = 20_000  # every wait in the page is bounded by this, or by ANSWER_WAIT_MS for a generation
ANSWER_WAIT_MS = 90_000
HTTP_TIMEOUT_S = 10

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)"),
]


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    running = start_node(tmp_path_factory.mktemp("web"), "--model", "smollm2-135m")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    playwright = sync_api.sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=WAIT_MS)
        yield chromium
        chromium.close()
    finally:
        playwright.stop()


def _new_page(browser: Any, **context_args: Any) -> tuple[Any, Any, list[str]]:
    context = browser.new_context(**context_args)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return context, page, errors


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A desktop-sized page; any uncaught script error fails the test."""
    context, page, errors = _new_page(browser, viewport={"width": 1100, "height": 820})
    yield page
    context.close()
    assert not errors, f"script errors in the page: {errors}"


# ---- helpers ----------------------------------------------------------------------------------


def _shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _sse_chunks(body: str) -> list[dict[str, Any]]:
    payloads = [line[5:].strip() for line in body.splitlines() if line.startswith("data:")]
    return [json.loads(p) for p in payloads if p != "[DONE]"]


def _decision_id(chunks: list[dict[str, Any]]) -> str | None:
    for chunk in chunks:
        meta = chunk.get("expertmesh") or {}
        decision_id = meta.get("decision_id") or chunk.get("decision_id")
        if decision_id:
            return decision_id
    return None


def _ask(page: Any, question: str) -> Any:
    """Type a question and send it with Enter; the answer's element."""
    page.locator("#prompt").fill(question)
    page.locator("#prompt").press("Enter")
    return page.locator("article.answer").last


def _no_horizontal_scroll(page: Any) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


# Payloads in the documented shapes of /v1/experts and /v1/router/stats, for drawing checks.
NOW_MS = int(time.time() * 1000)
FAKE_EXPERTS = {
    "object": "list",
    "data": [
        {
            "id": SMOLLM2_ID, "node": "NODEAAAAAAAAAAAAAAAA", "local": True, "queue_depth": 1,
            "cards": [
                {"judge": "NODEAAAAAAAAAAAAAAAA", "issued_ms": NOW_MS - 3_600_000, "scores": {
                    "arithmetic": {"mean": 0.31, "ci_low": 0.2, "ci_high": 0.44, "n": 40},
                    "knowledge": {"mean": 0.62, "ci_low": 0.5, "ci_high": 0.72, "n": 40},
                    "translation": {"mean": 0.45, "ci_low": 0.33, "ci_high": 0.58, "n": 40}}},
                {"judge": "NODEBBBBBBBBBBBBBBBB", "issued_ms": NOW_MS - 600_000, "scores": {
                    "arithmetic": {"mean": 0.28, "ci_low": 0.17, "ci_high": 0.41, "n": 40},
                    "knowledge": {"mean": 0.66, "ci_low": 0.54, "ci_high": 0.76, "n": 40}}},
            ],
            "flags": [],
        },
        {
            "id": "gemma3-270m@a5fd3b62230a", "node": "NODEBBBBBBBBBBBBBBBB", "local": False, "queue_depth": 0,
            "cards": [],
            "flags": ["scores disagree with independent judges (knowledge: 0.91 claimed, 0.40 measured)"],
        },
    ],
}
FAKE_STATS = {
    "reward_over_time": [
        {"t_ms": NOW_MS - (5 - i) * 600_000, "reward": r, "n": n}
        for i, (r, n) in enumerate([(0.4, 3), (0.5, 6), (0.55, 9), (0.7, 12), (0.75, 15)])
    ],
    "share_by_expert": {SMOLLM2_ID: 31, "gemma3-270m@a5fd3b62230a": 14},
    "share_by_task": {
        "knowledge": {SMOLLM2_ID: 12, "gemma3-270m@a5fd3b62230a": 3},
        "arithmetic": {SMOLLM2_ID: 4, "gemma3-270m@a5fd3b62230a": 9},
        "chat": {SMOLLM2_ID: 15, "gemma3-270m@a5fd3b62230a": 2},
    },
}


def _serve_fakes(page: Any) -> None:
    for path, payload in (("/v1/experts", FAKE_EXPERTS), ("/v1/router/stats", FAKE_STATS)):
        page.route(f"**{path}", lambda route, _request, body=payload: route.fulfill(json=body))


# ---- tests ------------------------------------------------------------------------------------


def test_page_and_its_files_are_served_with_their_types(web_node: RunningNode) -> None:
    status, headers, body = _get(web_node.url + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'src="/web/app.js"' in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for name, content_type in (("app.js", "text/javascript"), ("style.css", "text/css"), ("icon.svg", "image/svg+xml")):
        status, headers, _ = _get(f"{web_node.url}/web/{name}")
        assert (status, headers["Content-Type"].split(";")[0]) == (200, content_type), name
    # No listing, nothing outside node/http/web/, no hidden or unknown kinds of file.
    for path in ("/web/", "/web/nope.js", "/web/..%2fweb_routes.py", "/web/%2e%2e%2fapi.py", "/web/.hidden.js", "/web/index.py"):
        status, _, body = _get(web_node.url + path)
        assert status == 404, path
        assert b"def " not in body, path


def test_ask_with_auto_streams_the_answer_names_the_expert_and_takes_a_rating(page: Any, web_node: RunningNode) -> None:
    page.goto(web_node.url + "/")
    expect(page.locator("#model option").first).to_have_attribute("value", "auto")
    expect(page.locator(f'#model option[value="{SMOLLM2_ID}"]')).to_have_count(1)
    expect(page.locator("#node-id")).to_contain_text(web_node.node_id)
    expect(page.locator("#prompt")).to_be_focused()
    _shot(page, "01-chat-start")

    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions"), timeout=ANSWER_WAIT_MS) as info:
        answer = _ask(page, "What is the capital of France? Answer in one word.")
    expect(answer).to_have_attribute("data-state", "done", timeout=ANSWER_WAIT_MS)
    assert answer.locator(".text").inner_text().strip()
    expect(answer.locator(".who")).to_contain_text("smollm2-135m")
    expect(answer).to_have_attribute("data-expert", SMOLLM2_ID)
    expect(answer).to_have_attribute("data-node", web_node.node_id)
    expect(answer.locator(".error")).to_be_hidden()
    expect(page.locator("#send")).to_have_text("Send")
    _shot(page, "02-chat-answer")

    decision_id = _decision_id(_sse_chunks(info.value.text()))
    thumbs = answer.locator("button.thumb")
    if decision_id is None:  # nothing was routed, so there is nothing to rate
        expect(thumbs).to_have_count(0)
        expect(answer.locator(".foot")).to_be_hidden()
        return
    answer.locator("details.why summary").click()
    expect(answer.locator("details.why .why-body")).to_be_visible()
    answer.get_by_role("button", name="Good answer").click()
    expect(answer.locator(".feedback-status")).to_contain_text("recorded")
    for i in range(2):
        expect(thumbs.nth(i)).to_be_disabled()
    _shot(page, "03-chat-rated")
    status, _, body = _get(f"{web_node.url}/v1/decisions/{decision_id}")
    assert status == 200 and json.loads(body)["reward"] == 1.0


def test_an_api_error_is_shown_in_the_page(page: Any, web_node: RunningNode) -> None:
    page.goto(web_node.url + "/")
    expect(page.locator(f'#model option[value="{SMOLLM2_ID}"]')).to_have_count(1)
    page.evaluate(
        """() => {
            const select = document.getElementById("model");
            select.add(new Option("no-such-expert", "no-such-expert@000000000000"));
            select.value = "no-such-expert@000000000000";
        }"""
    )
    answer = _ask(page, "Hello?")
    expect(answer).to_have_attribute("data-state", "error")
    expect(answer.locator(".error")).to_contain_text("'no-such-expert@000000000000' does not exist")
    expect(answer.locator("button.thumb")).to_have_count(0)
    _shot(page, "04-chat-error")


def test_network_and_learning_views_show_this_node(page: Any, web_node: RunningNode) -> None:
    page.goto(web_node.url + "/")
    # Keyboard only: the tabs follow the arrow keys.
    page.locator("#tab-chat").focus()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-network")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#tab-network")).to_be_focused()
    expect(page.locator("#view-network")).to_be_visible()
    expect(page.locator("#view-chat")).to_be_hidden()
    expect(page.locator("#peers-summary")).to_contain_text(web_node.node_id)
    expect(page.locator("#peers-empty")).to_contain_text("No peers yet")
    if _get(web_node.url + "/v1/experts")[0] == 404:
        expect(page.locator("#experts-empty")).to_have_text("Expert profiles are not available on this node.")
    else:
        expect(page.locator(f'#experts .card[data-expert="{SMOLLM2_ID}"]')).to_have_count(1)
    expect(page.locator("#peers-error")).to_be_hidden()
    _shot(page, "05-network")

    page.keyboard.press("ArrowRight")
    expect(page.locator("#view-learning")).to_be_visible()
    assert page.url.endswith("#learning")
    if _get(web_node.url + "/v1/router/stats")[0] == 404:
        expect(page.locator("#learning-empty")).to_contain_text("No routing data yet")
    else:
        expect(page.locator("#learning-error")).to_be_hidden()
        expect(page.locator("#learning-updated")).to_contain_text("Updated")
    _shot(page, "06-learning")


def test_charts_draw_the_documented_shapes(page: Any, web_node: RunningNode) -> None:
    """Judged scores, load and the router's statistics as SVG, from payloads in the documented shapes."""
    _serve_fakes(page)
    page.goto(web_node.url + "/#network")
    smollm2 = page.locator(f'#experts .card[data-expert="{SMOLLM2_ID}"]')
    expect(smollm2.locator("svg.chart")).to_have_count(1)
    expect(smollm2.locator(".legend span")).to_have_count(2)  # one series per judge
    expect(smollm2.locator(".load")).to_contain_text("1 in queue")
    expect(smollm2.locator("svg.chart text", has_text="knowledge")).to_have_count(1)
    gemma = page.locator('#experts .card[data-expert="gemma3-270m@a5fd3b62230a"]')
    expect(gemma).to_contain_text("Not judged yet")
    expect(gemma.locator(".flags li")).to_contain_text("scores disagree")
    _shot(page, "07-network-charts")

    page.locator("#tab-learning").click()
    expect(page.locator("#chart-reward circle.dot")).to_have_count(5)
    expect(page.locator("#chart-reward path.line")).to_have_count(1)
    expect(page.locator("#chart-share svg text", has_text="31 · 69%")).to_have_count(1)
    expect(page.locator("#chart-tasks svg rect[fill]")).to_have_count(6)  # 3 tasks x 2 experts
    expect(page.locator("#learning-empty")).to_be_hidden()
    _shot(page, "08-learning-charts")


def test_the_page_fits_a_phone(browser: Any, web_node: RunningNode) -> None:
    context, page, errors = _new_page(
        browser, viewport={"width": 375, "height": 740}, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    try:
        _serve_fakes(page)
        page.goto(web_node.url + "/")
        expect(page.locator(f'#model option[value="{SMOLLM2_ID}"]')).to_have_count(1)
        answer = _ask(page, "Name a fruit.")
        expect(answer).to_have_attribute("data-state", "done", timeout=ANSWER_WAIT_MS)
        expect(page.locator("#send")).to_be_in_viewport()
        assert _no_horizontal_scroll(page)
        _shot(page, "09-phone-chat")
        for tab, ready in (("network", "#experts svg.chart"), ("learning", "#chart-tasks svg")):
            page.locator(f"#tab-{tab}").tap()
            expect(page.locator(ready).first).to_be_visible()
            assert _no_horizontal_scroll(page), tab
            _shot(page, f"10-phone-{tab}")
    finally:
        context.close()
    assert not errors, f"script errors in the page: {errors}"


def test_the_page_asks_for_the_api_key_when_the_node_wants_one(browser: Any, tmp_path) -> None:
    node = start_node(tmp_path / "keyed", "--model", "smollm2-135m", "--api-key", "page-key")
    context, page, errors = _new_page(browser)
    try:
        page.on("dialog", lambda dialog: dialog.accept("page-key"))
        page.goto(node.url + "/", wait_until="domcontentloaded")
        page.locator("#model option").nth(1).wait_for(state="attached")  # the models loaded with the key
        assert page.evaluate("window.localStorage.getItem('expertmesh.apiKey')") == "page-key"
        assert not errors
    finally:
        context.close()
        node.stop()
