"""Which filesystem holds a path, and whether DuckDB's file locks can be trusted there.

DuckDB serialises writers with a POSIX lock on the database file, and ckptreg adds its own lock
file beside it (``<db>.lock``). On NFS, SMB/CIFS, 9p, AFS and network FUSE filesystems (sshfs,
s3fs, rclone, gcsfuse, ...) those locks are missing, fail (duckdb issue 13017: "Could not set lock
on file ... Operation not supported"), or are only local to one client, so two machines can both
"hold" the lock and corrupt the file. :func:`check_local_locks` refuses such a location with an
:class:`~ckptreg.errors.AccessError`; a shared registry belongs on PostgreSQL.

Detection (Linux): ``statfs(2)``'s ``f_type`` magic via ctypes (no mount table needed), and for
FUSE, unknown magics and Lustre's lock options, the longest mount point of
``/proc/self/mountinfo`` holding the path. Other systems: mount table only if there is one, else
``"unknown"`` (accepted). Plain Python, no imports beyond the standard library, no printing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass

from .errors import AccessError

__all__ = ["Mount", "filesystem_type", "find_mount", "parse_mountinfo", "locks_unreliable",
           "check_local_locks", "FORCE_ENV", "MAGIC"]

#: Environment variable with the effect of ``--force-local-locks`` (for library callers such as
#: the trainer callbacks, which have no command line): "1", "true", "yes" or "on".
FORCE_ENV = "CKPTREG_FORCE_LOCAL_LOCKS"

#: statfs f_type magic numbers (linux/magic.h, statfs(2)) -> the name mountinfo uses.
MAGIC: dict[int, str] = {
    # network / distributed
    0x00006969: "nfs",
    0x0000517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x01021997: "9p",
    0x5346414F: "afs",        # OpenAFS
    0x6B414653: "afs",        # kAFS
    0x73757245: "coda",
    0x0000564C: "ncpfs",
    0x00C36400: "ceph",
    0x0BD00BD0: "lustre",
    0x47504653: "gpfs",
    0x19830326: "beegfs",
    0x20030528: "pvfs2",      # OrangeFS
    0xAAD7AAEA: "panfs",
    0x01161970: "gfs2",
    0x7461636F: "ocfs2",
    0x65735546: "fuse",       # subtype from mountinfo
    # local
    0x0000EF53: "ext4",       # ext2/ext3/ext4 share the magic
    0x58465342: "xfs",
    0x9123683E: "btrfs",
    0x2FC12FC1: "zfs",
    0xF2F52010: "f2fs",
    0xCA451A4E: "bcachefs",
    0x3153464A: "jfs",
    0x52654973: "reiserfs",
    0x00003434: "nilfs2",
    0x01021994: "tmpfs",
    0x858458F6: "ramfs",
    0x794C7630: "overlay",
    0x73717368: "squashfs",
    0xE0F5E1E2: "erofs",
    0x00004D44: "vfat",
    0x2011BAB0: "exfat",
    0x5346544E: "ntfs",
    0x00009FA0: "proc",
    0x62656572: "sysfs",
    0x00009660: "iso9660",
}

#: Filesystems whose POSIX locks do not protect a file written from more than one client (or do
#: not exist): NFS (v3 lockd, v4, ``nolock``/``local_lock`` mounts), SMB/CIFS, 9p (locks stay in
#: the client unless the server implements them), AFS (byte-range locks are client-local), Coda,
#: NCP, BeeGFS (fcntl locks are client-local unless tuneUseGlobalFileLocks). Lustre is decided by
#: its mount options (see :func:`locks_unreliable`).
NO_SHARED_LOCKS = frozenset({
    "nfs", "nfs4", "smb", "smbfs", "smb2", "smb3", "cifs", "9p", "v9fs", "afs", "openafs",
    "coda", "ncpfs", "ncp", "beegfs", "davfs", "fuse.davfs", "vboxsf", "prl_fs", "vmhgfs",
    "fuse.vmhgfs-fuse",
})

#: FUSE subtypes that reach a remote store. FUSE answers lock calls in the local kernel when the
#: daemon does not implement them, so two hosts both get the lock.
NETWORK_FUSE = frozenset({
    "sshfs", "s3fs", "gcsfuse", "rclone", "goofys", "blobfuse", "blobfuse2", "mountpoint-s3",
    "juicefs", "glusterfs", "ceph-fuse", "mfs", "moosefs", "lizardfs", "curlftpfs", "smbnetfs",
    "davfs2", "gvfsd-fuse", "s3ql", "alluxio-fuse", "cvmfs", "weka", "afpfs", "httpfs2",
    "geesefs", "sshfs.fuse",
})


@dataclass(frozen=True)
class Mount:
    """One line of a mountinfo table (fields of proc_pid_mountinfo(5))."""

    mount_point: str
    fstype: str        # "ext4", "nfs4", "fuse.sshfs", ...
    source: str        # "server:/export", "//nas/share", "/dev/vda", ...
    options: frozenset  # per-mount options and super options together ("rw", "vers=4.2", "flock", ...)


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # the kernel writes space, tab, newline and backslash in paths as \040 \011 \012 \134
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a ``/proc/<pid>/mountinfo`` text, in table order (later lines are mounted
    later and hide earlier ones on the same mount point). Malformed lines are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3 or len(fields) < 6:
            continue
        mount_point = _unescape(fields[4])
        if not mount_point.startswith("/"):
            continue
        fstype = _unescape(fields[sep + 1])
        source = _unescape(fields[sep + 2])
        opts = fields[5].split(",") + (fields[sep + 3].split(",") if len(fields) > sep + 3 else [])
        mounts.append(Mount(mount_point, fstype, source, frozenset(o for o in opts if o)))
    return mounts


def _read_mountinfo() -> str | None:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except OSError:
        return None


def _under(path: str, mount_point: str) -> bool:
    if mount_point == "/":
        return path.startswith("/")
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def _existing(path) -> str:
    """The real path of ``path`` or of its nearest existing parent (a database that is not
    created yet lives on its folder's filesystem)."""
    p = os.path.abspath(os.fspath(path))
    while not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    return os.path.realpath(p)


def find_mount(path, mountinfo: str | None = None) -> Mount | None:
    """The mount holding ``path``: the longest mount point that is a prefix of it by whole path
    components (the last such line when several share it). With ``mountinfo`` text the path is
    only normalised (it need not exist here); without, it is resolved on this machine and
    ``/proc/self/mountinfo`` is read (None where there is none)."""
    if mountinfo is None:
        mountinfo = _read_mountinfo()
        if mountinfo is None:
            return None
        p = _existing(path)
    else:
        p = os.path.normpath(os.path.join("/", os.fspath(path)))
    best = None
    for m in parse_mountinfo(mountinfo):
        if _under(p, m.mount_point) and (best is None or len(m.mount_point) >= len(best.mount_point)):
            best = m
    return best


_LIBC = None


def _statfs_magic(path: str) -> int | None:
    """statfs(2) f_type of an existing path, or None (not Linux, no libc, call failed)."""
    global _LIBC
    if not os.uname().sysname == "Linux":
        return None
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct statfs is 120 bytes on x86_64/aarch64
        if _LIBC.statfs(os.fsencode(path), buf) != 0:
            return None
    except (OSError, AttributeError):
        return None
    # f_type is the first member, a (signed) long: mask to the 32-bit magic
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _type_and_mount(path, mountinfo: str | None) -> tuple[str, Mount | None]:
    if mountinfo is not None:
        m = find_mount(path, mountinfo)
        return (m.fstype if m else "unknown"), m
    p = _existing(path)
    magic = _statfs_magic(p)
    name = MAGIC.get(magic) if magic is not None else None
    m = find_mount(p)
    if name is not None and name != "fuse":
        return name, m  # the kernel's answer; the mount (if found) only adds source/options
    if m is not None and (name is None or m.fstype.startswith("fuse")):
        return m.fstype, m
    if name is not None:
        return name, m
    return (f"0x{magic:08x}" if magic is not None else "unknown"), m


def filesystem_type(path, mountinfo: str | None = None) -> str:
    """The type of the filesystem holding ``path`` or its nearest existing parent, as mountinfo
    names it: "ext4", "xfs", "tmpfs", "overlay", "nfs", "cifs", "9p", "lustre", "fuse.sshfs",
    ... ("0x…" for a statfs magic unknown here and no mount table, "unknown" with neither).

    ``mountinfo``: a ``/proc/<pid>/mountinfo`` text to decide from instead of this machine (the
    path is then not looked up on disk) — for tests and for diagnosing a recorded table."""
    return _type_and_mount(path, mountinfo)[0]


def locks_unreliable(fstype: str, options=frozenset()) -> bool:
    """True when POSIX locks on ``fstype`` cannot keep two writers on two machines apart."""
    t = fstype.lower()
    if t in NO_SHARED_LOCKS:
        return True
    if t.startswith("fuse.") or t.startswith("fuseblk."):
        return t.split(".", 1)[1] in NETWORK_FUSE
    if t == "lustre":
        # Lustre: cluster-coherent locks only with the `flock` mount option; `localflock` keeps
        # them per client, `noflock` (the old default) makes them fail
        return "flock" not in options
    return False


def _forced(force: bool) -> bool:
    if force:
        return True
    return os.environ.get(FORCE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_local_locks(path, force: bool = False, *, mountinfo: str | None = None) -> str:
    """Refuse a DuckDB registry at ``path`` on a filesystem without working shared locks.

    Returns the filesystem type (see :func:`filesystem_type`) when the location is accepted.
    Raises :class:`~ckptreg.errors.AccessError` (exit 15) naming the path, the filesystem and its
    mount, pointing at the PostgreSQL backend and at ``--force-local-locks``. ``force`` (or
    ``$CKPTREG_FORCE_LOCAL_LOCKS=1``) skips the check: the user vouches that only one process on
    one machine opens the file."""
    if _forced(force):
        return "forced"
    fstype, mount = _type_and_mount(path, mountinfo)
    options = mount.options if mount is not None else frozenset()
    if mount is not None and fstype == "lustre" and mount.fstype != "lustre":
        options = frozenset()
    if not locks_unreliable(fstype, options):
        return fstype
    where = f"{fstype}, {mount.source} on {mount.mount_point}" if mount is not None else fstype
    raise AccessError(
        f"{os.fspath(path)}: the registry database is on a network filesystem ({where}) where "
        f"DuckDB's file locks do not work (duckdb issue 13017): two writers on two machines "
        f"could corrupt it. Use a PostgreSQL registry for a shared one "
        f"(--db postgresql://USER@HOST:PORT/DBNAME, or CKPTREG_DB=postgresql://...), keep the "
        f".duckdb file on a local disk, or pass --force-local-locks ({FORCE_ENV}=1) if only one "
        f"process on one machine ever opens it")
