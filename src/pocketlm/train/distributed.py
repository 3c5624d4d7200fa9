"""torch.distributed for training: process-group setup from the torchrun environment, and `parallelize`, which
applies activation checkpointing, torch.compile and FSDP2 `fully_shard` in torchtitan's order (AC -> compile ->
FSDP), each decoder layer its own FSDP unit and the root (embeddings, final norm, head) last.

Launch: `torchrun --nproc-per-node N -m pocketlm.cli train pretrain ...` (several nodes: torchrun's
`--nnodes/--rdzv-endpoint`). Backend: NCCL on CUDA, gloo on CPU (tests run world size 2 on gloo).
Deviation: FSDP2 keeps fp32 master parameters; on CUDA with mixed_precision="bfloat16" it gathers bf16
parameters and reduces gradients in fp32 (MixedPrecisionPolicy) instead of using autocast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup() -> DistEnv:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    device = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    if world > 1:
        return DistEnv(dist.get_rank(), dist.get_world_size(), local, device)
    return DistEnv(device=device)


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_sum(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Sum a (float64) tensor over ranks, in place on a copy; identity on one process."""
    values = values.detach().to(env.device, torch.float64).clone()
    if env.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def parallelize(model: nn.Module, env: DistEnv, *, compile: bool = False, activation_checkpointing: bool = False,
                fsdp: bool = True, bf16_params: bool = False) -> nn.Module:
    """Wrap `model` in place (parameter names are unchanged) and return it."""
    layers = model.model.layers
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint  # hooks, not a wrapper module: names stay
        for layer in layers:
            checkpoint(layer)
    if compile:
        for layer in layers:
            layer.compile()
    if env.distributed and fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16_params else \
            MixedPrecisionPolicy()
        for i, layer in enumerate(layers):
            # the last layer's parameters are needed right after forward for backward: keep them gathered
            fully_shard(layer, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
        fully_shard(model, mp_policy=mp)
        from torch.distributed.fsdp import register_fsdp_forward_method
        register_fsdp_forward_method(model, "forward_batched")  # packed SFT rows enter through this method
    elif env.distributed:
        raise NotImplementedError("fsdp=False with several processes (DDP) is not implemented; use fsdp=True")
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro-batch of a step (FSDP2 only; no-op otherwise)."""
    fn = getattr(model, "set_requires_gradient_sync", None)
    if fn is not None:
        fn(enabled)
