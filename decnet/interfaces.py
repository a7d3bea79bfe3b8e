"""The one reactor interface decnet's services and commands are typed with.

Twisted splits what a reactor offers into many interfaces; a daemon needs
several of them at once (a clock, TCP, TLS, processes, the thread pool).
Code that needs only one names that one (``IReactorTime`` for a clock).
"""

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorProcess,
    IReactorSSL,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
)


class IDecnetReactor(
    IReactorCore,
    IReactorTime,
    IReactorThreads,
    IReactorFromThreads,
    IReactorProcess,
    IReactorTCP,
    IReactorSSL,
):
    """A whole reactor: what ``twistd`` and ``decnet-admin`` run on."""
