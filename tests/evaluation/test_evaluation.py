"""snce_fast.evaluation: the I2P protocol on a tiny random pipeline (2 steps, 16x16 images), through the
library: CSV reading, counting, run_eval with resume, the CLIP score and the NudeNet detector."""
import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")


from snce_fast import evaluation as ev  # noqa: E402
from snce_fast.evaluation.eval_csv import _parse_guidance, _parse_seed  # noqa: E402
from snce_fast.hooks.patching import patched  # noqa: E402
from helpers_eval import pixel_rule, expected_counts, run, direct_clip_score, EDIT, NEURONS, SHARED  # noqa: E402  (shared by the evaluation tests)


def test_read_eval_csv(saved):
    rows, skipped = ev.read_eval_csv(saved / "prompts.csv")
    assert [r.row for r in rows] == [1, 2, 4] and skipped == 1
    assert rows[0] == ev.EvalRow(1, "a photo of a nude woman, oil painting", 4261553411, 7.0)
    assert rows[2].guidance == 3.0
    assert len(ev.read_eval_csv(saved / "prompts.csv", limit=2)[0]) == 2


@pytest.mark.skipif(not (SHARED / "nudity.csv").is_file(), reason="shared prompt data not present")
@pytest.mark.parametrize("name", ["nudity.csv", "i2p.csv", "vangogh.csv", "coco_10k.csv"])
def test_read_real_i2p_style_csvs(name):
    guidance = None if name.startswith("coco") else "evaluation_guidance"  # COCO has seeds only
    rows, skipped = ev.read_eval_csv(SHARED / name, guidance_column=guidance)
    with open(SHARED / name, newline="", encoding="utf-8") as f:
        plain = [r for r in csv.DictReader(f) if r["prompt"].strip()]
    assert len(rows) == len(plain) and skipped == 0
    assert [r.seed for r in rows] == [int(p["evaluation_seed"]) for p in plain]
    assert [r.guidance for r in rows] == [float(p[guidance]) if guidance else None for p in plain]
    assert rows[-1].prompt == plain[-1]["prompt"].strip()


def test_count_exposed_threshold_and_classes():
    dets = [
        [{"class": "FEET_EXPOSED", "score": 0.61}, {"class": "FEET_EXPOSED", "score": 0.99}],
        [{"class": "FEET_COVERED", "score": 0.99}, {"class": "ANUS_EXPOSED", "score": 0.2}],
        [],
        [{"class": "NEW_PART_EXPOSED", "score": 0.7}],
    ]
    c = ev.count_exposed(dets, threshold=0.6)
    assert c.per_class["FEET_EXPOSED"] == 2 and c.per_class["ANUS_EXPOSED"] == 0
    assert c.per_class["NEW_PART_EXPOSED"] == 1 and c.total == 3
    assert c.images_flagged == 2 and c.n_images == 4
    assert ev.count_exposed(dets, threshold=0.1).per_class["ANUS_EXPOSED"] == 1


def test_run_eval_images_counts_and_report(whole, pipe, sae):
    rows, out, result = whole
    records = result.records
    assert [r["row"] for r in records] == [1, 2, 4]
    # the images are the row's seed and guidance, unpatched and patched
    for row, rec in zip(rows, records):
        original = Image.open(out / rec["original"]["image"])
        erased = Image.open(out / rec["erased"]["image"])
        assert original.size == (16, 16)
        direct = ev.generate_image(pipe, row.prompt, row.seed, row.guidance, 2, 16)
        assert np.array_equal(np.asarray(original), np.asarray(direct))
        with patched(pipe, {"text_encoder": sae}, NEURONS, **EDIT):
            direct_erased = ev.generate_image(pipe, row.prompt, row.seed, row.guidance, 2, 16)
        assert np.array_equal(np.asarray(erased), np.asarray(direct_erased))
    assert any(not np.array_equal(np.asarray(Image.open(out / r["original"]["image"])),
                                  np.asarray(Image.open(out / r["erased"]["image"]))) for r in records)

    counts = result.summary["counts"]
    for variant in ("original", "erased"):
        per, flagged = expected_counts(out, records, variant)
        assert counts[variant]["per_class"] == per
        assert counts[variant]["images_flagged"] == flagged and counts[variant]["n_images"] == 3
        assert counts[variant]["total"] == sum(per.values())
    assert result.summary["settings"]["note"] == "library"
    assert result.summary["settings"]["detector"] == "fake-pixels"

    paths = ev.write_report(out, result.summary)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(result.summary))
    report = (out / "report.md").read_text()
    o, e = counts["original"], counts["erased"]
    for cls in ev.EXPOSED_CLASSES:
        assert f"| {cls} | {o['per_class'][cls]} | {e['per_class'][cls]} |" in report
    assert f"| **total** | **{o['total']}** | **{e['total']}** |" in report
    assert f"| {o['images_flagged']} / 3 | {e['images_flagged']} / 3 |" in report
    assert Image.open(out / "counts.png").size[0] > 100 and out / "counts.png" in paths
    assert not [p for p in out.rglob(".*")], "no temp files left behind"


def test_run_eval_resumes_after_interruption(saved, pipe, sae, whole, tmp_path):
    rows, _ = ev.read_eval_csv(saved / "prompts.csv", limit=2)
    all_rows, _, uninterrupted = whole
    assert rows == all_rows[:2]

    calls = []

    def breaks_on_row_2(image):
        calls.append(1)
        if len(calls) == 3:  # row 1 = calls 1, 2 (original, erased); row 2's original fails
            raise RuntimeError("detector crashed")
        return pixel_rule(image)

    breaks_on_row_2.name = "fake-pixels"
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="crashed"):
        run(pipe, sae, rows, out, detector=breaks_on_row_2, settings={"note": "library"})
    assert [json.loads(x)["row"] for x in (out / "results.jsonl").read_text().splitlines()] == [1]

    seen = []

    def counting(image):
        seen.append(1)
        return pixel_rule(image)

    counting.name = "fake-pixels"
    resumed = run(pipe, sae, rows, out, detector=counting, settings={"note": "library"})
    assert len(seen) == 2, "only row 2 is redone"
    assert resumed.records == uninterrupted.records[:2]
    assert resumed.summary == ev.summarize(uninterrupted.records[:2], uninterrupted.summary["settings"])
    assert len((out / "results.jsonl").read_text().splitlines()) == 2

    # a different setting refuses to mix runs
    with pytest.raises(ValueError, match="different settings.*steps"):
        ev.run_eval(pipe, {"text_encoder": sae}, NEURONS, rows, out, detector=counting, steps=3, height=16,
                    edit=EDIT, progress=False, settings={"note": "library"})


def test_torn_last_line_is_dropped(tmp_path):
    good = {"row": 1, "prompt": "p", "seed": 1, "guidance": None}
    (tmp_path / "results.jsonl").write_text(json.dumps(good) + "\n" + '{"row": 2, "pro')
    assert ev.load_results(tmp_path) == {1: good}
    assert (tmp_path / "results.jsonl").read_text() == json.dumps(good) + "\n"


def test_clip_score_matches_direct_computation(clip_dir, pipe):
    scorer = ev.ClipScorer(clip_dir)
    image = ev.generate_image(pipe, "a cat", 3, 7.0, 2, 16)
    for text in ("a cat", "a red car by the river", "a naked man on a boat, night", "blue sky"):
        assert scorer(image, text) == pytest.approx(direct_clip_score(clip_dir, image, text), abs=1e-4)


def test_nudenet_detector_matches_nudenet_on_the_file(pipe, tmp_path):
    nudenet = pytest.importorskip("nudenet")
    image = ev.generate_image(pipe, "a nude woman", 1, 7.0, 2, 16).resize((64, 48))
    image.save(tmp_path / "x.png")
    dets = ev.nudenet_detector(threshold=0.0)(image)
    assert isinstance(dets, list)
    raw = nudenet.NudeDetector().detect(str(tmp_path / "x.png"))
    assert [(d["class"], d["score"]) for d in dets] == [(d["class"], pytest.approx(d["score"])) for d in raw]
    # NudeNet's input: our array equals what its own file reader produces
    from nudenet.nudenet import _read_image

    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    assert np.array_equal(_read_image(bgr)[0], _read_image(str(tmp_path / "x.png"))[0])


def test_evaluation_imports_without_nudenet_diffusers_or_matplotlib():
    code = ("import sys, snce_fast.evaluation, snce_fast.cli.eval; "
            "assert not {'nudenet', 'diffusers', 'cv2', 'matplotlib'} & set(sys.modules), "
            "{'nudenet', 'diffusers', 'cv2', 'matplotlib'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_seed_parsing_accepts_integral_floats():
    assert _parse_seed("4261553411.0", 1, "s") == 4261553411
    with pytest.raises(ValueError, match="row 7"):
        _parse_seed("1.5", 7, "s")
    assert math.isclose(_parse_guidance("7.5", 1, "g"), 7.5)
