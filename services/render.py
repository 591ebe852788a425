"""The CLI's output for people: tables fitted to the terminal, human times, nothing printed as
`None`. `--json` prints the commands' results as they are (the stable interface for scripts)."""

from __future__ import annotations

import os
import shutil
import sys
import textwrap
import time
import unicodedata
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from supersede.lookups import SERVED_NOW_MS

# Control characters a published value may carry (terminal escape sequences among them), as
# \xNN: a table shows them, a terminal does not obey them. New lines are kept.
_CONTROL: dict[int, str] = {
    c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c != 0x0A
}
# And the characters that reorder or hide text (bidirectional overrides and isolates, zero-
# width marks), as \uNNNN: a key holding U+202E printed its row's columns reversed (a probe).
_CONTROL.update(
    {c: f"\\u{c:04x}" for c in (*range(0x200B, 0x2010), *range(0x202A, 0x202F),
                                 *range(0x2066, 0x206A), 0xFEFF, 0x2028, 0x2029)}
)  # fmt: skip


def printable(text: str) -> str:
    """`text` safe to print to a terminal: its control characters but new lines escaped."""
    return text.translate(_CONTROL)


def _one_line(value: Any) -> str:
    """A value on the one line it is printed on: its new lines shown as \\n."""
    return str(value).replace("\n", "\\n")


def width() -> int:
    """The terminal's columns; unlimited when the output is not a terminal (a pipe or a file
    gets whole values) unless COLUMNS says otherwise."""
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        return 1 << 20
    return max(60, shutil.get_terminal_size((100, 24)).columns)


def _columns(text: str) -> int:
    """The columns `text` takes in a terminal: two for a wide character (CJK, most emoji),
    none for a combining mark (a table's columns drifted past a key holding either, a probe)."""
    if text.isascii():
        return len(text)
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )


def _fit(text: str, w: int) -> str:
    """`text` in exactly `w` columns: padded, or cut with '…'."""
    taken = _columns(text)
    if taken > w:
        kept, taken = [], 0
        for c in text:
            step = _columns(c)
            if taken + step > w - 1:
                break
            kept.append(c)
            taken += step
        text = "".join(kept) + "…"
        taken += 1
    return text + " " * (w - taken)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    if isinstance(value, dict):  # (orjson leaves U+202E, DEL and C1 characters as they are)
        return printable(orjson.dumps(value).decode())
    # (escaped here, so that the widths are those printed: a new line showed as a space, and a
    # key holding ESC or U+202E drifted its row's columns, a CLI probe)
    return printable(_one_line(value))


def table(
    rows: Sequence[Sequence[Any]],
    header: Sequence[str],
    *,
    wrap: int = -1,
    keep: Sequence[int] = (),
) -> str:
    """Columns as wide as their content, shrunk (widest first, cut with '…') until the table
    fits the terminal, except the `keep` columns (ids: cut, they could not be copied); column
    `wrap` (if any) is wrapped over lines instead of cut."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [_columns(r[i]) for r in cells]) for i, h in enumerate(header)]
    room = width() - 2 * (len(header) - 1)
    while sum(widths) > room:
        free = [j for j in range(len(widths)) if j not in keep]
        if not free:
            break
        i = max(free, key=lambda j: widths[j])
        if widths[i] <= max(8, len(header[i])):
            break
        widths[i] -= 1
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for row in cells:
        parts = []
        extra: list[str] = []
        for i, (text, w) in enumerate(zip(row, widths, strict=True)):
            if i == wrap and _columns(text) > w:
                chunks = textwrap.wrap(text, w) or [""]  # (by characters: a chunk of wide
                parts.append(chunks[0] + " " * max(0, w - _columns(chunks[0])))  # ones is whole)
                extra = chunks[1:]
            else:
                parts.append(_fit(text, w))
        lines.append("  ".join(parts).rstrip())
        indent = sum(widths[:wrap]) + 2 * wrap if wrap >= 0 else 0
        lines += [" " * indent + chunk for chunk in extra]
    return "\n".join(lines)


def when(ms: int | None, now_ms: int | None = None) -> str:
    """'2026-12-01 11:02:03.123 UTC (4.2 s ago)'."""
    if not ms:
        return ""
    now_ms = now_ms or int(time.time() * 1000)
    stamp = datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f"{stamp} UTC ({ago(now_ms - ms)})"


def ago(delta_ms: int) -> str:
    s = delta_ms / 1000
    if s < 60:
        return f"{s:.1f} s ago"
    if s < 3600:
        return f"{s / 60:.0f} min ago"
    if s < 86400:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} d ago"


def _last_change(run: dict[str, Any]) -> int | None:
    """When the run last changed: its end, or the latest of its cancel decision, claim,
    assignment (a retry's is newer than the claim before it) and creation."""
    if run.get("ended_ms"):
        return int(run["ended_ms"])
    times = [run.get(k) for k in ("cancel_decided_ms", "claimed_ms", "assigned_ms", "created_ms")]
    return int(max(t for t in times if t)) if any(times) else None


def _duration(run: dict[str, Any]) -> str:
    start, end = run.get("claimed_ms"), run.get("ended_ms")
    assigned = run.get("assigned_ms")
    if start and assigned and start < assigned:
        start = None  # (an earlier attempt's claim: this one waits for an executor)
    if start and end:
        return f"{end - start} ms"
    if start:
        return f"{int(time.time() * 1000) - start} ms so far"
    return ""


def runs(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no runs)"
    now = int(time.time() * 1000)
    body = [
        [r["id"], r["workflow"], r["key"], r["state"], r["attempt"],
         ago(now - (_last_change(r) or now)), _duration(r),
         r.get("cancelled_by"), r.get("reason")]
        for r in rows
    ]  # fmt: skip
    heads = ["id", "workflow", "key", "state", "try", "last change", "ran", "by", "why"]
    return table(body, heads, keep=(0, 3, 7))


# ms the first recorded point may come before the inbox entry's time before the entry's id is
# said to be the producer's own (less: the skew of the reading host's clock, shown as it is)
AHEAD_MS = 1000


def run(r: dict[str, Any]) -> str:
    now = int(time.time() * 1000)
    lines = [
        f"run       {r['id']}",
        f"workflow  {r['workflow']} (version {r['version']})",
        f"key       {_one_line(r['key'])}",  # (a producer's: "mallory\nstate  FAILED" printed
        # a line of its own above the real state, a probe)
        f"state     {r['state']}" + (f" ({r['reason']})" if r.get("reason") else ""),
        f"attempt   {r['attempt']}",
        f"event     {_one_line(r['event_id'])}",
    ]
    if r.get("executor"):
        lines.append(f"executor  {_one_line(r['executor'])}")
    if r.get("cancelled_by"):
        lines.append(f"superseded by  {r['cancelled_by']}")
    last = r.get("workflow_served_ms_ago", 0)
    if "workflow_served_ms_ago" in r and (last is None or last >= SERVED_NOW_MS):
        said = "none ever said so" if last is None else f"the last said so {ago(last)}"
        lines.append(f"waits     for an executor: none serves workflow {r['workflow']} ({said}); "
                     "it starts once one of its pool is up")  # fmt: skip
    lines.append("timeline:")
    created = r.get("created_ms") or 0
    for e in r.get("timeline", []):
        step = f"+{e['at_ms'] - created} ms" if created and e["at_ms"] else ""
        lines.append(f"  {when(e['at_ms'], now):<46} {step:>10}  {e['event']}")
    path = r.get("path") or []
    if len(path) > 1 and path[1]["at_ms"] < path[0]["at_ms"] - AHEAD_MS:  # (less: a skew)
        # An entry id the producer chose, ahead of the server's clock, is no publish time:
        # each hop showed as negative (a probe's max-id event).
        ahead = path[0]["at_ms"] - path[1]["at_ms"]
        lines.append(f"published  its entry id is {ahead:,.0f} ms ahead of the ingress read "
                     "(an id the producer chose): hops from the read")  # fmt: skip
        path = path[1:]
    if path:
        first = path[0]["point"]
        since = "it was published" if first == "published" else f"the {first}"
        lines.append(f"path (ms after {since}; each hop's share):")
        start, prev = path[0]["at_ms"], path[0]["at_ms"]
        for p in path:
            hop = f"({p['at_ms'] - prev:+.3f} ms)" if p is not path[0] else ""
            lines.append(f"  {p['point']:<16} {p['at_ms'] - start:>10.3f} ms  {hop}")
            prev = p["at_ms"]
    outputs = r.get("outputs") or {}
    if outputs:
        lines.append("outputs:")
        for step, value in outputs.items():
            text = orjson.dumps(value, option=orjson.OPT_INDENT_2, default=repr).decode()
            lines.append(f"  {step}: " + text.replace("\n", "\n  "))
    if r.get("error"):
        lines.append("error:")
        lines += ["  " + line for line in str(r["error"]).splitlines()]
    return "\n".join(lines)


STATES = ["QUEUED", "ASSIGNED", "RUNNING", "CANCELLING", "SUCCEEDED", "FAILED", "CANCELLED"]


def debounced(w: dict[str, Any]) -> str:
    """A status row's debounce window: 'debounced 300 ms (at most 2000 ms)'."""
    most = f" (at most {w['max_wait_ms']} ms)" if w.get("max_wait_ms") else ""
    return f"debounced {w['debounce_ms']} ms{most}"


def status(s: dict[str, Any]) -> str:
    out = []
    body = []
    for name, w in s.get("workflows", {}).items():
        if w.get("strategy"):
            limit = f"{w['max_runs']} per {w['key']}, {w['strategy']}"
            limit += ", strict" if w.get("strict") else ""
            limit += f", scope {w['scope']}" if w.get("scope") else ""
            limit += f", {debounced(w)}" if w.get("debounce_ms") else ""
        else:
            limit = "none" if w.get("registered") else "(not registered)"
        counts = ", ".join(f"{w['runs'][st]} {st.lower()}" for st in STATES if w["runs"].get(st))
        ms = w.get("served_ms_ago")
        served = "never" if ms is None else ("now" if ms < SERVED_NOW_MS else ago(ms))
        body.append([name, w.get("events"), limit, served, counts or "no runs"])
    heads = ["workflow", "events", "limit", "served", "runs"]
    out.append(table(body, heads, wrap=4, keep=(0,)) if body else "(no workflows registered)")
    for name, error in (s.get("invalid_workflows") or {}).items():
        out.append(f"invalid stored workflow {name}: {error}")
    for name, error in (s.get("refused_workflows") or {}).items():
        out.append(
            f"workflow {name} is served as stored, but executors of this build refuse its "
            f"definition ({error}): change it before upgrading them"
        )
    streams = s.get("streams", {})
    lag_rows = [[n, v.get("lag"), v.get("pending")] for n, v in streams.items()]
    out += ["", table(lag_rows, ["stream", "unread", "pending"])]
    out.append(f"\ndead letters: {s.get('dead_letters', 0)}")
    executors = s.get("executors", {})
    out.append(f"live executors: {len(executors)}")
    if executors:
        rows = [[e, w] for e, w in executors.items()]
        out.append(table(rows, ["executor", "serves"], wrap=1, keep=(0,)))
    return "\n".join(out)


def dead(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no dead letters)"
    now = int(time.time() * 1000)
    body = [
        [r["id"], ago(now - int(r["id"].split("-")[0])), r.get("reason"), r.get("name"),
         r.get("workflow"), _origin(r), r.get("detail")]
        for r in rows
    ]  # fmt: skip
    heads = ["dead letter id", "age", "reason", "event", "workflow", "from entry", "detail"]
    note = "replay one with: supersede dead --replay <dead letter id>"
    return table(body, heads, wrap=len(heads) - 1, keep=(0,)) + "\n" + note


def _origin(row: dict[str, Any]) -> str | None:
    """The entry a letter came from, with its stream when it is not the inbox (a refused run
    request or result names the shard's stream: the table showed only the entry id)."""
    entry, stream = row.get("entry"), row.get("stream")
    if entry is None or stream is None:
        return entry
    return f"{stream} {entry}"


def publish(result: dict[str, Any]) -> str:
    lines = [f"published inbox entry {result['entry']}"]
    rows = result.get("runs", [])
    if not rows:
        return lines[0]
    if "state" in rows[0]:
        # (a failed run's error, not the outputs of the steps before the one that failed)
        body = [[r["run"], r["workflow"], r["key"], r["state"], r.get("cancelled_by"),
                 r.get("reason"), _summary(r.get("error")) or r.get("outputs")]
                for r in rows]  # fmt: skip
        heads = ["run", "workflow", "key", "state", "by", "why", "outputs / error"]
        lines.append(table(body, heads, wrap=6, keep=(0, 3)))
    else:
        rows_ = [[r["run"], r["workflow"], r["key"]] for r in rows]
        lines.append(table(rows_, ["run", "workflow", "key"], keep=(0,)))
    return "\n".join(lines)


def _summary(error: str | None) -> str | None:
    """A failed run's error in a table cell: its first line and the exception's (the last),
    not the traceback between them, which showed as one line of `\\n`s (a newcomer probe);
    `supersede run ID` shows it whole."""
    lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
    if len(lines) <= 1:
        return error
    return f"{lines[0]} {lines[-1]} (supersede run shows the traceback)"


def cancel(result: dict[str, bool]) -> str:
    if not result:
        return "no live run to cancel"
    return "\n".join(
        f"{rid}: {'cancelled' if done else 'not cancelled (already ended or stopping)'}"
        for rid, done in result.items()
    )


def replayed(result: dict[str, Any]) -> str:
    return f"dead letter {result['replayed']} published again as inbox entry {result['entry']}"


def _runs(n: int) -> str:
    return f"{n} live run" if n == 1 else f"{n} live runs"


def retired(result: dict[str, Any]) -> str:
    if result.get("before"):  # (again: it finishes a retire that was interrupted, if it was)
        return (
            f"workflow {result['retired']} was retired before (it is not registered): "
            f"{_runs(result['cancelled'])} cancelled now, its assignment streams deleted"
        )
    return (
        f"workflow {result['retired']} retired: its events make no run; "
        f"{_runs(result['cancelled'])} cancelled, its assignment streams deleted"
    )


def render(command: str, result: Any, replay: bool = False) -> str:
    if command == "runs":
        return runs(result)
    if command == "run":
        return run(result)
    if command == "status":
        return status(result)
    if command == "dead":
        return replayed(result) if replay else dead(result)
    if command == "publish":
        return publish(result)
    if command == "cancel":
        return cancel(result)
    if command == "retire":
        return retired(result)
    if command == "register":
        return "\n".join(
            f"registered {w['workflow']} (version {w['version']}; events: {', '.join(w['events'])})"
            for w in result
        )
    return orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
