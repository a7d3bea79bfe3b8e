# Declarations only: twistd imports this file to list plugins, so it must stay
# cheap.  Each daemon's options and service live in decnet/<daemon>/tap.py and
# are imported only when that daemon is started.
from twisted.application.service import ServiceMaker

decnet_agent = ServiceMaker(
    "DECNET agent",
    "decnet.agent.tap",
    "DECNET worker agent: runs deckies (mTLS API)",
    "decnet-agent",
)
decnet_updater = ServiceMaker(
    "DECNET updater",
    "decnet.updater.tap",
    "DECNET worker updater: installs pushed releases, rolls back",
    "decnet-updater",
)
decnet_forwarder = ServiceMaker(
    "DECNET forwarder",
    "decnet.forwarder.tap",
    "DECNET log forwarder: ships the worker log to the master (RFC 5425)",
    "decnet-forwarder",
)
decnet_listener = ServiceMaker(
    "DECNET listener",
    "decnet.listener.tap",
    "DECNET log listener: ingests worker logs on the master (RFC 5425)",
    "decnet-listener",
)
decnet_enroll = ServiceMaker(
    "DECNET enroll",
    "decnet.master.enroll_tap",
    "DECNET token enrollment on the master: signs worker CSRs for one-time tokens (TLS)",
    "decnet-enroll",
)
decnet_sink = ServiceMaker(
    "DECNET sink",
    "decnet.sink.tap",
    "DECNET event sink: JetStream events into PostgreSQL, exactly once",
    "decnet-sink",
)
