"""snce_fast.records.calibration: calibration.json built from plain values, read back, and bad
files refused with an error naming the file and the field (docs/formats.md)."""
import json

import pytest

from snce_fast.records.atomic import atomic_write_json
from snce_fast.records.calibration import FORMAT, calibration_record, ranked_entry, read_calibration

HASH = "ab" * 32


def _record(**over):
    kw = dict(sae="sae/", sae_hash=HASH, model="minilm", encoder="text_encoder", penultimate_output=False,
              target="nudity.txt", references={"coco": 40, "matched": 30}, fpr={"coco": 0.01, "matched": 0.05},
              min_tokens=2, max_length=16, neurons=[9, 4], thresholds=[0.5, 1.25],
              ranked=[ranked_entry(9, 0.5, 0.8, {"coco": 0.0, "matched": 0.03}),
                      ranked_entry(4, 1.25, 0.6, {"coco": 0.01, "matched": 0.0})])
    kw.update(over)
    return calibration_record(**kw)


def test_round_trip(tmp_path):
    rec = _record()
    path = tmp_path / "cal.json"
    atomic_write_json(path, rec)
    back = read_calibration(path, sae_hash=HASH, n_latents=16)
    assert back == rec
    assert back["format"] == FORMAT and back["neurons"] == [9, 4] and back["thresholds"] == [0.5, 1.25]
    assert back["gate_threshold"] == 1.25  # the largest, by default
    assert back["ranked"][0] == {"latent": 9, "threshold": 0.5, "recall": 0.8, "rate_coco": 0.0, "rate_matched": 0.03}
    assert (back["min_tokens"], back["max_length"]) == (2, 16)


def test_the_firing_rule_defaults_when_absent(tmp_path):
    rec = _record()
    del rec["min_tokens"], rec["max_length"]
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(rec))
    back = read_calibration(path)
    assert (back["min_tokens"], back["max_length"]) == (1, None)


def test_record_needs_one_threshold_per_neuron():
    with pytest.raises(ValueError, match="thresholds has 1 values for 2 neurons"):
        _record(thresholds=[0.5])
    with pytest.raises(ValueError, match="neurons is empty"):
        _record(neurons=[], thresholds=[])


@pytest.mark.parametrize("change, field", [
    ({"format": "snce_fast.scores"}, "'format'"),
    ({"neurons": []}, "'neurons'"),
    ({"neurons": "9,4"}, "'neurons'"),
    ({"neurons": [9, -1]}, "'neurons' holds -1"),
    ({"neurons": [9, 16]}, "'neurons' holds 16"),
    ({"neurons": [9, 9]}, "'neurons' lists latent 9 twice"),
    ({"thresholds": [0.5]}, "'thresholds' has 1 values for 2 neurons"),
    ({"thresholds": [0.5, float("nan")]}, "'thresholds'"),
    ({"thresholds": None}, "'thresholds' is null"),
    ({"min_tokens": 0}, "'min_tokens' is 0"),
    ({"max_length": "16"}, "'max_length' is '16'"),
    ({"n_latents": 8}, "'n_latents' is 8, but the SAE given has 16"),
])
def test_a_bad_file_is_refused_naming_the_file_and_the_field(tmp_path, change, field):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({**_record(), **change}))
    with pytest.raises(ValueError) as e:
        read_calibration(path, sae_hash=HASH, n_latents=16)
    assert str(path) in str(e.value) and f"field {field}" in str(e.value), str(e.value)


def test_another_sae_is_refused(tmp_path):
    path = tmp_path / "cal.json"
    atomic_write_json(path, _record())
    with pytest.raises(ValueError, match="different SAE") as e:
        read_calibration(path, sae_hash="cd" * 32)
    assert str(path) in str(e.value)


def test_not_a_calibration_file(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text("{")
    with pytest.raises(ValueError, match="is not valid JSON") as e:
        read_calibration(path)
    assert "snce-fast calibrate" in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_calibration(tmp_path / "nothing.json")


def test_a_missing_field_is_named(tmp_path):
    rec = _record()
    del rec["neurons"]
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="field 'neurons' is missing: expected a non-empty list of latent indices"):
        read_calibration(path)
