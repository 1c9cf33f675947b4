"""The page in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by
Playwright against a real ``chatledger serve`` process."""

from __future__ import annotations

import json
import os
import urllib.request

import pytest

from .server_process import serve

playwright_sync = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium"),
]

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser():
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def test_send_stream_reload_mid_reply_and_reconnect(browser, tmp_path):
    data_dir = tmp_path / "data"
    expect = playwright_sync.expect
    args = ("--demo-tokens-per-s", "15", "--demo-reply-tokens", "60", "--keepalive", "1")
    with serve(data_dir, *args) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.click("#new-chat")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        conversation_id = page.evaluate("location.hash").split("/")[-1]

        hostile = "<img src=x onerror=alert(1)> <b>bold?</b>"
        page.fill("#text", hostile)
        page.keyboard.press("Enter")
        reply = page.locator(".message.assistant").last
        expect(reply).to_have_class("message assistant generating")
        expect(page.locator("#stop")).to_be_visible()
        expect(page.locator("#send")).to_be_disabled()
        # the user's text is shown as text, never as HTML
        expect(page.locator(".message.user .text")).to_have_text(hostile)
        assert page.locator("#messages img, #messages b").count() == 0

        page.wait_for_function(
            "document.querySelector('.message.assistant .text').textContent.split(' ').length >= 8"
        )
        seen_before_reload = reply.locator(".text").text_content()
        page.reload()  # mid-reply: the page folds the log from the start again
        reply = page.locator(".message.assistant").last
        expect(reply).to_have_attribute("data-finish", "stop", timeout=30_000)
        full = reply.locator(".text").text_content()
        assert full.startswith(seen_before_reload)
        assert len(full.split()) == 60
        expect(page.locator("#stop")).to_be_hidden()

        body = get_json(f"{server.url}/api/conversations/{conversation_id}")
        assert full == body["messages"][-1]["text"]
        port = int(server.url.rsplit(":", 1)[1])
        server.process.terminate()
        server.process.wait(15)
        expect(page.locator("#connection")).to_have_attribute(
            "data-state", "reconnecting", timeout=15_000
        )
    with serve(data_dir, *args, port=port):
        expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=20_000)
        # after reconnecting (Last-Event-ID), nothing is duplicated
        expect(page.locator(".message")).to_have_count(2)
        page.close()


def test_stop_button_cancels_the_reply(browser, tmp_path):
    with serve(
        tmp_path / "data", "--demo-tokens-per-s", "10", "--demo-reply-tokens", "500"
    ) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.click("#new-chat")
        page.fill("#text", "tell me a long story")
        page.click("#send")
        expect = playwright_sync.expect
        expect(page.locator("#stop")).to_be_visible()
        page.click("#stop")
        reply = page.locator(".message.assistant").last
        expect(reply).to_have_attribute("data-finish", "cancelled")
        expect(reply.locator(".meta")).to_have_text("stopped")
        expect(page.locator("#send")).to_be_enabled()
        page.close()
