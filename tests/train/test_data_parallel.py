"""Data-parallel training (snce_fast.distributed + DDP in snce_fast.train.step): two gloo ranks hold
identical parameters, equal to one process on the concatenated batches; an end-to-end run shards
the prompts and checkpoints every rank's stream."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from helpers_train import make_prompts, new_sae, small_cfg, synthetic, tiny_bert, write_vocab
from snce_fast import distributed
from snce_fast.train import SAETrainer, latest_checkpoint, train_sae


def test_helpers_are_no_ops_in_one_process():
    t = torch.ones(3)
    assert distributed.rank_and_world() == (0, 1) and not distributed.is_distributed()
    assert distributed.all_reduce(t) is t and distributed.broadcast(t) is t and torch.equal(t, torch.ones(3))
    distributed.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        # (a) step-level: each rank takes half of every global batch
        x = synthetic(64 * 12, seed=1)
        cfg = small_cfg(dead_tokens=128)
        tr = SAETrainer(new_sae(32, cfg), cfg)
        assert isinstance(tr._objective, DistributedDataParallel)
        with torch.no_grad():
            tr.sae.b_dec.copy_(x.mean(0))
        for i in range(12):
            xb = x[i * 64 : (i + 1) * 64]
            tr.step(xb[rank * 32 : (rank + 1) * 32])
        # (b) end to end through the encoder, prompts sharded by rank
        enc, tok = tiny_bert(Path(out))
        sae, rep = train_sae(enc, tok, make_prompts(160), n_latents=64, k=4, batch_size=32, shuffle_buffer=64,
                             lr=3e-3, warmup_steps=3, epochs=1, progress=False, return_report=True,
                             checkpoint_dir=str(Path(out) / "ck"), checkpoint_every=5)
        torch.save({"step": {k: v.detach() for k, v in tr.sae.state_dict().items()},
                    "e2e": {k: v.detach() for k, v in sae.state_dict().items()},
                    "fvu0": rep.history[0]["fvu"], "fvu1": rep.fvu, "steps": rep.steps,
                    "world_size": rep.world_size},
                   Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_gloo_ranks(tmp_path):
    import torch.multiprocessing as mp

    write_vocab(tmp_path)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    # single process on the concatenated batches
    x = synthetic(64 * 12, seed=1)
    cfg = small_cfg(dead_tokens=128)
    tr = SAETrainer(new_sae(32, cfg), cfg)
    assert not isinstance(tr._objective, DistributedDataParallel)
    with torch.no_grad():
        tr.sae.b_dec.copy_(x.mean(0))
    for i in range(12):
        tr.step(x[i * 64 : (i + 1) * 64])
    for name, p in tr.sae.state_dict().items():
        assert torch.equal(r0["step"][name], r1["step"][name]), name
        assert torch.allclose(r0["step"][name], p, atol=2e-5, rtol=1e-4), name
    for name in r0["e2e"]:
        assert torch.equal(r0["e2e"][name], r1["e2e"][name]), name
    assert r0["steps"] == r1["steps"] > 3 and r0["fvu1"] < r0["fvu0"] and r0["world_size"] == 2
    ck = latest_checkpoint(tmp_path / "ck")
    assert {p.name for p in ck.iterdir()} >= {"sae", "trainer.pt", "data_rank0.pt", "data_rank1.pt"}
