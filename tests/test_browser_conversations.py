"""The conversation list on the page (issue 12, items 3 and 4), in headless Chromium
(Debian's /usr/bin/chromium) driven by Playwright against a real ``chatledger serve``
process: renaming inline (Enter saves, Escape cancels) and seeing it after a reload,
archiving and unarchiving through the "Archived" view, the filter box, a guardian's
read-only rows without actions, and, at 390x800, the sidebar as a drawer behind the
"Conversations" button (focus in and back, Escape, the backdrop, picking a conversation)
with the composer at the bottom and a reply streaming in. Every wait is on a condition."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from .conftest import CHROMIUM, add_account
from .server_process import serve

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium"),
]

SHOWN = "#conversations li:not([hidden])"
"""The rows the list shows (the filter and the archived toggle only hide the others)."""


def call(url: str, method: str = "GET", body: dict | None = None):
    request = urllib.request.Request(
        url,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={} if body is None else {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def create(server, title: str) -> str:
    return call(f"{server.url}/api/conversations", "POST", {"title": title})["id"]


def row(page, conversation_id: str):
    return page.locator(f'#conversations li[data-id="{conversation_id}"]')


def focused_id(page) -> str:
    return page.evaluate("() => document.activeElement.id")


def focus_in(page, selector: str) -> bool:
    return page.evaluate("(selector) => !!document.activeElement.closest(selector)", selector)


def test_rename_archive_and_filter(browser, tmp_path):
    with serve(tmp_path / "data") as server:
        alpha = create(server, "Alpha trip")
        beta = create(server, "Beta notes")
        gamma = create(server, "Gamma plan")
        page = browser.new_page()
        page.goto(server.url + "/")
        shown = page.locator(SHOWN)
        expect(shown).to_have_count(3)
        assert [shown.nth(i).get_attribute("data-id") for i in range(3)] == [gamma, beta, alpha]
        expect(row(page, alpha).locator("button.rename")).to_have_attribute(
            "aria-label", "Rename “\u2068Alpha trip\u2069”"
        )
        expect(row(page, alpha).locator("button.archive")).to_have_attribute(
            "aria-label", "Archive “\u2068Alpha trip\u2069”"
        )

        # the filter narrows the list as one types, whatever the case
        expect(page.get_by_label("Filter")).to_have_attribute("type", "search")
        page.fill("#conversation-filter", "PLA")
        expect(shown).to_have_count(1)
        expect(shown.locator("a")).to_have_text("Gamma plan")
        page.locator("#conversation-filter").press_sequentially("x")
        expect(shown).to_have_count(0)
        expect(page.locator("#list-empty")).to_have_text(
            "No conversation matches “\u2068PLAx\u2069”."
        )
        page.locator("#conversation-filter").press("Escape")  # clears what was typed
        expect(page.locator("#conversation-filter")).to_have_value("")
        expect(shown).to_have_count(3)
        expect(page.locator("#list-empty")).to_be_hidden()

        # rename with the keyboard: Escape cancels, Enter saves
        row(page, alpha).locator("a").focus()
        page.keyboard.press("Tab")
        assert page.evaluate("() => document.activeElement.className") == "rename"
        page.keyboard.press("Enter")
        field = row(page, alpha).locator("form.rename input")
        expect(field).to_be_focused()
        expect(field).to_have_value("Alpha trip")
        expect(field).to_have_attribute("aria-label", "New title for “\u2068Alpha trip\u2069”")
        page.keyboard.type("never saved")
        page.keyboard.press("Escape")
        expect(field).to_have_count(0)
        expect(row(page, alpha).locator("button.rename")).to_be_focused()
        expect(row(page, alpha).locator("a")).to_have_text("Alpha trip")
        page.keyboard.press("Enter")
        expect(field).to_be_focused()
        page.keyboard.press("ControlOrMeta+a")
        page.keyboard.type("Lisbon in May")
        with page.expect_response(lambda r: r.request.method == "PATCH") as answer:
            page.keyboard.press("Enter")
        assert answer.value.status == 200
        expect(field).to_have_count(0)
        expect(row(page, alpha).locator("a")).to_have_text("Lisbon in May")
        expect(row(page, alpha).locator("button.rename")).to_be_focused()
        expect(page.locator("#list-status")).to_have_text("Renamed to “\u2068Lisbon in May\u2069”.")
        page.reload()
        expect(row(page, alpha).locator("a")).to_have_text("Lisbon in May")
        listed = {r["id"]: r for r in call(f"{server.url}/api/conversations")}
        assert listed[alpha]["title"] == "Lisbon in May"

        # archive: gone from the list, under "Archived"; unarchive: back
        expect(page.locator("#show-archived")).to_have_text("Archived (0)")
        row(page, beta).locator("button.archive").click()
        expect(row(page, beta)).to_be_hidden()
        expect(shown).to_have_count(2)
        expect(page.locator("#show-archived")).to_have_text("Archived (1)")
        expect(page.locator("#list-status")).to_contain_text("archived")
        listed = {r["id"]: r for r in call(f"{server.url}/api/conversations")}
        assert listed[beta]["archived"] is True
        page.reload()  # it stays put away
        expect(shown).to_have_count(2)
        expect(row(page, beta)).to_be_hidden()
        page.click("#show-archived")
        expect(page.locator("#show-archived")).to_have_attribute("aria-pressed", "true")
        expect(page.locator("#conversations")).to_have_attribute(
            "aria-label", "Archived conversations"
        )
        expect(shown).to_have_count(1)
        expect(shown.locator("a")).to_have_text("Beta notes")
        unarchive = row(page, beta).locator("button.archive")
        expect(unarchive).to_have_text("Unarchive")
        expect(unarchive).to_have_attribute("aria-label", "Unarchive “\u2068Beta notes\u2069”")
        unarchive.click()
        expect(shown).to_have_count(0)
        expect(page.locator("#list-empty")).to_have_text("No archived conversations.")
        expect(page.locator("#show-archived")).to_be_focused()  # not lost to the body
        page.click("#show-archived")
        expect(shown).to_have_count(3)
        expect(row(page, beta)).to_be_visible()
        listed = {r["id"]: r for r in call(f"{server.url}/api/conversations")}
        assert listed[beta]["archived"] is False

        # archiving the open conversation leaves it open
        row(page, gamma).locator("a").click()
        expect(page.locator("#chat-title")).to_have_text("Gamma plan")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        row(page, gamma).locator("button.archive").click()
        expect(row(page, gamma)).to_be_hidden()
        expect(page.locator("#chat-title")).to_have_text("Gamma plan")
        expect(page.locator("#text")).to_be_enabled()
        page.close()


def test_a_guardians_rows_have_no_rename_or_archive(browser, tmp_path):
    data_dir = tmp_path / "data"
    add_account(data_dir, "Mom", "parent")
    add_account(data_dir, "Sam", "child")
    with serve(data_dir) as server:
        for name in ("Sam", "Mom"):
            context = browser.new_context()
            page = context.new_page()
            page.goto(server.url + "/")
            page.fill("#login-name", name)
            page.fill("#login-password", "password-1")
            page.click("#login-submit")
            expect(page.locator("#login")).to_be_hidden()
            if name == "Sam":
                page.click("#new-chat")
                expect(page.locator("#connection")).to_have_attribute("data-state", "live")
                expect(page.locator(SHOWN)).to_have_count(1)
                expect(page.locator("#conversations .row-tools")).to_be_attached()
                expect(page.locator("#conversations .row-tools")).not_to_have_attribute(
                    "hidden", ""
                )
            else:
                expect(page.locator(SHOWN)).to_have_count(1)
                expect(page.locator("#conversations .owner-mark")).to_have_text("Sam · read-only")
                expect(page.locator("#conversations .row-tools")).to_be_hidden()
                expect(page.locator("#conversations button")).to_have_count(2)  # hidden ones
                assert page.locator("#conversations button:visible").count() == 0
            context.close()


# Whether the composer's bottom edge is at `height` px (the visible viewport's bottom).
BOTTOM_AT = """(height) => {
  const box = document.getElementById("composer").getBoundingClientRect();
  return Math.abs(box.bottom - height) < 1 && box.top > 0;
}"""


def test_on_a_phone_the_list_is_a_drawer(browser, tmp_path):
    args = ("--demo-tokens-per-s", "40", "--demo-reply-tokens", "40")
    with serve(tmp_path / "data", *args) as server:
        first = create(server, "First chat")
        second = create(server, "Second chat")
        context = browser.new_context(viewport={"width": 390, "height": 800}, has_touch=True)
        page = context.new_page()
        page.goto(f"{server.url}/#/c/{first}")
        expect(page.locator("#chat-title")).to_have_text("First chat")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        button = page.locator("#drawer-open")
        expect(page.locator("#conversations")).to_be_hidden()
        expect(page.locator("#new-chat")).to_be_hidden()
        expect(button).to_be_visible()
        expect(button).to_have_text("Conversations")
        expect(button).to_have_attribute("aria-expanded", "false")
        expect(button).to_have_attribute("aria-controls", "sidebar")
        meta = page.locator('meta[name="viewport"]').get_attribute("content")
        assert "interactive-widget=resizes-content" in meta
        composer = page.locator("#composer").bounding_box()
        assert abs(composer["y"] + composer["height"] - 800) < 1  # at the bottom

        # open: focus goes in, "+ New chat" and the filter are in it, the rest is inert
        button.click()
        expect(button).to_have_attribute("aria-expanded", "true")
        expect(page.locator("#drawer-backdrop")).to_be_visible()
        expect(page.locator("#conversations")).to_be_visible()
        expect(page.locator("#new-chat")).to_be_visible()
        expect(page.locator("#conversation-filter")).to_be_visible()
        assert focus_in(page, "#sidebar")
        expect(row(page, first).locator("a")).to_be_focused()  # the open one
        assert page.evaluate("() => document.getElementById('chat').inert")

        # picking a conversation closes it, focus back on the button
        row(page, second).locator("a").click()
        expect(button).to_have_attribute("aria-expanded", "false")
        expect(page.locator("#conversations")).to_be_hidden()
        expect(page.locator("#drawer-backdrop")).to_be_hidden()
        expect(button).to_be_focused()
        expect(page.locator("#chat-title")).to_have_text("Second chat")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        assert not page.evaluate("() => document.getElementById('chat').inert")

        # a message, and its reply streams in
        page.locator("#text").tap()
        page.fill("#text", "hello from a phone")
        page.click("#send")
        reply = page.locator(".message.assistant").last
        expect(reply).to_have_class("message assistant generating")
        expect(reply).to_have_attribute("data-finish", "stop", timeout=30_000)
        assert len(reply.locator(".text").text_content().split()) == 40
        composer = page.locator("#composer").bounding_box()
        assert abs(composer["y"] + composer["height"] - 800) < 1
        body = call(f"{server.url}/api/conversations/{second}")
        assert body["messages"][-1]["text"] == reply.locator(".text").text_content()
        # an on-screen keyboard shrinks the layout viewport (resizes-content): the composer
        # stays at the bottom of what is left, the messages scroll above it
        page.set_viewport_size({"width": 390, "height": 420})
        page.wait_for_function(BOTTOM_AT, arg=420)
        assert (
            page.evaluate("() => getComputedStyle(document.getElementById('messages')).overflowY")
            == "auto"
        )
        page.set_viewport_size({"width": 390, "height": 800})
        page.wait_for_function(BOTTOM_AT, arg=800)

        # Escape closes it, focus back on the button; so does the backdrop
        button.click()
        assert focus_in(page, "#sidebar")
        page.keyboard.press("Escape")
        expect(button).to_have_attribute("aria-expanded", "false")
        expect(page.locator("#conversations")).to_be_hidden()
        expect(button).to_be_focused()
        assert focused_id(page) == "drawer-open"
        button.click()
        expect(page.locator("#conversations")).to_be_visible()
        page.mouse.click(380, 400)  # the backdrop, right of the drawer
        expect(page.locator("#conversations")).to_be_hidden()
        expect(button).to_be_focused()

        # "+ New chat" inside it opens a new conversation and closes it
        button.click()
        page.click("#new-chat")
        expect(page.locator("#conversations")).to_be_hidden()
        expect(page.locator("#chat-title")).to_have_text("New chat")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        context.close()
