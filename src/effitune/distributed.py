"""Several processes, one run: who is who, collectives that never hang on an error, and the launcher.

Who starts the processes
    Under `torchrun` (one machine or many) or SLURM's `srun` (one task per device) the launcher starts
    every process; each runs `train()` from the top and the variables the launcher set (RANK,
    WORLD_SIZE, LOCAL_RANK, ...; SLURM_PROCID, SLURM_NTASKS, ...) say who is who. Lightning reads the
    same variables, with the same priority (torchrun first), and joins the process group opened here.

    `train.devices: 2` (CLI `--devices 2`) on one machine without a launcher starts the processes
    itself (`launch`): PyTorch's `elastic_launch`, the library under torchrun, spawns them with
    exactly torchrun's variables, so both ways run one code path. Every process runs the whole
    `train()` (scan, image cache, feature cache, phases), not only `trainer.fit`, and rank 0's result
    comes back. Lightning's own launchers were not used: they start the processes inside
    `trainer.fit`, after one process built the caches, or re-run the user's script from the top. The
    processes are spawned: `train`'s arguments must pickle, and a script calling it needs
    `if __name__ == "__main__":`.

What the processes share
    Rank 0 alone writes run files (manifest, config, state, bundle, reports); the others read them
    after a collective. Work is split with `on_main` (rank 0 runs it, everyone gets the result) and
    `each_rank` (everyone runs its share, everyone gets all results). They are the only barriers and
    they carry errors: a bad file on rank 1 raises the same UserError on every rank instead of leaving
    the others waiting at a barrier. Object collectives run on a gloo (CPU) group even when training
    uses NCCL, so they never need a GPU.

This module imports torch only when it has to: `effitune scan` stays fast.
"""
from __future__ import annotations

import datetime
import difflib
import os
import signal
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from .errors import ConfigError, UserError

__all__ = ["rank", "world_size", "local_rank", "local_world_size", "is_main", "launcher", "init", "shutdown",
           "barrier", "on_main", "each_rank", "from_main", "shard_range", "note", "take_shares",
           "cores_per_process", "Plan", "plan", "check_settings", "launch", "STRATEGIES"]

# Lightning strategies that run in processes someone else started. ddp_spawn/ddp_fork/ddp_notebook start
# their own inside trainer.fit (after the caches were built by one process); fsdp/deepspeed shard the
# weights the phases save and reload whole.
STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true")
TIMEOUT = datetime.timedelta(minutes=60)  # rank 0's solo steps (split, merging records) must fit in it

_group = None  # the gloo group for object collectives when the default group is NCCL
_shares: dict[str, int] = {}


# --- who is who -----------------------------------------------------------------------------------

def launcher() -> str | None:
    """'torchelastic' (torchrun or `launch`), 'slurm' (srun with several tasks), or None (one process)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchelastic"
    if os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive") and int(os.environ.get("SLURM_NTASKS", 1)) > 1:
        return "slurm"  # Lightning's rule: a job named bash/interactive is a shell, not srun's tasks
    return None


def _from_env(elastic: str, slurm: str, default: int) -> int:
    name = {"torchelastic": elastic, "slurm": slurm}.get(launcher() or "")
    return int(os.environ[name]) if name and name in os.environ else default


def _initialized() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def rank() -> int:
    if _initialized():
        return sys.modules["torch.distributed"].get_rank()
    return _from_env("RANK", "SLURM_PROCID", 0)


def world_size() -> int:
    if _initialized():
        return sys.modules["torch.distributed"].get_world_size()
    return _from_env("WORLD_SIZE", "SLURM_NTASKS", 1)


def local_rank() -> int:
    return _from_env("LOCAL_RANK", "SLURM_LOCALID", 0)


def local_world_size() -> int:
    if launcher() == "slurm":
        return world_size() // int(os.environ.get("SLURM_NNODES", 1))
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launcher() else 1


def is_main() -> bool:
    return rank() == 0


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cores_per_process() -> int:
    """This machine's cores shared fairly between the run's processes on it (threads, decoder pools)."""
    if launcher() == "slurm" and "SLURM_CPUS_PER_TASK" in os.environ:  # srun gave each task its own
        return max(1, min(cores(), int(os.environ["SLURM_CPUS_PER_TASK"])))
    return max(1, cores() // local_world_size())


# --- joining and leaving ----------------------------------------------------------------------------

def init(device: str = "cpu") -> None:
    """Join the run's process group (nothing to do alone or when joined): gloo on a CPU, NCCL on GPUs.

    `device` is this process's device ("cpu" or "cuda:N"). Lightning finds the group open and uses it.
    """
    global _group
    if world_size() == 1 and not _initialized():
        return
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # "cuda" then means this process's GPU everywhere
    else:
        torch.set_num_threads(cores_per_process())  # N processes x all cores would oversubscribe the CPU
    if dist.is_initialized():
        return
    if launcher() == "slurm":
        from lightning.fabric.plugins.environments import SLURMEnvironment

        try:
            environment = SLURMEnvironment()
        except RuntimeError as error:  # e.g. --ntasks without --ntasks-per-node
            raise UserError(f"SLURM settings: {error}") from None
        environment.main_address, environment.main_port  # noqa: B018 - sets MASTER_ADDR/PORT as Lightning does
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, rank=rank(), world_size=world_size(),
                            timeout=TIMEOUT if backend == "gloo" else None)
    _group = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else None


def shutdown() -> None:
    global _group
    if _initialized():
        sys.modules["torch.distributed"].destroy_process_group()
    _group = None


def _collective_group():
    """The group object collectives run on; joins a gloo group first when nobody called `init`."""
    global _group
    import torch.distributed as dist

    if not dist.is_initialized():
        init("cpu")
    if _group is None and dist.get_backend() != "gloo":
        _group = dist.new_group(backend="gloo", timeout=TIMEOUT)
    return _group


# --- collectives that carry errors --------------------------------------------------------------------

@dataclass
class _Failure:
    rank: int
    kind: str  # "user" | "config" | "other"
    text: str


def _attempt(fn: Callable, args: tuple, kwargs: dict) -> tuple[bool, Any, BaseException | None]:
    try:
        return True, fn(*args, **kwargs), None
    except Exception as error:  # noqa: BLE001 - travels to every rank, re-raised below

        kind = "user" if isinstance(error, UserError) else "config" if isinstance(error, ConfigError) else "other"
        text = str(error) if kind != "other" else f"{type(error).__name__}: {error}"
        return False, _Failure(rank(), kind, text), error


def _raise(failure: _Failure, own: BaseException | None) -> None:
    if own is not None:
        raise own  # the failing rank keeps its own traceback
    if failure.kind == "user":
        raise UserError(failure.text)
    if failure.kind == "config":

        raise ConfigError(failure.text)
    raise RuntimeError(f"rank {failure.rank} of the run failed: {failure.text}")


def each_rank(fn: Callable, *args, **kwargs) -> list:
    """Run `fn` on every rank; every rank gets every rank's result, in rank order.

    A failure anywhere raises on every rank (a UserError stays a UserError with its message).
    """
    if world_size() == 1 and not _initialized():
        return [fn(*args, **kwargs)]
    import torch.distributed as dist

    group = _collective_group()
    ok, value, own = _attempt(fn, args, kwargs)
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, (ok, value), group=group)
    if not ok:
        raise own
    for other_ok, other_value in gathered:
        if not other_ok:
            _raise(other_value, None)
    return [value for _, value in gathered]


def on_main(fn: Callable, *args, **kwargs):
    """Run `fn` on rank 0 only; every rank gets its result (picklable), or raises its error."""
    if world_size() == 1 and not _initialized():
        return fn(*args, **kwargs)
    import torch.distributed as dist

    group = _collective_group()
    ok, value, own = _attempt(fn, args, kwargs) if is_main() else (True, None, None)
    box = [(ok, value)]
    dist.broadcast_object_list(box, src=0, group=group)
    ok, value = box[0]
    if not ok:
        _raise(value, own)
    return value


def from_main(value):
    """Rank 0's `value` on every rank (decisions that must agree, e.g. from clocks or files)."""
    return on_main(lambda: value)


def barrier() -> None:
    each_rank(lambda: None)


# --- sharding -----------------------------------------------------------------------------------------

def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous block [start, stop) of n items; blocks are disjoint, cover all, differ by <= 1."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def note(step: str, count: int) -> None:
    """Count the items this process computed in a sharded step (the run's distributed.json lists them)."""
    _shares[step] = _shares.get(step, 0) + count


def take_shares() -> dict[str, int]:
    shares = dict(_shares)
    _shares.clear()
    return shares


# --- the plan: how many processes, started by whom ---------------------------------------------------

def _gpu_ids(devices) -> list[int] | None:
    text = str(devices).strip().strip("[]")
    return [int(part) for part in text.split(",") if part.strip()] if "," in text else None


def check_settings(devices, num_nodes, strategy) -> None:
    """Syntax only (the machine is checked by `plan`); the message names the value and the fix."""
    text = str(devices).strip()
    ids = text.strip("[]").replace(" ", "").split(",")
    if not (text == "auto" or (text.isdigit() and int(text) >= 1) or ("," in text and all(i.isdigit() for i in ids))):
        raise UserError(f"train.devices '{devices}' must be auto, a number of processes per machine (e.g. 2) "
                        "or GPU indices (e.g. 0,1).")
    if num_nodes is not None and (not isinstance(num_nodes, int) or isinstance(num_nodes, bool) or num_nodes < 1):
        raise UserError(f"train.num_nodes '{num_nodes}' must be a whole number of machines (1 or more), or left "
                        "unset to take it from the launcher.")
    if strategy not in STRATEGIES:
        hint = difflib.get_close_matches(str(strategy), STRATEGIES, n=1)
        why = (" effitune starts the processes itself (or torchrun/srun does), so spawning strategies are not "
               "needed" if str(strategy).startswith("ddp_") else "")
        raise UserError(f"train.strategy '{strategy}' is not supported: use {', '.join(STRATEGIES)}."
                        f"{f' Did you mean {hint[0]!r}?' if hint else ''}{why}")


@dataclass(frozen=True)
class Plan:
    per_node: int  # processes on each machine
    num_nodes: int
    launch: str  # "" (one process), "self" (start per_node processes here), "torchelastic" or "slurm"
    strategy: str  # for Lightning
    devices: int | list[int]  # for Lightning
    device: str  # this process's device: "cpu" or "cuda:N"

    @property
    def world(self) -> int:
        return self.per_node * self.num_nodes


def plan(devices="auto", num_nodes: int | None = None, strategy: str = "auto", cuda: bool = False) -> Plan:
    """Resolve the requested devices against the launcher and this machine; UserError names any mismatch."""
    check_settings(devices, num_nodes, strategy)
    ids = _gpu_ids(devices)
    if ids is not None and not cuda:
        raise UserError(f"--devices {devices} lists GPU indices, but training runs on the CPU. Pass a number of "
                        "processes (e.g. --devices 2) or use a machine with GPUs.")
    wanted = len(ids) if ids is not None else None if str(devices).strip() == "auto" else int(devices)
    outside = launcher()
    if outside is not None:
        per_node = local_world_size()
        nodes = max(1, world_size() // per_node)
        tool = "torchrun --nproc-per-node" if outside == "torchelastic" else "srun --ntasks-per-node"
        if wanted not in (None, per_node):
            raise UserError(f"--devices {devices} asks for {wanted} processes per machine, but {tool} started "
                            f"{per_node}. Pass --devices {per_node} (or leave it auto), or start {wanted}.")
        if num_nodes not in (None, nodes):
            raise UserError(f"--num-nodes {num_nodes} does not match the launcher's {nodes} machine(s). Pass "
                            f"--num-nodes {nodes} (or leave it unset).")
    else:
        if num_nodes not in (None, 1):
            raise UserError(f"--num-nodes {num_nodes}: training on several machines needs a launcher on each one "
                            "(torchrun or SLURM's srun); see docs/scaling.md. On one machine, leave --num-nodes unset.")
        per_node, nodes = _local_processes(wanted, ids, cuda), 1
        outside = "self" if per_node > 1 else ""
    chosen = "ddp" if strategy == "auto" and per_node * nodes > 1 else strategy
    index = ids[local_rank()] if ids is not None else local_rank()
    return Plan(per_node, nodes, outside, chosen, ids if ids is not None else per_node,
                f"cuda:{index}" if cuda else "cpu")


def _local_processes(wanted: int | None, ids: list[int] | None, cuda: bool) -> int:
    if cuda:
        import torch

        available = torch.cuda.device_count()
        if ids is not None and max(ids) >= available:
            raise UserError(f"--devices {','.join(map(str, ids))} names GPU {max(ids)}, but this machine has "
                            f"{available} (indices 0 to {available - 1}).")
        if wanted is not None and wanted > available:
            raise UserError(f"--devices {wanted} asks for {wanted} GPUs, but this machine has {available}. "
                            f"Pass --devices {available} or fewer.")
        return wanted or available
    if wanted is not None and wanted > cores():
        raise UserError(f"--devices {wanted} asks for {wanted} CPU processes, but this machine has {cores()} "
                        f"core(s) for them. Pass --devices {cores()} or fewer.")
    return wanted or 1


# --- starting the processes ourselves -----------------------------------------------------------------

def launch(fn: Callable, processes: int, **kwargs):
    """Run `fn(**kwargs)` in `processes` new processes on this machine, as torchrun would; rank 0's result.

    `fn` must be importable by name (a module-level function) and `kwargs` picklable. A UserError or
    ConfigError in the workers comes back as itself (one clear message); any other failure raises
    PyTorch's ChildFailedError, which names the failing rank, after the worker printed its traceback.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=f"effitune-{uuid.uuid4().hex}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0",  # torchrun --standalone: a free port
                          max_restarts=0, monitor_interval=0.5, start_method="spawn")
    # The launcher installs signal handlers and leaves them: put back the caller's (with them, a fork
    # Pool the caller starts later hangs, and Ctrl-C raises torch's SignalException).
    handled = [getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, name)]
    handlers = {number: signal.getsignal(number) for number in handled}
    variable = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE")
    try:
        results = elastic_launch(config, _worker)(fn, kwargs)
    except SignalException:
        raise KeyboardInterrupt from None
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        if variable is None:
            os.environ.pop("TORCHELASTIC_SIGNALS_TO_HANDLE", None)
    result = results[0]
    if isinstance(result, BaseException):
        raise result
    return result


def _worker(fn: Callable, kwargs: dict):
    """One launched process: user mistakes come back as values, so the parent re-raises them cleanly."""
    import multiprocessing


    # A spawned process inherits "spawn" as its default start method; loader workers and decoder pools
    # would then re-import torch each time (seconds apiece). Back to the platform's default, as torchrun gives.
    multiprocessing.set_start_method(None, force=True)
    _die_with_parent()
    try:
        return fn(**kwargs)
    except (UserError, ConfigError) as error:
        return error
    finally:
        shutdown()


def _die_with_parent() -> None:
    """Linux: when the launching process dies, even by SIGKILL, its workers go too (no orphans training on)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
