"""Run a command under a system-call allow list, as a unit's ``SystemCallFilter=`` would.

``python tests/seccomp_exec.py ALLOWED_FILE -- COMMAND...``: every system call not named in
ALLOWED_FILE (one name per line) fails with EPERM (``SystemCallErrorNumber=EPERM``), only the
native architecture's calls pass (``SystemCallArchitectures=native``), and no-new-privileges
is set (``NoNewPrivileges=yes``).  Built with libseccomp, the library systemd uses; used by
tests/test_least_privilege.py to run the real daemons under their units' filters.
"""

import ctypes
import ctypes.util
import errno
import os
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_ERRNO = 0x00050000


def main(argv: list[str]) -> None:
    allowed_file, separator, *command = argv
    assert separator == "--" and command, __doc__
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ERRNO | errno.EPERM)
    if not ctx:
        sys.exit("seccomp_init failed")
    with open(allowed_file) as fh:
        names = [line.strip() for line in fh if line.strip()]
    for name in names:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            continue  # not a system call on this architecture (systemd skips these too)
        if lib.seccomp_rule_add(ctx, SCMP_ACT_ALLOW, number, 0) != 0:
            sys.exit(f"seccomp_rule_add({name}) failed")
    if lib.seccomp_load(ctx) != 0:
        sys.exit("seccomp_load failed")
    os.execvp(command[0], command)  # noqa: S606 - exec is the point: the filter stays


if __name__ == "__main__":
    main(sys.argv[1:])
