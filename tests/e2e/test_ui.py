"""`supersede ui` in a real browser (Debian's chromium driven by Playwright, no browser
download): the overview, a cancelled run whose "superseded by" link leads to the run that won,
a key page in sequence order that shows a new run live, an action behind its CSRF token, and
untrusted strings rendered as text. Screenshots go to test-artifacts/ui/."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from supersede.keys import Keys
from supersede.server import free_port
from tests.support import REPO, System, eventually, records

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "test-artifacts" / "ui"

try:
    from playwright.async_api import Browser, Page, async_playwright
except ImportError:  # pragma: no cover - the dev extra is installed in CI
    async_playwright = None  # type: ignore[assignment]

needs_browser = pytest.mark.skipif(
    CHROMIUM is None or async_playwright is None,
    reason="no chromium on PATH (.ci/run installs Debian's chromium) or no playwright package",
)


def start_ui(
    system: System, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "supersede", "ui", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, env={**system.env, **(env or {})}, stderr=system.stderr)
    system.procs.append(proc)
    return proc, f"http://127.0.0.1:{port}"


def get(url: str, data: bytes | None = None, timeout: float = 5, **headers: str) -> tuple[int, str]:
    """(status, body) of a GET, or of a POST of `data`."""
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def up(base: str) -> None:
    async def answers() -> bool:
        try:
            return (await asyncio.to_thread(get, base + "/"))[0] == 200
        except OSError:
            return False

    await eventually(answers, timeout=20)


async def publish(redis: Redis, keys: Keys, name: str, **data: Any) -> None:
    await redis.xadd(keys.events_stream, {"name": name, "data": orjson.dumps(data)})


async def runs_of(redis: Redis, keys: Keys, key: str) -> list[dict[str, Any]]:
    return sorted(
        (dict(r, id=rid) for rid, r in (await records(redis, keys)).items() if r.get("k") == key),
        key=lambda r: str(r["s"]),
    )


def ended(redis: Redis, keys: Keys, key: str, n: int) -> Callable[[], Any]:
    async def check() -> bool:
        runs = await runs_of(redis, keys, key)
        return len(runs) == n and all(r["st"] in ("S", "C", "F") for r in runs)

    return check


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert async_playwright is not None and CHROMIUM is not None
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def shots() -> Iterator[Callable[[Page, str], Any]]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    async def shot(page: Page, name: str) -> None:
        await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    yield shot


@needs_browser
async def test_a_person_sees_why_a_run_was_cancelled_and_a_key_live(
    redis: Redis, keys: Keys, system: System, browser: Browser, shots: Any
) -> None:
    await system.pipeline(redis, keys, 1)
    _, base = start_ui(system, "--allow-actions")
    await up(base)
    # alice: a long run superseded by a quick one (CANCEL_IN_PROGRESS, max_runs 1)
    minute = int(time.time() // 60)
    await publish(redis, keys, "chat.message", userId="alice", sleep=30, text="first")
    await eventually(lambda: _state_of(redis, keys, "alice", 0, "R"), timeout=20)
    await publish(redis, keys, "chat.message", userId="alice", text="second")
    await eventually(ended(redis, keys, "alice", 2), timeout=20)
    loser, winner = await runs_of(redis, keys, "alice")
    assert loser["st"] == "C" and winner["st"] == "S" and loser["by"] == winner["id"]

    page = await browser.new_page()
    await page.goto(base + "/")
    assert "chat-reply" in await page.inner_text("table.workflows")
    assert "CANCEL_IN_PROGRESS" in await page.inner_text("table.workflows")
    # this minute's ended runs (from the ended streams; the page refreshes itself): 2, 1 cancelled
    # (looked at only while the minute both runs ended in still has 15 s to go: in the next
    # one the page rightly shows 0)
    if int(time.time() // 60) == minute and time.time() % 60 < 45:
        await page.wait_for_selector("b.ended-now:text-is('2')", timeout=10_000)
        assert await page.inner_text("b.cancelled-now") == "1"
    await shots(page, "overview")

    # pages: one run a page, the older one behind the "Older runs" link (a cursor). Newest end
    # first: the superseded run ends when its executor has stopped it, which may be after the
    # quick winner ended (a loaded CI machine: the pages in the other order)
    await page.goto(base + "/runs?workflow=chat-reply&state=&limit=1")
    first = await page.locator("table.runs td:first-child a.run").all_inner_texts()
    await page.click("a.older")
    await page.wait_for_url("**before=**")
    second = await page.locator("table.runs td:first-child a.run").all_inner_texts()
    ends: list[tuple[tuple[int, ...], str]] = []
    for sk in keys.all_shards():
        for entry_id, fields in await redis.xrange(sk.ended_stream("chat-reply")):
            at = tuple(int(n) for n in entry_id.decode().split("-"))
            ends += [(at, run) for ids in fields.values() for run in ids.decode().split(",")]
    newest_first = [run for _, run in sorted(ends, reverse=True)]
    assert first + second == newest_first, (first, second, newest_first, page.url)
    assert sorted(first + second) == sorted([winner["id"], loser["id"]])

    # the key page: the runs in sequence order, with their outcomes
    await page.goto(base + "/runs?workflow=chat-reply")
    await page.click("table.runs a.key:text-is('alice')")
    await page.wait_for_selector("table.key-runs")
    rows = await page.locator("table.key-runs tbody tr").all_inner_texts()
    assert [r.split("\t")[1:3] for r in rows] == [
        [loser["id"], "CANCELLED"],
        [winner["id"], "SUCCEEDED"],
    ]
    assert await page.inner_text("b.max-runs") == "1"
    await shots(page, "key")

    # the cancelled run: "superseded by" leads to the run that won
    await page.click(f"table.key-runs a.run:text-is('{loser['id']}')")
    await page.wait_for_selector("table.facts")
    facts = await page.inner_text("table.facts")
    assert "superseded by" in facts and "CANCELLED" in facts
    assert await page.locator("svg.timeline rect").count() >= 2
    await shots(page, "cancelled-run")
    await page.click(f"table.facts a.run:text-is('{winner['id']}')")
    await page.wait_for_url(f"**/runs/{winner['id']}")
    assert "SUCCEEDED" in await page.inner_text("table.facts")
    assert loser["id"] in await page.inner_text("table.superseded")
    await shots(page, "winning-run")

    # live: a new run of a key appears on its open page without a reload
    await page.goto(base + "/key?workflow=chat-reply&key=carol")
    assert await page.locator("table.key-runs").count() == 0
    marker = await page.evaluate("window.__loaded = Math.random()")
    await publish(redis, keys, "chat.message", userId="carol", sleep=30, text="live")
    await page.wait_for_selector("table.key-runs a.run", timeout=20_000)
    assert await page.evaluate("window.__loaded") == marker  # the same document: no reload
    await shots(page, "key-live")

    # an action: cancel carol's live run from its key page (the form carries the CSRF token)
    await page.click("form[action='/key/cancel'] button")
    await eventually(lambda: _state_of(redis, keys, "carol", 0, "C"), timeout=20)
    (carol,) = await runs_of(redis, keys, "carol")
    assert carol["why"] == "manual"
    # a key holding line breaks: the browser sent a lone LF or CR as CRLF, so the page said
    # "No live run to cancel." while the run went on (a probe); the form carries it in hex
    odd = "two\nlines\rand a CR"
    await publish(redis, keys, "chat.message", userId=odd, sleep=30, text="odd")
    await eventually(lambda: _state_of(redis, keys, odd, 0, "R"), timeout=20)
    await page.goto(base + "/key?" + urllib.parse.urlencode({"workflow": "chat-reply", "key": odd}))
    await page.click("form[action='/key/cancel'] button")
    await eventually(lambda: _state_of(redis, keys, odd, 0, "C"), timeout=20)
    assert "Cancelled 1 live run." in await page.inner_text("p.notice")

    # replay a dead letter from its page (refused again here: its data is still not JSON)
    await redis.xadd(keys.events_stream, {"name": "chat.message", "data": b"{not json"})

    async def one_dead() -> bool:
        return len(await _dead_ids(redis, keys, 1)) == 1

    await eventually(one_dead, timeout=20)
    (dead_id,) = await _dead_ids(redis, keys, 1)
    await page.goto(base + "/dead")
    await page.click(f"form[action='/dead/{dead_id}/replay'] button")

    async def replayed() -> bool:
        ids = await _dead_ids(redis, keys, 1)
        return bool(ids) and dead_id not in ids

    await eventually(replayed, timeout=20)
    notice = await page.inner_text("p.notice")  # (the page said nothing of the replay)
    assert re.fullmatch(r"Replayed as inbox entry \d+-\d+\.", notice), notice
    forged = base + "/dead?" + urllib.parse.urlencode({"replayed": "1-1.0123456789abcdef"})
    await page.goto(forged)
    assert await page.locator("p.notice").count() == 0
    await page.close()


async def _dead_ids(redis: Redis, keys: Keys, n: int) -> list[str]:
    ids = [e.decode() for e, _ in await redis.xrange(keys.dead_stream)]
    return ids if len(ids) >= n else []


async def _state_of(redis: Redis, keys: Keys, key: str, i: int, st: str) -> bool:
    runs = await runs_of(redis, keys, key)
    return len(runs) > i and runs[i]["st"] == st


HOSTILE = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


@needs_browser
async def test_untrusted_keys_and_inputs_render_as_text(
    redis: Redis, keys: Keys, system: System, browser: Browser, shots: Any
) -> None:
    await system.pipeline(redis, keys, 1)
    _, base = start_ui(system)
    await up(base)
    await publish(redis, keys, "chat.message", userId=HOSTILE, text=HOSTILE)
    await eventually(ended(redis, keys, HOSTILE, 1), timeout=20)
    (run,) = await runs_of(redis, keys, HOSTILE)
    await redis.xadd(keys.events_stream, {"name": HOSTILE, "data": b"{not json"})  # dead letter
    dialogs: list[str] = []
    page = await browser.new_page()
    page.on("dialog", lambda d: dialogs.append(d.message))
    for path in ("/runs", f"/runs/{run['id']}", "/key?workflow=chat-reply&key=%3Cscript%3E"):
        await page.goto(base + path)
    await page.goto(base + "/runs?workflow=chat-reply")
    assert HOSTILE in await page.inner_text("table.runs")
    await page.click("table.runs a.key")
    await page.wait_for_selector("table.key-runs")
    await page.goto(base + f"/runs/{run['id']}")
    assert HOSTILE in await page.inner_text("table.facts")
    shown = await page.inner_text("pre")  # the step's output (the input is kept while live)
    assert "re: <script>alert(1)</script>" in shown and "<img src=x onerror=alert(2)>" in shown
    await shots(page, "hostile-run")

    await page.goto(base + "/dead")
    assert await page.locator("table.dead tbody tr").count() >= 1
    await shots(page, "dead-letters")
    assert dialogs == []
    assert await page.evaluate("document.querySelectorAll('main img, main script').length") == 0
    await page.close()
    status, text = await asyncio.to_thread(get, base + f"/runs/{run['id']}")
    assert status == 200 and "<script>alert" not in text and "&lt;script&gt;" in text


@needs_browser
async def test_a_long_key_leaves_the_runs_list_readable_and_a_refresh_keeps_a_links_focus(
    redis: Redis, keys: Keys, system: System, browser: Browser, shots: Any
) -> None:
    """A key of 900 letters squeezed every other column of the runs list to a letter a line
    (50 rows, 8,097 px), and each refresh of a live page took the focus off the link a
    keyboard user was on (a UI probe). The key is cut to a line, its text in its title; the
    focused link keeps the focus."""
    await system.pipeline(redis, keys, 1)
    _, base = start_ui(system)
    await up(base)
    long_key = "W" * 900
    await publish(redis, keys, "chat.message", userId=long_key, text="hi")
    await publish(redis, keys, "chat.message", userId="bob", text="hi")
    await eventually(ended(redis, keys, long_key, 1), timeout=20)
    await eventually(ended(redis, keys, "bob", 1), timeout=20)
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    await page.goto(base + "/runs")
    rows = page.locator("table.runs tbody tr")
    heights = [(await rows.nth(i).bounding_box() or {"height": 0})["height"]
               for i in range(await rows.count())]  # fmt: skip
    assert heights and max(heights) < 60, heights  # (a line or two: it was 200 px and more)
    cut = page.locator(f"table.runs a.key[title='{long_key}']")
    assert await cut.count() == 1
    await shots(page, "long-key")

    link = page.locator("table.runs a.run").first
    href = await link.get_attribute("href")
    await link.focus()
    before = await page.inner_text("table.runs")
    await publish(redis, keys, "chat.message", userId="carol", text="hi")

    async def refreshed() -> bool:
        return "carol" in await page.inner_text("table.runs")

    await eventually(refreshed, timeout=20)
    assert "carol" not in before
    focused = await page.evaluate("document.activeElement.getAttribute('href')")
    assert focused == href, (focused, href)
    await page.close()


@needs_browser
async def test_a_live_page_says_since_when_and_why_it_is_not_updated(
    keys: Keys, browser: Browser, shots: Any
) -> None:
    """Redis hung (SIGSTOP), then gone: the dashboard answered 500 "internal error", or hung
    with the server, and an open page kept showing its last figures as if live. Each page now
    answers 503 naming Redis within 5 s, and a live page says since when it is not updated,
    and why, until it is again."""
    import signal

    from supersede.server import EmbeddedServer

    server = EmbeddedServer().start()  # (its own: this test stops it)
    system = System(server.url, keys)
    own = Redis.from_url(server.url)
    try:
        await system.pipeline(own, keys, 1)
        _, base = start_ui(system)
        await up(base)
        page = await browser.new_page()
        await page.goto(base + "/")
        note = page.locator("p.stale")
        assert await note.count() == 1 and await note.is_hidden()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)  # hung: connections open, nothing answers
        try:
            await note.wait_for(state="visible", timeout=20_000)
            said = await note.inner_text()
            assert said.startswith("Not updated since ") and "Redis is unreachable" in said, said
            await shots(page, "stale")
            status, text = await asyncio.to_thread(get, base + "/runs", None, 15)
            assert status == 503 and "no answer within 5 s" in text, (status, text)
        finally:
            server.proc.send_signal(signal.SIGCONT)
        await note.wait_for(state="hidden", timeout=20_000)
        server.stop()  # gone: connections refused
        await note.wait_for(state="visible", timeout=20_000)
        assert "Redis is unreachable" in await note.inner_text()
        await page.close()
    finally:
        await own.aclose()
        system.close()
        server.stop()


async def test_the_ui_is_read_only_unless_allowed_and_actions_need_the_csrf_token(
    redis: Redis, keys: Keys, system: System
) -> None:
    await system.pipeline(redis, keys, 1)
    await publish(redis, keys, "chat.message", userId="dora", sleep=30)
    await eventually(lambda: _state_of(redis, keys, "dora", 0, "R"), timeout=20)
    (run,) = await runs_of(redis, keys, "dora")
    _, ro = start_ui(system)
    _, rw = start_ui(system, "--allow-actions")
    await up(ro)
    await up(rw)
    status, page_ro = await asyncio.to_thread(get, f"{ro}/runs/{run['id']}")
    assert status == 200 and "Cancel this run" not in page_ro
    assert "<h2>Input</h2>" in page_ro and "dora" in page_ro  # (kept in the live run's record)
    status, _ = await asyncio.to_thread(get, f"{ro}/runs/{run['id']}/cancel", b"csrf=x")
    assert status == 403
    status, page_rw = await asyncio.to_thread(get, f"{rw}/runs/{run['id']}")
    assert "Cancel this run" in page_rw
    token = re.search(r'name=csrf value="([^"]+)"', page_rw)
    assert token is not None
    cancel = f"{rw}/runs/{run['id']}/cancel"
    # a forged form: no token, or a wrong one; the right token posted from another origin; a
    # request addressed to another host name (a DNS name rebound to 127.0.0.1)
    right = f"csrf={token[1]}".encode()
    forged: list[tuple[bytes, dict[str, str]]] = [
        (b"", {}),
        (b"csrf=guess", {}),
        (right, {"Origin": "http://evil.example"}),
        (right, {"Sec-Fetch-Site": "cross-site"}),
    ]
    for data, headers in forged:
        status, text = await asyncio.to_thread(get, cancel, data, **headers)
        assert status == 403, (data, headers, text)
    host = rw.removeprefix("http://").replace("127.0.0.1", "evil.example")
    status, _ = await asyncio.to_thread(get, f"{rw}/", None, Host=host)
    assert status == 421
    # an id that is no run here: 404, not a 500 or the cancel script's words
    tail = "abcd" * 5  # (a run id's tail: 20 hex digits)
    for unknown in ("1-" + tail, f"{keys.shards}-{tail}", f"99999999999999999999999-{tail}"):
        status, text = await asyncio.to_thread(get, f"{rw}/runs/{unknown}/cancel", right,
                                               Origin=rw)  # fmt: skip
        assert status == 404 and f"no run {unknown!r}" in text, (unknown, status, text)
    status, text = await asyncio.to_thread(get, f"{rw}/runs/1-abc/cancel", right, Origin=rw)
    assert status == 404 and "not a run id: '1-abc'" in text, (status, text)
    assert await _state_of(redis, keys, "dora", 0, "R")
    # bad parameters are a 400 (or a 404), never a 500
    bad = [
        ("/key?workflow=chat-reply", 400),
        ("/runs?before=0-0", 400),
        ("/runs?before=99999999999999999999-0", 400),
        ("/runs?limit=x", 400),
        ("/runs?ended_before=yesterday", 400),
        ("/runs?state=nope", 400),
        ("/runs/not-a-run", 404),
        ("/runs?workflow=chat-replies", 404),
        ("/runs?ended_before=1970-01-01T00:00", 200),
    ]
    for path, want in bad:
        status, text = await asyncio.to_thread(get, rw + path)
        assert status == want, (path, status, text[-300:])
        if path.startswith("/runs?workflow="):  # it names the registered ones
            assert "no workflow 'chat-replies' is registered" in text and "chat-reply" in text
        if want == 400 and "?" in path and not path.startswith("/key"):  # it names the parameter
            param = path.split("?", 1)[1].split("=", 1)[0]
            assert text.startswith(f"{param}: "), (path, text)
    # behind a TLS proxy on 443 that forwards `ui.example` (or `ui.example:443`): the pages
    # and the actions (the browser's Origin is https://ui.example)
    _, proxied = start_ui(system, "--allow-actions", "--allow-host", "ui.example")
    await up(proxied)
    status, page = await asyncio.to_thread(get, f"{proxied}/", None, Host="ui.example")
    assert status == 200, page
    status, page = await asyncio.to_thread(get, f"{proxied}/runs/{run['id']}", None,
                                           Host="ui.example:443")  # fmt: skip
    proxy_token = re.search(r'name=csrf value="([^"]+)"', page)
    assert status == 200 and proxy_token is not None
    status, text = await asyncio.to_thread(
        get, f"{proxied}/runs/1-abc/cancel", f"csrf={proxy_token[1]}".encode(),
        Host="ui.example:443", Origin="https://ui.example",
    )  # fmt: skip
    assert status == 404, text  # (past the host and origin checks: no such run)
    # a key's cancel says what it did: no fields is a 400; a workflow not registered, or a key
    # with no live run, is said on the key page (it answered 303 without a word)
    key_cancel = f"{rw}/key/cancel"
    status, _ = await asyncio.to_thread(get, key_cancel, right, Origin=rw)
    assert status == 400
    status, text = await asyncio.to_thread(
        get, key_cancel, right + b"&workflow=nope&key=x", Origin=rw
    )
    assert status == 200 and "No workflow" in text and "is registered" in text
    status, text = await asyncio.to_thread(
        get, key_cancel, right + b"&workflow=chat-reply&key=nobody", Origin=rw
    )
    assert status == 200 and "No live run to cancel." in text
    # the right token, from the page's own origin: the run is cancelled
    status, _ = await asyncio.to_thread(get, cancel, right, Origin=rw)
    assert status in (200, 303)
    await eventually(lambda: _state_of(redis, keys, "dora", 0, "C"), timeout=20)
    # a second cancel changes nothing, and the page says so (it said nothing)
    status, text = await asyncio.to_thread(get, cancel, right, Origin=rw)
    assert status == 200 and "Not cancelled: the run had ended" in text
    # ... and a link from elsewhere cannot make a page say so (the notices are signed)
    spoofed = {f"{rw}/runs/{run['id']}?not=1": "Not cancelled",
              f"{rw}/key?workflow=chat-reply&key=nobody&cancelled=999999": "Cancelled 999999",
              f"{rw}/key?workflow=chat-reply&key=nobody&cancelled=0": "No live run"}  # fmt: skip
    for url, said in spoofed.items():
        status, text = await asyncio.to_thread(get, url)
        assert status == 200 and said not in text, (url, text)
    assert (await asyncio.to_thread(get, f"{rw}/favicon.ico"))[0] == 204  # (it was a 404)
    assert os.path.isdir(REPO / "services" / "ui" / "static")


def _posted(url: str, data: bytes, origin: str) -> tuple[int, str]:
    """(status, the address it ended at) of a form's post, its redirect followed."""
    request = urllib.request.Request(url, data=data, headers={"Origin": origin})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, r.geturl()
    except urllib.error.HTTPError as exc:
        return exc.code, url


async def test_dashboards_sharing_a_secret_take_each_others_forms_and_notices(
    redis: Redis, keys: Keys, system: System
) -> None:
    """Behind one load balancer, a page from one dashboard posts to another: with the same
    SUPERSEDE_UI_SECRET its token is taken and its notices shown (each process had its own
    token: the post was refused, "reload the page"); without, refused as before."""
    await system.pipeline(redis, keys, 1)
    await publish(redis, keys, "chat.message", userId="erin", sleep=30)
    await eventually(lambda: _state_of(redis, keys, "erin", 0, "R"), timeout=20)
    (run,) = await runs_of(redis, keys, "erin")
    shared = {"SUPERSEDE_UI_SECRET": "correct horse battery staple"}
    _, a = start_ui(system, "--allow-actions", env=shared)
    _, b = start_ui(system, "--allow-actions", env=shared)
    _, own = start_ui(system, "--allow-actions")
    for base in (a, b, own):
        await up(base)
    _, page = await asyncio.to_thread(get, f"{a}/runs/{run['id']}")
    token = re.search(r'name=csrf value="([^"]+)"', page)
    assert token is not None
    form = f"csrf={token[1]}".encode()
    status, _ = await asyncio.to_thread(_posted, f"{own}/runs/{run['id']}/cancel", form, own)
    assert status == 403  # (another secret: a token of a's is no token of its)
    status, _ = await asyncio.to_thread(_posted, f"{b}/runs/{run['id']}/cancel", form, b)
    assert status == 200
    await eventually(lambda: _state_of(redis, keys, "erin", 0, "C"), timeout=20)
    # a's notice ("not cancelled: the run had ended"), shown by b, not by the other
    status, notice = await asyncio.to_thread(_posted, f"{a}/runs/{run['id']}/cancel", form, a)
    assert status == 200 and "?not=" in notice, notice
    query = notice.split("?", 1)[1]
    _, text = await asyncio.to_thread(get, f"{b}/runs/{run['id']}?{query}")
    assert "Not cancelled: the run had ended" in text
    _, text = await asyncio.to_thread(get, f"{own}/runs/{run['id']}?{query}")
    assert "Not cancelled" not in text
    # a short secret is one line naming it
    done = subprocess.run(
        [sys.executable, "-m", "supersede", "ui", "--port", str(free_port())],
        env={**system.env, "SUPERSEDE_UI_SECRET": "hunter2"}, capture_output=True, timeout=60,
    )  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("supersede: SUPERSEDE_UI_SECRET is too short")


async def test_a_password_changed_under_the_ui_is_said_so_and_a_bad_entry_id_refused(
    redis: Redis, redis_url: str, keys: Keys, system: System
) -> None:
    """A password rotated (or a user removed) under a running dashboard: its new connections
    are refused, which redis-py raises as a ConnectionError, and the pages said "Redis is
    unreachable" (a probe). They say the credentials were refused. A dead letter's replay of an
    id past the server's 64 bits answered 500."""
    user, url = f"ui-{keys.namespace}", urllib.parse.urlsplit(redis_url)
    await redis.execute_command("ACL", "SETUSER", user, "on", ">first-password-1234", "~*",
                                "&*", "+@all")  # fmt: skip
    try:
        own = url._replace(netloc=f"{user}:first-password-1234@{url.hostname}:{url.port}")
        system.env = {**system.env, "SUPERSEDE_REDIS_URL": own.geturl()}
        _, base = start_ui(system, "--allow-actions")
        await up(base)
        await redis.xadd(keys.dead_stream, {"name": "x", "reason": "bad_json", "detail": "-"})
        status, page = await asyncio.to_thread(get, base + "/dead")  # (a replay form: a token)
        token = re.search(r'name=csrf value="([^"]+)"', page)
        assert status == 200 and token is not None, page
        status, text = await asyncio.to_thread(
            get, base + "/dead/99999999999999999999999-0/replay", f"csrf={token[1]}".encode(),
            Origin=base,
        )  # fmt: skip
        assert status == 409 and "is not a dead letter id" in text, (status, text)
        await redis.execute_command("ACL", "SETUSER", user, "resetpass", ">second-password-12")
        await redis.execute_command("CLIENT", "KILL", "USER", user)
        status, text = await asyncio.to_thread(get, base + "/runs")
        assert status == 503 and "refused the UI's credentials" in text, (status, text)
    finally:
        await redis.execute_command("ACL", "DELUSER", user)


def test_a_command_over_tls_without_the_certificates_check_says_so(redis_url: str) -> None:
    """The services log that `ssl_cert_reqs=none` lets anyone on the path read and change
    every call; the CLI and the UI said nothing (a security probe)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    port = free_port()  # (nothing listens: refused at once, after the warning)
    unchecked = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none"
    for args in (["status"], ["ui", "--port", "1"]):
        out = subprocess.run([sys.executable, "-m", "supersede", *args], capture_output=True,
                             env={**env, "SUPERSEDE_REDIS_URL": unchecked}, timeout=30)  # fmt: skip
        said = out.stderr.decode()
        assert "warning: TLS without the server certificate's check" in said, said
    out = subprocess.run([sys.executable, "-m", "supersede", "status"], capture_output=True,
                         env={**env, "SUPERSEDE_REDIS_URL": redis_url}, timeout=30)  # fmt: skip
    assert out.returncode == 0 and b"warning" not in out.stderr, out.stderr


def test_the_ui_command_names_what_to_fix(redis_url: str) -> None:
    """A taken port is one line naming --port; a host that is no address here, --host."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
        out = subprocess.run(
            [sys.executable, "-m", "supersede", "ui", "--port", str(port)],
            env={**env, "SUPERSEDE_REDIS_URL": redis_url},
            capture_output=True,
            timeout=30,
        )
    assert out.returncode == 2
    err = out.stderr.decode()
    assert "Traceback" not in err and f"cannot listen on 127.0.0.1:{port}" in err
    assert "set --port" in err
    # a host that names no address of this machine is the host to fix (it said "set --port")
    for host in ("[::]", "203.0.113.7"):
        out = subprocess.run(
            [sys.executable, "-m", "supersede", "ui", "--host", host, "--port", str(port)],
            env={**env, "SUPERSEDE_REDIS_URL": redis_url}, capture_output=True, timeout=30,
        )  # fmt: skip
        said = out.stderr.decode()
        assert out.returncode == 2 and "Traceback" not in said, said
        assert said.strip().splitlines()[-1].endswith("set --host"), said
    bad = subprocess.run([sys.executable, "-m", "supersede", "ui", "--port", "0"], env=env,
                         capture_output=True, timeout=30)  # fmt: skip
    assert bad.returncode == 2 and b"not a port: 0" in bad.stderr
    assert b"Traceback" not in bad.stderr


async def test_requests_the_ui_cannot_read_are_one_sampled_line_not_a_traceback(
    redis_url: str, tmp_path: Any
) -> None:
    """A request line of 100 KB got its 400, and the log a traceback each ("Error handling
    request"): any client could fill the dashboard's log (a security probe). One line, at most
    one a kind every few seconds."""
    import socket

    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERSEDE_")}
    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supersede", "ui", "--port", str(port)],
            env={**env, "SUPERSEDE_REDIS_URL": redis_url}, stderr=err,
        )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        await up(base)

        def long_line() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"GET /key?key=" + b"k" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                return conn.recv(100)

        for _ in range(5):
            assert (await asyncio.to_thread(long_line))[9:12] == b"400", "answered"
        assert (await asyncio.to_thread(get, base + "/"))[0] == 200
    finally:
        proc.terminate()
        proc.wait(10)
    said = log.read_text()
    assert "Traceback" not in said, said
    lines = [line for line in said.splitlines() if "request not read" in line]
    assert len(lines) == 1 and "answered 400" in lines[0], said


def test_the_host_names_the_ui_answers() -> None:
    """Its address and the loopback names with its port; a proxy's name when given; on port
    80 also without the port; any name only when it listens everywhere with none given."""
    from supersede.services.ui import served_hosts

    hosts = served_hosts("127.0.0.1", 8686)
    assert hosts is not None
    assert {"127.0.0.1:8686", "localhost:8686", "[::1]:8686"} <= hosts
    assert "evil.example:8686" not in hosts and "localhost" not in hosts
    proxied = served_hosts("127.0.0.1", 8686, ["Dash.Example.com"])
    assert proxied is not None and "dash.example.com:8686" in proxied
    # (a proxy on 443 or 80 forwards the bare name: it got 421, so no setting served both
    # the pages and the actions there)
    assert "dash.example.com" in proxied and "evil.example" not in proxied
    assert "localhost" in (served_hosts("127.0.0.1", 80) or set())
    # (a Host with a default port is compared without it, so on 443 the bare names are served)
    assert "127.0.0.1" in (served_hosts("127.0.0.1", 443) or set())
    assert served_hosts("0.0.0.0", 8686) is None
    # so actions on every interface need a name to serve (a probe posted a cancel through a
    # rebound name): refused in one line
    cmd = [sys.executable, "-m", "supersede", "ui", "--host", "0.0.0.0", "--allow-actions"]
    done = subprocess.run(cmd, capture_output=True, timeout=60)
    err = done.stderr.decode()
    last = err.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in err, err
    assert last.startswith("supersede: ") and "--allow-host" in last, err
    # (an empty name passed that check, and served nothing more: a UI probe)
    done = subprocess.run([*cmd, "--allow-host", ""], capture_output=True, timeout=60)
    err = done.stderr.decode()
    assert done.returncode == 2 and "--allow-host '' is no host name" in err, err
    everywhere = served_hosts("::", 8686, ["dash.example.com"])
    assert everywhere is not None and "dash.example.com:8686" in everywhere


async def test_a_run_page_shows_any_input_a_producer_can_send(
    redis: Redis, keys: Keys, system: System
) -> None:
    """A live run's page answered 500, with a traceback in the UI's log, for inputs ingress
    accepts: a msgpack timestamp, JSON nested 260 deep (and up to 1,000 deep) (orjson writes
    254 levels at most; a probe). Each page shows the input."""
    import msgpack

    await system.pipeline(redis, keys, 1)
    _, base = start_ui(system)
    await up(base)
    deep = b'{"userId": "deep", "sleep": 30, "x": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    await redis.xadd(keys.events_stream, {"name": "chat.message", "data": deep})
    packed = msgpack.packb({"userId": "stamp", "sleep": 30, "at": msgpack.Timestamp(1, 0),
                            "big": 2**64 - 1})  # fmt: skip
    await redis.xadd(keys.events_stream, {"name": "chat.message", "data": packed,
                                          "encoding": "msgpack"})  # fmt: skip

    async def running() -> list[dict[str, Any]]:
        runs = [r for k in ("deep", "stamp") for r in await runs_of(redis, keys, k)]
        return runs if len(runs) == 2 and all(r["st"] == "R" for r in runs) else []

    await eventually(running, timeout=20)
    for run in await running():
        status, text = await asyncio.to_thread(get, base + f"/runs/{run['id']}")
        assert status == 200, text[:500]
        if run["k"] == "deep":  # (its levels past 100 are said to be cut, past what shows)
            assert "[\n" in text
        else:
            assert "18446744073709551615" in text and "Timestamp" in text
