"""Sans-IO syslog: octet-counted framing, RFC 5424 parsing, acknowledged-mode messages."""
