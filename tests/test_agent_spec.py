"""Deployment spec validation (decnet.agent.spec): complete, strict, canonical."""

import json
from pathlib import Path

import pytest

from decnet.agent.spec import parse_spec
from decnet.errors import ValidationError

EXAMPLE = Path(__file__).parent.parent / "docs" / "example-spec.json"


def problems_of(doc) -> list[str]:
    with pytest.raises(ValidationError) as info:
        parse_spec(doc)
    return info.value.problems


def test_defaults_are_filled_in_and_the_hash_ignores_how_the_spec_was_written():
    short = parse_spec({"deckies": [{"name": "web-01", "services": [{"type": "ssh"}]}]})
    explicit = parse_spec(
        {
            "format": "decnet-spec/1",
            "deckies": [
                {
                    "services": [
                        {
                            "port": 22,
                            "bind": "0.0.0.0",  # noqa: S104
                            "type": "ssh",
                            "name": "ssh",
                            "version": "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3",
                        }
                    ],
                    "name": "web-01",
                }
            ],
        }
    )
    assert short.digest == explicit.digest
    service = short.deckies[0].services[0]
    assert (service.bind, service.port, service.option("max_auth_tries")) == ("0.0.0.0", 22, 6)  # noqa: S104


def test_hostname_options_default_to_the_decky_name():
    spec = parse_spec({"deckies": [{"name": "mx-1", "services": [{"type": "smtp"}]}]})
    assert spec.deckies[0].services[0].option("hostname") == "mx-1"


def test_every_problem_is_reported_at_once():
    problems = problems_of(
        {
            "deckies": [
                {"name": "Bad Name!", "services": [{"type": "ssh"}]},
                {"name": "ok", "services": [{"type": "gopher"}, {"type": "ssh", "port": 70000}]},
                {"name": "ok", "services": []},
                {
                    "name": "x",
                    "services": [
                        {"type": "http", "bind": "localhost", "color": "red", "max_body": -1}
                    ],
                },
            ],
            "extra": 1,
        }
    )
    text = "\n".join(problems)
    for fragment in (
        "unknown top-level key 'extra'",
        "deckies[0].name: must be a host name",
        "type: must be one of ssh, telnet, http, ftp, smtp, redis, tcp-banner (got 'gopher')",
        "(ssh).port: must be an integer from 0 to 65535",
        "deckies[2].name: decky 'ok' appears twice",
        "bind: must be an IPv4 or IPv6 address literal",
        "unknown option 'color'",
        "(http).max_body: must be an integer from 0 to 1048576",
    ):
        assert fragment in text, fragment
    assert len(problems) == 9


@pytest.mark.parametrize(
    ("service", "fragment"),
    [
        ({"type": "tcp-banner"}, "port: is required for tcp-banner"),
        ({"type": "ssh", "version": "OpenSSH_9"}, "must look like 'SSH-2.0-"),
        ({"type": "ssh", "version": "SSH-2.0-x\r\nHTTP"}, "printable ASCII on one line"),
        ({"type": "http", "server": ""}, "1 to 200 characters"),
        ({"type": "http", "port": True}, "port: must be an integer"),
        ({"type": "telnet", "banner": "x" * 2000}, "at most 1024 characters"),
        ({"type": "ftp", "idle_timeout": 0}, "idle_timeout: must be a number"),
        ({"type": "smtp", "hostname": "-bad"}, "hostname: must be a host name"),
        ({"type": "redis", "name": "Has Space"}, "name: must match"),
        ("ssh", "must be an object"),
    ],
)
def test_invalid_service_options_are_refused(service, fragment):
    problems = problems_of({"deckies": [{"name": "d", "services": [service]}]})
    assert any(fragment in p for p in problems), problems


def test_two_services_on_the_same_port_are_refused_even_across_deckies_and_wildcards():
    problems = problems_of(
        {
            "deckies": [
                {"name": "a", "services": [{"type": "ssh", "port": 2222}]},
                {"name": "b", "services": [{"type": "telnet", "port": 2222, "bind": "10.0.0.5"}]},
            ]
        }
    )
    assert problems == [
        "a/ssh (0.0.0.0:2222) and b/telnet (10.0.0.5:2222) would listen on the same port"
    ]
    # Different addresses, different families, or ephemeral ports do not clash.
    parse_spec(
        {
            "deckies": [
                {"name": "a", "services": [{"type": "ssh", "bind": "10.0.0.1", "port": 22}]},
                {"name": "b", "services": [{"type": "ssh", "bind": "10.0.0.2", "port": 22}]},
                {"name": "c", "services": [{"type": "ssh", "bind": "::", "port": 22}]},
                {"name": "d", "services": [{"type": "ssh", "port": 0}, {"type": "ftp", "port": 0}]},
            ]
        }
    )


def test_two_services_of_one_type_need_distinct_names():
    problems = problems_of(
        {"deckies": [{"name": "d", "services": [{"type": "http"}, {"type": "http", "port": 8080}]}]}
    )
    assert problems == ["decky 'd': two services are named 'http'; give one a 'name'"]
    parse_spec(
        {
            "deckies": [
                {
                    "name": "d",
                    "services": [
                        {"type": "http"},
                        {"type": "http", "name": "http-alt", "port": 81},
                    ],
                }
            ]
        }
    )


@pytest.mark.parametrize("doc", [None, [], "x", {"deckies": {}}, {"format": "v2", "deckies": []}])
def test_malformed_documents_are_refused(doc):
    assert problems_of(doc)


def test_an_empty_spec_is_valid():
    assert parse_spec({"deckies": []}).deckies == ()


def test_the_documented_example_spec_is_valid():
    spec = parse_spec(json.loads(EXAMPLE.read_text()))
    types = {s.type for s in spec.services()}
    assert types == {"ssh", "telnet", "http", "ftp", "smtp", "redis", "tcp-banner"}
