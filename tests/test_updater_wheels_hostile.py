"""A compromised worker with a valid certificate lying about its wheels and its progress."""

import io

import pytest
import pytest_twisted

from decnet import config
from decnet.cli.updates import Progress
from decnet.errors import BadReply
from tests.hostile_worker import EVIL, Reply
from tests.test_master_client_hostile import (  # noqa: F401  (fixtures)
    fleet,
    guarded,
    updater,
    worker,
)

SHA = "ab" * 32

LYING_INVENTORIES = [
    (Reply({"wheels": "all of them", "deps": []}), "wheels: must be a list"),
    (Reply({"wheels": [EVIL], "deps": []}), "must be a sha256"),
    (Reply({"wheels": ["../../etc/passwd"], "deps": []}), "must be a sha256"),
    (Reply({"wheels": [], "deps": [SHA.upper()]}), "must be a sha256"),
    (Reply({"wheels": []}), "deps: is required"),
    (Reply({"wheels": [SHA] * (config.MAX_INVENTORY_WHEELS + 1), "deps": []}), "more than"),
]


@pytest.mark.parametrize(("reply", "why"), LYING_INVENTORIES)
@pytest_twisted.ensureDeferred
async def test_an_inventory_that_breaks_its_schema_is_a_bad_reply_naming_the_host(
    fleet,  # noqa: F811
    worker,  # noqa: F811
    reply,
    why,
):
    worker.routes[("updater", "wheels")] = reply
    with pytest.raises(BadReply) as info:
        await guarded(updater(fleet, worker).wheels())
    assert str(info.value).startswith("bad reply from updater@rogue")
    assert why in str(info.value)


@pytest_twisted.ensureDeferred
async def test_a_valid_inventory_is_taken_as_it_is(fleet, worker):  # noqa: F811
    worker.routes[("updater", "wheels")] = Reply({"wheels": [SHA], "deps": []})
    assert await guarded(updater(fleet, worker).wheels()) == {"wheels": [SHA], "deps": []}


@pytest.mark.parametrize("live", [False, True])
def test_a_phase_with_escape_sequences_never_reaches_the_terminal_raw(live):
    out = io.StringIO()
    progress = Progress(out, live=live)
    progress.show("web-01", "uploading 10%")
    progress.show("web-01", EVIL)
    progress.show("-", "canary phase: web-01")
    text = out.getvalue()
    ours = ("\x1b[1F", "\x1b[2K") if live else ()
    for control in ours:
        text = text.replace(control, "")
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "\\x1b]0;PWNED" in text
    lines = text.splitlines()
    assert lines[-1] == "[-] canary phase: web-01"
    assert all(line.startswith("[") for line in lines)  # "\r\nfake line" stayed inside its line


def test_a_live_terminal_rewrites_each_hosts_line_in_place():
    out = io.StringIO()
    progress = Progress(out, live=True)
    progress.show("a", "uploading 0%")
    progress.show("b", "uploading 0%")
    progress.show("a", "installing")
    assert out.getvalue().endswith("\x1b[2F\x1b[2K[a] installing\n\x1b[2K[b] uploading 0%\n")
