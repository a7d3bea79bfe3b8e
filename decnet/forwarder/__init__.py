"""DECNET forwarder."""
