"""Data parallelism: `torchrun --nproc-per-node N -m lincompile heal ...` runs N ranks of the same heal.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them healing runs as one
process. Backend: nccl when the device is CUDA, gloo on CPU. Every rank builds the same model and reads the
same data (the sample order needs no communication); DistributedDataParallel averages the gradients of
the trainable parameters; rank 0 alone writes checkpoints, metrics and outputs, and the others wait at
barriers so that nobody reads a half-written file.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a float over ranks (for logging: gradients are averaged by DDP itself)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def gather_rng(self) -> dict[str, torch.Tensor]:
        """Every rank's CPU RNG state (dropout masks differ per rank), gathered on all ranks."""
        mine = torch.get_rng_state()
        if not self.active:
            return {"0": mine}
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine.to(self._comm_device))
        return {str(r): p.cpu() for r, p in enumerate(parts)}

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.local_rank] if self.device.startswith("cuda") else None
        # Frozen base weights are identical on every rank (same files): no buffer broadcast per step.
        return DDP(module, device_ids=ids, broadcast_buffers=False)

    def no_sync(self, model, skip: bool):
        """Accumulate gradients locally on all but the last micro-batch of a step."""
        return model.no_sync() if self.active and skip else nullcontext()

    @property
    def _comm_device(self) -> str:
        return self.device if self.device.startswith("cuda") else "cpu"


def init(device: str = "cpu") -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(device=device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank=rank, world=world, local_rank=local, device=device)


def shutdown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
