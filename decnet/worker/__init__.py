"""The worker side of token enrollment (``decnet-worker``)."""
