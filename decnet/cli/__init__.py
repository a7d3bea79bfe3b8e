"""``decnet-admin``: the operator's console."""

import time

# When this command started (before its imports): a command's --timeout counts from here,
# so `check --timeout 3` ends about 3 s after it was typed, however slow the start-up.
STARTED = time.monotonic()
