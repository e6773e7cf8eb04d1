"""The processes of a run: torchrun starts them, torch.distributed connects them (the World and its
collectives); what a multi-process run needs from the recipe. Outside torchrun a world of one, where
every collective is a no-op."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from grpo_cli.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def device(self, choice: str) -> torch.device | None:
        """The device this rank uses, or None to let the recipe decide (single process)."""
        if not self.active:
            return None
        if torch.cuda.is_available() and choice != "cpu":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    # Collectives. With one process each returns its input.

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-shaped tensors from every rank along dim 0, in rank order."""
        if not self.active:
            return tensor
        moved = tensor.to(self._collective_device()).contiguous()
        parts = [torch.empty_like(moved) for _ in range(self.size)]
        torch.distributed.all_gather(parts, moved)
        return torch.cat(parts).to(tensor.device)

    def all_gather_objects(self, items: list) -> list:
        if not self.active:
            return items
        parts = [None] * self.size
        torch.distributed.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def reduce(self, value: float, op: str = "sum") -> float:
        if not self.active:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self._collective_device())
        ops = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX,
               "min": torch.distributed.ReduceOp.MIN}
        torch.distributed.all_reduce(tensor, op=ops[op])
        return tensor.item()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.distributed.get_backend() == "nccl" \
            else torch.device("cpu")


def connect(timeout_minutes: int = 30) -> World:
    """Join the process group torchrun set up (WORLD_SIZE > 1), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not torch.distributed.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run a single process.")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # before the first collective: NCCL binds to the current device
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank)


def disconnect(world: World) -> None:
    if world.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_recipe(recipe, world: World) -> None:
    """What a multi-process run needs from the recipe, refused before anything loads."""
    if not world.active:
        return
    grpo = recipe.grpo
    if grpo.prompts_per_step % world.size:
        raise UserError(f"grpo.prompts_per_step ({grpo.prompts_per_step}) must divide evenly over the "
                        f"{world.size} processes: each takes whole groups. Use a multiple of {world.size}.")
    if grpo.dynamic_sampling:
        raise UserError("grpo.dynamic_sampling is not supported with several processes yet; run one process "
                        "or set grpo.dynamic_sampling: false.")
    if grpo.engine != "fast":
        raise UserError("several processes need grpo.engine: fast (its sampling keeps the ranks in lockstep).")
    if recipe.distributed.strategy == "fsdp" and recipe.model.load_in_4bit:
        raise UserError("distributed.strategy: fsdp does not shard 4-bit (bitsandbytes) weights; use strategy: ddp "
                        "with load_in_4bit, or fsdp with 16-bit weights.")
