"""torchrun process groups, DDP / FSDP2 wrapping, and checkpoint state that loads at any world size."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ajepa.config import Config, to_dict
from ajepa.device import resolve_device
from ajepa.model import AJEPA


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # this module created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: Config) -> tuple[DistInfo, torch.device]:
    """Join torchrun's process group (WORLD_SIZE > 1): NCCL for CUDA tensors, gloo for CPU ones.

    An already initialized group is used as it is; without torchrun this is one process.
    """
    device = resolve_device(cfg.train.device)
    if dist.is_available() and dist.is_initialized():
        info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
        info = DistInfo(dist.get_rank(), dist.get_world_size(), local, owned=True)
    else:
        return DistInfo(), device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return info, device


def wrap_model(model: AJEPA, cfg: Config, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP2 with online and target encoders sharded alike, so the EMA runs on local shards.

    Encoders run through forward_packed / forward_dense rather than __call__, so each of their
    submodules that holds parameters gets its own fully_shard unit (FSDP2 hooks fire on __call__).
    """
    if info.world == 1:
        return model
    if cfg.train.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (info.world,))
        for enc in (model.encoder, model.target_encoder):
            for blk in enc.blocks:
                fully_shard(blk, mesh=mesh)
            fully_shard(enc.patch_embed, mesh=mesh)
            fully_shard(enc.norm, mesh=mesh)
        for blk in model.predictor.blocks:
            fully_shard(blk, mesh=mesh)
        fully_shard(model.predictor, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # No buffer sync per forward: the only buffers are fixed sin-cos tables, equal on every rank.
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **{no_sync: False})


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _state_options(info: DistInfo):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=info.world > 1)


def checkpoint_state(model: AJEPA, opt, step: int, cfg: Config, info: DistInfo, counters: dict) -> dict:
    """Full (unsharded) weights and optimizer state keyed by parameter name, so a checkpoint loads
    at any world size, with or without FSDP. A collective under FSDP: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _state_options(info)
    return {
        "step": step,
        "config": to_dict(cfg),
        "model": get_model_state_dict(model, options=options),
        "optimizer": get_optimizer_state_dict(model, opt, options=options),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "counters": dict(counters),
        "world_size": info.world,
    }


def load_optimizer_state(model: AJEPA, opt, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if all(isinstance(k, int) for k in state["state"]):  # an older checkpoint: torch's own layout
        opt.load_state_dict(state)
        return
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def allreduce(values: list[float], device: torch.device, op) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()
