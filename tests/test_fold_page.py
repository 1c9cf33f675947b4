"""The page opens at the tail (DESIGN.md "The page"): it starts from a page of the newest
messages that the server folded, folds the records after the page's ``offset`` onto it
(``static/fold.js`` ``viewFrom``), and puts older pages in front as the person scrolls up
(``prependMessages``). The cases of ``tests/fold_page_fixtures.json`` say, for one log:
the page the server answers after its first ``at`` records (``limit`` messages), the
view the page must end with once the rest is folded onto it, the older pages scrolling
up brings, and the title and running reply. Python checks here that every page is what
``storage.fold.Folded.page`` (the route's fold) gives and that the views are
``storage.fold.messages``'s; Node runs the same cases through ``static/fold.js``
(``tests/js/fold_page.test.mjs``, started from here), and also resumes every case of
``tests/fold_fixtures.json`` from a page at every split point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatledger.storage.fold import Folded, Summary, messages

from .test_fold import run_node_tests

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = json.loads((ROOT / "tests" / "fold_page_fixtures.json").read_text(encoding="utf-8"))
NODE_TEST = ROOT / "tests" / "js" / "fold_page.test.mjs"
KEYS = {"name", "records", "at", "limit", "page", "messages", "older", "title", "running"}


def summary(records: list[dict]) -> Summary:
    out = Summary()
    for record in records:
        out.observe(record)
    return out


def running(records: list[dict]) -> str | None:
    open_replies = summary(records).open_replies
    return list(open_replies)[-1] if open_replies else None


def test_fixture_names_are_unique_and_cases_well_formed():
    names = [case["name"] for case in FIXTURES]
    assert len(names) == len(set(names))
    assert not [n for n in names if "#" in n or "\\" in n]  # TAP would escape them
    for case in FIXTURES:
        assert set(case) == KEYS, case["name"]
        assert set(case["page"]) == {"title", "more", "running", "messages"}, case["name"]
        assert 0 <= case["at"] <= len(case["records"]) and case["limit"] >= 1
        for record in case["records"]:
            assert isinstance(record["type"], str) and isinstance(record["ts"], int)
    # what the cases must cover: a reply streaming across the page's offset, older pages
    assert any(c["page"]["running"] and c["page"]["running"] != c["running"] for c in FIXTURES)
    assert any(len(c["older"]) > 1 for c in FIXTURES)
    assert any(not c["page"]["messages"] for c in FIXTURES)


@pytest.mark.parametrize("case", FIXTURES, ids=[case["name"] for case in FIXTURES])
def test_pages_and_views_are_the_python_fold(case):
    records, at, limit = case["records"], case["at"], case["limit"]
    # the page: what the route answers after the first `at` records
    folded = Folded()
    for record in records[:at]:
        folded.observe(record)
    page, more = folded.page(limit)
    assert page == case["page"]["messages"]
    assert more == case["page"]["more"]
    assert summary(records[:at]).title == case["page"]["title"]
    assert running(records[:at]) == case["page"]["running"]  # the reply its task runs
    # the view once the rest is folded onto the page: the page's messages and the newer
    # ones, as the fold of the whole log has them
    whole = messages(records)
    first = len(messages(records[:at])) - len(page)
    assert case["messages"] == whole[first:]
    assert summary(records).title == case["title"]
    assert running(records) == case["running"]
    # scrolling up: each older page is the route's page before the oldest message shown
    folded = Folded()
    for record in records:
        folded.observe(record)
    shown = list(case["messages"])
    more = case["page"]["more"]
    for older in case["older"]:
        assert more, "an older page after one that said no more"
        page, more = folded.page(limit, shown[0]["id"])
        assert page == older["messages"] and more == older["more"]
        shown[:0] = page
    assert not more
    assert shown == whole


def test_fold_js_resumes_from_pages():
    passed, output = run_node_tests(NODE_TEST)
    missing = [c["name"] for c in FIXTURES if f"page fixture: {c['name']}" not in passed]
    assert not missing, output
    assert "every shared fixture resumes from a page at every split point" in passed, output
