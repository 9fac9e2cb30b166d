"""Hub loading and upload without a network: huggingface_hub in offline mode over a cache folder laid
out as huggingface_hub lays it out (models--owner--name/snapshots/<commit>/..., refs/<branch>), and an
HfApi stand-in that records what push_to_hub uploads."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from snce_fast import SAE, ErasureSAE, SAEFormatError
from snce_fast.sae import load_pretrained
from snce_fast.sae.hub import detect_layout, split_hub_spec
from snce_fast.testing import random_sae

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, files: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """Put the directory tree `files` into the cache as revision `commit` of `repo_id`, with `ref` pointing
    at it; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files, snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """huggingface_hub in offline mode with an empty cache at tmp_path/hub (as HF_HUB_OFFLINE=1 and
    HF_HUB_CACHE would set it)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def same(a, b):
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.k == b.k and a.hook == b.hook


def test_native_layout_from_the_cache(tmp_path, offline):
    sae = random_sae(12, 30, 3, hook="layer:1")
    sae.save(tmp_path / "files")
    cache_repo(offline, "owner/native", tmp_path / "files")
    same(SAE.from_pretrained("owner/native"), sae)
    half = SAE.from_pretrained("owner/native", revision="main", dtype=torch.float16)
    assert half.W_enc.dtype == torch.float16 and torch.equal(half.W_enc, sae.W_enc.half())
    same(SAE.from_pretrained("owner/native", revision=COMMIT), sae)


def test_saelens_and_sparsify_layouts_in_subfolders(tmp_path, offline):
    a, b = random_sae(12, 30, 3, seed=1, hook="layer:3"), random_sae(12, 36, 4, seed=2)
    a.save_saelens(tmp_path / "files" / "blocks.3.hook_resid_post")
    b.save_sparsify(tmp_path / "files" / "text_model.encoder.layers.1")
    cfg_file = tmp_path / "files" / "text_model.encoder.layers.1" / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["snce_fast_hook"]  # as sparsify itself writes it: the hook is the folder name
    cfg_file.write_text(json.dumps(cfg))
    cache_repo(offline, "owner/mixed", tmp_path / "files")
    same(SAE.from_pretrained("owner/mixed", subfolder="blocks.3.hook_resid_post"), a)
    got = SAE.from_pretrained("owner/mixed", subfolder="text_model.encoder.layers.1")
    assert got.hook == "layer:1" and torch.equal(got.W_enc, b.W_enc)
    assert SAE.from_pretrained("owner/mixed", subfolder="text_model.encoder.layers.1", hook="layer:0").hook == "layer:0"


def test_erasure_from_the_cache_and_layout_mismatches(tmp_path, offline):
    sae = random_sae(12, 30, 3)
    sae.slim([4, 7]).save(tmp_path / "files" / "erasure")
    sae.save(tmp_path / "files" / "full")
    cache_repo(offline, "owner/e", tmp_path / "files")
    er = ErasureSAE.from_pretrained("owner/e", subfolder="erasure")
    assert er.decoder_targets == [4, 7] and torch.equal(er.W_enc, sae.W_enc)
    assert isinstance(load_pretrained("owner/e", "erasure"), ErasureSAE)
    assert isinstance(load_pretrained("owner/e", "full"), SAE)
    with pytest.raises(SAEFormatError, match="slim erasure, not a full SAE"):
        SAE.from_pretrained("owner/e", subfolder="erasure")
    with pytest.raises(SAEFormatError, match="holds a full SAE"):
        ErasureSAE.from_pretrained("owner/e", subfolder="full")


def test_not_cached_offline_is_one_clear_error(offline):
    with pytest.raises(FileNotFoundError) as err:
        SAE.from_pretrained("owner/absent")
    msg = str(err.value)
    assert "owner/absent" in msg and "not in the local Hugging Face cache" in msg and "HF_HUB_OFFLINE=1" in msg
    assert str(offline) in msg and "\n" not in msg


def test_local_directory_wins_over_a_hub_id(tmp_path, offline, monkeypatch):
    hub_sae, local_sae = random_sae(12, 30, 3, seed=1), random_sae(12, 30, 3, seed=2)
    hub_sae.save(tmp_path / "files")
    cache_repo(offline, "owner/name", tmp_path / "files")
    local_sae.save(tmp_path / "cwd" / "owner" / "name")
    monkeypatch.chdir(tmp_path / "cwd")
    same(SAE.from_pretrained("owner/name"), local_sae)
    monkeypatch.chdir(tmp_path)
    same(SAE.from_pretrained("owner/name"), hub_sae)


def test_local_layouts_are_detected(tmp_path):
    sae = random_sae(8, 16, 2)
    sae.save(tmp_path / "n")
    sae.save_saelens(tmp_path / "s")
    sae.save_sparsify(tmp_path / "p")
    sae.slim([1]).save(tmp_path / "e")
    assert [detect_layout(tmp_path / x) for x in "nspe"] == ["native", "saelens", "sparsify", "erasure"]
    for x in "nsp":
        same(SAE.from_pretrained(tmp_path / x), sae)
    (tmp_path / "multi" / "layers.1").mkdir(parents=True)
    sae.save_sparsify(tmp_path / "multi" / "layers.1")
    with pytest.raises(SAEFormatError, match=r"subfolders \['layers.1'\] hold SAEs: pass subfolder="):
        SAE.from_pretrained(tmp_path / "multi")
    same(SAE.from_pretrained(tmp_path / "multi", subfolder="layers.1"), sae)


@pytest.mark.parametrize("call, error, message", [
    (lambda p: SAE.from_pretrained(p / "nowhere"), FileNotFoundError, "neither a local directory nor a hub repo id"),
    (lambda p: SAE.from_pretrained(p, revision="main"), ValueError, "revision='main' applies to hub repos"),
    (lambda p: SAE.from_pretrained(p, subfolder="nope"), FileNotFoundError, "is not a directory"),
    (lambda p: SAE.from_pretrained(42), TypeError, "repo_id_or_dir=42"),
    (lambda p: SAE.from_pretrained(p, subfolder=""), ValueError, "subfolder=''"),
    (lambda p: SAE.from_pretrained(p, dtype="int8"), ValueError, "dtype='int8'"),
    (lambda p: SAE.from_pretrained(p, hook="layer:x"), ValueError, "hook='layer:x'"),
])
def test_bad_arguments(tmp_path, call, error, message):
    random_sae(8, 16, 2).save(tmp_path)
    with pytest.raises(error, match=message):
        call(tmp_path)


class FakeHfApi:
    """Records create_repo / create_branch / upload_folder and keeps copies of the uploaded files."""

    calls: list = []
    uploaded: dict = {}

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, **kw):
        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok))

    def create_branch(self, repo_id, branch, exist_ok=False, **kw):
        FakeHfApi.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, revision=None, commit_message=None, **kw):
        FakeHfApi.calls.append(("upload_folder", repo_id, path_in_repo, revision, commit_message))
        FakeHfApi.uploaded = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        return "commit-info"


@pytest.fixture
def fake_api(monkeypatch):
    FakeHfApi.calls, FakeHfApi.uploaded = [], {}
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


@pytest.mark.parametrize("fmt, names", [("native", ["config.json", "sae.safetensors"]),
                                        ("saelens", ["cfg.json", "sae_weights.safetensors"]),
                                        ("sparsify", ["cfg.json", "sae.safetensors"])])
def test_push_to_hub_uploads_a_folder_from_pretrained_reads_back(tmp_path, offline, fake_api, fmt, names):
    sae = random_sae(12, 30, 3, hook="layer:2")
    assert sae.push_to_hub("me/sae", subfolder="te1", format=fmt, private=True, revision="v2") == "commit-info"
    assert fake_api.calls == [("create_repo", "me/sae", True, True), ("create_branch", "me/sae", "v2"),
                              ("upload_folder", "me/sae", "te1", "v2", "Upload SAE with snce_fast")]
    assert sorted(fake_api.uploaded) == names
    for name, data in fake_api.uploaded.items():
        (tmp_path / "up" / "te1").mkdir(parents=True, exist_ok=True)
        (tmp_path / "up" / "te1" / name).write_bytes(data)
    cache_repo(offline, "me/sae", tmp_path / "up", ref="v2")
    same(SAE.from_pretrained("me/sae", subfolder="te1", revision="v2"), sae)


def test_erasure_push_to_hub_and_bad_arguments(fake_api):
    er = random_sae(12, 30, 3).slim([2])
    er.push_to_hub("me/erasure")
    assert sorted(fake_api.uploaded) == ["config.json", "erasure.safetensors"]
    with pytest.raises(ValueError, match="format='gguf'"):
        random_sae(8, 16, 2).push_to_hub("me/x", format="gguf")
    with pytest.raises(ValueError, match="repo_id='nope'"):
        random_sae(8, 16, 2).push_to_hub("nope")


def test_cli_sae_spec():
    assert split_hub_spec("owner/name") == ("owner/name", None, None)
    assert split_hub_spec("owner/name@v1/text_model.encoder.layers.1") == \
        ("owner/name", "text_model.encoder.layers.1", "v1")


def test_cli_sae_accepts_a_hub_id(tmp_path, offline):
    from snce_fast.cli._common import UsageError, load_sae

    random_sae(12, 30, 3, hook="layer:1").save_sparsify(tmp_path / "files" / "layers.1")
    cache_repo(offline, "owner/sp", tmp_path / "files")
    assert load_sae("owner/sp/layers.1").hook == "layer:1"
    with pytest.raises(UsageError,
                       match=r"--sae 'owner/none': no such local directory; as a hub repo: .*not in the local"):
        load_sae("owner/none")
    with pytest.raises(UsageError, match="is not a directory"):
        load_sae("/nonexistent/sae")


def test_hf_hub_offline_environment_reads_the_cache(tmp_path):
    """What the README promises, with the real environment variables in a fresh interpreter."""
    sae = random_sae(12, 30, 3, hook="layer:2")
    sae.save(tmp_path / "files")
    cache_repo(tmp_path / "hub", "owner/env", tmp_path / "files")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(ROOT)}
    code = ("import snce_fast\n"
            "print(snce_fast.SAE.from_pretrained('owner/env').hook)\n"
            "try:\n    snce_fast.SAE.from_pretrained('owner/missing')\n"
            "except FileNotFoundError as e:\n    print('ERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "layer:2"
    assert lines[1].startswith("ERROR hub repo owner/missing is not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in lines[1]
