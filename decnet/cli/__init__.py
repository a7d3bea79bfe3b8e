"""``decnet-admin``: the operator's console."""

import time

# When this command started, read once on the monotonic clock before anything else of
# decnet-admin is imported: where its --timeout counts from (decnet.cli.runtime.budget).
STARTED = time.monotonic()
