"""snce_fast.records.scores: scores.json built from plain values, read back, and bad files refused
with an error naming the file and the field (docs/formats.md)."""
import json

import pytest

from snce_fast.records.atomic import atomic_write_json
from snce_fast.records.scores import FORMAT, read_scores, scores_record, top_entry, top_latents

HASH = "ab" * 32


def _record(**over):
    top = [top_entry(1, 7, 0.5, {"concept": 0.9, "coco": 0.1}, {"concept": 0.2, "coco": 0.01},
                     {"concept": 1.5, "coco": 0.3}),
           top_entry(2, 3, 0.25, {"concept": 0.5, "coco": 0.2}, {"concept": 0.1, "coco": 0.02},
                     {"concept": 0.9, "coco": 0.4})]
    kw = dict(method="snce", level="prompt", target="concept", references=["coco"], stats="stats/", sae_hash=HASH,
              n_latents=16, n_prompts={"concept": 40, "coco": 50}, top=top)
    kw.update(over)
    return scores_record(**kw)


def test_round_trip(tmp_path):
    rec = _record()
    path = tmp_path / "scores.json"
    atomic_write_json(path, rec)
    back = read_scores(path, sae_hash=HASH, n_latents=16)
    assert back == rec
    assert back["format"] == FORMAT and back["references"] == ["coco"] and back["n_prompts"]["coco"] == 50
    assert top_latents(back) == [7, 3] and top_latents(back, 1) == [7]
    assert back["top"][0] == {"rank": 1, "latent": 7, "score": 0.5, "frequency": {"concept": 0.9, "coco": 0.1},
                              "token_frequency": {"concept": 0.2, "coco": 0.01},
                              "mean_activation": {"concept": 1.5, "coco": 0.3}}
    assert read_scores(path) == rec  # nothing to check against: the file alone


def test_record_needs_a_level_and_latents():
    with pytest.raises(ValueError, match="level='word'"):
        _record(level="word")
    with pytest.raises(ValueError, match="top is empty"):
        _record(top=[])


@pytest.mark.parametrize("change, field", [
    ({"format": "snce_fast.calibration"}, "'format'"),
    ({"top": []}, "'top'"),
    ({"top": None}, "'top'"),
    ({"top": [1, 2]}, "'top'"),
    ({"top": [{"latent": "7"}]}, "'top[].latent' holds '7'"),
    ({"top": [{"latent": 16}]}, "'top[].latent' holds 16"),
    ({"top": [{"latent": True}]}, "'top[].latent' holds True"),
    ({"top": [{"latent": 1, "score": "high"}]}, "'top[].score'"),
    ({"n_latents": 32}, "'n_latents' is 32, but the SAE given has 16"),
    ({"n_latents": -1}, "'n_latents' is -1"),
    ({"sae_hash": 5}, "'sae_hash' is 5"),
])
def test_a_bad_file_is_refused_naming_the_file_and_the_field(tmp_path, change, field):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({**_record(), **change}))
    with pytest.raises(ValueError) as e:
        read_scores(path, sae_hash=HASH, n_latents=16)
    assert str(path) in str(e.value) and f"field {field}" in str(e.value), str(e.value)


def test_another_sae_is_refused(tmp_path):
    path = tmp_path / "scores.json"
    atomic_write_json(path, _record())
    with pytest.raises(ValueError, match="different SAE") as e:
        read_scores(path, sae_hash="cd" * 32)
    assert str(path) in str(e.value) and "sae_hash" in str(e.value)


def test_latents_out_of_range_for_the_recorded_n_latents(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(json.dumps({**_record(), "top": [{"latent": 16}]}))
    with pytest.raises(ValueError, match=r"field 'top\[\].latent' holds 16: expected latent indices \(ints in 0..15\)"):
        read_scores(path)  # no SAE given: the file's own n_latents bounds the indices


@pytest.mark.parametrize("content, message", [
    (b"{not json", "is not valid JSON"),
    (b"\xff\xfe", "is not valid JSON"),
    (b"[1, 2]", "holds a JSON list"),
    (b'{"top": [{"latent": 1}]}', "field 'format' is None"),
])
def test_not_a_scores_file(tmp_path, content, message):
    path = tmp_path / "scores.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as e:
        read_scores(path)
    assert str(path) in str(e.value) and "snce-fast score" in str(e.value)


def test_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scores(tmp_path / "nothing.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_scores(tmp_path)  # a directory is not a scores file
