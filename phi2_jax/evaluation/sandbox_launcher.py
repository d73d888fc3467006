"""The first process inside the sandbox: confines itself, runs the program as its child, reports how it ended.

Run by `sandbox.py` as `python -I -B -c <this file's text> ARGS` (stdlib only, no
phi2_jax import: the sandbox need not be able to read this package). With
namespaces it is pid 1 of a fresh pid namespace, so its exit kills everything the
program started; without them it is a child subreaper that kills the program's
leftover descendants itself. One line goes to the status descriptor, which the
program never holds: `exit N`, `signal N` or `setup <reason>`.

ARGS: status_fd mode workdir cpu_seconds memory_bytes file_bytes open_files processes disk_bytes python program
(mode: 'namespaces' or 'none').
"""

import ctypes
import os
import resource
import signal
import sys

NOBODY = 65534
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_SECUREBITS = 1, 4, 24, 28
_PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 36, 38
_SECBIT_NOROOT_LOCKED_ALL = 0x3F  # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED and their locks
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x4000, 1 << 18
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 0x1

_libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _read_only_except(workdir, program, disk_bytes):
    """Every mount read-only (recursively); over the working directory a fresh tmpfs of `disk_bytes` holding
    the program, so that many files within the file size limit still cannot fill the host's disk."""
    _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount private")
    set_ro = _MountAttr(attr_set=_MOUNT_ATTR_RDONLY)
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(set_ro),
                         ctypes.sizeof(set_ro)), "mount_setattr /")
    with open(program, "rb") as f:
        source = f.read()
    options = f"size={disk_bytes},nr_inodes=1024,mode=0700".encode()
    _check(_libc.mount(b"tmpfs", workdir.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options), "mount tmpfs")
    with open(program, "wb") as f:
        f.write(source)


def _drop_capabilities():
    """No capability left, none regained by exec: the mounts above cannot be undone."""
    _check(_libc.prctl(_PR_SET_SECUREBITS, _SECBIT_NOROOT_LOCKED_ALL, 0, 0, 0), "securebits")
    for cap in range(64):
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # past the kernel's last capability
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()                  # effective, permitted, inheritable x 2 words: all empty
    _check(_libc.capset(header, data), "capset")


def _user_processes(uid):
    """Tasks (threads included, as RLIMIT_NPROC counts them) that `uid` runs now."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                pass
    return count


def _children():
    me = str(os.getpid())
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                found.append(int(entry))
    return found


def _kill_descendants():
    """As subreaper, every orphaned descendant becomes a child: kill and reap until none is left."""
    while True:
        children = _children()
        if not children:
            return
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def main():
    status_fd, mode, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    cpu, memory, file_bytes, open_files, processes, disk_bytes = (int(v) for v in sys.argv[4:10])
    python, program = sys.argv[10], sys.argv[11]
    os.set_inheritable(status_fd, False)  # the program never holds the status channel
    try:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # the evaluator side gone: so are we
        if mode == "namespaces":
            _read_only_except(workdir, program, disk_bytes)
            _drop_capabilities()
        else:
            _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
            if os.getuid() == 0:  # root ignores RLIMIT_NPROC and may write anywhere: run as nobody
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            else:  # RLIMIT_NPROC counts all of this user's tasks: allow `processes` more than it has now
                processes += _user_processes(os.getuid())
        _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        # CPU: SIGXCPU at the soft limit, SIGKILL a second later (at equal limits SIGKILL would come first).
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, file_bytes),
                             (resource.RLIMIT_NOFILE, open_files), (resource.RLIMIT_NPROC, processes),
                             (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(limit, (value, value))
        os.chdir(workdir)
        # Not dumpable: the program (same user) can neither ptrace us nor open our status descriptor
        # through /proc/<pid>/fd. Its own exec makes it dumpable again, which is harmless.
        _check(_libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
        pid = os.fork()
    except OSError as error:
        os.write(status_fd, f"setup {error}\n".encode())
        os._exit(125)
    if pid == 0:
        try:
            os.execv(python, [python, "-I", "-B", program])
        finally:
            os._exit(127)

    def end(signum, frame):  # the evaluator's time limit (without namespaces; with them SIGKILL ends us all)
        os.kill(pid, signal.SIGKILL)
        _kill_descendants()
        os._exit(124)

    signal.signal(signal.SIGTERM, end)
    _, status = os.waitpid(pid, 0)
    if mode != "namespaces":
        _kill_descendants()
    report = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
    os.write(status_fd, (report + "\n").encode())
    os._exit(0)


if __name__ == "__main__":  # `python -c` runs it as __main__; an import (a layout test) runs nothing
    main()
