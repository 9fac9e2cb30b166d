"""The snce-fast CLI: erase on a tiny saved pipeline, and its bad-input paths."""
import json

import pytest
import torch
from PIL import Image

from snce_fast.cli import main
from snce_fast.testing import random_sae, sd_pipeline

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    sd_pipeline(root / "build").save_pretrained(root / "pipe")
    random_sae(32, n=64, k=3, seed=2).save(root / "sae")
    return root


def test_info(capsys):
    assert main(["info"]) == 0
    assert "C++ extension" in capsys.readouterr().out


def test_erase_writes_images_record_and_comparison(saved, tmp_path):
    out = tmp_path / "out"
    rc = main(["erase", "--model", str(saved / "pipe"), "--sae", str(saved / "sae"), "--neurons", "3,5",
               "--prompt", "a photo of a cat", "--seed", "1", "--seed", "2", "--steps", "2",
               "--height", "16", "--compare", "--out", str(out), "--quiet"])
    assert rc == 0
    record = json.loads((out / "record.json").read_text())
    assert record["neurons"] == [3, 5] and record["seeds"] == [1, 2] and len(record["images"]) == 2
    # whether the neuron fired on the prompt (and so whether the patch edited it) is recorded
    import snce_fast

    det = snce_fast.detect(sd_pipeline(saved / "build"), snce_fast.SAE.load(saved / "sae"), [3, 5], ["a photo of a cat"])
    for entry in record["images"]:
        erased = Image.open(out / entry["erased"])
        compare = Image.open(out / entry["compare"])
        assert erased.size == (16, 16) and compare.size == (36, 16 + 14)  # a label strip above the pair
        assert entry["neuron_fired"] == bool(det.flags[0]) == entry["edited"]
        assert entry["neuron_score"] == pytest.approx(float(det.scores[0]))
        # the labels are drawn: the strip is not blank white
        strip = torch.tensor(list(compare.crop((0, 0, 36, 14)).convert("L").getdata()))
        assert (strip < 128).any()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temp files left behind"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--model": "/nonexistent/pipe"}, "no such local directory"),
        ({"--sae": "/nonexistent/sae"}, "is not a directory"),
        ({"--neurons": "3,x"}, "comma-separated"),
        ({"--neurons": "64"}, "out of range"),
        ({"--prompt": None}, "no prompts"),
        ({"--steps": "0"}, "--steps 0: expected a positive integer"),
        ({"--min-tokens": "0"}, "--min-tokens 0"),
        ({"--clamp": "0.5", "--scale": "0.5"}, "clamp"),
        ({"--scale": "nan"}, "--scale nan: expected a finite number"),
        ({"--model": "SAE_DIR"}, "no model_index.json"),
        ({"--out": "A_FILE"}, "is a file"),
    ],
)
def test_erase_bad_inputs(saved, tmp_path, capsys, change, message):
    args = {"--model": str(saved / "pipe"), "--sae": str(saved / "sae"), "--neurons": "3",
            "--prompt": "a cat", "--out": str(tmp_path / "o"), "--steps": "1"}
    args.update(change)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    subst = {"SAE_DIR": str(saved / "sae"), "A_FILE": str(a_file)}
    argv = ["erase"] + [x for k, v in args.items() if v is not None for x in (k, subst.get(v, v))]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists(), "a failed run leaves no output directory"


def test_erase_sae_width_mismatch(saved, tmp_path, capsys):
    random_sae(16, n=64, k=3).save(tmp_path / "narrow")
    rc = main(["erase", "--model", str(saved / "pipe"), "--sae", str(tmp_path / "narrow"), "--neurons", "1",
               "--prompt", "a cat", "--out", str(tmp_path / "o"), "--steps", "1"])
    assert rc == 2 and "hidden size is 32" in capsys.readouterr().err


def test_erase_with_a_slim_erasure_matches_the_full_sae(saved, tmp_path, capsys):
    from snce_fast import SAE

    from transformers import CLIPTextModel, CLIPTokenizer

    from snce_fast.ops import reference

    sae = SAE.load(saved / "sae")
    enc = CLIPTextModel.from_pretrained(saved / "pipe" / "text_encoder")
    tok = CLIPTokenizer.from_pretrained(saved / "pipe" / "tokenizer")
    ids = tok(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        _, idx = reference.encode(enc(ids).last_hidden_state[:, 1:], sae)
    firing = torch.bincount(idx.flatten().long(), minlength=sae.n_latents).argsort(descending=True)[:2].tolist()
    sae.slim(firing).save(tmp_path / "slim")
    unused = next(j for j in range(sae.n_latents) if j not in firing)
    common = ["--model", str(saved / "pipe"), "--neurons", ",".join(map(str, firing)), "--prompt",
              "a photo of a cat", "--steps", "2", "--height", "16", "--quiet", "--compare"]
    assert main(["erase", "--sae", str(saved / "sae"), "--out", str(tmp_path / "full"), *common]) == 0
    assert main(["erase", "--sae", str(tmp_path / "slim"), "--out", str(tmp_path / "s"), *common]) == 0
    a = Image.open(tmp_path / "full" / "0000_seed0_erased.png")
    b = Image.open(tmp_path / "s" / "0000_seed0_erased.png")
    assert a.tobytes() == b.tobytes()
    original = Image.open(tmp_path / "full" / "0000_seed0_original.png")
    assert original.tobytes() != a.tobytes(), "the erasure must change the image (the latents fire)"
    capsys.readouterr()
    assert main(["erase", "--sae", str(tmp_path / "slim"), "--out", str(tmp_path / "x"), *common[:3],
                 f"{firing[0]},{unused}", *common[4:]]) == 2
    assert f"latent {unused} has no stored decoder row" in capsys.readouterr().err
    assert main(["erase", "--sae", str(tmp_path / "slim"), "--mode", "reconstruct", "--out", str(tmp_path / "r"),
                 *common]) == 2
    err = capsys.readouterr().err
    assert "whole decoder" in err and err.count("\n") == 1
