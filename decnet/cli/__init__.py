"""``decnet-admin``: the operator's console."""
