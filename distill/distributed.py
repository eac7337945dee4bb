"""Small pieces every rank agrees on: who am I (rank/world from the launcher's environment), which
device is mine, which samples and which crops are mine.

The rule that makes a multi-process run equal a one-process run of the same recipe: the *global*
batch (trainer.batch_size images per optimiser step) is drawn exactly as one process would draw it
— one permutation and one set of crops from the epoch's generator, identical on every rank — and
each rank then keeps its share, interleaved (global position p goes to rank p mod world), as
`torch.utils.data.DistributedSampler` does. How the global batch is split over ranks and
gradient-accumulation micro-steps changes float summation order, never which images or crops.

No import of torch.distributed or deepspeed here: the launcher's environment is read directly.
"""
from __future__ import annotations

import os
import socket
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import Sampler

from distill.augment import RandomCrops, apply_crops, sample_crops
from distill.errors import ConfigError


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_world(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """This process's share of sharded work (label stores, synthesis chunks): the given `--rank`/
    `--world`, else the launcher's RANK/WORLD_SIZE, else 0 of 1."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"--rank {rank} --world {world}: need world >= 1 and 0 <= rank < world")
    return rank, world


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched() -> bool:
    """True under torchrun / the deepspeed launcher (they export RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """Without a launcher, a one-rank process group still needs RANK/WORLD_SIZE/MASTER_*; else
    `deepspeed.initialize` goes looking for MPI. Only unset variables are filled."""
    if launched():
        return
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(free_port())}
    for k, v in defaults.items():
        os.environ.setdefault(k, v)


def resolve_device(name: str) -> torch.device:
    """A recipe's `device` here: `auto` is the GPU when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for but no CUDA device is visible; allowed here: cpu, auto")
    return dev


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision: fp16 needs a CUDA device (device is {device}); use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision: bf16 is not supported by this GPU; use fp16 or fp32")


def rank_device(device: torch.device, backend: str) -> torch.device:
    """This rank's device. Under a launcher every rank gets `cuda:LOCAL_RANK` (a recipe's bare
    `cuda`/`auto`); a pinned `cuda:N` or a one-process backend there is a recipe error."""
    if not launched() or world_size() == 1:
        return device
    if backend == "plain":
        raise ConfigError(f"trainer.backend: 'plain' trains in one process, but this was launched with "
                          f"{world_size()} processes; set trainer.backend: deepspeed (and trainer.deepspeed)")
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"device: {device} pins every rank to one GPU under a {world_size()}-process "
                              f"launch; use device: auto or cuda (each rank takes cuda:LOCAL_RANK)")
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    return device


def micro_batch(batch_size: int, world: int, grad_accum: int) -> int:
    """Images per rank per micro-step; the recipe's batch_size is the global batch."""
    if batch_size % (world * grad_accum):
        raise ConfigError(f"trainer.batch_size {batch_size} does not divide over {world} rank(s) × "
                          f"trainer.grad_accum {grad_accum}; use a multiple of {world * grad_accum}")
    return batch_size // (world * grad_accum)


class ShardedSampler(Sampler[int]):
    """One permutation of the data per epoch, drawn from the epoch's generator (the same draws on
    every rank, and the same as `RandomSampler(generator=...)` in one process), padded by wrapping
    to a multiple of `world` and dealt out interleaved: rank r gets positions r, r+world, ...
    Per-epoch seeding is the generator's (a fresh one each epoch plays `set_epoch`)."""

    def __init__(self, n: int, rank: int, world: int, generator: torch.Generator):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.n, self.rank, self.world, self.generator = n, rank, world, generator

    def __len__(self) -> int:
        return -(-self.n // self.world)

    def __iter__(self) -> Iterator[int]:
        perm = torch.randperm(self.n, generator=self.generator)
        pad = len(self) * self.world - self.n
        if pad:
            perm = torch.cat([perm, perm[:pad]])
        yield from perm[self.rank::self.world].tolist()


class GlobalBatchCrops:
    """`RandomCrops` drawn for the whole global batch, cut for this rank's images.

    Each optimiser step draws crops for `len(images) × world × grad_accum` positions at its first
    micro-step (what one process with the whole batch draws); micro-step j on rank r keeps global
    positions `world·(j·micro + t) + r`, the images `ShardedSampler` gave it. The epoch loop runs
    whole accumulation windows, so the micro-step counter restarts cleanly each epoch."""

    def __init__(self, crops: RandomCrops, rank: int, world: int, grad_accum: int):
        self.crops, self.rank, self.world, self.accum = crops, rank, world, grad_accum
        self._calls, self._micro = 0, 0
        self._boxes: Tensor | None = None
        self._flips: Tensor | None = None

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        j = self._calls % self.accum
        self._calls += 1
        if j == 0:  # the window's first micro-batch is full-sized (only an epoch's last may be short)
            c, self._micro = self.crops, len(images)
            boxes, flips = sample_crops(self._micro * self.world * self.accum, 1, tuple(images.shape[-2:]), c.scale,
                                        c.ratio, 0.5 if c.flip else 0.0, generator)
            self._boxes, self._flips = boxes[:, 0], flips[:, 0]
        rows = self.world * (j * self._micro + torch.arange(len(images))) + self.rank
        return apply_crops(images, self._boxes[rows], self._flips[rows], images.shape[-1])
