"""The household on the page (issue 10, item 7), in headless Chromium (Debian's
/usr/bin/chromium) driven by Playwright against a real ``chatledger serve`` process with
accounts: the sign-in form, who is signed in, signing out, a parent reading a child's
conversation read-only and live, the child told who reads it ("read by Mom, 20:14"), and
what is left of a daily budget. Every wait is on a condition, never on a clock."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from chatledger.server.sessions import COOKIE
from chatledger.storage.household import Household

from .conftest import CHROMIUM, add_account
from .server_process import serve

playwright_sync = pytest.importorskip("playwright.sync_api")
expect = playwright_sync.expect
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium"),
]

PASSWORD = "password-1"  # add_account's default


def sign_in(page, name: str, password: str = PASSWORD):
    """Fill the sign-in form and send it; returns the answer to ``POST /api/login``."""
    expect(page.locator("#login")).to_be_visible()
    page.fill("#login-name", name)
    page.fill("#login-password", password)
    with page.expect_response("**/api/login") as answer:
        page.click("#login-submit")
    return answer.value


def me_with(url: str, cookie: str) -> int:
    """The status of ``GET /api/me`` sent with the session cookie ``cookie``."""
    request = urllib.request.Request(f"{url}/api/me", headers={"Cookie": f"{COOKIE}={cookie}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            json.load(response)
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def words_of(page, index: int) -> int:
    return len(page.locator(".message.assistant .text").nth(index).text_content().split())


# Whether the assistant message `index` is still generating and has at least `words`
# words; a function, not an expression: the CSP forbids eval.
GENERATING_WITH = """([index, words]) => {
  const reply = document.querySelectorAll(".message.assistant")[index];
  return !!reply && reply.classList.contains("generating")
    && reply.querySelector(".text").textContent.split(" ").length >= words;
}"""

GREW_PAST = """([index, words]) => {
  const reply = document.querySelectorAll(".message.assistant")[index];
  return reply.querySelector(".text").textContent.split(" ").length > words;
}"""


def household(data_dir: Path) -> None:
    """Mom (parent) and Sam (child), who may send 2 messages a day."""
    add_account(data_dir, "Mom", "parent")
    add_account(data_dir, "Sam", "child")
    accounts = Household(data_dir)
    try:
        accounts.set_limit("Sam", messages_per_day=2, tokens_per_day=None)
    finally:
        accounts.close()


def test_a_parent_reads_a_childs_conversation_live_and_the_child_sees_it(browser, tmp_path):
    data_dir = tmp_path / "data"
    household(data_dir)
    tokens = 80
    args = ("--demo-tokens-per-s", "20", "--demo-reply-tokens", str(tokens))
    with serve(data_dir, *args) as server:
        sam_context = browser.new_context()
        sam = sam_context.new_page()
        sam.goto(server.url + "/")
        expect(sam.locator("#sidebar")).to_be_hidden()
        expect(sam.locator("#chat")).to_be_hidden()
        assert sign_in(sam, "Sam").status == 200
        expect(sam.locator("#login")).to_be_hidden()
        expect(sam.locator("#account-name")).to_have_text("Signed in as Sam (child)")
        expect(sam.locator("#sign-out")).to_be_visible()
        expect(sam.locator("#oversight")).to_have_text("Mom can read your conversations")
        expect(sam.locator("#budget")).to_have_text("2 messages left today")

        sam.click("#new-chat")
        expect(sam.locator("#connection")).to_have_attribute("data-state", "live")
        sam.fill("#text", "hello there")
        sam.keyboard.press("Enter")
        expect(sam.locator(".message.assistant").first).to_have_attribute(
            "data-finish", "stop", timeout=30_000
        )
        expect(sam.locator("#budget")).to_have_text("1 message left today")
        # nobody has read it yet: only who may
        expect(sam.locator("#oversight")).to_have_text("Mom can read your conversations")
        assert sam.locator("#oversight .read-by").count() == 0

        mom_context = browser.new_context()
        mom = mom_context.new_page()
        mom.goto(server.url + "/")
        assert sign_in(mom, "Mom").status == 200
        expect(mom.locator("#account-name")).to_have_text("Signed in as Mom (parent)")
        row = mom.locator("#conversations a")
        expect(row).to_have_count(1)
        expect(row.locator(".owner-mark")).to_have_text("Sam · read-only")
        expect(mom.locator("#oversight")).to_be_hidden()  # a parent has no readers
        row.click()
        expect(mom.locator("#connection")).to_have_attribute("data-state", "live")
        expect(mom.locator(".message")).to_have_count(2)
        expect(mom.locator("#oversight")).to_have_text(
            "You can read Sam's conversation; only Sam can write in it"
        )
        expect(mom.locator("#text")).to_be_disabled()
        expect(mom.locator("#send")).to_be_disabled()

        # Sam's second message: Mom watches its reply stream in
        sam.fill("#text", "tell me more")
        sam.keyboard.press("Enter")
        mom.wait_for_function(GENERATING_WITH, arg=[1, 5], timeout=30_000)
        partial = mom.locator(".message.assistant .text").nth(1).text_content()
        expect(mom.locator("#stop")).to_be_hidden()  # nor can she stop it
        expect(mom.locator("#text")).to_be_disabled()
        mom.wait_for_function(GREW_PAST, arg=[1, len(partial.split())], timeout=30_000)
        reply = mom.locator(".message.assistant").nth(1)
        expect(reply).to_have_attribute("data-finish", "stop", timeout=30_000)
        full = reply.locator(".text").text_content()
        assert full.startswith(partial) and len(full.split()) == tokens
        assert len(partial.split()) < tokens
        expect(sam.locator(".message.assistant .text").nth(1)).to_have_text(full)
        expect(mom.locator("#send")).to_be_disabled()  # still read-only once it ended

        # Sam's page, reloaded, says who read it
        sam.reload()
        expect(sam.locator("#connection")).to_have_attribute("data-state", "live")
        expect(sam.locator("#oversight .readers")).to_have_text("Mom can read your conversations")
        read_by = sam.locator("#oversight .read-by")
        expect(read_by).to_have_count(1)
        expect(read_by).to_have_text(re.compile(r"^read by Mom, (\w+ \d+, )?\d{2}:\d{2}$"))

        # the budget is used up: what is left says so, and the server's refusal is shown
        expect(sam.locator("#budget")).to_have_text(
            re.compile(r"^0 messages left today \(more in .+\)$")
        )
        sam.fill("#text", "one more?")
        with sam.expect_response("**/messages") as answer:
            sam.keyboard.press("Enter")
        assert answer.value.status == 429
        expect(sam.locator("#error")).to_contain_text("used up")
        expect(sam.locator(".message")).to_have_count(4)
        sam_context.close()
        mom_context.close()


def test_a_wrong_password_is_said_and_tries_are_throttled(browser, tmp_path):
    data_dir = tmp_path / "data"
    add_account(data_dir, "Sam", "child")
    with serve(data_dir) as server:
        context = browser.new_context()
        page = context.new_page()
        page.goto(server.url + "/")
        error = page.locator("#login-error")
        expect(error).to_be_hidden()
        for _ in range(5):  # the server allows 5 failures per account
            assert sign_in(page, "Sam", "not the password").status == 401
            expect(error).to_have_text("Wrong name or password.")
            expect(page.locator("#chat")).to_be_hidden()
        throttled = re.compile(r"^Too many tries: wait \d+ s, then try again\.$")
        assert sign_in(page, "Sam", "still wrong").status == 429
        expect(error).to_have_text(throttled)
        # while throttled, the right password is not even checked
        assert sign_in(page, "Sam").status == 429
        expect(error).to_have_text(throttled)
        expect(page.locator("#login")).to_be_visible()
        assert [c for c in context.cookies() if c["name"] == COOKIE] == []
        context.close()


def test_sign_out_ends_the_session_here_and_elsewhere(browser, tmp_path):
    data_dir = tmp_path / "data"
    household(data_dir)
    with serve(data_dir) as server:
        first = browser.new_context()
        page = first.new_page()
        page.goto(server.url + "/")
        assert sign_in(page, "Sam").status == 200
        page.click("#new-chat")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        (cookie,) = [c for c in first.cookies() if c["name"] == COOKIE]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
        assert page.evaluate("() => document.cookie") == ""  # the page never sees it
        assert me_with(server.url, cookie["value"]) == 200

        # the same session in a second browser: signing out there ends it everywhere
        second = browser.new_context()
        second.add_cookies([cookie])
        other = second.new_page()
        other.goto(server.url + "/")
        expect(other.locator("#account-name")).to_have_text("Signed in as Sam (child)")
        expect(other.locator("#conversations a")).to_have_count(1)
        with other.expect_response("**/api/logout") as answer:
            other.click("#sign-out")
        assert answer.value.status == 204
        expect(other.locator("#login")).to_be_visible()
        expect(other.locator("#sidebar")).to_be_hidden()
        expect(other.locator("#account")).to_be_hidden()
        assert other.evaluate("() => document.querySelectorAll('#conversations li').length") == 0
        assert [c for c in second.cookies() if c["name"] == COOKIE] == []
        assert me_with(server.url, cookie["value"]) == 401  # the old cookie is dead

        # the first page's session ended too: its event stream is closed, and the next
        # call it makes is answered 401, which brings back the sign-in form
        expect(page.locator("#login")).to_be_visible(timeout=30_000)
        expect(page.locator("#chat")).to_be_hidden()
        expect(page.locator("#messages .message")).to_have_count(0)

        # signing in again brings the page back
        assert sign_in(page, "Sam").status == 200
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        expect(page.locator("#conversations a")).to_have_count(1)
        first.close()
        second.close()


def test_single_person_mode_shows_no_household(browser, tmp_path):
    with serve(tmp_path / "data") as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.click("#new-chat")
        expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        expect(page.locator("#text")).to_be_enabled()
        for hidden in ("#login", "#account", "#oversight", "#budget"):
            expect(page.locator(hidden)).to_be_hidden()
        page.close()
