"""The web UI's pages, rendered on the server. Every value that comes from Redis (run inputs,
keys, event names, errors, dead letters: all untrusted) goes through `esc` or `q`; the pages
carry no inline script and no inline style (the Content-Security-Policy forbids both)."""

from __future__ import annotations

import html
import itertools
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

from supersede.protocol import RunState
from supersede.services.render import debounced, printable

FIELD_MAX = 2000  # characters of one dead-letter field or run input shown


def esc(value: Any) -> str:
    """Text shown, as HTML (quotes too, so it is safe in an attribute): control characters and
    those that reorder or hide text (U+202E) shown escaped, as the CLI's tables do (a NUL and
    a bidirectional override were sent raw: a probe)."""
    return html.escape(printable("" if value is None else str(value)), quote=True)


def attr(value: Any) -> str:
    """A value a form sends back (a key to cancel), as an HTML attribute: whole, not shown."""
    return html.escape("" if value is None else str(value), quote=True)


def q(**params: Any) -> str:
    """A query string of the params that are set, escaped for an attribute."""
    return attr(urlencode({k: v for k, v in params.items() if v not in (None, "")}))


def cut(text: Any, limit: int = FIELD_MAX) -> str:
    s = "" if text is None else str(text)
    return s if len(s) <= limit else s[:limit] + f"… ({len(s) - limit:,} more characters)"


def page(title: str, body: str, *, live: bool = False, head: str = "") -> str:
    """A whole page: `head` (e.g. a filter form) stays, `body` is what a live page refreshes."""
    nav = "".join(
        f'<a href="{href}">{name}</a>'
        for href, name in (("/", "Overview"), ("/runs", "Runs"), ("/dead", "Dead letters"))
    )
    main = f"<main>{head}<div{' data-live' if live else ''}>{body}</div></main>"
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · supersede</title>"
        '<link rel=stylesheet href="/static/ui.css"><script src="/static/ui.js" defer></script>'
        f"</head><body><header><strong>supersede</strong>{nav}</header>{main}</body></html>"
    )


def run_link(rid: str | None) -> str:
    if not rid:
        return ""
    return f'<a class=run href="/runs/{esc(rid)}">{esc(rid)}</a>'


def key_link(workflow: str, key: str) -> str:
    shown = esc(key)  # (cut to a line by the stylesheet: its whole text in its title)
    return f'<a class=key href="/key?{q(workflow=workflow, key=key)}" title="{shown}">{shown}</a>'


def state(name: str) -> str:
    return f'<span class="state-{esc(name)}">{esc(name)}</span>'


def duration(run: dict[str, Any]) -> str:
    start = run.get("claimed_ms") or run.get("created_ms")
    end = run.get("ended_ms") or int(time.time() * 1000)
    return f"{(end - start) / 1000:.3f} s" if start else ""


def table(head: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    """Cells are HTML already (escaped by the caller)."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>'


def activity(series: list[tuple[int, int, int]], width: int = 600, height: int = 90) -> str:
    """Runs ended and cancelled per minute, as bars (cancelled drawn over ended)."""
    top = max([1, *(n for _, n, _ in series)])
    step = width / max(len(series), 1)
    bars = []
    for i, (minute, ended, cancelled) in enumerate(series):
        x = i * step + 2
        for cls, n in (("bar-SUCCEEDED", ended), ("bar-CANCELLED", cancelled)):
            h = n / top * (height - 20)
            label = time.strftime("%H:%M", time.gmtime(minute * 60))
            bars.append(
                f'<rect class="{cls}" x="{x:.1f}" y="{height - 16 - h:.1f}" '
                f'width="{step - 4:.1f}" height="{h:.1f}"><title>{label} UTC: {n:,} '
                f"{'cancelled' if cls == 'bar-CANCELLED' else 'ended'}</title></rect>"
            )
        if i % 2 == 0:
            bars.append(f'<text x="{x:.1f}" y="{height - 3}">{label}</text>')
    _, ended, cancelled = series[-1] if series else (0, 0, 0)
    return (
        f"<p class=activity>This minute: <b class=ended-now>{ended:,}</b> runs ended, "
        f"<b class=cancelled-now>{cancelled:,}</b> of them cancelled (per minute, last "
        f"{len(series)} minutes; peak {top:,})</p>"
        f'<svg class=activity width="{width}" height="{height}" role=img '
        f'aria-label="runs ended and cancelled per minute">{"".join(bars)}</svg>'
    )


def _limit_notes(w: dict[str, Any]) -> str:
    """A workflow's scope and debounce window, after its strategy."""
    notes = [f"scope {w['scope']}"] if w.get("scope") else []
    notes += [debounced(w)] if w.get("debounce_ms") else []
    return "".join(f" <span class=muted>{esc(n)}</span>" for n in notes)


def overview(s: dict[str, Any], series: list[tuple[int, int, int]]) -> str:
    wf_rows = []
    for name, w in s["workflows"].items():
        runs = ", ".join(f"{esc(k)} {n:,}" for k, n in sorted(w["runs"].items()))
        wf_rows.append(
            [
                f'<a href="/runs?{q(workflow=name)}">{esc(name)}</a>',
                esc(", ".join(w.get("events") or [])),
                esc(w.get("strategy") or "—") + _limit_notes(w),
                f"<code>{esc(w.get('key') or '')}</code>",
                esc(w.get("max_runs") if w.get("max_runs") is not None else "—"),
                esc("yes" if w.get("strict") else ""),
                runs or '<span class="muted">none retained</span>',
            ]
        )
    workflows = table(
        ["workflow", "events", "strategy", "key", "max_runs", "strict", "runs by state"],
        wf_rows,
        "workflows",
    )
    streams = table(
        ["stream", "pending", "lag"],
        [[esc(n), f"{v['pending']:,}", f"{v['lag']:,}"] for n, v in s["streams"].items()],
        "streams",
    )
    executors = table(
        ["executor", "workflows"],
        [[esc(n), esc(", ".join(wfs))] for n, wfs in s["executors"].items()],
        "executors",
    )
    invalid = ""
    if s.get("invalid_workflows"):
        invalid = "<h2>Invalid definitions</h2>" + table(
            ["workflow", "error"], [[esc(k), esc(v)] for k, v in s["invalid_workflows"].items()]
        )
    dead = f'<p><a href="/dead">Dead letters</a>: <b class=dead-count>{s["dead_letters"]:,}</b></p>'
    return (
        "<h1>Overview</h1><h2>Workflows</h2>"
        + workflows
        + invalid
        + dead
        + "<h2>Runs ended per minute</h2>"
        + activity(series)
        + "<h2>Live executors</h2>"
        + executors
        + "<h2>Streams</h2>"
        + streams
    )


def runs(
    rows: list[dict[str, Any]], workflows: list[str], f: dict[str, Any], nxt: str | None
) -> tuple[str, str]:
    """(the title and filter form, which stay; the rows, which a live page refreshes)"""
    chosen = f.get("workflow")
    options = "".join(
        f'<option value="{attr(w)}"{" selected" if w == chosen else ""}>{esc(w)}</option>'
        for w in ["", *workflows]
    )
    wanted = (f.get("state") or "").lower()  # (`?state=SUCCEEDED` filters as `succeeded`: the
    states = "".join(  # form showed "any" for it, and a Filter dropped it)
        f'<option value="{s}"{" selected" if s == wanted else ""}>{s or "any"}</option>'
        for s in ["", *(x.name.lower() for x in RunState)]
    )
    form = (
        '<form class=filters method=get action="/runs">'
        f"<label>workflow <select name=workflow>{options}</select></label> "
        f'<label>key <input name=key value="{attr(f.get("key") or "")}"></label> '
        f"<label>state <select name=state>{states}</select></label> "
        f"<label>ended before (UTC) <input type=datetime-local name=ended_before "
        f'value="{attr(f.get("ended_before") or "")}"></label> '
        "<button type=submit>Filter</button></form>"
    )
    body = [
        [
            run_link(r["id"]),
            esc(r["workflow"]),
            key_link(r["workflow"], r["key"]),
            state(r["state"]),
            esc(duration(r)),
            ("superseded by " + run_link(r["cancelled_by"]))
            if r.get("cancelled_by")
            else esc(r.get("reason") or ""),
        ]
        for r in rows
    ]
    more = ""
    if nxt is not None:
        params = {k: v for k, v in f.items() if k not in ("before", "ended_before")}
        more = f'<p><a class=older href="/runs?{q(**params, before=nxt)}">Older runs</a></p>'
    where = " (ended runs, older than the first page)" if f.get("before") else ""
    table_ = table(["run", "workflow", "key", "state", "duration", "why"], body, "runs")
    return f"<h1>Runs{esc(where)}</h1>" + form, table_ + more


def bar(points: list[tuple[str, float]], width: int = 900) -> str:
    """A run's timeline as one horizontal bar: a segment per phase (from each point to the
    next, coloured by the phase that point starts), each point labelled with its ms."""
    if len(points) < 2:
        return ""
    t0, t1 = points[0][1], points[-1][1]
    span = max(t1 - t0, 1e-6)
    parts, labels = [], []
    for (name, at), (_, nxt) in itertools.pairwise(points):
        x = (at - t0) / span * width
        w = max((nxt - at) / span * width, 1.0)
        parts.append(
            f'<rect class="bar-{PHASES.get(name, "QUEUED")}" x="{x:.1f}" y="4" width="{w:.1f}" '
            f'height="18"><title>{esc(name)}: {nxt - at:.1f} ms</title></rect>'
        )
    ends: list[float] = []  # per row of labels, where its last one ends
    for name, at in points:
        text = f"{name} +{at - t0:.1f} ms"
        wide = len(text) * LABEL_CHAR_PX + 8
        x = max(0.0, min((at - t0) / span * width, width - wide))  # (whole, inside the bar)
        # the first row where it overlaps no label (points at one ms were drawn on top of each
        # other, and the last was cut at the edge, a UI probe)
        row = next((r for r, end in enumerate(ends) if end <= x), len(ends))
        if row == len(ends):
            ends.append(0.0)
        ends[row] = x + wide
        labels.append(f'<text x="{x:.1f}" y="{40 + row * 14}">{esc(text)}</text>')
    return (
        f'<svg class=timeline width="{width}" height="{44 + 14 * len(ends)}" role=img '
        f'aria-label="timeline">{"".join(parts)}{"".join(labels)}</svg>'
    )


LABEL_CHAR_PX = 6.2  # (the width of a character of the timeline's 11 px labels, about)


PHASES = {
    "created": "QUEUED",
    "assigned": "ASSIGNED",
    "running": "RUNNING",
    "cancel decided": "CANCELLING",
}


def run(
    r: dict[str, Any],
    cancelled: list[dict[str, Any]],
    csrf: str | None,
    *,
    not_cancelled: bool = False,
) -> str:
    """One run; `not_cancelled`: a cancel asked for it changed nothing (it had ended, or was
    stopping already)."""
    points: list[tuple[str, float]] = []
    for name, key in (
        ("created", "created_ms"),
        ("assigned", "assigned_ms"),
        ("running", "claimed_ms"),
        ("cancel decided", "cancel_decided_ms"),
        ("ended", "ended_ms"),
    ):
        if r.get(key):
            points.append((name, float(r[key])))
    points.sort(key=lambda p: p[1])
    facts = [
        ["workflow", esc(r["workflow"]) + f" <span class=muted>v{esc(r['version'])}</span>"],
        ["key", key_link(r["workflow"], r["key"])],
        ["state", state(r["state"])],
        ["attempt", esc(r["attempt"])],
        ["event", esc(r["event_id"])],
        ["executor", esc(r.get("executor") or "")],
    ]
    if r.get("cancelled_by"):
        facts.append(["superseded by", run_link(r["cancelled_by"])])
    if r.get("reason"):
        facts.append(["reason", esc(r["reason"])])
    timeline = table(
        ["at", "event"],
        [[esc(_clock(t["at_ms"])), esc(t["event"])] for t in r["timeline"] if t["at_ms"]],
        "timeline",
    )
    chain = ""
    if cancelled:
        chain = "<h2>Runs it superseded</h2>" + table(
            ["run", "state"],
            [[run_link(c["id"]), state(c["state"])] for c in cancelled],
            "superseded",
        )
    error = f"<h2>Error</h2><pre>{esc(cut(r['error']))}</pre>" if r.get("error") else ""
    data = f"<h2>Input</h2><pre>{esc(cut(r['input']))}</pre>" if r.get("input") else ""
    outputs = ""
    if r.get("outputs"):
        outputs = f"<h2>Step outputs</h2><pre>{esc(cut(r['outputs']))}</pre>"
    action = ""
    if csrf is not None and r["state"] not in {s.name for s in RunState if s.terminal}:
        action = (
            f'<form class=inline method=post action="/runs/{esc(r["id"])}/cancel">'
            f'<input type=hidden name=csrf value="{attr(csrf)}">'
            "<button type=submit>Cancel this run</button></form>"
        )
    if not_cancelled:
        action += "<p class=notice>Not cancelled: the run had ended, or was stopping already.</p>"
    return (
        f"<h1>Run <code>{esc(r['id'])}</code></h1>{action}"
        + table(["", ""], facts, "facts")
        + bar(points)
        + timeline
        + chain
        + error
        + data
        + outputs
    )


def _clock(ms: float) -> str:
    whole = int(ms)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole / 1000)) + f".{whole % 1000:03d}"


def key(k: dict[str, Any], csrf: str | None) -> str:
    """Every retained run of one key in sequence order, drawn on one time axis."""
    runs_ = k["runs"]
    now = k["at_ms"]
    head = (
        f"<h1>Key <code>{esc(k['key'])}</code> of {esc(k['workflow'])}</h1>"
        f"<p>max_runs <b class=max-runs>{esc(k['max_runs'])}</b> · "
        f"strategy {esc(k['strategy'])} · slots in use <b class=slots>{esc(k['slots'])}</b> · "
        f"{len(runs_)} runs shown{' (older ones)' if k.get('before') else ''}</p>"
    )
    action = ""
    if csrf is not None and any(r["state"] in LIVE_NAMES for r in runs_):
        action = (
            '<form class=inline method=post action="/key/cancel">'
            f'<input type=hidden name=csrf value="{attr(csrf)}">'
            f'<input type=hidden name=workflow value="{attr(k["workflow"])}">'
            f'<input type=hidden name=key_hex value="{attr(str(k["key"]).encode().hex())}">'
            "<button type=submit>Cancel this key's live runs</button></form>"
        )
    if k.get("notice"):
        action += f"<p class=notice>{esc(k['notice'])}</p>"
    if not runs_:
        return head + action + "<p class=muted>No retained runs.</p>"
    t0 = min(r["created_ms"] or now for r in runs_)
    # (to now while a run is live, else to the last end: runs of an hour ago filled a pixel
    # of an axis that ran on to now, a newcomer probe)
    t1 = max(r["ended_ms"] or now for r in runs_)
    span, width, row = max(t1 - t0, 1), 900, 20
    rects = []
    for i, r in enumerate(runs_):
        start = r["created_ms"] or t0
        end = r["ended_ms"] or now
        x, w = (start - t0) / span * width, max((end - start) / span * width, 2)
        y = i * row + 4
        rects.append(
            f'<rect class="bar-{esc(r["state"])}" x="{x:.1f}" y="{y}" width="{w:.1f}" '
            f'height="{row - 6}"><title>{esc(r["id"])} {esc(r["state"])}</title></rect>'
        )
        if r.get("cancel_decided_ms"):
            cx = (r["cancel_decided_ms"] - t0) / span * width
            rects.append(
                f'<line class=cut x1="{cx:.1f}" x2="{cx:.1f}" y1="{y}" y2="{y + row - 6}"></line>'
            )
    height = len(runs_) * row + 24
    axis = (
        f'<line class=axis x1="0" x2="{width}" y1="{height - 18}" y2="{height - 18}"></line>'
        f'<text x="0" y="{height - 4}">{esc(_clock(t0))}</text>'
        f'<text x="{width - 60}" y="{height - 4}">+{(t1 - t0) / 1000:.1f} s</text>'
    )
    svg = (
        f'<svg class=key-axis width="{width}" height="{height}" role=img '
        f'aria-label="runs of the key on a time axis">{"".join(rects)}{axis}</svg>'
    )
    rows = [
        [
            esc(i + 1),
            run_link(r["id"]),
            state(r["state"]),
            esc(duration(r)),
            ("superseded by " + run_link(r["cancelled_by"]))
            if r.get("cancelled_by")
            else esc(r.get("reason") or ""),
        ]
        for i, r in enumerate(runs_)
    ]
    older = ""
    if k.get("next"):
        params = q(workflow=k["workflow"], key=k["key"], before=k["next"])
        older = f'<p><a class=older href="/key?{params}">Older runs of this key</a></p>'
    return (
        head
        + action
        + svg
        + table(["#", "run", "state", "duration", "why"], rows, "key-runs")
        + older
    )


LIVE_NAMES = {s.name for s in RunState if not s.terminal}


def dead(rows: list[dict[str, Any]], csrf: str | None, notice: str = "") -> str:
    body = []
    for d in rows:
        fields = {k: v for k, v in d.items() if k not in ("id", "reason", "detail")}
        shown = "<br>".join(
            f"<b>{esc(k)}</b>: <code>{esc(cut(v, 300))}</code>" for k, v in fields.items()
        )
        action = ""
        if csrf is not None:
            action = (
                f'<form class=inline method=post action="/dead/{esc(d["id"])}/replay">'
                f'<input type=hidden name=csrf value="{attr(csrf)}">'
                "<button type=submit>Replay</button></form>"
            )
        body.append(
            [
                esc(d["id"]),
                esc(d.get("reason") or ""),
                esc(cut(d.get("detail"), 500)),
                shown,
                action,
            ]
        )
    said = f"<p class=notice>{esc(notice)}</p>" if notice else ""
    return (
        "<h1>Dead letters</h1>"
        + said
        + table(["id", "reason", "detail", "fields", ""], body, "dead")
    )


def message(title: str, text: str, back: str = "/") -> str:  # (a whole page)
    return page(
        title,
        f"<h1>{esc(title)}</h1><p class=message>{esc(text)}</p>"
        f'<p><a href="{esc(back)}">Back</a></p>',
    )
