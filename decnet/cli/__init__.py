"""``decnet-admin``: the operator's console."""

import time

# When this package was imported: where a command's --timeout counts from when /proc
# cannot tell when the process itself started (decnet.cli.runtime.age).
STARTED = time.monotonic()
