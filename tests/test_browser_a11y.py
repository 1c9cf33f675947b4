"""Accessibility of the page's main views (issue 12): axe-core (npm ``axe-core``, pinned in
package.json and package-lock.json, installed by ``npm ci``) injected into headless
Chromium (Debian's /usr/bin/chromium) driven by Playwright against a real server, finds
no ``serious`` or ``critical`` violation in any of them, light and dark, desktop and phone.

The views: the sign-in form (household mode: accounts exist), the empty state after a
parent signs in, a conversation with a finished streamed Markdown reply (list, table,
code block with its Copy button, link), that conversation's replay, and a child's
conversation the parent reads (read-only: its row marked with the child's name, the
composer disabled).

axe goes in without loosening the page's CSP (``default-src 'self'``, no inline script):
``page.add_script_tag`` inserts an inline ``<script>`` (the CSP blocks it) but
``page.evaluate`` of a *function* whose body is axe's source is compiled by the DevTools
protocol (``Runtime.callFunctionOn``), not by the page, so the CSP stays on while axe runs
and the page is checked as users get it (no ``bypass_csp``)."""

from __future__ import annotations

import functools
import json
import os
import re
import time
import urllib.request
from pathlib import Path

import pytest

from chatledger.server.sessions import COOKIE

from .conftest import CHROMIUM, add_account
from .test_browser_markdown import MARKDOWN, ScriptedProvider, serve_in_thread

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium"),
]

ROOT = Path(__file__).resolve().parent.parent
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
BLOCKING = ("serious", "critical")
"""The impacts that fail the test (axe's others: ``minor``, ``moderate``)."""

VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 800}}

# axe.run over the whole document, violations only, reduced to what a report needs
RUN_AXE = """async () => {
  const results = await window.axe.run(document, { resultTypes: ["violations"] });
  return results.violations.map((v) => ({
    id: v.id, impact: v.impact, help: v.help, helpUrl: v.helpUrl,
    nodes: v.nodes.map((n) => ({
      impact: n.impact, target: n.target.join(" "), html: n.html, summary: n.failureSummary,
    })),
  }));
}"""


@functools.cache
def axe_source() -> str:
    """axe-core's browser build. Fails (never skips) without it, as tests/test_fold.py
    does without Node.js: CI installs both (``.ci/run``)."""
    if not AXE.is_file():
        pytest.fail(
            f"{AXE.relative_to(ROOT)} is missing: run `npm ci` in {ROOT} (package.json pins"
            " axe-core; npm: Debian's `npm` package)",
            pytrace=False,
        )
    return AXE.read_text(encoding="utf-8")


def blocking(violations: list[dict]) -> list[dict]:
    """The violations with at least one node of a :data:`BLOCKING` impact, only those nodes."""
    found = []
    for violation in violations:
        nodes = [n for n in violation["nodes"] if (n["impact"] or violation["impact"]) in BLOCKING]
        if nodes:
            found.append({**violation, "nodes": nodes})
    return found


def report(view: str, violations: list[dict]) -> str:
    """``violations`` as lines a person reads: rule, impact, help, then each element."""
    lines = [f"{view}: {len(violations)} serious or critical axe violation(s)"]
    for violation in violations:
        lines.append(
            f"- {violation['id']} ({violation['impact']}): {violation['help']}"
            f" <{violation['helpUrl']}>"
        )
        for node in violation["nodes"]:
            lines.append(f"    {node['target']}: {node['html'][:200]}")
            for summary in (node["summary"] or "").splitlines():
                lines.append(f"      {summary}")
    return "\n".join(lines)


def check(page, view: str) -> list[dict]:
    """Inject axe (once per document), run it, fail on a serious or critical violation;
    returns every violation found (of any impact)."""
    if not page.evaluate("() => typeof window.axe === 'object'"):
        # a function whose body is axe, not an inline <script>: see the module docstring
        page.evaluate("() => {\n" + axe_source() + "\n}")
        assert page.evaluate("() => typeof window.axe?.run === 'function'"), "axe did not load"
    violations = page.evaluate(RUN_AXE)
    bad = blocking(violations)
    if bad:
        pytest.fail(report(view, bad), pytrace=False)
    for violation in violations:  # the minor and moderate ones: shown (-s), not failed
        print(f"{view}: {violation['id']} ({violation['impact']}) x{len(violation['nodes'])}")
    return violations


def post(url: str, path: str, body: dict, cookie: str | None = None):
    """``POST`` JSON as the page would (same origin); returns the answer's body and its
    session cookie, if it set one."""
    headers = {"Content-Type": "application/json", "Origin": url}
    if cookie:
        headers["Cookie"] = f"{COOKIE}={cookie}"
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        set_cookie = response.headers.get("Set-Cookie", "")
        cookie = set_cookie.split(";", 1)[0].split("=", 1)[1] if set_cookie else None
        return json.load(response), cookie


def child_conversation(url: str) -> str:
    """Sam (a child) signs in and asks something; returns the conversation's id once its
    reply has ended."""
    _, cookie = post(url, "/api/login", {"name": "Sam", "password": PASSWORD})
    (conversation, _) = post(url, "/api/conversations", {}, cookie)
    path = f"/api/conversations/{conversation['id']}"
    post(url, f"{path}/messages", {"text": "homework: fractions"}, cookie)
    deadline = time.monotonic() + 30
    while True:
        request = urllib.request.Request(url + path, headers={"Cookie": f"{COOKIE}={cookie}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            if json.load(response)["running"] is None:
                return conversation["id"]
        assert time.monotonic() < deadline, "Sam's reply did not end"
        time.sleep(0.05)


PASSWORD = "password-1"  # add_account's default


@pytest.fixture(scope="module")
def household(tmp_path_factory):
    """A real server in household mode, Mom (parent) and Sam (child), whose model answers
    every message with the Markdown of test_browser_markdown, streamed in 60 deltas; Sam
    has one conversation. Yields the server's URL and that conversation's id."""
    data_dir = tmp_path_factory.mktemp("a11y") / "data"
    add_account(data_dir, "Mom", "parent")
    add_account(data_dir, "Sam", "child")
    with serve_in_thread(data_dir, ScriptedProvider({"": MARKDOWN})) as url:
        yield url, child_conversation(url)


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_main_views_have_no_serious_or_critical_axe_violation(browser, household, scheme, viewport):
    url, sams = household
    axe_source()  # fail at once without it
    context = browser.new_context(color_scheme=scheme, viewport=VIEWPORTS[viewport])
    page = context.new_page()
    where = f"{scheme} {viewport}"
    page.goto(url + "/")

    # dark mode renders: light text on a dark page in dark mode, dark on light otherwise,
    # so axe measures the contrast of the scheme asked for
    background, ink = page.evaluate(
        "() => [getComputedStyle(document.body).backgroundColor,"
        " getComputedStyle(document.body).color]"
    )
    brightness = {
        name: sum(map(int, re.findall(r"\d+", value)[:3])) / 765
        for name, value in (("background", background), ("ink", ink))
    }
    if scheme == "dark":
        assert brightness["background"] < 0.2 < 0.8 < brightness["ink"], (background, ink)
    else:
        assert brightness["ink"] < 0.2 < 0.8 < brightness["background"], (background, ink)

    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#login-name")).to_be_focused()
    check(page, f"sign-in form ({where})")

    page.fill("#login-name", "Mom")
    page.fill("#login-password", PASSWORD)
    page.click("#login-submit")
    expect(page.locator("#login")).to_be_hidden()
    expect(page.locator("#account-name")).to_have_text("Signed in as Mom (parent)")
    expect(page.locator("#empty")).to_be_visible()
    check(page, f"empty state after sign-in ({where})")

    # the first send makes the conversation (no list needed: a phone's is in a drawer)
    expect(page.locator("#text")).to_be_enabled()
    page.fill("#text", "some markdown, please")
    page.keyboard.press("Enter")
    reply = page.locator(".message.assistant").last
    expect(reply).to_have_attribute("data-finish", "stop", timeout=30_000)
    expect(reply.locator(".markdown .code-block pre code.hljs")).to_have_count(1)
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#send")).to_be_enabled()
    check(page, f"conversation with a Markdown reply ({where})")

    page.click("#replay-open")
    expect(page.locator("#replay")).to_be_visible()
    expect(page.locator("#replay")).not_to_have_attribute("data-state", "loading")
    expect(page.locator("#replay-messages .message.assistant .markdown")).to_have_count(1)
    check(page, f"replay ({where})")
    page.click("#replay-exit")
    expect(page.locator("#replay")).to_be_hidden()

    # Sam's conversation, which Mom may read, not write in (on a phone, whose list is in a
    # closed drawer: by its address, as its row's link would)
    if viewport == "desktop":
        page.click(f'#conversations a[href$="{sams}"]')
    else:
        page.evaluate("(id) => { location.hash = `#/c/${id}`; }", sams)
    expect(page.locator("#oversight")).to_have_text(
        "You can read Sam's conversation; only Sam can write in it"
    )
    expect(page.locator(".message.assistant").last).to_have_attribute("data-finish", "stop")
    expect(page.locator("#text")).to_be_disabled()
    check(page, f"a child's conversation, read-only ({where})")
    context.close()
