"""``twistd decnet-sink`` options: an operator's typo is one usage error that says what to do."""

from __future__ import annotations

import pytest
from twisted.python import usage

from decnet.listener.tap import NATS_CLIENT_OPTIONS
from decnet.sink.tap import Options

NATS = ["--nats", "nats://127.0.0.1:1"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--postgres", "dbname=x"], "--nats URL is required"),
        (NATS, "--postgres DSN is required"),
        (["--nats", "nat://x:1", "--postgres", "dbname=x"], "is not nats://HOST:PORT"),
        ([*NATS, "--postgres", "hots x"], "--postgres: not a connection string"),
        ([*NATS, "--postgres", "dbname=x", "--durable", "a.b"], "--durable: 1-64"),
        ([*NATS, "--postgres", "dbname=x", "--batch", "0"], "1 to 10000"),
        ([*NATS, "--postgres", "dbname=x", "--nats-tls-cert", "/nonexistent"], "no such file"),
        (["--postgres", "dbname=x", "--nats-creds", "/x"], "--nats-creds needs --nats"),
        ([*NATS, "--postgres", "dbname=x", "--nats-stream", "a b"], "--nats-stream"),
    ],
)
def test_a_bad_option_is_one_usage_error_naming_it(argv, message):
    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions(argv)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_nats_options_are_the_listeners_own_definitions():
    rows = {row[0]: row for row in Options.optParameters}
    for row in NATS_CLIENT_OPTIONS:
        assert rows[row[0]] is row


def test_the_help_has_examples_and_the_metrics_port():
    text = " ".join(Options().getUsage().split())
    assert "twistd -n decnet-sink --nats nats://" in text
    assert "--metrics tcp:9469:interface=127.0.0.1 serves" in text


def test_a_creds_file_that_is_not_one_is_a_usage_error_that_never_quotes_it(tmp_path):
    """(Before, the sink took it and reported a broker outage for ever.)"""
    creds = tmp_path / "nats.creds"
    creds.write_text("SUAsecretseedbutnojwt\n")
    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions([*NATS, "--postgres", "dbname=x", "--nats-creds", str(creds)])
    said = str(caught.value)
    assert "is not a NATS credentials file" in said and "secret" not in said
