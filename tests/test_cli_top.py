"""``decnet-admin top`` in a terminal: the screen it draws (pure, no reactor)."""

import io
import os

from decnet.cli.fleet import ScreenConsole
from decnet.cli.output import HOME_CLEAR
from decnet.listener.workers import CONNECTED, LogHealth
from decnet.sandbox.report import FeedEvents, HostRow, HostTable


def entry(n: int, user: str = "root") -> dict:
    return {
        "source_worker": "w1",
        "timestamp": "2026-11-30T16:00:00Z",
        "hostname": "web-01",
        "app_name": "ssh",
        "msgid": "login",
        "structured_data": [{"id": "decnet@1", "params": [["user", f"{user}{n}"]]}],
    }


def test_the_screen_is_the_table_then_as_many_newest_events_as_fit_and_nothing_else():
    stream = io.StringIO()
    screen = ScreenConsole(stream, size=lambda: os.terminal_size((100, 12)))
    logs = LogHealth(CONNECTED, last_seen=0.0, lag=2048)
    screen.show(HostTable((HostRow("w1", "10.0.0.1", "healthy", "r1", 2, logs=logs),)))
    screen.show(FeedEvents(tuple(entry(i) for i in range(50))))
    drawn = stream.getvalue().split(HOME_CLEAR)[-1].splitlines()
    assert len(drawn) <= 12 and all(len(line) <= 100 for line in drawn)
    assert drawn[0].split()[-4:] == ["LAST", "SEEN", "LOG", "LAG"]
    assert drawn[2].split()[:3] == ["w1", "10.0.0.1", "healthy"] and "2.0 KiB" in drawn[2]
    assert (
        "user=root49" in drawn[-1] and "user=root40" not in stream.getvalue().split(HOME_CLEAR)[-1]
    )


def test_a_worker_cannot_drive_the_terminal_through_the_screen():
    stream = io.StringIO()
    screen = ScreenConsole(stream, size=lambda: os.terminal_size((200, 20)))
    screen.show(HostTable((HostRow("w1", "a", "degraded", detail="\x1b[2J\u202egnp.exe"),)))
    screen.show(FeedEvents((entry(1, user="\x1b]0;owned\x07"),)))
    text = stream.getvalue().replace(HOME_CLEAR, "")
    assert "\x1b" not in text and "\u202e" not in text
    assert "\\x1b[2J\\u202egnp.exe" in text
