"""scan: exact counts on real corpora, crash + resume == uninterrupted, 2-rank gloo == 1 process."""
from __future__ import annotations

import csv
import importlib
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import snce_fast
from snce_fast.ops import histogram as H
from snce_fast.ops import reference
from snce_fast.hooks.activations import eos_id, hook_activations
from snce_fast.hooks.batching import BUCKET_WINDOW, TOKEN_BUDGET, bucketed
from snce_fast.workflow.corpus import read_prompts
from snce_fast.testing import bert_model, clip_text_model, random_sae, write_bert_tokenizer, write_clip_tokenizer

scan_mod = importlib.import_module("snce_fast.workflow.scan")  # the module (snce_fast.scan is the function)
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "prompts"
needs_data = pytest.mark.skipif(not (SHARED / "i2p.csv").is_file(), reason="shared prompt data not present")
INLINE = [f"a {c} {a} on the {p}" for c in ("red", "blue", "green") for a in ("cat", "dog", "man", "boat")
          for p in ("river", "street", "sky")]  # 36 prompts


def _subset_csv(src: Path, dst: Path, rows: int) -> Path:
    """The first `rows` prompts of a shared CSV (plus one blank row), as a small CSV."""
    prompts = read_prompts(src, limit=rows)
    with open(dst, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "prompt"])
        for i, p in enumerate(prompts):
            w.writerow([i, p])
            if i == 3:
                w.writerow([i, "   "])
    return dst


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    tok = write_clip_tokenizer(tmp_path_factory.mktemp("tok"))
    return tok, clip_text_model(tok, hidden=32, layers=2), random_sae(32, n=96, k=6, seed=1)


def _recount(encoder, tok, sae, groups: dict[str, list[str]], batch_size: int, itd_top: int = 128,
             window: int = BUCKET_WINDOW):
    """Independent recount: the same token batches through the eager reference encode + NumPy."""
    flat = [(g, p) for g, ps in enumerate(groups.values()) for p in ps]
    G, n = len(groups), sae.n_latents
    total = {f: 0 for f in H.STATE_FIELDS}
    itd = torch.zeros(G, n, dtype=torch.int64)
    for s in range(0, len(flat), window):
        chunk = flat[s : s + window]
        for tb in bucketed(tok, [p for _, p in chunk], None, eos_id(encoder, tok), batch_size, TOKEN_BUDGET):
            hidden = hook_activations(encoder, tb.tokens, sae.hook)
            values, indices = reference.encode(hidden, sae)
            B, L, k = values.shape
            counted = tb.counted.reshape(-1)
            gop = torch.tensor([chunk[i][0] for i in tb.index.tolist()])
            args = (indices.reshape(-1, k), values.reshape(-1, k), counted, H.batch_layout(B, L), gop)
            r = H.recount_numpy(*args, G, n)
            total = {f: total[f] + r[f] for f in H.STATE_FIELDS}
            H.itd_update(indices.reshape(-1, k), values.reshape(-1, k), counted, B, gop, itd, top=itd_top)
    return total, itd


def _assert_same(a, b, exact_float=True):
    assert a.groups == b.groups
    for f in ("prompts_fired", "tokens_fired", "n_prompts", "n_tokens", "itd_prompts"):
        assert torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu()), f
    if exact_float:
        assert torch.equal(a.act_sum.cpu(), b.act_sum.cpu())
    else:
        torch.testing.assert_close(a.act_sum.cpu(), b.act_sum.cpu(), rtol=1e-12, atol=1e-9)
    assert a.skipped == b.skipped


@needs_data
def test_scan_real_corpora_clip_exact(clip, tmp_path):
    tok, enc, sae = clip
    i2p = _subset_csv(SHARED / "i2p.csv", tmp_path / "i2p.csv", 150)
    coco = _subset_csv(SHARED / "coco_10k.csv", tmp_path / "coco.csv", 150)
    stats = snce_fast.scan(enc, tok, sae, {"target": [i2p], "reference": str(coco)}, batch_size=48, progress=False,
                           itd_top=4)
    assert stats.n_prompts.tolist() == [150, 150]
    assert stats.skipped["target"]["blank"] == 1 and stats.skipped["reference"]["blank"] == 1
    want, itd = _recount(enc, tok, sae, {"t": read_prompts(i2p), "r": read_prompts(coco)}, 48, itd_top=4)
    for f in H.STATE_FIELDS:
        np.testing.assert_array_equal(getattr(stats, f).numpy(), want[f], err_msg=f)
    assert torch.equal(stats.itd_prompts, itd)
    assert (stats.itd_prompts <= stats.prompts_fired).all()


@needs_data
def test_scan_bert_matches_recount(tmp_path):
    tok = write_bert_tokenizer(tmp_path / "tok")
    enc, sae = bert_model(tok, hidden=32), random_sae(32, n=40, k=5, seed=2, hook="layer:0")
    groups = {"a": read_prompts(SHARED / "nudity.csv", limit=60), "b": INLINE, "c": read_prompts(SHARED / "coco_10k.csv", limit=40)}
    stats = snce_fast.scan(enc, tok, sae, groups, batch_size=32, progress=False)
    want, itd = _recount(enc, tok, sae, groups, 32)
    for f in H.STATE_FIELDS:
        np.testing.assert_array_equal(getattr(stats, f).numpy(), want[f], err_msg=f)
    assert torch.equal(stats.itd_prompts, itd)


def test_scan_save_load_roundtrip(clip, tmp_path):
    tok, enc, sae = clip
    stats = snce_fast.scan(enc, tok, sae, {"target": INLINE[:20], "reference": INLINE[20:]}, batch_size=8,
                           progress=False)
    stats.save(tmp_path / "s")
    back = snce_fast.ScanStats.load(tmp_path / "s")
    _assert_same(stats, back)
    assert back.meta["sae_hash"] == scan_mod.sae_hash(sae)
    tensor_file = next((tmp_path / "s").glob("stats-*.safetensors"))
    tensor_file.write_bytes(tensor_file.read_bytes()[:-10])
    with pytest.raises(ValueError, match="does not match the sha256"):
        snce_fast.ScanStats.load(tmp_path / "s")


def test_crash_and_resume_equals_uninterrupted(clip, tmp_path, monkeypatch):
    tok, enc, sae = clip
    txt = tmp_path / "t.txt"
    txt.write_text("\n".join(INLINE[:25] + ["", "  "] + INLINE[25:]) + "\n")
    groups = {"target": [txt], "reference": INLINE[::-1] + ["a sky"]}
    kw = dict(batch_size=5, window=5, progress=False, itd_top=3)
    full = snce_fast.scan(enc, tok, sae, groups, **kw)

    ckpt = tmp_path / "ckpt"
    real, calls = scan_mod._process, [0]

    def crashing(*a, **k):
        calls[0] += 1
        if calls[0] == 8:  # mid-scan, after the checkpoints at batches 3 and 6
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(scan_mod, "_process", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        snce_fast.scan(enc, tok, sae, groups, checkpoint=ckpt, checkpoint_every=3, **kw)
    monkeypatch.setattr(scan_mod, "_process", real)
    partial = snce_fast.ScanStats.load(ckpt)
    assert partial.n_prompts.sum() == 30  # 6 batches of 5 prompts
    assert len(list(ckpt.glob("stats-*.safetensors"))) == 1 and not list(ckpt.glob(".*.tmp"))

    resumed = snce_fast.scan(enc, tok, sae, groups, checkpoint=ckpt, checkpoint_every=3, resume=True, **kw)
    _assert_same(full, resumed)
    assert resumed.skipped["target"]["blank"] == 2
    # a finished checkpoint resumes to the same result without scanning again
    _assert_same(full, snce_fast.scan(enc, tok, sae, groups, checkpoint=ckpt, resume=True, **kw))

    other = random_sae(32, n=96, k=6, seed=5)
    with pytest.raises(ValueError, match="different SAE"):
        snce_fast.scan(enc, tok, other, groups, checkpoint=ckpt, resume=True, **kw)
    moved = random_sae(32, n=96, k=6, seed=1, hook="layer:0")
    with pytest.raises(ValueError, match="hook='output'"):
        snce_fast.scan(enc, tok, moved, groups, checkpoint=ckpt, resume=True, **kw)
    with pytest.raises(ValueError, match="window=5"):
        snce_fast.scan(enc, tok, sae, groups, checkpoint=ckpt, resume=True, **{**kw, "window": 4})


def test_width_mismatch_and_bad_groups(clip):
    tok, enc, _ = clip
    with pytest.raises(ValueError, match=r"d_in=16 but the encoder \(\w+\) has width 32"):
        snce_fast.scan(enc, tok, random_sae(16), {"t": ["a cat"]}, progress=False)
    with pytest.raises(ValueError, match="non-empty dict"):
        snce_fast.scan(enc, tok, random_sae(32), ["a cat"], progress=False)


def test_producer_error_propagates(clip, tmp_path):
    tok, enc, sae = clip
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n1,a cat\n")
    with pytest.raises(ValueError, match="no 'prompt' column"):
        snce_fast.scan(enc, tok, sae, {"t": [bad]}, progress=False)


# -- 2 ranks on CPU with gloo -------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(tmp: str):
    torch.set_num_threads(1)
    tok = write_clip_tokenizer(Path(tmp) / "tok")
    return tok, clip_text_model(tok, hidden=32, layers=2), random_sae(32, n=96, k=6, seed=1)


GROUPS = {"target": INLINE, "reference": [p.replace("a ", "the ") for p in INLINE[:23]]}


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tok, enc, sae = _setup(tmp)
        stats = snce_fast.scan(enc, tok, sae, GROUPS, batch_size=4, window=4, checkpoint=os.path.join(tmp, "ckpt"),
                               checkpoint_every=2, progress=False)
        if rank == 0:
            stats.save(os.path.join(tmp, "dist"))
    finally:
        dist.destroy_process_group()


def test_two_rank_gloo_equals_single(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    dist_stats = snce_fast.ScanStats.load(tmp_path / "dist")
    old = torch.get_num_threads()
    try:
        tok, enc, sae = _setup(str(tmp_path / "single"))
        single = snce_fast.scan(enc, tok, sae, GROUPS, batch_size=4, window=4, progress=False)
    finally:
        torch.set_num_threads(old)
    _assert_same(single, dist_stats, exact_float=False)
    _assert_same(single, snce_fast.ScanStats.load(tmp_path / "ckpt"), exact_float=False)
