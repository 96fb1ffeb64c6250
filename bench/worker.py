"""A rank of the warm worker pool, started by DeepSpeed's launcher (`python -m llmbench.worker`).

Each rank connects to the driver's control socket, joins the process group once, then runs
the trials the driver sends, one after another, each building and fully tearing down its
own engine and model. When the driver goes away (its socket closes) every rank exits at
once, even one stuck in a collective, so no rank outlives its sweep.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

EXIT_DRIVER_GONE = 75


def release_own_shm() -> None:
    """Unlink this rank's DeepSpeed CPU-comm shared-memory segment, which DeepSpeed never
    removes (see launch.release_shm_buffers); peers keep their mappings, so this is safe."""
    port, rank = os.environ.get("MASTER_PORT"), os.environ.get("RANK")
    if port and rank:
        from .launch.process import release_shm_buffers

        release_shm_buffers(int(port), rank)


def release_launch_shm() -> None:
    """When the driver is gone: unlink the segments of every rank of this launch on this host.
    The first rank to see the driver's socket close does it for all: a peer that DeepSpeed's
    launch.py SIGTERMs first (it ends the others once one rank exits) cannot do its own."""
    port = os.environ.get("MASTER_PORT")
    if port:
        from .launch.process import release_shm_buffers

        release_shm_buffers(int(port))


def _placement(nodes: str, local_rank: int, host: str) -> dict:
    """Where this rank runs, as the launcher sees it: its node's name and rank (DeepSpeed:
    `--nodes` in node-rank order and CROSS_RANK; srun: SLURMD_NODENAME and SLURM_NODEID) and
    its local rank (the device index on a GPU node)."""
    node_rank = int(os.environ.get("CROSS_RANK") or os.environ.get("LLMBENCH_NODE_RANK") or 0)
    names = [n for n in nodes.split(",") if n]
    node = os.environ.get("LLMBENCH_NODE") or (names[node_rank] if node_rank < len(names) else host)
    return {"node": node, "node_rank": node_rank, "local_rank": local_rank}


def _per_host_extensions_dir(host: str) -> None:
    """One JIT-build cache per physical host (~/.cache/torch_extensions/HOST): nodes sharing a
    home directory would otherwise share, fight over, or load another machine's build of
    DeepSpeed's compiled ops. A TORCH_EXTENSIONS_DIR the user set is theirs and is kept."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return
    from .launch.process import extensions_dir

    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir() / host)


def _ranks_on_this_host(host: str, world: int) -> int:
    """How many ranks of the process group run on this physical host (all ranks' host names, gathered)."""
    import torch.distributed as dist

    names: list = [None] * world
    dist.all_gather_object(names, host)
    return sum(1 for n in names if n == host)


def _threads_on_host(on_host: int) -> int:
    """This rank's share of its physical host's cores: SLURM's --cpus-per-task where srun set
    it (its binding already made the share), else the usable cores over the ranks on this host."""
    from .env import usable_cores

    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    return max(1, usable_cores() // max(1, on_host))


MEMORY_SHARE = 0.9      # of the host's memory, split among its ranks
MEMORY_FLOOR = 8 << 30  # at least this much address space a rank (ZeRO-1/2 reserve 2-4 GB of buckets by default)


def limit_memory(setting: str, ranks_on_host: int) -> int | None:
    """Confine this rank's memory (CPU ranks): RLIMIT_DATA, which since Linux 4.7 counts every
    private writable mapping (the heap and glibc's and torch's mmapped blocks), so an allocation
    beyond it fails in the allocator (torch: "DefaultCPUAllocator: can't allocate memory",
    classified oom) instead of the host's OOM killer ending a process, or the machine, at
    random. It counts address space, touched or not, so `auto` is a guard against a runaway
    trial, not a fine budget: what the rank maps now, plus the larger of MEMORY_SHARE of the
    host's memory over the ranks on this host and MEMORY_FLOOR. `off`: none; else a size (`12GiB`).
    Returns the limit set, or None."""
    import resource

    import psutil

    from .plan.devices import parse_bytes

    if setting == "off":
        return None
    if setting == "auto":
        mapped = 0
        try:
            with open("/proc/self/status") as f:
                mapped = next((int(ln.split()[1]) << 10 for ln in f if ln.startswith("VmData:")), 0)
        except OSError:
            pass
        limit = mapped + max(int(psutil.virtual_memory().total * MEMORY_SHARE / max(1, ranks_on_host)), MEMORY_FLOOR)
    else:
        limit = parse_bytes(setting)
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return limit


def main() -> None:
    t_start = time.time()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--control", required=True, help="driver's host:port")
    parser.add_argument("--key", required=True, help="the pool's key file (0600): proves this rank to the driver")
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="threads per rank; 0: share the physical host's cores")
    parser.add_argument("--nodes", default="", help="the launcher's node names in node-rank order (DeepSpeed's hostfile)")
    parser.add_argument("--memory-limit", default="off", help="CPU ranks: RLIMIT_DATA, auto, off or a size (limit_memory)")
    args, _ = parser.parse_known_args()

    from .launch.slurm import torch_env_from_slurm

    os.environ.update(torch_env_from_slurm())  # a task srun started: SLURM's names for rank and world
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    host = socket.gethostname()
    placement = _placement(args.nodes, local_rank, host)
    if args.threads == 0:
        _per_host_extensions_dir(host)
    from .launch.control import RankChannel

    ctl = RankChannel(args.control, args.key, {"rank": rank, "pid": os.getpid(), "host": host, **placement},
                      on_driver_gone=release_launch_shm, exit_code=EXIT_DRIVER_GONE)

    if args.accelerator == "cpu":  # DeepSpeed's CPU comm segments exist only here
        import signal

        def terminated(signum, frame):  # DeepSpeed's launch.py SIGTERMs the others when one rank exits
            release_launch_shm()  # (this rank's EOF cleanup may not have run: it was busy as the driver went)
            os._exit(128 + signum)

        # (a Python handler runs once the main thread is back in the interpreter: a rank stuck in
        # native code then dies by launch.py's SIGKILL 30 s later; on a GPU, with no segment to
        # clean, the default action ends it at once)
        signal.signal(signal.SIGTERM, terminated)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.accelerator == "cuda":
        torch.cuda.set_device(local_rank)
    else:  # a trial's speed must not depend on what the process ran before (collect/memory.STEADY_MALLOC)
        from .collect import allocated
        from .collect.memory import STEADY_MALLOC, set_malloc

        set_malloc(STEADY_MALLOC)
        allocated.install()  # the tensors' own peak beside the RSS (collect/allocated.py)
    import deepspeed

    from .spec import TrialSpec
    from .trial import NAN_ENV, SLOWDOWN_ENV, bare_loop, injected_nan, injected_slowdown, run_trial

    deepspeed.init_distributed(dist_backend=args.backend)
    world = torch.distributed.get_world_size()
    from .env import cpu_model_name

    if args.threads == 0:  # several nodes may share one physical host: divide its cores, never oversubscribe
        torch.set_num_threads(_threads_on_host(_ranks_on_this_host(host, world)))
        os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    placement["threads"] = torch.get_num_threads()
    on_host = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 0) or \
        (_ranks_on_this_host(host, world) if args.threads == 0 else world)
    memory_limit = limit_memory(args.memory_limit, on_host) if args.accelerator == "cpu" else None
    device = torch.cuda.get_device_name(local_rank) if args.accelerator == "cuda" else f"cpu ({cpu_model_name()})"
    ctl.send({"type": "ready", "rank": rank, "world_size": world, "device": device,
              "startup_s": time.time() - t_start, "threads": torch.get_num_threads(), "memory_limit": memory_limit})
    while True:
        msg = ctl.inbox.get()
        if msg["type"] == "stop":
            break
        if msg["type"] == "trial":
            spec = TrialSpec.model_validate(msg["spec"])
            ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
            from .safetext import file_part

            trace = f"{msg['trace_dir']}/{file_part(msg['trial_id'])}-rank{rank}.json" if msg.get("trace_dir") else None
            def beat(step: int, watch: bool, trial_id=msg["trial_id"]) -> None:  # the driver's watchdog
                ctl.send({"type": "beat", "trial_id": trial_id, "step": step, "watch": watch})

            res = run_trial(spec, rank, world, args.accelerator, host, device, msg.get("base_config"), ranks_per_node,
                            trace, injected_slowdown(msg["trial_id"], os.environ.get(SLOWDOWN_ENV)), placement,
                            beat, injected_nan(msg["trial_id"], os.environ.get(NAN_ENV)))
            if res.status == "oom" and memory_limit:
                res.error = (f"{res.error}\n(this rank's memory limit: RLIMIT_DATA {memory_limit / 2**30:.2f} GiB, "
                             f"--rank-memory; an allocation past it fails here instead of the host running out)")
            ctl.send({"type": "result", "trial_id": msg["trial_id"], **res.message()})
        if msg["type"] == "inference":  # single-process inference scenario (world size 1)
            from .inference import run_inference

            spec = TrialSpec.model_validate(msg["spec"])
            res = run_inference(spec, args.accelerator, host, device)
            res.fill(placement)
            ctl.send({"type": "result", "trial_id": msg["trial_id"], **res.message()})
        if msg["type"] == "bare":  # the reference loop for the collector-overhead benchmark
            spec = TrialSpec.model_validate(msg["spec"])
            out = bare_loop(spec, rank, args.accelerator, msg.get("base_config"))
            ctl.send({"type": "result", "trial_id": msg["trial_id"], **out})
        if msg["type"] == "kernels":  # `llmbench kernels`: micro-benchmarks on every rank
            from .kernels.plan import KernelPlan
            from .kernels.run import run_kernels

            def emit(row: dict, trial_id=msg["trial_id"]) -> None:  # each case as it finishes
                ctl.send({"type": "row", "trial_id": trial_id, "rank": rank, "row": row})

            try:
                rows = run_kernels(KernelPlan.model_validate(msg["spec"]), rank, args.accelerator, device_name=device,
                                   emit=emit)
                ctl.send({"type": "result", "trial_id": msg["trial_id"], "rank": rank, "status": "ok", "n_rows": len(rows)})
            except Exception as e:  # a bug or a broken device: reported, the driver records it
                ctl.send({"type": "result", "trial_id": msg["trial_id"], "rank": rank, "status": "failed",
                          "error": f"{type(e).__name__}: {e}"})
    torch.distributed.destroy_process_group()
    release_own_shm()
    ctl.send({"type": "bye", "rank": rank})


if __name__ == "__main__":
    main()
