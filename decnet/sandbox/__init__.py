"""``decnet-admin sandbox``: a complete local swarm on loopback (docs/Sandbox.md).

Pure logic (:mod:`.layout`, :mod:`.state`, :mod:`.report`, :mod:`.feeds`,
:mod:`.daemons`) is kept apart from the Twisted and process glue
(:mod:`.children`, :mod:`.up`, :mod:`.live`, :mod:`.control`, :mod:`.poke`).
The sandbox returns data (:mod:`.report`); what a person sees is decided in
``decnet/cli`` (:mod:`decnet.cli.sandbox_view`), and nothing here imports
``decnet.cli``.
"""

from decnet.interfaces import IDecnetReactor

# What the sandbox needs of its reactor: a clock, the thread pool, processes, TCP.
ISandboxReactor = IDecnetReactor
