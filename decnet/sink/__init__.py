"""``twistd decnet-sink``: the events of ``decnet.events.>`` (JetStream) into PostgreSQL."""
