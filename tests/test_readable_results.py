"""Results a reader cannot misread (issue 27): each test is what a researcher reading the outputs meets."""

import csv
import html
import json
import re

import cv2
import numpy as np
import pytest
from matplotlib.figure import Figure

import plots
import report
import run_inference
import run_training
import tracking
from test_reliability import one_line_error, train_in_process


@pytest.mark.parametrize(
    "line, said",
    [
        ("resolution: quater", "resolution: invalid choice: 'quater' (choose from 'full', 'half', 'quarter')"),
        ("image_mean: [0.5, 0.4]", "image_mean: expected 3 arguments"),
        ("lora_rank: eight", "lora_rank: invalid int value: 'eight'"),
        ("lora_rank: 0", "--lora-rank (from --config {recipe}) must be at least 1"),
        ("lora_dropout: 1.5", "--lora-dropout (from --config {recipe}) must be in [0, 1)"),
    ],
    ids=["choice", "count", "type", "range", "interval"],
)
def test_a_bad_value_in_a_recipe_names_the_file_and_the_key(tmp_path, capsys, line, said):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(SystemExit) as refused:
        run_training.parse_args(["--config", str(recipe)])
    assert refused.value.code == 2
    message = one_line_error(capsys.readouterr().err)
    assert said.format(recipe=recipe) in message and str(recipe) in message


def test_a_class_in_no_ground_truth_frame_is_marked_and_counted_in_every_per_class_table(tmp_path, capsys):
    data, predictions = tmp_path / "data" / "test" / "video_01" / "segmentation", tmp_path / "pred"
    data.mkdir(parents=True)
    (predictions / "video_01" / "segmentation").mkdir(parents=True)
    for k in range(3):  # tool clasper in every frame; catheter in no ground truth, predicted in one frame
        truth = np.zeros((64, 96), np.uint8)
        truth[10:30, 10:40] = 1
        prediction = truth.copy()
        prediction[40:50, 50:60] = 9 if k == 0 else 0
        cv2.imwrite(str(data / f"{60 * k:09d}.png"), truth)
        cv2.imwrite(str(predictions / "video_01" / "segmentation" / f"{60 * k:09d}.png"), prediction)
    arguments = ["--data-directory", str(tmp_path / "data"), "--predictions-directory", str(predictions)]
    assert run_inference.main(arguments) == 0
    printed = capsys.readouterr().out

    rows = {row["class"]: row for row in csv.DictReader((predictions / "per_class.csv").open())}
    assert (rows["tool clasper"]["ground_truth_frames"], rows["tool clasper"]["absent_rule_frames"]) == ("3", "0")
    assert (rows["catheter"]["ground_truth_frames"], rows["catheter"]["absent_rule_frames"]) == ("0", "2")
    assert re.search(r"^catheter †\s+0\.6667\s+0\.6667\s+0\s+2$", printed, re.M)
    assert re.search(r"^tool clasper\s+1\.0000\s+1\.0000\s+3\s+0$", printed, re.M)
    assert plots.ABSENT_NOTE in printed and html.escape(plots.ABSENT_NOTE) in (predictions / "report.html").read_text()
    assert "catheter †</td>" in (predictions / "report.html").read_text()

    metrics = json.loads((predictions / "metrics.json").read_text())
    assert metrics["classes"]["catheter"]["ground_truth_frames"] == 0
    report.print_scores({**metrics, "seed_mIoU": 0.5}, step=10)  # the line each validation prints in training
    assert "catheter† 0.67/0.67" in capsys.readouterr().out
    scores, thin = Figure().subplots(1, 2)
    plots.plot_validation(scores, thin, [{"step": 10, "val": metrics}], "score")  # training_curves.png's panels
    assert "thread IoU † in no ground-truth frame: false positives only" in [x.get_label() for x in thin.get_lines()]


def test_every_validation_reports_the_score_of_predicting_background_everywhere(
    release_copy, backbone, tmp_path, capsys
):
    output = tmp_path / "run"
    assert train_in_process(release_copy, backbone, output, "--max-steps", "2", "--val-every", "1") == 0
    val_videos = json.loads((output / "split.json").read_text())["val"]
    floor = report.background_only_score(release_copy / "train", val_videos)
    printed = capsys.readouterr().out
    assert printed.count(f"(background everywhere: {floor['score']:.4f})") == 2  # every validation line

    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    validations = [r for r in records if "val" in r]
    assert [r["val"]["background_only"] for r in validations] == [floor, floor]
    assert tracking.scalars(validations[0])["val/background_only_score"] == floor["score"]
    scores, thin = Figure().subplots(1, 2)
    plots.plot_validation(scores, thin, validations, "score")
    assert f"background everywhere {floor['score']:.4f}" in [line.get_label() for line in scores.get_lines()]


def test_the_per_video_chart_draws_the_score_of_predicting_background_everywhere(monkeypatch, tmp_path):
    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: drawn.append(figure))
    videos = {"video_01": {"mIoU": 0.5, "mNSD": 0.7, "frames": 3}}
    plots.video_scores({"videos": videos, "background_only": {"mIoU": 0.8, "mNSD": 0.9, "score": 0.85}}, tmp_path)
    labels = [line.get_label() for line in drawn[0].axes[0].get_lines()]
    assert labels == ["background everywhere (all videos) mIoU 0.800", "background everywhere (all videos) mNSD 0.900"]


# ----------------------------------------------------------------------------- report.html without repeats (issue 27)


def frame_lists(page: str) -> dict:
    """{(class, list): [video/frame]} of report.html's frame rows."""
    rows = re.findall(r'<div class="frames" data-class="([^"]+)" data-list="([^"]+)">(.*?)</div>', page)
    return {(name, kind): re.findall(r'data-frame="([^"]+)"', cards) for name, kind, cards in rows}


def test_the_report_shows_the_same_frames_once_and_an_absent_class_by_its_false_positives_only(tmp_path):
    data, predictions = tmp_path / "data" / "test" / "video_01" / "segmentation", tmp_path / "pred"
    data.mkdir(parents=True)
    (predictions / "video_01" / "segmentation").mkdir(parents=True)
    for k in range(3):
        truth = np.zeros((64, 96), np.uint8)
        truth[10:30, 10:40], truth[40:60, 10:40] = 1, 3  # tool clasper and tool shaft in every frame
        prediction = truth.copy()
        if k < 2:  # the clasper cut short by 15 px in frames 0 and 60: its lowest IoU and lowest NSD frames
            prediction[10:30, 25:40] = 0
        if k == 2:  # the shaft 3 px low in frame 120: a lower IoU, NSD still 1 (within the 10 px tolerance)
            prediction[40:63, 10:40] = np.where(np.arange(40, 63)[:, None] >= 43, 3, 0)
        if k == 0:  # catheter, in no ground truth, predicted once
            prediction[2:8, 80:90] = 9
        cv2.imwrite(str(data / f"{60 * k:09d}.png"), truth)
        cv2.imwrite(str(predictions / "video_01" / "segmentation" / f"{60 * k:09d}.png"), prediction)
    arguments = ["--data-directory", str(tmp_path / "data"), "--predictions-directory", str(predictions)]
    assert run_inference.main(arguments) == 0
    page = (predictions / "report.html").read_text()
    lists = frame_lists(page)

    assert lists[("tool clasper", "IoU and NSD")] == ["video_01/000000000", "video_01/000000060"]  # shown once
    assert ("tool clasper", "IoU") not in lists and ("tool clasper", "NSD") not in lists
    assert lists[("tool shaft", "IoU")] == ["video_01/000000120"] and "every frame scores NSD 1 on tool shaft" in page
    assert not [kind for name, kind in lists if name == "catheter" and kind != "false positives"]
    assert lists[("catheter", "false positives")] == ["video_01/000000000"]
    assert f"<h3>{report.swatch('catheter')}catheter †</h3>{report.ABSENT_FAILURES}" in page
