"""Process-group setup for the three ways largefr is started.

* `deepspeed launch/train.py ...`: the launcher sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
  MASTER_PORT for every rank and passes `--local_rank`.
* `torchrun --nproc_per_node N launch/train.py ...`: the same variables (plus TORCHELASTIC_RUN_ID).
* `python launch/train.py ...`: none of them; a world of one process gets a gloo group on a free
  local port, so the DeepSpeed engine and the collectives work unchanged.

The backend is DeepSpeed's accelerator's (nccl on NVIDIA GPUs, gloo on CPU without oneCCL); the
torch group is created here with an explicit timeout, then handed to DeepSpeed, so a rank that
dies makes the others fail after `timeout` instead of hanging forever.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from largefr.distributed.spawn import free_port
from largefr.errors import UserError
from largefr.quiet import quiet_stdout

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MEETING_TIMEOUT_S = 60.0
"""Longest wait of a failed rank for its peers (see `meet_failed_ranks`): covers the skew of ranks that
run the same setup checks on a loaded machine, and keeps an error that only one rank sees from hanging."""


@dataclass(kw_only=True, frozen=True)
class DistributedEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str
    """'deepspeed', 'torchrun', 'env' (the variables without a known launcher) or 'single'."""
    backend: str
    device: torch.device
    meeting_group: object | None = None
    """A gloo group only `meet_failed_ranks` uses (None for one rank): CPU tensors work under nccl too, and
    no other collective shares it, so a rank waiting there cannot pair with a peer's training collective."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_launcher(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    if not all(name in environ for name in LAUNCH_VARIABLES):
        missing = [name for name in LAUNCH_VARIABLES if name not in environ]
        if len(missing) < len(LAUNCH_VARIABLES) and int(environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(f"incomplete launcher environment: {', '.join(missing)} not set; start with "
                               "`deepspeed`, `torchrun` or plain `python` (one process)")
        return "single"
    if "TORCHELASTIC_RUN_ID" in environ:
        return "torchrun"
    if "CROSS_RANK" in environ or "LOCAL_SIZE" in environ:
        return "deepspeed"
    return "env"


def _accelerator():
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def _device_for(local_rank: int) -> torch.device:
    accelerator = _accelerator()
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    accelerator.set_device(local_rank)
    return torch.device(accelerator.device_name(local_rank))


def default_timeout_s() -> float:
    """Collective timeout: $LARGEFR_DIST_TIMEOUT_S, else 30 minutes (DeepSpeed's and torch's default)."""
    return float(os.environ.get("LARGEFR_DIST_TIMEOUT_S", 1800))


SHM_COMM_OP = "deepspeed_shm_comm"
"""DeepSpeed's CPU shared-memory collectives op: JIT-built by torch's cpp_extension at the first
`deepspeed.init_distributed` on CPU, into $TORCH_EXTENSIONS_DIR/deepspeed_shm_comm (minutes on a loaded machine)."""


LOCK_RECHECK_S = 0.5
"""Pause before a lock held by no one is called stale (it must still be there, the same file, after it)."""


class StaleBuildLockError(UserError, FileExistsError):
    """A JIT build's `lock` file left by a killed build that could not be removed: every start would wait on it."""


class RendezvousError(UserError, RuntimeError):
    """The ranks could not meet (a busy port, an unreachable master, a missing peer); the message says which."""


def _held_open(path: str) -> bool:
    """True when a process of this machine that we may inspect has `path` open (Linux /proc; True if unknown)."""
    if not os.path.isdir("/proc/self/fd"):
        return True
    target = os.path.realpath(path)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.path.realpath(f"/proc/{pid}/fd/{fd}") == target for fd in fds):
                return True
        except OSError:  # the process ended, or is not ours to read
            continue
    return False


def stale_build_lock(op_name: str = SHM_COMM_OP) -> str | None:
    """The path of op `op_name`'s JIT build `lock` file when no process here holds it, else None.

    torch's cpp_extension creates the lock with O_EXCL, keeps it open while it builds and deletes it when
    done; a waiter (`FileBaton.wait`) polls until it is gone, with no timeout and no message. A build killed
    midway leaves the file behind, held by no one. The same file checked twice around the scan guards
    against a build that ends (and another that starts) meanwhile.
    """
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory(op_name, verbose=False), "lock")
    try:
        before = os.stat(lock)
        if _held_open(lock):
            return None
        time.sleep(LOCK_RECHECK_S)  # a finishing build closes the file a moment before it deletes it
        after = os.stat(lock)
    except FileNotFoundError:
        return None
    same_file = (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    return lock if same_file and not _held_open(lock) else None


def clear_stale_build_lock(op_name: str = SHM_COMM_OP) -> str | None:
    """Remove the lock a killed JIT build of `op_name` left (no process holds it), with one log line; its path.

    Called by one process per machine before the ranks meet (`init_distributed`: local rank 0), so no rank
    of this job can have started the build yet. StaleBuildLockError when the file cannot be removed.
    """
    lock = stale_build_lock(op_name)
    if lock is None:
        return None
    try:
        os.remove(lock)
    except FileNotFoundError:  # removed meanwhile (another job's start): nothing left to do
        return lock
    except OSError as error:
        raise StaleBuildLockError(
            f"{lock}: a lock file left by a killed build of DeepSpeed's {op_name} op (no process holds it) "
            f"could not be removed ({error.strerror}); every start would wait on it forever. Delete it, or set "
            "TORCH_EXTENSIONS_DIR to another folder") from error
    print(f"largefr: removed {lock}, left by a killed build of DeepSpeed's {op_name} op (no process held it); "
          "the op is built again", file=sys.stderr, flush=True)
    return lock


def _is_local_address(address: str) -> bool:
    """True when `address` names this machine (where a busy port can be checked before the ranks meet)."""
    if address in ("localhost", "127.0.0.1", "::1", socket.gethostname()):
        return True
    try:
        with socket.socket() as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


def _port_in_use(address: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((address, port))
        except OSError:
            return True
    return False


def _port_busy_message(address: str, port: int, launcher: str) -> str:
    return (f"the rendezvous port {address}:{port} (MASTER_PORT, set by {launcher}) is held by another process, "
            f"so the ranks cannot meet there. Start with `python launch/train.py --world N ...` (it picks a free "
            f"port), or give the launcher a free port: `deepspeed --master_port {free_port()} ...` "
            f"(`torchrun --master_port ...`)")


def check_rendezvous_port(launcher: str, environ: Mapping[str, str] | None = None) -> None:
    """Before rank 0 meets the others: a launcher's MASTER_PORT on this machine that another process holds
    raises RendezvousError naming it and the flag to change (torch would only say EADDRINUSE)."""
    environ = os.environ if environ is None else environ
    address, port = environ.get("MASTER_ADDR", ""), int(environ.get("MASTER_PORT", "0") or 0)
    agent_store = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent holds the port itself
    if environ.get("RANK") != "0" or not port or agent_store or not _is_local_address(address):
        return
    if _port_in_use(address, port):
        raise RendezvousError(_port_busy_message(address, port, launcher))


def _meet(backend: str, timeout_s: float, device: torch.device, launcher: str) -> None:
    """dist.init_process_group, with a failure reported as what it is: the ranks did not meet."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    except (dist.DistError, RuntimeError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if "EADDRINUSE" in first_line or "address already in use" in first_line:
            raise RendezvousError(_port_busy_message(str(address), int(port or 0), launcher)) from error
        raise RendezvousError(
            f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')} could not meet the others at "
            f"{address}:{port} (MASTER_ADDR:MASTER_PORT, set by {launcher}) within {timeout_s:.0f} s: {first_line}. "
            "Check that every rank was started with the same address and port and that rank 0 is running; "
            "nothing was trained yet") from error


def set_default_group_timeout(timeout_s: float) -> None:
    """Make `timeout_s` the timeout of every process group created later without one.

    DeepSpeed 0.19.8 builds its groups (the data-parallel clone of the world group that reduces the
    gradients, ZeRO's, ...) with `dist.new_group(ranks)` and no timeout, so torch gives them its module
    default (30 min gloo, 10 min NCCL) whatever the default group has: a hung peer held the gradient
    all-reduce for that long. torch reads the default from these two module attributes at each new_group.
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timedelta(seconds=timeout_s)
    distributed_c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)


def init_distributed(*, timeout_s: float | None = None, backend: str | None = None) -> DistributedEnv:
    """Create (or adopt) the default process group and DeepSpeed's comm backend; return who we are.

    timeout_s bounds every collective, on every group (DeepSpeed's included: `set_default_group_timeout`), so a
    rank that died makes the others fail instead of hang.
    A stale JIT build lock of DeepSpeed's CPU comm op is removed (one log line) instead of a silent wait; a
    rendezvous that fails raises RendezvousError saying what failed (a busy port names the flag to change).
    """
    import deepspeed

    timeout_s = default_timeout_s() if timeout_s is None else timeout_s
    launcher = detect_launcher()
    if launcher == "single" and not dist.is_initialized():
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank == 0:  # one process per machine, before any rank of this job can start the build
        clear_stale_build_lock()  # deepspeed.init_distributed JIT-builds its CPU comm op: a stale lock hangs it
    device = _device_for(local_rank)
    backend = backend or _accelerator().communication_backend_name()
    if not dist.is_initialized():
        check_rendezvous_port(launcher)
        _meet(backend, timeout_s, device, launcher)
    set_default_group_timeout(timeout_s)
    with quiet_stdout():  # its comm-op build prints one line per rank at every start
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False,
                                   timeout=timedelta(seconds=timeout_s))
    meeting_group = None
    if dist.get_world_size() > 1:
        meeting_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=min(timeout_s, MEETING_TIMEOUT_S)))
    return DistributedEnv(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                          launcher=launcher, backend=dist.get_backend(), device=device, meeting_group=meeting_group)


def meet_failed_ranks(group) -> int:
    """Called by a rank that failed (after it printed why): wait until the other ranks fail too, or give up.

    Launchers (deepspeed, torchrun) kill every rank as soon as one exits non-zero, so a rank that reaches
    the same error a moment later than its peer (a loaded machine) would die before printing it. The
    failed ranks meet here before any exits. A healthy rank never comes: the wait ends after the group's
    timeout (at most MEETING_TIMEOUT_S) and this rank exits as before. Returns how many ranks met.
    """
    if group is None:
        return 1
    arrived = torch.ones(1)
    try:
        dist.all_reduce(arrived, group=group)
    except RuntimeError:  # dist.DistError is one: a peer that never arrives, or died: stop waiting
        return 1
    return int(arrived.item())


def meet_after_config_error(*, timeout_s: float = MEETING_TIMEOUT_S) -> None:
    """`meet_failed_ranks` for a config error, before any process group exists (every rank reads the same file).

    A short-lived gloo group on the launcher's address; nothing when started without a launcher.
    """
    try:
        if detect_launcher() == "single" or int(os.environ["WORLD_SIZE"]) < 2 or dist.is_initialized():
            return
        dist.init_process_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError):  # an odd environment, or a peer that never came: nothing to wait for
        return
    try:
        meet_failed_ranks(dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def shutdown_distributed(*, wait_for_peers: bool = False) -> None:
    """Destroy the default process group; `wait_for_peers` first waits until every rank got here.

    The barrier keeps a rank that finished from closing its connections while a peer still reads the
    tail of the last collective (gloo then aborts the peer). Only after a run that ended normally: after
    an error the peers may never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    release_shm_segment()


SHM_SEGMENT_DIR = "/dev/shm"


def shm_segment_path(environ: Mapping[str, str] | None = None) -> str | None:
    """This rank's shared-memory all-reduce buffer of DeepSpeed's CPU comm op, or None when it makes none.

    DeepSpeed 0.19.8 (csrc/cpu/comm/shm.cpp) creates one 64 MiB segment per rank when every rank is on this
    machine (LOCAL_SIZE = world size, as its launcher sets), named after the uid, MASTER_ADDR, MASTER_PORT
    and the rank, and never unlinks it: each run would leave 64 MiB per rank of RAM-backed /dev/shm behind.
    """
    env = os.environ if environ is None else environ
    if env.get("LOCAL_SIZE") is None or env.get("RANK") is None:
        return None
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}"
    return os.path.join(SHM_SEGMENT_DIR, f"{name}_{env['RANK']}")


def release_shm_segment() -> None:
    """Unlink this rank's DeepSpeed shared-memory segment (its name only: a peer still mapping it keeps it)."""
    path = shm_segment_path()
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
