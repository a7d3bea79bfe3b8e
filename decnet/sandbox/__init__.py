"""``decnet-admin sandbox``: a complete local swarm on loopback (docs/Sandbox.md).

Pure logic (:mod:`.layout`, :mod:`.state`, :mod:`.view`, :mod:`.feeds`,
:mod:`.wheelhouse`) is kept apart from the Twisted and process glue
(:mod:`.children`, :mod:`.up`, :mod:`.live`, :mod:`.control`, :mod:`.poke`).
"""
