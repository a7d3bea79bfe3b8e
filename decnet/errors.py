"""One exception hierarchy for the swarm plane.

Every refusal the operator or a peer can trigger has its own type, so that the
CLI can print a message that says what to do and the HTTP layer can map it to a
status code in one place without echoing internals.
"""

from collections.abc import Iterable


def _listed(problems: str | Iterable[str]) -> list[str]:
    """``problems`` as a list; a single string is one problem."""
    return [problems] if isinstance(problems, str) else list(problems)


class DecnetError(Exception):
    """Base class: an expected, explainable failure (never a bug)."""


class ConfigError(DecnetError):
    """Configuration, paths or options are wrong; the message says which."""


class MissingFileError(ConfigError):
    """A file the daemon or command needs does not exist."""

    def __init__(self, path, what="file"):
        self.path = str(path)
        self.what = what
        super().__init__(f"{what} not found: {self.path}")


class ValidationError(DecnetError):
    """Input was refused; ``problems`` lists every reason, not just the first."""

    def __init__(self, problems: str | Iterable[str]):
        self.problems = _listed(problems)
        super().__init__("; ".join(self.problems))


class InvalidName(ValidationError):
    """A host name does not match the allowed pattern or is reserved."""


class PKIError(DecnetError):
    """The CA or a certificate bundle is unusable."""


class RegistryError(DecnetError):
    """The host registry refused an operation."""


class DuplicateHost(RegistryError):
    """A host with this name is already enrolled."""


class UnknownHost(RegistryError):
    """No host with this name is enrolled."""


class EnrollmentRefused(RegistryError):
    """A join was refused: the token is unknown, used or expired, or the name is taken."""


class HostDecommissioned(RegistryError):
    """The host was decommissioned; nobody talks to it any more."""


class PeerRefused(DecnetError):
    """A TLS peer failed our certificate policy (role, pin, revocation, CA)."""


class FingerprintMismatch(PeerRefused):
    """The peer's certificate is not the one pinned at enrollment."""


class Unreachable(DecnetError):
    """A worker daemon could not be reached (refused, timed out, reset)."""


class RemoteError(DecnetError):
    """A worker daemon answered with an HTTP error; ``problems`` are its own words."""

    def __init__(self, status: int, problems, body=None):
        self.status = status
        self.problems = list(problems)
        self.body = body if body is not None else {}
        super().__init__(f"HTTP {status}: {'; '.join(self.problems) or 'no detail'}")


class BadReply(DecnetError):
    """A worker daemon answered, but not what its API promises; the answer is not used.

    Not JSON, a field missing or of the wrong type (``decnet.replies``), a
    redirect, a body over the size cap.  ``where`` names the host; ``problems``
    say what was wrong (worker-supplied text: escape it before showing it).
    """

    def __init__(self, where: str, problems: str | Iterable[str]):
        self.where = where
        self.problems = _listed(problems)
        super().__init__(f"bad reply from {where}: {'; '.join(self.problems)}")


class RedirectRefused(BadReply):
    """The daemon answered with a redirect (3xx); the master never follows one."""


class ReplyTooLarge(BadReply):
    """The daemon sent a longer body than the master is willing to read."""


class UnknownDecky(DecnetError):
    """A request named a decky that is not deployed on this worker."""


class UpdateError(DecnetError):
    """A release could not be installed, switched or rolled back (updater side)."""

    #: HTTP status the updater answers with; mapped in ``decnet.httpapi.problem_of`` only.
    status = 500
    #: The outcome reported to the master: ``failed`` or ``rolled_back``.
    result = "failed"

    def __init__(self, message: str, **details):
        self.details = details
        super().__init__(message)


class UpdaterBusy(UpdateError):
    """Another update, rollback or self-update is in progress on this updater."""

    status = 409


class UpdaterStarting(UpdateError):
    """The updater is still reconciling its release directory after a start."""

    status = 503


class DigestMismatch(UpdateError):
    """The uploaded tarball does not have the sha256 the master announced."""

    status = 400


class UnsafeArchive(UpdateError):
    """The release tarball breaks the extraction allow-list or a size cap."""

    status = 422


class MalformedArchive(UnsafeArchive):
    """The raw tar stream is malformed or hostile in its structure (an oversized or chained
    extended header, a corrupt header): refused while it streams, before it is parsed."""

    status = 400


class BadManifest(UpdateError):
    """A wheel release's ``release.json`` is malformed, lies about its wheels, or names a
    wheel that is neither shipped nor stored on the worker: refused before any install."""

    status = 400


class InstallFailed(UpdateError):
    """Creating the release's virtualenv or installing into it failed."""

    status = 422


class WheelRefused(InstallFailed):
    """A wheel that must not be unpacked: an unsafe member name, a duplicate, a RECORD lie."""


class WheelUnsupported(InstallFailed):
    """A wheel the updater's own unpacking does not handle; pip installs it instead."""


class UnknownRelease(UpdateError):
    """No complete release with that id is installed."""

    status = 404


class NoPreviousRelease(UpdateError):
    """There is nothing to roll back to."""

    status = 409


class RolledBack(UpdateError):
    """The new release failed its health check; the previous one is active again."""

    status = 409
    result = "rolled_back"


class RollbackFailed(UpdateError):
    """The new release failed and the previous one did not come back healthy either."""

    status = 500


class AgentControlFailed(UpdateError):
    """Starting, stopping or restarting the agent failed (systemctl, spawn)."""


class HealthCheckFailed(UpdateError):
    """The agent did not report the expected release as healthy in time."""


class RenewalRefused(UpdateError):
    """The worker refused certificates pushed for renewal (no pending key, wrong CA or name)."""

    status = 409


class BundleNotWritable(UpdateError):
    """The updater may not write the bundle, so it cannot renew (docs/Operations.md)."""


class RenewalFailed(DecnetError):
    """A certificate renewal did not complete; running ``decnet-admin renew`` again resumes it."""


class SandboxError(DecnetError):
    """The local sandbox (``decnet-admin sandbox``) could not start, be inspected or stop."""


class FilterError(ValidationError):
    """A ``decnet-admin events`` filter does not parse (a bad CIDR, duration or time)."""


class EventIndexError(DecnetError):
    """The event index (``<ingest>/events.sqlite``) is missing, unreadable or inconsistent."""
