"""torch.distributed on the CPU (gloo, 2 processes): DDP and FSDP2 against one process, and a
checkpoint written at world size 2 resumed at world size 1.

Every launch has a hard timeout, so a hung collective fails the test instead of the CI job.
"""

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import micro_config

from ajepa.config import ConfigError, load_config
from ajepa.train import train

STEPS = 4
# SIGReg is a statistic of each rank's own tokens, not a token mean, so a 2-rank run with it is not
# the one-process run; these tests check the distributed machinery on the token-mean JEPA loss.
OVERRIDES = {"train.steps": STEPS, "train.ckpt_every": 2, "optim.lr": 2e-3, "model.sigreg_weight": 0}
# One process and two ranks see the same samples and masks; only the order of float sums differs
# (the gradient all-reduce, the per-rank loss weighting). Over 4 AdamW steps at lr 2e-3 that moves
# losses by ~1e-7 relative and weights by ~1e-6.
LOSS_RTOL, PARAM_ATOL = 1e-5, 2e-5
LAUNCH_TIMEOUT = 120


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _local(params) -> list[torch.Tensor]:
    """This rank's piece of each parameter: all of it under DDP, its dim-0 shard under FSDP2."""
    return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in params]


def _worker(rank: int, world: int, port: int, port2: int, out: str, parallel: str,
            nan_at: tuple[int, int] | None) -> None:
    # The environment torchrun sets: train() joins the group itself (gloo on the CPU) and leaves it.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if nan_at is not None and nan_at[0] == rank:  # this rank alone gets a NaN loss at step index nan_at[1]
        from ajepa.model import AJEPA

        forward, calls = AJEPA.forward, [0]

        def poisoned(self, spec, masks):
            calls[0] += 1
            return forward(self, spec, masks) * (float("nan") if calls[0] - 1 == nan_at[1] else 1.0)

        AJEPA.forward = poisoned
    cfg = micro_config(**OVERRIDES, **{"train.parallel": parallel})
    if parallel == "fsdp":  # stop after step 2 and resume: the sharded model and optimizer load a full checkpoint
        first = train(cfg, out, progress=False, max_steps=2)
        os.environ["MASTER_PORT"] = str(port2)  # a fresh rendezvous, as a new torchrun job would have
        result = train(cfg, out, resume=True, progress=False)
        result.losses = first.losses + result.losses
    else:
        result = train(cfg, out, progress=False)
    assert not dist.is_initialized(), "train() should close the process group it opened"
    m = result.model
    torch.save({"online": _local(list(m.encoder.parameters()) + list(m.predictor.parameters())),
                "target": _local(m.target_encoder.parameters()), "losses": result.losses,
                "counters": result.counters},
               Path(out) / f"rank{rank}.pt")


def _spawn(parallel: str, out: Path, world: int = 2, nan_at: tuple[int, int] | None = None) -> None:
    ports = _free_ports(2)
    ctx = mp.start_processes(_worker, args=(world, *ports, str(out), parallel, nan_at), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world}-process {parallel} run did not finish in {LAUNCH_TIMEOUT}s")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, global batch 4: the run every distributed one must reproduce."""
    out = tmp_path_factory.mktemp("single") / "run"
    result = train(micro_config(**OVERRIDES), out, progress=False)
    m = result.model
    return {"losses": result.losses,
            "online": _local(list(m.encoder.parameters()) + list(m.predictor.parameters())),
            "target": _local(m.target_encoder.parameters())}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    _spawn("ddp", out)
    return out


def _check_against_single(out: Path, single: dict, sharded: bool) -> None:
    r0, r1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert r0["losses"] == r1["losses"]  # logged losses are reduced across ranks
    assert [s for s, _ in r0["losses"]] == [s for s, _ in single["losses"]]
    torch.testing.assert_close([v for _, v in r0["losses"]], [v for _, v in single["losses"]], rtol=LOSS_RTOL, atol=0)
    for which in ("online", "target"):
        if sharded:  # each rank holds its dim-0 shard of every tensor, together the whole
            assert any(a.shape != b.shape for a, b in zip(r0[which], single[which])), "expected sharded tensors"
            full = [torch.cat([a, b]) for a, b in zip(r0[which], r1[which])]
        else:  # every rank holds identical copies
            assert all(torch.equal(a, b) for a, b in zip(r0[which], r1[which])), f"{which} differs between ranks"
            full = r0[which]
        torch.testing.assert_close(_flat(full), _flat(single[which]), rtol=0, atol=PARAM_ATOL)
    assert not torch.equal(_flat(single["target"]), _flat(single["online"][: len(single["target"])]))
    # only rank 0 wrote checkpoints, with full (unsharded) tensors
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["world_size"] == 2 and state["step"] == STEPS
    target = [v for k, v in state["model"].items() if k.startswith("target_encoder.")]
    assert all(type(v) is torch.Tensor for v in target)
    torch.testing.assert_close(_flat(target), _flat(single["target"]), rtol=0, atol=PARAM_ATOL)


def test_ddp_ranks_agree_and_match_one_process(ddp_run, single):
    _check_against_single(ddp_run, single, sharded=False)


def test_fsdp2_ema_on_shards_and_resume_match_one_process(tmp_path, single):
    _spawn("fsdp", tmp_path / "run")
    _check_against_single(tmp_path / "run", single, sharded=True)


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    _spawn("ddp", tmp_path / "run", nan_at=(1, 2))  # rank 1's loss at step 3 is NaN
    r0, r1 = (torch.load(tmp_path / "run" / f"rank{r}.pt") for r in (0, 1))
    assert r0["counters"]["skipped_steps"] == r1["counters"]["skipped_steps"] == 1
    assert all(torch.equal(a, b) for w in ("online", "target") for a, b in zip(r0[w], r1[w]))
    losses = [v for _, v in r0["losses"]]
    assert np.isnan(losses[2]) and np.isfinite(losses[:2] + losses[3:]).all()


def test_checkpoint_from_two_ranks_resumes_in_one_process(ddp_run, single, tmp_path):
    resumed = tmp_path / "resumed"  # only the world-size-2 checkpoint of step 2 and the config
    resumed.mkdir()
    shutil.copy(ddp_run / "config.yaml", resumed / "config.yaml")
    shutil.copy(ddp_run / "checkpoint-00000002.pt", resumed / "checkpoint-00000002.pt")
    assert torch.load(resumed / "checkpoint-00000002.pt", weights_only=False)["world_size"] == 2
    rest = train(load_config(resumed / "config.yaml"), resumed, resume=True, progress=False)
    assert [s for s, _ in rest.losses] == [3, 4]
    torch.testing.assert_close([v for _, v in rest.losses], [v for _, v in single["losses"][2:]],
                               rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(_flat(rest.model.target_encoder.parameters()), _flat(single["target"]),
                               rtol=0, atol=PARAM_ATOL)


def test_global_batch_must_split_over_ranks(tmp_path, monkeypatch):
    import ajepa.trainer as trainer_mod
    from ajepa.distributed import DistInfo

    monkeypatch.setattr(trainer_mod, "init_distributed", lambda cfg: (DistInfo(0, 3), torch.device("cpu")))
    with pytest.raises(ConfigError, match="divisible by the world size 3"):
        train(micro_config(**{"model.sigreg_weight": 0}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_ranks_draw_the_samples_and_masks_of_one_process():
    from ajepa.data import StepBatchSampler
    from ajepa.masks import MaskSampler

    cfg = micro_config(**{"model.sigreg_weight": 0})
    one = MaskSampler(cfg.masks, cfg.grid, 100, seed=3)
    ranks = [MaskSampler(cfg.masks, cfg.grid, 100, seed=3, rank=r) for r in (0, 1)]
    for step in (0, 7, 60):
        whole, parts = one(step, 4), [r(step, 2) for r in ranks]
        assert whole.use_tf == parts[0].use_tf == parts[1].use_tf
        n = cfg.num_patches
        joined = torch.cat([parts[0].ctx_index, parts[1].ctx_index + 2 * n])
        assert torch.equal(joined, whole.ctx_index)
        assert torch.equal(torch.cat([parts[0].tgt_index, parts[1].tgt_index + 2 * n]), whole.tgt_index)
        samples = [StepBatchSampler(16, 2, 100, seed=3, rank=r, world=2).indices(step) for r in (0, 1)]
        assert samples[0] + samples[1] == StepBatchSampler(16, 4, 100, seed=3).indices(step)
