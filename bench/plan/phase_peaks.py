"""The allocator's peak phase by phase, for checking the memory model's phases (docs/plan.md).

A trial records one peak for its whole window; the model predicts one per phase. This runs the
same engine on 2 gloo CPU ranks with llmbench's counting allocator (collect/allocated.py) and
prints, per rank and step, the bytes above the step's start at the forward's peak, after the
forward, at the backward's peak and at the step's peak (MiB):

    python -m llmbench.plan.phase_peaks DS_CONFIG.json --model tiny --seq-len 32 --micro-batch 2

DS_CONFIG.json is a record's `ds_config` (`llmbench results --format json`). Nothing is stored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

MiB = 2**20


def _rank(rank: int, args: argparse.Namespace, port: int, lines) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import deepspeed
    import torch

    from ..collect import allocated
    from ..models import build_config, build_model, initialize_weights, model_class

    if not allocated.install():
        raise SystemExit(allocated.error)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = json.loads(open(args.ds_config).read())
    config = build_config(args.model, args.family, args.seq_len, args.attn)
    cls = model_class(config)  # imported outside zero.Init, as trial.build_trial_model does
    if cfg.get("zero_optimization", {}).get("stage") == 3:
        with deepspeed.zero.Init(config_dict_or_path=cfg):
            model = build_model(config, cls)
    else:
        model = build_model(config, cls)
    initialize_weights(model, 0)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    ids = torch.randint(0, config.vocab_size, (args.micro_batch, args.seq_len), generator=torch.Generator().manual_seed(rank))
    for step in range(args.steps):
        start = allocated.current()
        allocated.reset_peak()
        loss = engine(input_ids=ids, labels=ids).loss
        fwd, held = allocated.peak(), allocated.current()
        allocated.reset_peak()
        engine.backward(loss)
        bwd = allocated.peak()
        allocated.reset_peak()
        engine.step()
        opt = allocated.peak()
        lines.put((step, rank, f"rank {rank} step {step}: start {start / MiB:.2f}  forward +{(fwd - start) / MiB:.2f}  "
                   f"held after forward +{(held - start) / MiB:.2f}  backward +{(bwd - start) / MiB:.2f}  "
                   f"step +{(opt - start) / MiB:.2f}"))
    # the lines are sent; leave without the interpreter's teardown, where gloo's threads
    # sometimes ended the process with "terminate called without an active exception" (SIGABRT)
    torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    import torch.multiprocessing as mp

    from ..launch import free_port

    ap = argparse.ArgumentParser(prog="python -m llmbench.plan.phase_peaks", description=__doc__.splitlines()[0])
    ap.add_argument("ds_config")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--family", default="llama")
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"), help="attention implementation")
    args = ap.parse_args(argv)
    # the ranks hand their lines back and this process prints them, whole and in order (two
    # ranks printing at once can join their lines)
    lines = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(args, free_port(), lines), nprocs=2)
    got = []
    while not lines.empty():
        got.append(lines.get())
    for _, _, line in sorted(got):
        print(line)


if __name__ == "__main__":
    main()
