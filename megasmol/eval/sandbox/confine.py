"""Confine the current process for good, before it runs code it does not trust.

Loaded by ``child.py`` (by path, in a fresh ``python -I``; never imported by megasmol's own
process). ``confine()`` applies, in this order, what cannot be undone afterwards:

* capabilities: the bounding, ambient, effective, permitted and inheritable sets are emptied, so
  a process started as root keeps its user id but none of root's powers (no raw sockets, no
  immutable flags, no ``chown``, no reading files it does not own past their mode bits);
* Landlock (Linux >= 5.13, no privileges needed): reads only beneath the interpreter's import
  path (its standard library and site-packages), the system's shared libraries and the process's
  own work directory; writes, file creation, removal, renames and links nowhere (the process writes
  only through the descriptors it was handed); no execution of files; from ABI 4 no TCP bind or
  connect; from ABI 5 no ioctl on devices; from ABI 6 no signals and no abstract Unix sockets
  outside the sandbox. Inherited by every thread and cannot be lifted (``no_new_privs``);
* resource limits: address space, CPU seconds, the size of any file written, no core files,
  and a wall-clock alarm (SIGALRM ends the process);
* seccomp: no new processes (``fork``, ``vfork``, ``clone`` without ``CLONE_THREAD``, ``setsid``,
  ``setpgid``; ``clone3`` answers ENOSYS so the C library falls back to ``clone``: threads run);
  no sockets (``socket``: TCP, UDP, raw, Unix and netlink alike; ``socketpair`` stays); no
  metadata changes (``chmod``, ``chown``, ``utime*``, extended attributes, the inode-flag
  ioctls, ``TIOCSTI``); signals, ``prlimit`` and scheduling only on the process itself; no
  ``ptrace``, no reading or writing another process's memory, no ``io_uring`` (it would do I/O
  past the filter), no ``memfd`` (memory outside the address-space limit), no namespaces,
  mounts, keys, BPF or performance counters. x86-64 and AArch64; another architecture, or a
  system call of another ABI (x32), ends the process.

Only the standard library is used.
"""

import ctypes
import errno
import math
import os
import resource
import signal
import struct
import sys

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

# --- capabilities --------------------------------------------------------------------------
_PR_CAPBSET_DROP, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 47, 4
_CAPSET = {"x86_64": 126, "aarch64": 91}
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def drop_capabilities() -> bool:
    """Empty every capability set; True when none is left."""
    for cap in range(64):
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the kernel's last capability
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    number = _CAPSET.get(os.uname().machine)
    if number is not None:
        header = ctypes.create_string_buffer(struct.pack("<Ii", _LINUX_CAPABILITY_VERSION_3, 0))
        data = ctypes.create_string_buffer(bytes(24))  # effective, permitted, inheritable x 2
        _libc.syscall(number, header, data)
    try:
        with open("/proc/self/status") as status:
            sets = {k: v.strip() for k, v in (line.split(":", 1) for line in status if ":" in line)}
    except OSError:
        return False
    return all(int(sets.get(name, "1"), 16) == 0 for name in ("CapEff", "CapPrm", "CapInh", "CapAmb"))


# --- Landlock --------------------------------------------------------------------------------
_CREATE_RULESET, _ADD_RULE, _RESTRICT_SELF = 444, 445, 446  # the same on every architecture
_RULE_PATH_BENEATH = 1
_EXECUTE, _WRITE_FILE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_FS_BY_ABI = {1: (1 << 13) - 1,  # execute .. make_sym
              2: 1 << 13, 3: 1 << 14, 5: 1 << 15}  # refer, truncate, ioctl_dev
_NET_TCP = (1 << 0) | (1 << 1)  # bind, connect (ABI 4)
_SCOPE = (1 << 0) | (1 << 1)  # abstract unix sockets, signals (ABI 6)
_PR_SET_NO_NEW_PRIVS = 38
# Files (not directories) a Python program may need to read after confinement.
_READABLE_FILES = ("/etc/ld.so.cache", "/dev/urandom", "/dev/random", "/etc/localtime")
_LIBRARY_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64")


def readable_directories(work: str) -> list[str]:
    """The interpreter's import path (its standard library and the site-packages the parent
    named), the system's shared libraries, and ``work``: nothing else, so no home directory, no
    /proc, no /etc (keys, tokens, another process's environment stay unreadable)."""
    paths = {work, *_LIBRARY_DIRS, *sys.path}
    return sorted(p for p in paths if p and os.path.isdir(p))


def landlock(work: str) -> int:
    """Apply the rules above; returns the Landlock ABI used (0: not available)."""
    abi = _libc.syscall(_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return 0
    handled = sum(bits for version, bits in _FS_BY_ABI.items() if abi >= version)
    fields = [handled] + ([_NET_TCP] if abi >= 4 else []) + ([_SCOPE] if abi >= 6 else [])
    attr = ctypes.create_string_buffer(struct.pack(f"<{len(fields)}Q", *fields))
    ruleset = _libc.syscall(_CREATE_RULESET, attr, ctypes.c_size_t(len(attr.raw)), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    rules = [(path, _READ_FILE | _READ_DIR) for path in readable_directories(work)]
    rules += [(path, _READ_FILE) for path in _READABLE_FILES if os.path.exists(path)]
    rules.append((os.devnull, _READ_FILE | _WRITE_FILE))
    for path, access in rules:
        _add_rule(ruleset, path, access)
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if _libc.syscall(_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)
    return abi


def _add_rule(ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        beneath = ctypes.create_string_buffer(struct.pack("<Qi", access, fd))
        if _libc.syscall(_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH),
                         beneath, ctypes.c_uint32(0)) != 0:
            raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
    finally:
        os.close(fd)


# --- seccomp ---------------------------------------------------------------------------------
# System call numbers: (x86-64, AArch64); None where the architecture has no such call. Checked
# against the kernel headers (asm/unistd_64.h, asm-generic/unistd.h); 452-466 are shared numbers.
_NR = {
    "clone": (56, 220), "clone3": (435, 435), "fork": (57, None), "vfork": (58, None),
    "setsid": (112, 157), "setpgid": (109, 154),
    "chmod": (90, None), "fchmod": (91, 52), "fchmodat": (268, 53), "fchmodat2": (452, 452),
    "chown": (92, None), "fchown": (93, 55), "lchown": (94, None), "fchownat": (260, 54),
    "utime": (132, None), "utimes": (235, None), "futimesat": (261, None), "utimensat": (280, 88),
    "setxattr": (188, 5), "lsetxattr": (189, 6), "fsetxattr": (190, 7), "removexattr": (197, 14),
    "lremovexattr": (198, 15), "fremovexattr": (199, 16), "setxattrat": (463, 463),
    "removexattrat": (466, 466),
    "socket": (41, 198),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "memfd_create": (319, 279), "memfd_secret": (447, 447), "unshare": (272, 97),
    "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsmount": (432, 432), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438),
    "kcmp": (312, 272), "mknod": (133, None), "mknodat": (259, 33),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264), "fanotify_init": (300, 262),
    "setpriority": (141, 140), "sched_setaffinity": (203, 122), "sched_setscheduler": (144, 119),
    "sched_setparam": (142, 118), "sched_setattr": (314, 274), "ioprio_set": (251, 30),
    "migrate_pages": (256, 238), "move_pages": (279, 239), "process_madvise": (440, 440),
    "tkill": (200, 130),
    # Allowed only on the process itself (argument 0: its pid, or 0 / -pid where that means it).
    "kill": (62, 129), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240), "prlimit64": (302, 261),
    "ioctl": (16, 29),
}
_ARCH = {"x86_64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7)}
_REFUSED = tuple(name for name in _NR if name not in (
    "clone", "clone3", "kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "prlimit64", "ioctl"))
# ioctl requests refused on any descriptor: inode flags (immutable, append-only), project
# quota / flags, and faking terminal input.
_IOCTL_REFUSED = (0x40086602, 0x40046602, 0x401C5820, 0x5412)  # FS_IOC(32)_SETFLAGS, FSSETXATTR, TIOCSTI
_CLONE_THREAD = 0x00010000
_X32_BIT = 0x40000000
_ALLOW, _KILL, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_LD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # classic BPF opcodes
_NR_OFFSET, _ARCH_OFFSET = 0, 4


def _arg(index: int) -> int:
    return 16 + 8 * index  # the low half of seccomp_data.args[index] (little-endian)


def seccomp_program(machine: str, pid: int) -> list[tuple[int, int, int, int]]:
    """The filter as (code, jt, jf, k) instructions; every rule's body ends in a return, so the
    accumulator holds the call's number whenever the next rule is tested."""
    column, arch = _ARCH[machine]
    number = {name: nr for name, pair in _NR.items() if (nr := pair[column]) is not None}
    refuse = (_RET, 0, 0, _ERRNO | errno.EPERM)
    allow = (_RET, 0, 0, _ALLOW)

    def only(argument: int, values) -> list:  # allow when the argument is one of values
        body = [(_LD, 0, 0, _arg(argument))]
        for value in values:
            body += [(_JEQ, 0, 1, value & 0xFFFFFFFF), allow]
        return body + [refuse]

    bodies = {name: [refuse] for name in _REFUSED if name in number}
    bodies["clone3"] = [(_RET, 0, 0, _ERRNO | errno.ENOSYS)]
    bodies["clone"] = [(_LD, 0, 0, _arg(0)), (_JSET, 0, 1, _CLONE_THREAD), allow, refuse]
    bodies["kill"] = only(0, (0, pid, -pid))
    for name in ("tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        bodies[name] = only(0, (pid,))
    bodies["prlimit64"] = only(0, (0, pid))
    ioctl = [(_LD, 0, 0, _arg(1))]
    for request in _IOCTL_REFUSED:
        ioctl += [(_JEQ, 0, 1, request), refuse]
    bodies["ioctl"] = ioctl + [allow]
    program = [(_LD, 0, 0, _ARCH_OFFSET), (_JEQ, 1, 0, arch), (_RET, 0, 0, _KILL),
               (_LD, 0, 0, _NR_OFFSET), (_JGE, 0, 1, _X32_BIT), (_RET, 0, 0, _KILL)]
    for name, body in bodies.items():
        program += [(_JEQ, 0, len(body), number[name])] + body
    return program + [allow]


def install_seccomp() -> bool:
    """Install the filter; False where seccomp or this architecture is not supported."""
    machine = os.uname().machine
    if machine not in _ARCH:
        return False
    program = seccomp_program(machine, os.getpid())
    filters = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *op) for op in program))
    fprog = ctypes.create_string_buffer(struct.pack("<HxxxxxxQ", len(program),
                                                    ctypes.addressof(filters)))
    if _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    return _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, fprog, 0, 0) == 0


# --- resource limits -------------------------------------------------------------------------

def limit(memory_mb: int, timeout_s: float, output_mb: int) -> None:
    for name, value in ((resource.RLIMIT_AS, memory_mb << 20),
                        (resource.RLIMIT_CPU, math.ceil(timeout_s) + 1),
                        (resource.RLIMIT_FSIZE, output_mb << 20), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(name, (value, value))
    signal.setitimer(signal.ITIMER_REAL, timeout_s)


class Unconfined(Exception):
    """A kernel feature the sandbox needs is missing (and ``MEGASMOL_SANDBOX`` is not
    ``limits-only``)."""


def confine(work: str, memory_mb: int, timeout_s: float, output_mb: int) -> None:
    """Everything above, for good; raises Unconfined where a feature is missing."""
    limits_only = os.environ.get("MEGASMOL_SANDBOX") == "limits-only"
    if not drop_capabilities() and not limits_only:
        raise Unconfined("capabilities could not be dropped")
    if landlock(work) == 0 and not limits_only:
        raise Unconfined("no Landlock")
    limit(memory_mb, timeout_s, output_mb)
    if not install_seccomp() and not limits_only:
        raise Unconfined("no seccomp filter")
