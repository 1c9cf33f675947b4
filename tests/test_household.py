"""The household log (DESIGN.md "The household"; ``storage/household.py``): the fold of
its records, unique names, torn tails left by a dead writer, corruption, several writers
(two ``Household`` objects, ``chatledger user ...`` in another process), what is stored
of a session, and that appends are synced."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import argon2
import pytest

from chatledger.server.sessions import COOKIE
from chatledger.storage import CorruptLogError, FileIO, records
from chatledger.storage.household import (
    HOUSEHOLD_FILE,
    AccountError,
    Household,
    HouseholdState,
    check_name,
    session_key,
)

from .conftest import add_account, create_conversation, login

REPO = Path(__file__).resolve().parent.parent


def chatledger(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Run ``python -m chatledger ARGS`` as a child process (blocking)."""
    return subprocess.run(
        [sys.executable, "-m", "chatledger", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def torn_files(data_dir: Path) -> list[Path]:
    return sorted(data_dir.glob(f"{HOUSEHOLD_FILE}.torn-*"))


def lines_of(path: Path) -> list[dict]:
    return [records.decode(line) for line in path.read_bytes().splitlines()]


def account_record(name: str, account_id: str = "ghost-id") -> bytes:
    return records.encode(
        {"type": "account", "ts": 1, "id": account_id, "name": name, "role": "adult", "hash": "h"}
    )


# -- the fold (pure) ----------------------------------------------------------------------


def fold(*recs: dict) -> HouseholdState:
    state = HouseholdState()
    for ts, record in enumerate(recs, start=1):
        state.observe({"ts": ts, **record})
    return state


def test_fold_of_every_record_type():
    mom = {"type": "account", "id": "m", "name": "Mom", "role": "parent", "hash": "h-mom"}
    kid = {"type": "account", "id": "k", "name": "Kid", "role": "child", "hash": "h-kid"}
    state = fold(
        mom,
        kid,
        {"type": "session", "sid": "s-kid-1", "account": "k", "client": "c"},
        {"type": "session", "sid": "s-mom", "account": "m", "client": "c"},
        {"type": "limit", "account": "k", "messages_per_day": 3, "tokens_per_day": None},
        {"type": "password", "account": "k", "hash": "h-kid-2"},  # ends s-kid-1 only
        {"type": "session", "sid": "s-kid-2", "account": "k", "client": "c"},
        {"type": "session", "sid": "s-kid-3", "account": "k", "client": "c"},
        {"type": "logout", "sid": "s-kid-2"},
        {"type": "logout", "sid": "never-was"},  # nothing
        {"type": "session", "sid": "s-nobody", "account": "unknown", "client": "c"},
        {"type": "limit", "account": "unknown", "messages_per_day": 1},
        {"type": "a-type-from-the-future", "account": "k"},  # skipped
    )
    assert set(state.accounts) == {"m", "k"}
    assert state.accounts["k"].hash == "h-kid-2"
    assert state.accounts["k"].messages_per_day == 3
    assert state.accounts["k"].tokens_per_day is None
    assert set(state.sessions) == {"s-mom", "s-kid-3"}
    assert state.session("s-kid-3").account == "k"
    assert state.session("s-kid-1") is None and state.session("s-kid-2") is None
    assert state.first_parent().id == "m"
    # remove: disabled, its sessions end, its name is free; a later session is not live
    state.observe({"type": "remove", "ts": 20, "account": "k"})
    state.observe({"type": "session", "ts": 21, "sid": "late", "account": "k", "client": "c"})
    assert state.accounts["k"].removed is True
    assert set(state.sessions) == {"s-mom"}
    assert state.named("kid") is None
    assert [a.id for a in state.active()] == ["m"]
    # a limit record with nulls removes the limits
    state.observe(
        {"type": "limit", "ts": 22, "account": "m", "messages_per_day": 5, "tokens_per_day": 9}
    )
    state.observe(
        {
            "type": "limit",
            "ts": 23,
            "account": "m",
            "messages_per_day": None,
            "tokens_per_day": None,
        }
    )
    assert state.accounts["m"].messages_per_day is None
    assert state.accounts["m"].tokens_per_day is None


def test_the_operations_and_a_fresh_fold_of_the_file_agree(data_dir):
    data_dir.mkdir()
    household = Household(data_dir)
    mom = household.add_account("Mom", "parent", "h-mom")
    kid = household.add_account("Kid", "child", "h-kid")
    household.set_limit("kid", messages_per_day=3, tokens_per_day=1000)
    kid_1 = household.start_session(kid.id, "10.0.0.1")
    mom_1 = household.start_session(mom.id, "10.0.0.2")
    household.set_password("KID", "h-kid-2")
    assert household.state.session(session_key(kid_1)) is None  # a new password ends it
    kid_2 = household.start_session(kid.id, "10.0.0.1")
    kid_3 = household.start_session(kid.id, "10.0.0.1")
    household.end_session(session_key(kid_2))
    household.end_session(session_key(kid_2))  # twice: nothing more is appended
    assert [r["type"] for r in lines_of(household.path)].count("logout") == 1
    assert set(household.state.sessions) == {session_key(mom_1), session_key(kid_3)}
    household.close()

    again = Household(data_dir)
    assert again.state.accounts == household.state.accounts
    assert again.state.sessions == household.state.sessions
    assert again.state.accounts[kid.id].hash == "h-kid-2"
    assert again.state.accounts[kid.id].messages_per_day == 3
    assert again.state.accounts[kid.id].tokens_per_day == 1000
    again.remove_account("Kid")
    assert set(again.state.sessions) == {session_key(mom_1)}
    again.close()
    assert set(Household(data_dir).state.sessions) == {session_key(mom_1)}


def test_a_limit_is_a_whole_number(data_dir):
    data_dir.mkdir()
    household = Household(data_dir)
    household.add_account("Kid", "child", "h")
    for bad in (-1, 1.5, "3", -2):
        with pytest.raises(AccountError):
            household.set_limit("Kid", messages_per_day=bad, tokens_per_day=None)
    with pytest.raises(AccountError):
        household.set_limit("nobody", messages_per_day=1, tokens_per_day=None)
    assert [r["type"] for r in lines_of(household.path)] == ["account"]


# -- names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("Mom", "mom"),
        ("Mom", "MOM"),
        ("Mom", "  mOm  "),
        ("Mom", "\uff2d\uff4f\uff4d"),  # fullwidth M, o, m: NFKC folds it to Mom
        ("José", "Jose\u0301"),  # precomposed and combining accent
        ("Straße", "STRASSE"),  # casefold
    ],
)
def test_names_are_unique_case_and_width_insensitively(data_dir, first, second):
    data_dir.mkdir()
    household = Household(data_dir)
    account = household.add_account(first, "parent", "h")
    size = household.path.stat().st_size
    with pytest.raises(AccountError, match="already"):
        household.add_account(second, "adult", "h")
    assert household.path.stat().st_size == size  # nothing appended
    assert household.state.named(second) is account
    assert len(household.state.active()) == 1


@pytest.mark.parametrize(
    "name",
    [
        "",
        "   ",
        "a" * 41,
        "a\nb",
        "a\tb",
        "a\x00b",
        "a\u200bb",  # zero-width space (a format character)
        "a\u202eb",  # right-to-left override
        "a\u2028b",  # line separator
        "a\u00a0b",  # no-break space
        "a  b",
        None,
        42,
    ],
)
def test_a_bad_name_is_refused_and_appends_nothing(data_dir, name):
    data_dir.mkdir()
    household = Household(data_dir)
    with pytest.raises(AccountError):
        household.add_account(name, "adult", "h")
    assert not household.path.exists() or household.path.stat().st_size == 0


def test_good_names_and_roles(data_dir):
    assert check_name("  Anne Marie ") == "Anne Marie"
    assert check_name("a" * 40) == "a" * 40
    assert check_name("Zoë") == "Zoë"
    data_dir.mkdir()
    household = Household(data_dir)
    with pytest.raises(AccountError, match="role"):
        household.add_account("Root", "admin", "h")
    assert household.add_account(" Anne Marie ", "adult", "h").name == "Anne Marie"


def test_a_name_can_be_used_again_after_remove(data_dir):
    data_dir.mkdir()
    household = Household(data_dir)
    old = household.add_account("Kid", "child", "h-old")
    old_session = household.start_session(old.id, "c")
    household.remove_account("kid")
    assert household.state.named("Kid") is None
    with pytest.raises(AccountError):
        household.remove_account("Kid")  # removing twice: there is no such account now
    with pytest.raises(AccountError):
        household.set_password("Kid", "h")
    with pytest.raises(AccountError):  # a removed account gets no new session
        household.start_session(old.id, "c")
    new = household.add_account("KID", "adult", "h-new")
    assert new.id != old.id
    assert household.state.named("kid") is new
    assert household.state.accounts[old.id].removed is True
    assert household.state.session(session_key(old_session)) is None
    # what is done to the name now is done to the new account only
    household.set_password("Kid", "h-new-2")
    assert household.state.accounts[old.id].hash == "h-old"
    assert household.state.accounts[new.id].hash == "h-new-2"
    household.close()
    fresh = Household(data_dir).state
    assert fresh.named("kid").id == new.id and fresh.accounts[old.id].removed


def test_a_check_and_its_record_are_one_step_across_households(data_dir):
    """A writer whose fold is stale folds what others appended before it decides."""
    data_dir.mkdir()
    first, second = Household(data_dir), Household(data_dir)
    kid = first.add_account("Kid", "child", "h")
    with pytest.raises(AccountError, match="already"):
        second.add_account("kid", "adult", "h")  # second had not refreshed: still refused
    second_kid_session = second.start_session(kid.id, "c")
    first.remove_account("Kid")
    with pytest.raises(AccountError):
        second.start_session(kid.id, "c")  # removed meanwhile, by another writer
    assert second.state.session(session_key(second_kid_session)) is None
    assert [r["type"] for r in lines_of(first.path)] == ["account", "session", "remove"]


# -- torn tails and corruption ------------------------------------------------------------

DEAD_WRITER = textwrap.dedent(
    """
    import fcntl, os, signal, sys
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, bytes.fromhex(sys.argv[2]))
    os.kill(os.getpid(), signal.SIGKILL)  # dies holding the lock, mid-append
    """
)


def die_mid_append(path: Path, tail: bytes) -> None:
    """A writer process that takes the lock, writes ``tail`` and is killed."""
    done = subprocess.run(
        [sys.executable, "-c", DEAD_WRITER, str(path), tail.hex()], timeout=60, check=False
    )
    assert done.returncode == -signal.SIGKILL


@pytest.mark.parametrize(
    "tail",
    [
        pytest.param(account_record("Ghost")[:30], id="half-a-record"),
        pytest.param(account_record("Ghost")[:-1], id="a-whole-record-but-its-newline"),
        pytest.param(b"\x00" * 64, id="nul-hole"),
        pytest.param(b"\x00" * 20 + b"\n" + b"\x00" * 7, id="nul-lines"),
        pytest.param(b"not json\n", id="an-invalid-last-line"),
        pytest.param(account_record("Ghost")[:40] + b"\n", id="a-cut-line-and-its-newline"),
    ],
)
def test_a_torn_tail_is_never_folded_and_is_cut_by_the_next_append(data_dir, tail):
    data_dir.mkdir()
    writer = Household(data_dir)
    mom = writer.add_account("Mom", "parent", "h")
    writer.close()
    path = data_dir / HOUSEHOLD_FILE
    good = path.read_bytes()
    die_mid_append(path, tail)
    assert path.read_bytes() == good + tail

    reader = Household(data_dir)
    assert reader.state.named("Ghost") is None
    assert set(reader.state.accounts) == {mom.id}
    assert reader.end == len(good)
    assert reader.refresh() is False  # folding again folds nothing, and cuts nothing
    assert path.read_bytes() == good + tail
    assert torn_files(data_dir) == []

    other = Household(data_dir)
    other.add_account("Kid", "child", "h")  # the next writer cuts the tail
    [aside] = torn_files(data_dir)
    assert aside.read_bytes() == tail
    assert stat.S_IMODE(aside.stat().st_mode) & 0o077 == 0
    assert path.read_bytes().startswith(good)
    assert [r["type"] for r in lines_of(path)] == ["account", "account"]  # every line valid
    assert reader.refresh() is True
    assert reader.state.named("Kid") is not None and reader.state.named("Ghost") is None
    assert Household(data_dir).state.named("Ghost") is None


def test_a_torn_tail_in_a_new_file_is_cut_too(data_dir):
    data_dir.mkdir()
    path = data_dir / HOUSEHOLD_FILE
    path.write_bytes(b"")
    os.chmod(path, 0o600)
    die_mid_append(path, account_record("Ghost")[:-1])
    household = Household(data_dir)
    assert household.state.accounts == {}
    household.add_account("Mom", "parent", "h")
    assert [r["name"] for r in lines_of(path)] == ["Mom"]
    assert len(torn_files(data_dir)) == 1


async def test_the_server_cuts_a_torn_tail_when_it_starts_a_session(make_client, data_dir):
    add_account(data_dir, "Mom", "parent")
    path = data_dir / HOUSEHOLD_FILE
    die_mid_append(path, b'{"type":"session","ts":1,"si')
    client = await make_client()
    await login(client, "Mom")
    assert [r["type"] for r in lines_of(path)] == ["account", "session"]
    assert torn_files(data_dir)[0].read_bytes() == b'{"type":"session","ts":1,"si'


@pytest.mark.parametrize(
    "bad",
    [b"not json\n", b"\x00\x00\x00\n", b'{"type":"account"}\n', b"[1, 2]\n", b"\xff\xfe\n"],
)
def test_an_invalid_line_before_valid_ones_is_corruption_and_is_never_cut(data_dir, bad):
    data_dir.mkdir()
    early = Household(data_dir)  # opened while the file was sound
    early.add_account("Mom", "parent", "h")
    path = data_dir / HOUSEHOLD_FILE
    with open(path, "ab") as out:
        out.write(bad + account_record("Later", "later-id"))
    damaged = path.read_bytes()
    with pytest.raises(CorruptLogError):
        Household(data_dir)
    with pytest.raises(CorruptLogError):
        early.refresh()
    with pytest.raises(CorruptLogError):
        early.add_account("Kid", "child", "h")  # a writer refuses too, and cuts nothing
    with pytest.raises(CorruptLogError):
        early.start_session(next(iter(early.state.accounts)), "c")
    assert path.read_bytes() == damaged
    assert torn_files(data_dir) == []
    assert early.state.named("Later") is None and early.state.named("Kid") is None


def test_serve_refuses_a_corrupt_household_with_a_message(data_dir):
    data_dir.mkdir()
    path = data_dir / HOUSEHOLD_FILE
    path.write_bytes(account_record("Mom", "m") + b"garbage\n" + account_record("Dad", "d"))
    os.chmod(path, 0o600)
    done = chatledger("serve", "--port", "0", "--data-dir", str(data_dir))
    assert done.returncode == 2, done.stdout + done.stderr
    assert HOUSEHOLD_FILE in done.stderr and "Traceback" not in done.stderr
    assert " serving http://" not in done.stdout


def test_the_cli_reports_a_corrupt_household_without_a_traceback(data_dir):
    data_dir.mkdir()
    path = data_dir / HOUSEHOLD_FILE
    path.write_bytes(account_record("Mom", "m") + b"garbage\n" + account_record("Dad", "d"))
    os.chmod(path, 0o600)
    done = chatledger("user", "list", "--data-dir", str(data_dir))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("chatledger:")


# -- several writers ----------------------------------------------------------------------


def test_two_households_see_each_others_appends(data_dir):
    data_dir.mkdir()
    first, second = Household(data_dir), Household(data_dir)
    assert second.changed() is False and second.refresh() is False  # no file yet
    mom = first.add_account("Mom", "parent", "h")
    assert second.changed() is True
    assert second.state.named("Mom") is None  # not before a refresh
    assert second.refresh() is True
    assert second.changed() is False and second.refresh() is False
    assert second.state.named("mom").id == mom.id
    sid = second.start_session(mom.id, "c")
    second.set_limit("Mom", messages_per_day=2, tokens_per_day=None)
    assert first.refresh() is True
    assert first.state.session(session_key(sid)).account == mom.id
    assert first.state.accounts[mom.id].messages_per_day == 2
    first.end_session(session_key(sid))
    second.refresh()
    assert second.state.sessions == {} and first.state.sessions == {}
    assert first.end == second.end == first.path.stat().st_size


def test_cli_user_add_in_another_process_while_a_household_holds_the_file(data_dir):
    data_dir.mkdir()
    held = Household(data_dir)
    held.add_account("Mom", "parent", "h")
    done = chatledger(
        "user", "add", "Kid", "--role", "child", "--password-stdin", "--data-dir", str(data_dir),
        stdin="a long password\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert held.changed() is True
    assert held.refresh() is True
    kid = held.state.named("kid")
    assert kid is not None and kid.role == "child"
    assert argon2.PasswordHasher().verify(kid.hash, "a long password")
    assert kid.hash.startswith("$argon2id$")
    # and the other way round: the CLI sees what this process appended
    held.remove_account("Kid")
    listing = chatledger("user", "list", "--data-dir", str(data_dir))
    assert listing.returncode == 0, listing.stderr
    assert "Mom" in listing.stdout and "Kid" not in listing.stdout
    assert "$argon2" not in listing.stdout
    again = chatledger(
        "user", "add", "KID", "--role", "adult", "--password-stdin", "--data-dir", str(data_dir),
        stdin="another password\n",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    taken = chatledger(
        "user", "add", "mom", "--role", "adult", "--password-stdin", "--data-dir", str(data_dir),
        stdin="another password\n",
    )  # fmt: skip
    assert taken.returncode == 1 and "already" in taken.stderr
    held.refresh()
    assert [a.name for a in held.state.active()] == ["Mom", "KID"]


def test_cli_waits_for_a_writer_that_holds_the_lock(data_dir):
    data_dir.mkdir()
    Household(data_dir).add_account("Mom", "parent", "h")
    path = data_dir / HOUSEHOLD_FILE
    before = path.read_bytes()
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a writer mid-append holds it
        process = subprocess.Popen(
            [sys.executable, "-m", "chatledger", "user", "add", "Kid", "--role", "child",
             "--password-stdin", "--data-dir", str(data_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        process.stdin.write(b"a long password\n")
        process.stdin.close()
        time.sleep(2.0)
        assert process.poll() is None  # blocked on the lock
        assert path.read_bytes() == before
    finally:
        os.close(fd)  # releases the lock
    assert process.wait(60) == 0, process.stderr.read()
    assert [r["name"] for r in lines_of(path)] == ["Mom", "Kid"]


# -- what is stored -----------------------------------------------------------------------


def test_the_log_stores_only_the_sha256_of_a_session_id(data_dir):
    data_dir.mkdir()
    household = Household(data_dir)
    mom = household.add_account("Mom", "parent", "h")
    session_id = household.start_session(mom.id, "10.1.2.3")
    assert len(session_id) >= 32
    data = household.path.read_bytes()
    assert session_id.encode() not in data
    assert session_key(session_id).encode() in data
    assert [r["sid"] for r in lines_of(household.path) if r["type"] == "session"] == [
        session_key(session_id)
    ]
    assert household.start_session(mom.id, "c") != session_id  # a new id each time


async def test_a_cookie_value_is_in_no_file_of_the_data_dir(make_client, data_dir):
    add_account(data_dir, "Mom", "parent")
    client = await make_client(demo_reply_tokens=3)
    await login(client, "Mom")
    cookie = client.session.cookie_jar.filter_cookies(client.make_url("/"))[COOKIE].value
    conversation_id = await create_conversation(client, title="t")
    async with client.get(f"/api/conversations/{conversation_id}/log") as response:
        assert response.status == 200
    await client.post("/api/logout")
    await client.close()
    household = (data_dir / HOUSEHOLD_FILE).read_bytes()
    assert session_key(cookie).encode() in household
    for path in data_dir.rglob("*"):
        if path.is_file():
            assert cookie.encode() not in path.read_bytes(), path


def test_the_household_file_is_private(data_dir, tmp_path):
    done = chatledger(
        "user", "add", "Mom", "--role", "parent", "--password-stdin",
        "--data-dir", str(data_dir), stdin="a long password\n",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((data_dir / HOUSEHOLD_FILE).stat().st_mode) & 0o077 == 0


def make_foreign(data_dir: Path, tmp_path: Path, kind: str) -> None:
    """Accounts exist, but household.jsonl is a symlink to them, or a second name (a hard
    link, as ``cp -al`` backups make) of their file."""
    data_dir.mkdir(exist_ok=True)
    add_account(data_dir, "Mom", "parent")
    path = data_dir / HOUSEHOLD_FILE
    if kind == "symlink":
        real = tmp_path / "real-household.jsonl"
        path.rename(real)
        path.symlink_to(real)
    else:
        os.link(path, tmp_path / "backup-household.jsonl")


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_a_household_file_that_is_not_ours_is_refused(data_dir, tmp_path, kind):
    make_foreign(data_dir, tmp_path, kind)
    with pytest.raises(OSError):  # ForeignFileError, never "no accounts"
        Household(data_dir)


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
async def test_a_foreign_household_file_never_opens_single_person_mode(
    make_client, data_dir, tmp_path, kind
):
    make_foreign(data_dir, tmp_path, kind)
    try:
        client = await make_client()
    except OSError:
        return  # refused at start: fine
    response = await client.get("/api/conversations")
    assert response.status == 401  # never the LOCAL viewer with accounts on disk


# -- durability ---------------------------------------------------------------------------


class RecordingIO(FileIO):
    """A FileIO that records every call: (kind, file name, file size at the call)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    @staticmethod
    def _name(fd: int) -> str:
        return Path(os.readlink(f"/proc/self/fd/{fd}")).name

    def write_all(self, fd: int, data: bytes) -> None:
        super().write_all(fd, data)
        self.calls.append(("write", self._name(fd), os.fstat(fd).st_size))

    def fdatasync(self, fd: int) -> None:
        self.calls.append(("fdatasync", self._name(fd), os.fstat(fd).st_size))
        super().fdatasync(fd)

    def fsync_dir(self, path: Path) -> None:
        self.calls.append(("fsync_dir", Path(path).name, 0))
        super().fsync_dir(path)


def test_every_append_is_written_then_fdatasynced_through_file_io(data_dir):
    data_dir.mkdir()
    io = RecordingIO()
    household = Household(data_dir, file_io=io)
    assert io.calls == []  # reading nothing writes nothing
    mom = household.add_account("Mom", "parent", "h")
    size = household.path.stat().st_size
    # a new file's name is synced (its directory), and the record is synced before use
    assert io.calls == [
        ("fsync_dir", data_dir.name, 0),
        ("write", HOUSEHOLD_FILE, size),
        ("fdatasync", HOUSEHOLD_FILE, size),
    ]
    operations = [
        lambda: household.start_session(mom.id, "c"),
        lambda: household.set_limit("Mom", messages_per_day=1, tokens_per_day=2),
        lambda: household.set_password("Mom", "h2"),
        lambda: household.end_session(session_key(household.start_session(mom.id, "c"))),
        lambda: household.remove_account("Mom"),
    ]
    for operation in operations:
        io.calls.clear()
        operation()
        size = household.path.stat().st_size
        writes = [c for c in io.calls if c[0] == "write"]
        syncs = [c for c in io.calls if c[0] == "fdatasync"]
        assert writes and len(syncs) == len(writes)
        assert io.calls[-1] == ("fdatasync", HOUSEHOLD_FILE, size)  # the last call: a sync
        for write, sync in zip(writes, syncs, strict=True):  # each write has its own sync
            assert io.calls.index(sync) == io.calls.index(write) + 1
            assert sync[2] == write[2]
    io.calls.clear()
    household.end_session("not-a-live-session")  # nothing to append: nothing written
    assert io.calls == []


def test_with_durable_false_appends_are_written_but_not_synced(data_dir):
    data_dir.mkdir()
    io = RecordingIO()
    household = Household(data_dir, file_io=io, durable=False)
    household.add_account("Mom", "parent", "h")
    assert [c[0] for c in io.calls if c[1] == HOUSEHOLD_FILE] == ["write"]


def test_cutting_a_torn_tail_is_synced_before_the_next_record(data_dir):
    data_dir.mkdir()
    Household(data_dir).add_account("Mom", "parent", "h")
    path = data_dir / HOUSEHOLD_FILE
    good = path.stat().st_size
    die_mid_append(path, b'{"type":"acc')
    io = RecordingIO()
    household = Household(data_dir, file_io=io)
    household.add_account("Kid", "child", "h")
    [aside] = torn_files(data_dir)
    kinds = [(kind, name) for kind, name, _ in io.calls]
    assert kinds[:3] == [("write", aside.name), ("fdatasync", aside.name), ("fsync_dir", "data")]
    # the cut itself is synced (at the good size) before the new record is written
    assert io.calls[3] == ("fdatasync", HOUSEHOLD_FILE, good)
    assert kinds[4:] == [("write", HOUSEHOLD_FILE), ("fdatasync", HOUSEHOLD_FILE)]


class FailingSyncIO(FileIO):
    def __init__(self) -> None:
        self.fail = True

    def fdatasync(self, fd: int) -> None:
        if self.fail:
            self.fail = False
            raise OSError(5, "Input/output error")
        super().fdatasync(fd)


def test_a_failed_fdatasync_is_fatal_for_the_household_log(data_dir):
    data_dir.mkdir()
    household = Household(data_dir, file_io=FailingSyncIO())
    with pytest.raises(OSError):
        household.add_account("Mom", "parent", "h")
    with pytest.raises(OSError):  # never retried as if it worked
        household.add_account("Dad", "parent", "h")
    assert household.state.named("Mom") is None  # not acted on by this process


# -- through the server -------------------------------------------------------------------


async def test_a_reused_name_does_not_inherit_the_removed_accounts_conversations(
    make_client, data_dir
):
    add_account(data_dir, "Mom", "parent")
    add_account(data_dir, "Kid", "adult", "kid-password-1")
    client = await make_client()
    await login(client, "Kid", "kid-password-1")
    secret = await create_conversation(client, title="old kid's diary")
    household = Household(data_dir)
    household.remove_account("Kid")
    household.close()
    add_account(data_dir, "kid", "adult", "new-kid-password")
    await asyncio.sleep(0)
    client.session.cookie_jar.clear()
    response = await client.post("/api/login", json={"name": "Kid", "password": "kid-password-1"})
    assert response.status == 401  # the old password is the removed account's
    await login(client, "KID", "new-kid-password")
    listing = await (await client.get("/api/conversations")).json()
    assert secret not in [row["id"] for row in listing]
    for path in ("", "/log", "/events", "/audit"):
        response = await client.get(f"/api/conversations/{secret}{path}")
        assert response.status == 404, path
    response = await client.post(f"/api/conversations/{secret}/messages", json={"text": "hi"})
    assert response.status == 404
