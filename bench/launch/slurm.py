"""Ranks started by SLURM's `srun` inside an allocation (`salloc`, `sbatch`).

DeepSpeed's own `--launcher slurm` still wants a hostfile and does not map SLURM's
variables, so inside an allocation the pool runs `srun` itself: one task per rank (per GPU),
`--overlap` when the driver already runs inside a job step (whose CPUs it would otherwise
wait for), `--kill-on-bad-exit` so one rank's death ends the step. The rendezvous address is
the allocation's first node (`scontrol show hostnames $SLURM_JOB_NODELIST`); each rank maps
SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS to RANK / LOCAL_RANK / WORLD_SIZE
(`torch_env_from_slurm`) before joining the process group.
"""

from __future__ import annotations

import os
import subprocess


def in_allocation() -> bool:
    """Whether this process runs inside a SLURM allocation (a job id is set)."""
    return bool(os.environ.get("SLURM_JOB_ID"))


def allocation_ranks() -> int | None:
    """The tasks the allocation was made for (SLURM_NTASKS, or nodes × GPUs per node)."""
    if os.environ.get("SLURM_NTASKS"):
        return int(os.environ["SLURM_NTASKS"])
    nodes, gpus = os.environ.get("SLURM_JOB_NUM_NODES"), os.environ.get("SLURM_GPUS_ON_NODE")
    if nodes and gpus:
        return int(nodes) * int(gpus)
    return None


def first_node() -> str:
    """The allocation's first host, where rank 0 runs and the rendezvous listens."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    names = out.stdout.split()
    if out.returncode != 0 or not names:
        raise RuntimeError(f"scontrol show hostnames {nodelist} failed: {out.stderr.strip()}")
    return names[0]


def srun_command(world_size: int, master_port: int) -> list[str]:
    """`srun` for `world_size` ranks of the worker (the caller appends the command); the
    rendezvous goes through `--export`, so it reaches every node whatever its shell sets."""
    master = first_node()
    cmd = ["srun", f"--ntasks={world_size}", "--kill-on-bad-exit=1", "--wait=30",
           f"--export=ALL,MASTER_ADDR={master},MASTER_PORT={master_port}"]
    if os.environ.get("SLURM_STEP_ID") is not None:
        cmd.append("--overlap")
    if os.environ.get("SLURM_GPUS_ON_NODE"):
        cmd.append("--gpus-per-task=1")
    return cmd


def torch_env_from_slurm(environ: dict | None = None) -> dict:
    """RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and the node's name and rank for a task
    srun started (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_NODEID, SLURMD_NODENAME;
    ranks per node from SLURM_TASKS_PER_NODE, e.g. `2(x3),1`); {} outside srun or where the
    torch variables are set already."""
    e = os.environ if environ is None else environ
    if "SLURM_PROCID" not in e or "RANK" in e:
        return {}
    node_id = int(e.get("SLURM_NODEID", "0"))
    per_node = []
    for part in (e.get("SLURM_TASKS_PER_NODE") or e.get("SLURM_NTASKS", "1")).split(","):
        n, _, times = part.partition("(x")
        per_node += [int(n)] * (int(times.rstrip(")")) if times else 1)
    return {"RANK": e["SLURM_PROCID"], "LOCAL_RANK": e.get("SLURM_LOCALID", "0"), "WORLD_SIZE": e["SLURM_NTASKS"],
            "LOCAL_WORLD_SIZE": str(per_node[node_id] if node_id < len(per_node) else 1),
            "LLMBENCH_NODE": e.get("SLURMD_NODENAME", ""), "LLMBENCH_NODE_RANK": str(node_id)}
