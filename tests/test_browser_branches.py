"""Branches in a real browser (issue 12: "regenerate twice and switch among three answers,
reload, and the same answer is current; edit a question and see the new branch, the old
one one click away"; "an interrupted or failed reply offers Try again"): headless
Chromium (Debian's /usr/bin/chromium) through Playwright against a real server whose
provider numbers its answers, so each version can be told apart.
"""

from __future__ import annotations

import asyncio
import os
import re

import pytest

from chatledger.server.providers.base import Delta
from chatledger.server.providers.demo import DemoProvider

from .conftest import CHROMIUM
from .test_browser_markdown import open_page, send_first, serve_in_thread

playwright_sync = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium"),
]


class NumberedProvider(DemoProvider):
    """Answer ``n`` (counted from 1 over the server's life) to the last question: "Answer
    n to: <question>", in a few deltas; a question with "slow" in it streams for minutes
    (to be stopped)."""

    def __init__(self) -> None:
        super().__init__(tokens_per_s=0, reply_tokens=16)
        self.count = 0

    async def stream(self, messages, *, model="demo", max_tokens=None):
        self.count += 1
        asked = messages[-1]["content"]
        words = f"Answer {self.count} to: {asked}".split(" ")
        slow = "slow" in asked
        for k, word in enumerate(words * (200 if slow else 1)):
            await asyncio.sleep(0.3 if slow else 0.002)
            yield Delta(text=word if k == 0 else " " + word)
        yield Delta(finish_reason="stop", usage=None)


@pytest.fixture
def server(tmp_path):
    with serve_in_thread(tmp_path / "data", NumberedProvider()) as url:
        yield url


def reply_text(page) -> str:
    return page.locator(".message.assistant").last.locator(".text").text_content()


def test_regenerate_switch_reload_edit_and_try_again(browser, server):
    expect = playwright_sync.expect
    page, dialogs = open_page(browser, server)
    send_first(page, "Name a fruit.")
    expect(page).to_have_url(re.compile(r"#/c/[A-Za-z0-9_-]+$"))
    answer = page.locator(".message.assistant").last
    expect(answer).to_have_attribute("data-finish", "stop", timeout=30_000)
    assert reply_text(page) == "Answer 1 to: Name a fruit."
    expect(answer.locator(".siblings")).to_have_count(0)  # one version: no switch

    # regenerate twice: three answers, the newest shown, "3/3"
    for n in (2, 3):
        page.locator(".message.assistant").last.get_by_role("button", name="Regenerate").click()
        expect(page.locator(".message.assistant .text").last).to_have_text(
            f"Answer {n} to: Name a fruit.", timeout=30_000
        )
        expect(page.locator(".message.assistant").last).to_have_attribute("data-finish", "stop")
    expect(page.locator(".message.assistant")).to_have_count(1)  # one path: one answer shown
    switch = page.locator(".message.assistant .siblings")
    expect(switch.locator(".position")).to_have_text("3/3")
    expect(switch.get_by_role("button", name=re.compile("^Next"))).to_be_disabled()

    # back to the second, by keyboard: focus stays on the switch
    previous = switch.get_by_role("button", name=re.compile("^Previous"))
    previous.focus()
    page.keyboard.press("Enter")
    expect(page.locator(".message.assistant .text")).to_have_text("Answer 2 to: Name a fruit.")
    expect(page.locator(".message.assistant .siblings .position")).to_have_text("2/3")
    focused = page.evaluate("() => document.activeElement?.closest('.siblings') !== null")
    assert focused

    # a reload shows the same answer current
    page.reload()
    expect(page.locator(".message.assistant .text")).to_have_text("Answer 2 to: Name a fruit.")
    expect(page.locator(".message.assistant .siblings .position")).to_have_text("2/3")

    # edit and resend the question: a new branch; the old question one click away
    question = page.locator(".message.user").last
    question.get_by_role("button", name="Edit and resend this message").click()
    box = question.get_by_role("textbox", name="Edited message")
    expect(box).to_have_value("Name a fruit.")
    box.fill("Name a berry.")
    box.press("Enter")
    expect(page.locator(".message.user .text")).to_have_text("Name a berry.", timeout=30_000)
    expect(page.locator(".message.assistant .text")).to_have_text(
        "Answer 4 to: Name a berry.", timeout=30_000
    )
    user_switch = page.locator(".message.user .siblings")
    expect(user_switch.locator(".position")).to_have_text("2/2")
    user_switch.get_by_role("button", name=re.compile("^Previous")).click()
    expect(page.locator(".message.user .text")).to_have_text("Name a fruit.")
    expect(page.locator(".message.assistant .text")).to_have_text(
        re.compile(r"^Answer [123] to: Name a fruit\.$")
    )
    expect(page.locator(".message.assistant .siblings .position")).to_have_text(
        re.compile(r"^\d/3$")
    )

    # a stopped reply offers "Try again", which answers the same question anew
    page.fill("#text", "Say something slow.")
    page.keyboard.press("Enter")
    expect(page.locator("#stop")).to_be_visible(timeout=30_000)
    expect(page.locator(".message.assistant").last.locator(".actions")).to_be_hidden()
    page.locator("#stop").click()
    stopped = page.locator(".message.assistant").last
    expect(stopped).to_have_attribute("data-finish", "cancelled", timeout=30_000)
    stopped.get_by_role("button", name="Try again: another answer").click()
    expect(page.locator(".message.assistant").last.locator(".siblings .position")).to_have_text(
        "2/2", timeout=30_000
    )
    expect(page.locator(".message.assistant").last).not_to_have_attribute(
        "data-finish", "cancelled"
    )
    page.locator("#stop").click()  # the slow answer again: stop it so the server can close
    expect(page.locator(".message.assistant").last).to_have_attribute(
        "data-finish", "cancelled", timeout=30_000
    )
    assert dialogs == []
    page.close()


def test_a_branch_made_on_another_device_shows_up(browser, server):
    """A second browser context regenerates and switches versions; the first page, which
    holds only the path it opened with, follows (its page anew when it must)."""
    expect = playwright_sync.expect
    one, _ = open_page(browser, server)
    send_first(one, "Name a colour.")
    expect(one.locator(".message.assistant").last).to_have_attribute(
        "data-finish", "stop", timeout=30_000
    )
    url = one.url
    two, _ = open_page(browser, server)
    two.goto(url)
    expect(two.locator(".message.assistant .text")).to_have_text("Answer 1 to: Name a colour.")
    two.get_by_role("button", name="Regenerate").click()
    expect(one.locator(".message.assistant .text")).to_have_text(
        "Answer 2 to: Name a colour.", timeout=30_000
    )
    expect(one.locator(".message.assistant .siblings .position")).to_have_text("2/2")
    two.locator(".message.assistant .siblings").get_by_role(
        "button", name=re.compile("^Previous")
    ).click()
    expect(one.locator(".message.assistant .text")).to_have_text(
        "Answer 1 to: Name a colour.", timeout=30_000
    )
    expect(one.locator(".message.assistant .siblings .position")).to_have_text("1/2")
    one.close()
    two.close()
