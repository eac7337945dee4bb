"""`distill launch --nproc N RECIPE [overrides]`: the recipe's `distill train` on N processes.

It checks the recipe for the world it is about to start (backend, batch split), builds the
command line of `torchrun` (default) or DeepSpeed's launcher around `python -m distill.cli train`,
and replaces itself with it, so a scheduler's signals reach the launcher directly. With no GPU it
sets `DS_ACCELERATOR=cpu` (DeepSpeed's CPU accelerator, gloo) and splits the CPU threads between
the ranks. docs/deepspeed.md shows the same launch written out for a cluster.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field

import torch

from distill.config import RunConfig
from distill.deepspeed_config import engine_config
from distill.distributed import free_port, micro_batch
from distill.errors import ConfigError
from distill.recipe import load_config

LAUNCHERS = ("torchrun", "deepspeed")


@dataclass
class LaunchPlan:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # variables set on top of the current environment

    def shell(self) -> str:
        return " ".join([f"{k}={shlex.quote(v)}" for k, v in self.env.items()] + [shlex.quote(a) for a in self.argv])


def check_recipe(cfg: RunConfig, world: int) -> None:
    """What only the number of processes decides, refused before anything starts."""
    if world > 1 and cfg.trainer.backend != "deepspeed":
        raise ConfigError(f"trainer.backend: {cfg.trainer.backend!r} trains in one process; a {world}-process launch "
                          f"needs trainer.backend=deepspeed (and trainer.deepspeed=configs/deepspeed/zero2.json, say)")
    micro_batch(cfg.trainer.batch_size, world, cfg.trainer.grad_accum)
    if cfg.trainer.backend == "deepspeed":
        engine_config(cfg.trainer.deepspeed or {}, batch_size=cfg.trainer.batch_size, grad_accum=cfg.trainer.grad_accum,
                      world=world, precision=cfg.precision, grad_clip=cfg.trainer.grad_clip)


def plan_launch(recipe: str, overrides: list[str], nproc: int, launcher: str = "torchrun", nnodes: int = 1,
                node_rank: int = 0, master_addr: str | None = None, master_port: int | None = None,
                gpu: bool | None = None) -> LaunchPlan:
    if nproc < 1 or nnodes < 1:
        raise ConfigError(f"--nproc {nproc} / --nnodes {nnodes}: both must be >= 1")
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher!r}; allowed: {', '.join(LAUNCHERS)}")
    if nnodes > 1 and not master_addr:
        raise ConfigError(f"--nnodes {nnodes} needs --master-addr (the address of node 0, reachable from every node)")
    if nnodes > 1 and launcher == "deepspeed":
        raise ConfigError("--launcher deepspeed starts one node here; for several nodes use its hostfile "
                          "(docs/deepspeed.md) or --launcher torchrun on every node")
    check_recipe(load_config(recipe, overrides), nproc * nnodes)
    gpu = torch.cuda.is_available() if gpu is None else gpu
    env: dict[str, str] = {}
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"
        if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1; share the cores instead
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    train = ["train", recipe, *overrides]
    if launcher == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        if nnodes == 1 and master_port is None:
            argv.append("--standalone")  # rendezvous on localhost, a free port picked for us
        else:
            argv += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr or '127.0.0.1'}",
                     f"--master_port={master_port or 29500}"]
        argv += ["-m", "distill.cli", *train]
    else:
        argv = [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}",
                f"--master_port={master_port or free_port()}", "--module", "distill.cli", *train]
    return LaunchPlan(argv, env)


def run_launch(plan: LaunchPlan, dry_run: bool = False) -> int:
    print(plan.shell(), file=sys.stderr, flush=True)
    if dry_run:
        return 0
    os.execvpe(plan.argv[0], plan.argv, {**os.environ, **plan.env})
    return 1  # not reached
