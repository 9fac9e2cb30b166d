"""SAE directories on the Hugging Face Hub and on disk: which layout a directory holds (native, slim
erasure, SAELens, sparsify, OpenAI), fetching one from a hub repo through `huggingface_hub` (its cache,
its offline mode), and uploading one (docs/api.md#hub).

Offline (`HF_HUB_OFFLINE=1`), a hub id resolves from the local cache only; a repo or file that is not
cached raises FileNotFoundError saying so. A local directory always takes precedence over a hub id.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from snce_fast.sae.files import ERASURE_FORMAT, SAEFormatError

log = logging.getLogger(__name__)

LAYOUTS = ("native", "erasure", "saelens", "sparsify", "openai")
_EXPECTED = ("config.json + sae.safetensors (snce_fast), config.json + erasure.safetensors (a slim erasure), "
             "cfg.json + sae_weights.safetensors (SAELens), cfg.json + sae.safetensors (sparsify) or "
             "state_dict.pth (OpenAI's layout)")


def _json(file: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _config_layout(name: str, cfg: dict[str, Any]) -> str:
    """The layout a config file announces: config.json is ours (native or erasure) or OpenAI's; cfg.json is
    SAELens' (it has d_sae) or sparsify's."""
    if name == "config.json":
        if cfg.get("format") == ERASURE_FORMAT:
            return "erasure"
        return "native" if "format_version" in cfg or "n_latents" in cfg else "openai"
    return "saelens" if "d_sae" in cfg or "architecture" in cfg else "sparsify"


_WEIGHTS = {"native": "sae.safetensors", "erasure": "erasure.safetensors", "saelens": "sae_weights.safetensors",
            "sparsify": "sae.safetensors", "openai": "state_dict.pth"}


def detect_layout(path: str | os.PathLike) -> str:
    """Which SAE layout the directory `path` holds (one of LAYOUTS); SAEFormatError listing what it
    found (and the subfolders that hold SAEs) when none."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"SAE directory {str(d)!r} does not exist")
    for name in ("config.json", "cfg.json"):
        if (d / name).is_file():
            layout = _config_layout(name, _json(d / name))
            if (d / _WEIGHTS[layout]).is_file() or layout in ("native", "erasure"):
                return layout  # a native config without its weights: its loader says what is missing
    if (d / "state_dict.pth").is_file():
        return "openai"
    subs = sorted(p.name for p in d.iterdir()
                  if p.is_dir() and any((p / c).is_file() for c in ("config.json", "cfg.json")))
    hint = f"; its subfolders {subs[:8]} hold SAEs: pass subfolder=" if subs else ""
    found = sorted(p.name for p in d.iterdir())[:12]
    raise SAEFormatError(f"{str(d)!r} holds no SAE snce_fast reads (found {found}): expected {_EXPECTED}{hint}")


def hub_id_like(spec: str) -> bool:
    """Whether `spec` (not a local directory) can be a hub repo id: owner/name[/subfolder...]."""
    return isinstance(spec, str) and spec.count("/") >= 1 and not spec.startswith((".", "/", "~")) \
        and "\\" not in spec and all(spec.split("/"))


def split_hub_spec(spec: str) -> tuple[str, Optional[str], Optional[str]]:
    """`owner/name[@revision][/sub/folder]` -> (repo_id, subfolder, revision), as the CLI's --sae takes it."""
    parts = spec.split("/")
    repo, revision = parts[1].split("@", 1) if "@" in parts[1] else (parts[1], None)
    return f"{parts[0]}/{repo}", "/".join(parts[2:]) or None, revision or None


def _hub_download(repo_id: str, filename: str, subfolder: Optional[str], revision: Optional[str],
                  cache_dir: Optional[str], misses: list[str]) -> Optional[Path]:
    """One file of the repo through huggingface_hub (cache first when offline); None when the repo has no
    such file, or when it is not cached and cannot be downloaded (the reason is added to `misses`)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{repo_id}" + (f"/{subfolder}" if subfolder else "") + (f"@{revision}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision, cache_dir=cache_dir))
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        raise FileNotFoundError(f"hub repo {where!r}: {str(e).splitlines()[0]}") from None
    except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError) not cached, no download
        misses.append(f"{filename}: {str(e).splitlines()[0]}")
        return None
    except EntryNotFoundError:  # the repo has no such file
        return None


def fetch(repo_id: str, subfolder: Optional[str] = None, revision: Optional[str] = None,
          cache_dir: Optional[str] = None) -> Path:
    """The local directory (in the Hugging Face cache) holding the SAE of hub repo `repo_id`
    (in `subfolder`, at `revision`): its config first, then the weights file its layout names."""
    from huggingface_hub import constants

    misses: list[str] = []
    for name in ("config.json", "cfg.json", "state_dict.pth"):
        found = _hub_download(repo_id, name, subfolder, revision, cache_dir, misses)
        if found is None:
            continue
        layout = "openai" if name == "state_dict.pth" else _config_layout(name, _json(found))
        weights = _WEIGHTS[layout]
        if weights != name and _hub_download(repo_id, weights, subfolder, revision, cache_dir, misses) is None:
            raise FileNotFoundError(f"hub repo {repo_id!r}{f' subfolder {subfolder!r}' if subfolder else ''}: has "
                                    f"{name} ({layout} layout) but its {weights} could not be fetched"
                                    + (f" ({misses[-1]})" if misses else ""))
        log.info("hub repo %r%s: %s layout in %s", repo_id, f"/{subfolder}" if subfolder else "", layout, found.parent)
        return found.parent
    where = (repo_id + (f" (subfolder {subfolder!r})" if subfolder else "")
             + (f" at revision {revision!r}" if revision else ""))
    if misses:
        offline = " with HF_HUB_OFFLINE=1 (downloads are off)" if constants.is_offline_mode() else ""
        raise FileNotFoundError(f"hub repo {where} is not in the local Hugging Face cache "
                                f"({cache_dir or constants.HF_HUB_CACHE}){offline} and could not be downloaded: "
                                f"{misses[0]}")
    raise FileNotFoundError(f"hub repo {where} holds no SAE snce_fast reads: expected {_EXPECTED}")


def resolve(repo_id_or_dir: str | os.PathLike, subfolder: Optional[str] = None, revision: Optional[str] = None,
            cache_dir: Optional[str] = None) -> Path:
    """A local SAE directory for a local path (which always wins) or a hub repo id."""
    if not isinstance(repo_id_or_dir, (str, os.PathLike)):
        raise TypeError(f"repo_id_or_dir={repo_id_or_dir!r} is a {type(repo_id_or_dir).__name__}: expected a local "
                        "directory or a hub repo id such as 'owner/name'")
    if subfolder is not None and (not isinstance(subfolder, str) or not subfolder.strip("/")):
        raise ValueError(f"subfolder={subfolder!r}: expected a folder inside the repo or directory, e.g. 'layers.8'")
    local = Path(repo_id_or_dir)
    if local.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub repos, but {str(local)!r} is a local directory")
        d = local / subfolder if subfolder else local
        if not d.is_dir():
            raise FileNotFoundError(f"{str(d)!r} is not a directory (subfolder={subfolder!r} of {str(local)!r})")
        return d
    spec = str(repo_id_or_dir)
    if not hub_id_like(spec) or spec.count("/") != 1:
        raise FileNotFoundError(f"{spec!r} is neither a local directory nor a hub repo id ('owner/name'; pass a "
                                "folder inside the repo as subfolder=)")
    return fetch(spec, subfolder.strip("/") if subfolder else None, revision, cache_dir)


def push_folder(save: Callable[[Path], Any], repo_id: str, subfolder: Optional[str] = None,
                revision: Optional[str] = None, private: Optional[bool] = None, token: Optional[str] = None,
                commit_message: Optional[str] = None) -> Any:
    """Save with `save(dir)` into a temporary folder and upload it to hub repo `repo_id` (created if
    missing) under `subfolder`, on branch `revision`; returns huggingface_hub's commit info."""
    from huggingface_hub import HfApi

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id={repo_id!r}: expected a hub repo id such as 'owner/name'")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, path_in_repo=subfolder, revision=revision,
                                 commit_message=commit_message or "Upload SAE with snce_fast")
