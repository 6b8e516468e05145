"""ckptreg.fsinfo: the filesystem under a registry path, and the refusal of filesystems whose file
locks do not keep two machines' writers apart (issue 11 item 3).

Real mounts where this kernel allows them: the tmp_path filesystem, a tmpfs, and a real network
filesystem (sshfs: SFTP over TCP to an sshd on 127.0.0.1, mounted through FUSE). This VM's kernel
has neither an NFS client nor nfsd (``mount.nfs: No such device``), so NFS/SMB/9p/Lustre are decided
from mountinfo texts in the kernel's format.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time

import duckdb
import pytest
from helpers_files import mounted_tmpfs

from ckptreg import fsinfo
from ckptreg.errors import AccessError

# ----------------------------------------------------------------------------- real filesystems


def _stat_f_magic(path) -> int:
    """f_type as coreutils' stat(1) reads it (the oracle for the ctypes statfs call)."""
    r = subprocess.run(["stat", "--file-system", "--format=%t", str(path)], capture_output=True, text=True,
                       check=True)
    return int(r.stdout.strip(), 16)


def test_statfs_magic_agrees_with_stat_f(tmp_path):
    for p in (tmp_path, "/proc", "/dev/shm" if os.path.isdir("/dev/shm") else "/"):
        assert fsinfo._statfs_magic(str(p)) == _stat_f_magic(p), p


def test_tmp_path_filesystem_is_accepted(tmp_path):
    db = tmp_path / "not" / "created" / "yet.duckdb"  # nearest existing parent decides
    fstype = fsinfo.filesystem_type(db)
    expected = fsinfo.MAGIC.get(_stat_f_magic(tmp_path))
    assert fstype == expected and fstype not in ("unknown", "fuse"), fstype
    mount = fsinfo.find_mount(db)
    assert mount is not None and str(tmp_path).startswith(mount.mount_point)
    assert fsinfo.check_local_locks(db) == fstype
    # and a real DuckDB file there opens (the accepted location is a working one)
    duckdb.connect(str(tmp_path / "r.duckdb")).close()


@pytest.fixture
def tmpfs(tmp_path):
    """A REAL small tmpfs mounted for the test (root only)."""
    with mounted_tmpfs(tmp_path / "mnt", "4m") as mnt:
        yield mnt


def test_tmpfs_mount_is_accepted(tmpfs):
    db = tmpfs / "reg.duckdb"
    assert fsinfo.filesystem_type(db) == "tmpfs"
    assert fsinfo.find_mount(db).mount_point == str(tmpfs)
    assert fsinfo.check_local_locks(db) == "tmpfs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshfs_mount(tmp_path):
    """A REAL network filesystem: an sshd on 127.0.0.1 (own host key, key-only login) exporting
    tmp_path/export over SFTP, mounted with sshfs at tmp_path/mnt. Root only (sshd, FUSE)."""
    need = {"sshd": shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None),
            "sshfs": shutil.which("sshfs"), "ssh-keygen": shutil.which("ssh-keygen"),
            "fusermount": shutil.which("fusermount3") or shutil.which("fusermount")}
    missing = [k for k, v in need.items() if not v]
    if os.geteuid() != 0 or missing or not os.path.exists("/dev/fuse"):
        pytest.skip(f"sshfs mount needs root, /dev/fuse and {', '.join(missing) or 'nothing else'} "
                    f"(apt-get install sshfs openssh-server)")
    d = tmp_path / "ssh"
    export, mnt = tmp_path / "export", tmp_path / "mnt"
    for p in (d, export, mnt):
        p.mkdir()
    for key in ("host_key", "client_key"):
        subprocess.run([need["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n"
        f"PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        f"UsePAM no\nStrictModes no\nPidFile {d}/sshd.pid\nSubsystem sftp internal-sftp\n")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation folder (packaging creates it at boot)
    log = open(d / "sshd.log", "wb")
    sshd = subprocess.Popen([need["sshd"], "-D", "-e", "-f", str(d / "sshd_config")], stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    mounted = False
    try:
        deadline = time.monotonic() + 10
        while True:  # wait until sshd listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if sshd.poll() is not None or time.monotonic() > deadline:
                    pytest.skip(f"sshd did not start: {(d / 'sshd.log').read_text()[-500:]}")
                time.sleep(0.05)
        r = subprocess.run(
            [need["sshfs"], "-o", f"IdentityFile={d}/client_key,StrictHostKeyChecking=no,"
             f"UserKnownHostsFile=/dev/null,BatchMode=yes,port={port}",
             f"root@127.0.0.1:{export}", str(mnt)], capture_output=True, text=True, timeout=30,
            stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            pytest.skip(f"sshfs mount failed: {r.stderr.strip()}")
        mounted = True
        yield mnt, export
    finally:
        if mounted:
            if subprocess.run([need["fusermount"], "-u", str(mnt)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        sshd.terminate()
        sshd.wait(10)
        log.close()


def test_real_network_filesystem_is_refused(sshfs_mount, monkeypatch):
    mnt, export = sshfs_mount
    monkeypatch.delenv(fsinfo.FORCE_ENV, raising=False)
    db = mnt / "team" / "registry.duckdb"          # folder not created yet: its parent decides
    assert fsinfo.filesystem_type(db) == "fuse.sshfs"
    m = fsinfo.find_mount(db)
    assert m.mount_point == str(mnt) and m.source == f"root@127.0.0.1:{export}"
    with pytest.raises(AccessError) as ei:
        fsinfo.check_local_locks(db)
    msg = str(ei.value)
    assert ei.value.exit_code == 15
    for part in (str(db), "fuse.sshfs", str(mnt), "duckdb issue 13017", "--db postgresql://",
                 "--force-local-locks", "CKPTREG_FORCE_LOCAL_LOCKS=1"):
        assert part in msg, (part, msg)
    # this is the danger being refused: DuckDB itself opens and writes the file there happily
    # (the FUSE kernel answers its lock locally, so a second host would get the lock too)
    con = duckdb.connect(str(mnt / "x.duckdb"))
    con.execute("CREATE TABLE t AS SELECT 1 AS x")
    con.close()
    assert (export / "x.duckdb").exists()
    # insisting works, by argument or by environment (trainer callbacks have no command line)
    assert fsinfo.check_local_locks(db, force=True) == "forced"
    monkeypatch.setenv(fsinfo.FORCE_ENV, "1")
    assert fsinfo.check_local_locks(db) == "forced"
    monkeypatch.setenv(fsinfo.FORCE_ENV, "0")
    with pytest.raises(AccessError):
        fsinfo.check_local_locks(db)


# ----------------------------------------------------------------------------- mountinfo decoding

# Lines in the kernel's proc_pid_mountinfo(5) format. The fuse.sshfs line is the one the mount above
# produced on this machine; the others carry the option sets the kernel prints for those clients
# (this VM cannot mount NFS/SMB/9p/Lustre, so they could not be recorded here).
MOUNTINFO = "\n".join([
    "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard",
    "25 27 0:23 / /dev/shm rw,relatime - tmpfs tmpfs rw,size=24684084k",
    "104 27 0:51 / /mnt/nas rw,relatime shared:58 - nfs4 10.0.0.1:/export rw,vers=4.2,rsize=1048576,"
    "wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.0.0.2,"
    "local_lock=none,addr=10.0.0.1",
    "105 104 254:0 /srv/scratch /mnt/nas/local rw,relatime - ext4 /dev/vda rw,discard",
    "106 27 0:52 / /mnt/nas2 rw,relatime - ext4 /dev/vdb rw",
    "107 27 0:53 / /home/ada/nfs3 rw,relatime - nfs 10.0.0.1:/home rw,vers=3,rsize=65536,wsize=65536,"
    "namlen=255,hard,nolock,proto=tcp,timeo=600,retrans=2,sec=sys,mountaddr=10.0.0.1,mountvers=3,"
    "mountport=20048,mountproto=udp,local_lock=all,addr=10.0.0.1",
    "108 27 0:54 / /mnt/Team\\040Share rw,relatime - cifs //fileserver/team rw,vers=3.1.1,cache=strict,"
    "username=ada,uid=0,noforceuid,gid=0,noforcegid,addr=10.0.0.3,file_mode=0755,dir_mode=0755,soft,"
    "nounix,serverino,mapposix,rsize=4194304,wsize=4194304,bsize=1048576,echo_interval=60,actimeo=1",
    "109 27 0:55 / /mnt/smb3 rw,relatime - smb3 //fileserver/data rw,vers=3.0",
    "110 27 0:56 / /mnt/c rw,noatime - 9p drvfs rw,dirsync,aname=drvfs;path=C:\\134;uid=1000;gid=1000,"
    "mmap,access=client,msize=65536,trans=fd,rfd=5,wfd=5",
    "43 27 0:40 / /tmp/d2ssh.XAOn/mnt rw,nosuid,nodev,relatime - fuse.sshfs "
    "root@127.0.0.1:/tmp/d2ssh.XAOn/export rw,user_id=0,group_id=0",
    "111 27 0:57 / /mnt/bucket rw,nosuid,nodev,relatime - fuse.s3fs s3fs rw,user_id=0,group_id=0",
    "112 27 0:58 / /gluster rw,relatime - fuse.glusterfs gfs1:/vol0 rw,user_id=0,group_id=0,"
    "default_permissions,allow_other,max_read=131072",
    "113 27 0:59 / /var/lib/containers/x rw,relatime - fuse.fuse-overlayfs fuse-overlayfs rw,user_id=0,"
    "group_id=0,default_permissions,allow_other",
    "114 27 1:60 / /lustre/flock rw,relatime - lustre 10.0.0.9@tcp:/fs1 rw,flock,lazystatfs",
    "115 27 1:61 / /lustre/local rw,relatime - lustre 10.0.0.9@tcp:/fs1 rw,localflock,lazystatfs",
    "116 27 0:62 / /cephfs rw,relatime - ceph 10.0.0.7:6789:/ rw,name=admin,secret=<hidden>,acl",
    "117 27 0:63 / /mnt/over rw,relatime - ext4 /dev/vdc rw",
    "118 27 0:64 / /mnt/over rw,relatime - nfs4 10.0.0.1:/over rw,vers=4.1",  # mounted later, on top
    "this line is not mountinfo",
    "",
])


@pytest.mark.parametrize("path,fstype,refused", [
    ("/work/reg.duckdb", "ext4", False),
    ("/dev/shm/reg.duckdb", "tmpfs", False),
    ("/mnt/nas/team/reg.duckdb", "nfs4", True),
    ("/mnt/nas", "nfs4", True),
    ("/mnt/nas/local/reg.duckdb", "ext4", False),   # a local disk mounted inside the NFS share
    ("/mnt/nas2/reg.duckdb", "ext4", False),        # /mnt/nas is not a prefix of /mnt/nas2 by component
    ("/home/ada/nfs3/./x/../reg.duckdb", "nfs", True),
    ("/mnt/Team Share/reg.duckdb", "cifs", True),   # \040 in the table is a space
    ("/mnt/smb3/reg.duckdb", "smb3", True),
    ("/mnt/c/Users/ada/reg.duckdb", "9p", True),    # WSL drive
    ("/tmp/d2ssh.XAOn/mnt/reg.duckdb", "fuse.sshfs", True),
    ("/mnt/bucket/reg.duckdb", "fuse.s3fs", True),
    ("/gluster/reg.duckdb", "fuse.glusterfs", True),
    ("/var/lib/containers/x/reg.duckdb", "fuse.fuse-overlayfs", False),
    ("/lustre/flock/reg.duckdb", "lustre", False),  # cluster-coherent locks with -o flock
    ("/lustre/local/reg.duckdb", "lustre", True),   # localflock: per-client locks
    ("/cephfs/reg.duckdb", "ceph", False),          # CephFS locks are coherent across clients
    ("/mnt/over/reg.duckdb", "nfs4", True),         # the later mount on the same point hides the first
])
def test_recorded_mountinfo_decoding(path, fstype, refused):
    assert fsinfo.filesystem_type(path, mountinfo=MOUNTINFO) == fstype
    if refused:
        with pytest.raises(AccessError) as ei:
            fsinfo.check_local_locks(path, mountinfo=MOUNTINFO)
        assert fstype in str(ei.value) and path in str(ei.value)
        assert fsinfo.check_local_locks(path, force=True, mountinfo=MOUNTINFO) == "forced"
    else:
        assert fsinfo.check_local_locks(path, mountinfo=MOUNTINFO) == fstype


def test_refusal_names_the_server_and_mount_point():
    with pytest.raises(AccessError) as ei:
        fsinfo.check_local_locks("/mnt/Team Share/reg.duckdb", mountinfo=MOUNTINFO)
    assert "(cifs, //fileserver/team on /mnt/Team Share)" in str(ei.value)


def test_statfs_magics_of_network_filesystems_are_refused():
    # the kernel's answer alone (no mount table line) decides for the kernel network clients
    for magic in (0x6969, 0x517B, 0xFF534D42, 0xFE534D42, 0x01021997, 0x5346414F, 0x6B414653):
        assert fsinfo.locks_unreliable(fsinfo.MAGIC[magic]), hex(magic)
    for magic in (0xEF53, 0x58465342, 0x9123683E, 0x01021994, 0x794C7630, 0x00C36400):
        assert not fsinfo.locks_unreliable(fsinfo.MAGIC[magic]), hex(magic)
    assert fsinfo.locks_unreliable(fsinfo.MAGIC[0x0BD00BD0])              # lustre without options
    assert not fsinfo.locks_unreliable("lustre", frozenset({"rw", "flock"}))


def test_empty_or_foreign_table_is_unknown_and_accepted():
    assert fsinfo.filesystem_type("/x/reg.duckdb", mountinfo="") == "unknown"
    assert fsinfo.check_local_locks("/x/reg.duckdb", mountinfo="garbage\n") == "unknown"


# ----------------------------------------------------------------------------- the registry refuses it

def _export_files(export):
    return sorted(os.path.relpath(os.path.join(d, f), export) for d, _, fs in os.walk(export) for f in fs)


def test_cli_refuses_a_registry_on_a_real_network_filesystem(sshfs_mount, tmp_path, monkeypatch):
    """``ckptreg --db MNT/r.duckdb ...`` on the sshfs mount: every command, reading or writing, exits
    15 naming the path and the filesystem before any file is made there (no database, lock file or
    spool); ``--force-local-locks`` (or its environment variable) opens it."""
    from click.testing import CliRunner

    from ckptreg.cli import main
    from ckptreg.registry import Registry
    from helpers_files import write_peft_adapter

    mnt, export = sshfs_mount
    monkeypatch.delenv(fsinfo.FORCE_ENV, raising=False)
    ckpt = write_peft_adapter(tmp_path / "out" / "checkpoint-10", 0)  # the checkpoint is local
    db = mnt / "r.duckdb"
    runner = CliRunner()
    add = ["add", str(ckpt), "--run", "sft", "--step", "10", "--metric", "train_loss=0.5"]
    for cmd in (add, ["ls", "--run", "sft"], ["runs"], ["sql", "SELECT 1"], ["show", "sft@10"],
                ["best", "--run", "sft", "--metric", "train_loss"],
                ["leaderboard", "--run", "sft", "--score", "train_loss"]):
        r = runner.invoke(main, ["--db", str(db)] + cmd)
        assert r.exit_code == 15, (cmd, r.output)
        err = r.stderr
        for part in (f"error: {db}", "network filesystem", "fuse.sshfs", str(mnt), "--force-local-locks",
                     "postgresql://"):
            assert part in err, (cmd, part, err)
        assert _export_files(export) == [], cmd          # nothing written on the share
    assert not db.exists()

    r = runner.invoke(main, ["--db", str(db), "--force-local-locks"] + add)
    assert r.exit_code == 0, r.output
    assert (export / "r.duckdb").exists()
    r = runner.invoke(main, ["--db", str(db), "--force-local-locks", "ls", "--run", "sft", "--json"])
    assert r.exit_code == 0, r.output
    assert [row["step"] for row in json.loads(r.stdout)] == [10]
    # the environment variable is the same switch (trainer jobs, scripts)
    monkeypatch.setenv(fsinfo.FORCE_ENV, "1")
    r = runner.invoke(main, ["--db", str(db), "ls", "--run", "sft", "--json"])
    assert r.exit_code == 0, r.output
    monkeypatch.delenv(fsinfo.FORCE_ENV)
    # without it the existing file is refused again, and stays as it was
    before = (export / "r.duckdb").read_bytes()
    r = runner.invoke(main, ["--db", str(db), "add", str(ckpt), "--run", "sft", "--step", "20"])
    assert r.exit_code == 15, r.output
    assert (export / "r.duckdb").read_bytes() == before
    assert [c.step for c in Registry(db, force_local_locks=True).checkpoints("sft")] == [10]
    # the Python class: refused unless told
    with pytest.raises(AccessError):
        Registry(db).checkpoints("sft")


@pytest.mark.slow  # ~7 s: two tiny HF Trainer runs
def test_training_loop_on_a_network_filesystem_is_not_raised_into(sshfs_mount, tmp_path, monkeypatch):
    """A non-strict trainer callback whose registry is on the sshfs mount: training finishes, each
    save is a warning and a "failed" result naming the filesystem, nothing is written on the
    share; strict=True and the plain ``ckptreg.add`` raise the AccessError; the environment
    variable lets them register."""
    transformers = pytest.importorskip("transformers")
    import torch

    import ckptreg
    from ckptreg.integrations.hf import CkptregCallback
    from ckptreg.registry import Registry

    mnt, export = sshfs_mount
    monkeypatch.delenv(fsinfo.FORCE_ENV, raising=False)
    db = mnt / "train.duckdb"

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = (torch.arange(8) + i) % 32
            return {"input_ids": ids, "labels": ids.clone()}

    def train(out, cb):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0))
        args = transformers.TrainingArguments(
            output_dir=str(out), max_steps=2, per_device_train_batch_size=4, logging_steps=1, save_steps=1,
            report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
        transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[cb]).train()

    cb = CkptregCallback(run="sft", db=db)
    with pytest.warns(RuntimeWarning, match="network filesystem"):
        train(tmp_path / "a", cb)                      # not raised into
    res = cb.results()
    assert sorted(res) == [1, 2] and all(v["status"] == "failed" for v in res.values()), res
    assert all("fuse.sshfs" in v["reason"] for v in res.values()), res
    assert _export_files(export) == []
    with pytest.raises(AccessError):
        train(tmp_path / "b", CkptregCallback(run="sft", db=db, strict=True))
    with pytest.raises(AccessError):
        ckptreg.add(tmp_path / "a" / "checkpoint-2", run="sft", db=db)
    assert _export_files(export) == []
    monkeypatch.setenv(fsinfo.FORCE_ENV, "1")
    assert ckptreg.add(tmp_path / "a" / "checkpoint-2", run="sft", db=db) is not None
    assert [c.step for c in Registry(db).checkpoints("sft")] == [2]
