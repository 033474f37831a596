"""Inference entry point: predictions in the official layout, pictures, the official score (and the seed pipeline's own
mIoU beside it), re-scoring, bad input."""

import csv
import json
import shutil
import sys
from html.parser import HTMLParser

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import compare_runs
import dataset
import files
import inference
import plots
import run_inference
from conftest import ROOT, run_script, train_with_own_backbone
from metrics import evaluate_directories, false_positive_pixels, frame_scores, read_label_png, summarize
from trained_model import load_trained_model

INFER = ROOT / "run_inference.py"


@pytest.fixture(scope="module")
def release(demo_release, tmp_path_factory):
    """Our own copy: training and inference cache mask statistics in the data directory."""
    return shutil.copytree(demo_release, tmp_path_factory.mktemp("inference_release") / "sarrarp")


@pytest.fixture(scope="module")
def trained_model(release, tmp_path_factory):
    flags = "--max-steps 4 --batch-size 2 --num-workers 0 --resolution quarter --warmup-steps 1".split()
    return train_with_own_backbone(release, tmp_path_factory.mktemp("inference_model"), *flags)


@pytest.fixture(scope="module")
def test_run(trained_model, release):
    """The plain run: test split, written to MODEL/inference."""
    return run_script(
        INFER,
        "--data-directory",
        release,
        "--model-directory",
        trained_model,
        *"--batch-size 1 --num-workers 0".split(),
    )


@pytest.fixture(scope="module")
def options_run(trained_model, release, tmp_path_factory):
    """--split val with every test-time option, on copies of the model and the data (one unlabelled frame added)."""
    root = tmp_path_factory.mktemp("options")
    model = root / "model"
    shutil.copytree(trained_model, model, ignore=shutil.ignore_patterns("inference"))
    data = root / "sarrarp"
    shutil.copytree(release, data)
    val_video = data / "train" / json.loads((model / "split.json").read_text())["val"][0]
    shutil.copy(val_video / "frames" / "000000060.png", val_video / "frames" / "000000030.png")
    result = run_script(
        INFER,
        "--data-directory",
        data,
        "--model-directory",
        model,
        *"--split val --tta flip --min-component-size 20".split(),
        *"--all-frames --batch-size 4 --num-workers 0".split(),
    )
    return result, model, data


def ground_truth_masks(root):
    return sorted(path.relative_to(root) for path in root.glob("video_*/segmentation/*.png"))


def infer(*args):
    """run_inference's main in this process (what the script runs), saving an interpreter start; returns the exit code."""
    return run_inference.main([str(a) for a in args])


def test_predictions_are_the_models_labels_at_the_source_size_in_the_official_layout(test_run, trained_model, release):
    predictions = trained_model / "inference"
    masks = ground_truth_masks(release / "test")
    assert ground_truth_masks(predictions) == masks  # one per ground-truth mask, same names, nothing else
    for mask in masks:
        labels = read_label_png(predictions / mask)  # 8-bit single-channel class ids 0..9, or it raises
        assert labels.dtype == np.uint8 and labels.shape == dataset.read_mask(release / "test" / mask).shape

    model, config = load_trained_model(trained_model)  # a direct forward pass on one frame
    frame = release / "test" / "video_41" / "frames" / "000000060.png"
    content_h, content_w = config["resolution"]["content_size"]
    padded_h, padded_w = config["resolution"]["padded_size"]
    image = torch.from_numpy(dataset.read_scaled_image(frame, (content_h, content_w), use_cache=False)).permute(2, 0, 1)
    padded = F.pad(image[None], (0, padded_w - content_w, 0, padded_h - content_h))
    with torch.no_grad():
        expected = model(padded, tuple(config["resolution"]["source_size"]), (content_h, content_w)).argmax(1)[0]
    np.testing.assert_array_equal(
        read_label_png(predictions / "video_41" / "segmentation" / frame.name), expected.numpy()
    )


def test_each_ground_truth_frame_gets_a_picture_of_frame_prediction_and_truth(test_run, trained_model, release):
    height, width = dataset.read_mask(release / "test" / "video_41" / "segmentation" / "000000000.png").shape
    expected_height = plots.TITLE_HEIGHT + height + plots.legend_rows(3 * width) * plots.LEGEND_ROW_HEIGHT
    for mask in ground_truth_masks(release / "test"):
        picture = cv2.imread(str(trained_model / "inference" / mask.parent.parent / "visualisations" / mask.name))
        assert picture.shape == (expected_height, 3 * width, 3)
    frame = cv2.imread(str(release / "test" / "video_41" / "frames" / "000000000.png"))
    picture = cv2.imread(str(trained_model / "inference" / "video_41" / "visualisations" / "000000000.png"))
    np.testing.assert_array_equal(picture[plots.TITLE_HEIGHT : plots.TITLE_HEIGHT + height, :width], frame)
    assert "visualisations:" in test_run.stdout


def test_wide_sources_are_pictured_at_half_resolution():
    frame, labels = np.zeros((100, 1400, 3), np.uint8), np.zeros((100, 1400), np.uint8)
    picture = plots.visualisation(frame, labels, labels)
    assert picture.shape == (plots.TITLE_HEIGHT + 50 + plots.LEGEND_ROW_HEIGHT, 3 * 700, 3)


def test_metrics_json_is_the_official_score_of_the_written_predictions(test_run, trained_model, release):
    output = trained_model / "inference"
    metrics = json.loads((output / "metrics.json").read_text())
    expected = evaluate_directories(release / "test", output, workers=1, progress=False)
    assert {key: metrics[key] for key in expected} == expected
    assert metrics["model_directory"] == str(trained_model) and metrics["checkpoint"] == "best"
    assert metrics["data_directory"] == str(release) and metrics["split"] == "test"
    assert metrics["inference"]["tta"] == "none" and metrics["frames"] == 6 and metrics["missing"] == []
    assert set(metrics["videos"]) == {"video_41", "video_42"}

    floor = summarize(
        {
            video: [
                frame_scores(np.zeros_like(truth), truth)
                for truth in (
                    dataset.read_mask(p) for p in sorted((release / "test" / video / "segmentation").glob("*.png"))
                )
            ]
            for video in ("video_41", "video_42")
        }
    )
    assert metrics["background_only"] == {key: floor[key] for key in ("mIoU", "mNSD", "score")}

    with open(output / "per_class.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["class"] for row in rows] == list(dataset.CLASS_NAMES[1:])
    assert float(rows[4]["IoU"]) == pytest.approx(metrics["classes"]["thread"]["IoU"], abs=1e-6)
    assert cv2.imread(str(output / "confusion_matrix.png")) is not None
    for text in ("thread *", "suturing needle *", f"official score {metrics['score']:.4f}", "background everywhere"):
        assert text in test_run.stdout

    assert 0 <= metrics["seed_mIoU"] <= 1 and "not the official score" in metrics["seed_mIoU_note"]
    assert (
        f"baseline mIoU {metrics['seed_mIoU']:.4f} (the DinoV3 x SARRAP baseline's own metric, not the official score; "
        "its published 0.687 is this number)"
    ) in test_run.stdout


def test_eval_only_rescores_the_predictions_without_the_model(test_run, trained_model, release, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained_model, model)
    for weights in model.glob("*/weights.safetensors"):
        weights.unlink()
    (model / "inference" / "metrics.json").unlink()
    result = run_script(INFER, "--eval-only", "--data-directory", release, "--model-directory", model)
    rescored = json.loads((model / "inference" / "metrics.json").read_text())
    original = json.loads((trained_model / "inference" / "metrics.json").read_text())
    assert rescored["score"] == original["score"] and rescored["classes"] == original["classes"]
    assert rescored["seed_mIoU"] == original["seed_mIoU"] and rescored["seed_mIoU_note"] == original["seed_mIoU_note"]
    assert rescored["checkpoint"] == "best"  # from the predictions' record, not from a model
    assert "visualisations:" not in result.stdout


def test_predictions_directory_scores_any_folder_without_a_model(release, tmp_path, capsys):
    perfect = tmp_path / "perfect"
    shutil.copytree(release / "test", perfect, ignore=shutil.ignore_patterns("frames", "*.avi", "*.txt"))
    assert (
        infer(
            "--data-directory",
            release,
            "--model-directory",
            tmp_path / "nothing-here",
            "--predictions-directory",
            perfect,
        )
        == 0
    )
    metrics = json.loads((perfect / "metrics.json").read_text())
    assert metrics["mIoU"] == metrics["mNSD"] == metrics["score"] == metrics["seed_mIoU"] == 1.0
    assert metrics["model_directory"] is None and metrics["inference"] is None
    assert (perfect / "per_class.csv").is_file() and (perfect / "confusion_matrix.png").is_file()
    assert not (tmp_path / "nothing-here").exists()


def test_no_instrument_in_any_frame_writes_a_null_seed_miou(tmp_path, capsys):
    for folder in ("sarrarp/test", "predictions"):
        mask = tmp_path / folder / "video_41" / "segmentation" / "000000000.png"
        mask.parent.mkdir(parents=True)
        cv2.imwrite(str(mask), np.zeros((8, 8), np.uint8))
    assert infer("--data-directory", tmp_path / "sarrarp", "--predictions-directory", tmp_path / "predictions") == 0
    text = (tmp_path / "predictions" / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["seed_mIoU"] is None  # strict JSON: null
    assert json.loads(text)["score"] == 1.0
    assert "baseline mIoU n/a (no frame has an instrument)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda labels: labels[::2, ::2], "size 64x48, ground truth is 128x96"),
        (lambda labels: np.full_like(labels, 12), "value 12 above 9"),
    ],
)
def test_a_bad_prediction_stops_with_one_line_and_no_metrics(release, tmp_path, capsys, damage, message):
    predictions = tmp_path / "predictions"
    shutil.copytree(release / "test", predictions, ignore=shutil.ignore_patterns("frames", "*.avi", "*.txt"))
    bad = predictions / "video_42" / "segmentation" / "000000060.png"
    cv2.imwrite(str(bad), np.ascontiguousarray(damage(read_label_png(bad))))
    assert infer("--data-directory", release, "--predictions-directory", predictions) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {bad}: {message}"  # after the progress bar
    assert not (predictions / "metrics.json").exists()


def test_a_missing_prediction_scores_zero_and_is_listed(release, tmp_path, capsys):
    predictions = tmp_path / "predictions"
    shutil.copytree(release / "test", predictions, ignore=shutil.ignore_patterns("frames", "*.avi", "*.txt"))
    (predictions / "video_42" / "segmentation" / "000000060.png").unlink()
    assert infer("--data-directory", release, "--predictions-directory", predictions) == 0
    metrics = json.loads((predictions / "metrics.json").read_text())
    assert metrics["missing"] == ["video_42/segmentation/000000060.png"]
    assert (
        metrics["videos"]["video_42"]["mIoU"] == pytest.approx(2 / 3) and metrics["videos"]["video_41"]["mIoU"] == 1.0
    )
    assert (
        "1 ground-truth masks have no prediction and score 0: video_42/segmentation/000000060.png"
        in capsys.readouterr().err
    )


def test_a_directory_that_is_not_a_model_is_one_clear_line(release, tmp_path, capsys):
    assert infer("--data-directory", release, "--model-directory", tmp_path) == 1
    assert capsys.readouterr().err == (
        f"error: {tmp_path} is not a trained model directory (it has no config.json): "
        "pass the --output-directory of run_training.py\n"
    )
    assert list(tmp_path.iterdir()) == []  # nothing written into it


def test_a_model_without_the_chosen_weights_is_one_clear_line(trained_model, release, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(trained_model, model, ignore=shutil.ignore_patterns("inference", "best"))
    assert infer("--data-directory", release, "--model-directory", model) == 1
    assert capsys.readouterr().err.startswith(f"error: {model} has no best weights")
    assert not (model / "inference").exists()


def test_no_data_points_at_data_preparation_and_the_demo(trained_model, tmp_path, capsys):
    assert infer("--data-directory", tmp_path / "sarrarp", "--model-directory", trained_model) == 1
    assert capsys.readouterr().err == (
        f"error: no test videos in {tmp_path / 'sarrarp' / 'test'}: see 'Data preparation' in README.md, "
        "or try the built-in demo first: bash scripts/demo.sh\n"
    )


def test_split_val_predicts_and_scores_exactly_the_validation_videos(options_run):
    result, model, data = options_run
    val_videos = json.loads((model / "split.json").read_text())["val"]
    metrics = json.loads((model / "inference" / "metrics.json").read_text())
    assert list(metrics["videos"]) == sorted(val_videos) and metrics["split"] == "val"
    assert sorted(p.name for p in (model / "inference").glob("video_*")) == sorted(val_videos)
    assert metrics["frames"] == sum(len(list((data / "train" / v / "segmentation").glob("*.png"))) for v in val_videos)


def test_test_time_options_run_and_all_frames_adds_the_unlabelled_ones(options_run):
    result, model, data = options_run
    metrics = json.loads((model / "inference" / "metrics.json").read_text())
    backbone = json.loads((model / "config.json").read_text())["backbone"]
    assert metrics["inference"] == {
        "backbone": backbone,
        "split": "val",
        "tta": "flip",
        "tta_scales": [1.0],
        "min_component_size": 20,
        "all_frames": True,
        "precision": "fp32",
        "members": [
            {
                "model_directory": str(model),
                "backbone": backbone,
                "head": "mlp",
                "resolution": "quarter",
                "weights": files.sampled_digest(model / "best" / "weights.safetensors"),  # which weights made them
            }
        ],
    }
    video = json.loads((model / "split.json").read_text())["val"][0]
    names = sorted(p.name for p in (data / "train" / video / "frames").glob("*.png"))
    assert "000000030.png" in names
    predictions = model / "inference" / video
    assert sorted(p.name for p in (predictions / "segmentation").glob("*.png")) == names
    source = dataset.read_mask(data / "train" / video / "segmentation" / "000000000.png").shape
    assert all(read_label_png(p).shape == source for p in (predictions / "segmentation").glob("*.png"))
    assert not (predictions / "visualisations" / "000000030.png").exists()  # pictures only where there is truth


def test_small_components_take_the_label_around_them():
    labels = np.zeros((40, 40), np.uint8)
    labels[5:25, 5:25] = 3  # a tool shaft, kept
    labels[10:12, 10:12] = 5  # a 4-pixel thread blob inside it -> shaft
    labels[30:32, 30:33] = 4  # a 6-pixel needle blob on background -> background
    labels[30:40, 0:3] = 5  # a 30-pixel thread touching the image border, kept
    labels[0, 39] = 9  # a 1-pixel catheter blob in the corner -> background
    cleaned = inference.remove_small_components(labels, min_size=10)
    expected = labels.copy()
    expected[10:12, 10:12] = 3
    expected[30:32, 30:33] = 0
    expected[0, 39] = 0
    np.testing.assert_array_equal(cleaned, expected)
    np.testing.assert_array_equal(inference.remove_small_components(labels, min_size=0), labels)


# ----------------------------------------------------------------------------- the error-analysis report


class Page(HTMLParser):
    """What a test reads of report.html: its text, its links, and its frame lists {(class, list): [video/frame]}."""

    def __init__(self, text):
        super().__init__()
        self.text, self.links, self.lists, self.current = [], [], {}, None
        self.feed(text)

    def handle_starttag(self, tag, attributes):
        attributes = dict(attributes)
        self.links += [attributes[key] for key in ("href", "src") if key in attributes]
        if "data-list" in attributes:
            self.current = self.lists.setdefault((attributes["data-class"], attributes["data-list"]), [])
        if "data-frame" in attributes:
            self.current.append(attributes["data-frame"])

    def handle_data(self, data):
        self.text.append(data)


def per_frame_rows(directory):
    with open(directory / "per_frame.csv") as f:
        return list(csv.DictReader(f))


def test_per_frame_scores_average_frame_video_dataset_back_to_metrics_json(test_run, trained_model):
    output = trained_model / "inference"
    metrics, rows = json.loads((output / "metrics.json").read_text()), per_frame_rows(output)
    assert len(rows) == metrics["frames"] and {row["video"] for row in rows} == set(metrics["videos"])
    for name, scores in metrics["classes"].items():
        for metric in ("IoU", "NSD"):
            per_video = [
                np.mean([float(r[f"{metric} {name}"]) for r in rows if r["video"] == video])
                for video in metrics["videos"]
            ]
            assert np.mean(per_video) == scores[metric], (name, metric)
    for video, scores in metrics["videos"].items():
        frames = [r for r in rows if r["video"] == video]
        assert len(frames) == scores["frames"]
        assert np.mean([np.mean([float(r[f"IoU {n}"]) for r in frames]) for n in metrics["classes"]]) == pytest.approx(
            scores["mIoU"], abs=1e-12
        )


def test_the_report_lists_every_class_and_links_only_to_files_that_exist(test_run, trained_model):
    output = trained_model / "inference"
    page = Page((output / "report.html").read_text())
    text = " ".join(page.text)
    assert all(name in text for name in dataset.CLASS_NAMES[1:])
    assert f"{json.loads((output / 'metrics.json').read_text())['score']:.4f}" in text
    assert page.links and not any("://" in link for link in page.links)  # relative: nothing from the network
    assert all((output / link).is_file() for link in page.links), [
        link for link in page.links if not (output / link).is_file()
    ]
    assert {"confusion_matrix.png", "per_class_scores.png", "per_video_scores.png", "per_frame.csv"} <= set(page.links)
    assert "<script" not in (output / "report.html").read_text()
    assert "report.html" in test_run.stdout


def test_the_reports_worst_frames_are_those_of_per_frame_csv(test_run, trained_model):
    output = trained_model / "inference"
    rows, page = per_frame_rows(output), Page((output / "report.html").read_text())
    classes = json.loads((output / "metrics.json").read_text())["classes"]
    for name in dataset.CLASS_NAMES[1:]:
        worst = {}
        for metric in ("IoU", "NSD"):
            failing = [r for r in rows if float(r[f"{metric} {name}"]) < 1]
            lowest = sorted(failing, key=lambda r: (float(r[f"{metric} {name}"]), r["video"], r["frame"]))[:4]
            worst[metric] = [f"{r['video']}/{r['frame']}" for r in lowest]
        if classes[name]["ground_truth_frames"] == 0:  # it fails by its false positives only, listed below
            expected = {}
        elif set(worst["IoU"]) == set(worst["NSD"]):  # the same frames are shown once
            expected = {"IoU and NSD": worst["IoU"]} if worst["IoU"] else {}
        else:
            expected = {metric: frames for metric, frames in worst.items() if frames}
        shown = {kind: frames for (c, kind), frames in page.lists.items() if c == name and kind != "false positives"}
        assert shown == expected, name
        wrong = [r for r in rows if int(r[f"false positive pixels {name}"]) > 0]
        most = sorted(wrong, key=lambda r: (-int(r[f"false positive pixels {name}"]), r["video"], r["frame"]))[:4]
        assert page.lists.get((name, "false positives"), []) == [f"{r['video']}/{r['frame']}" for r in most], name
    assert any(page.lists.values())  # an untrained model fails somewhere


def test_a_false_positive_is_a_class_predicted_where_the_ground_truth_has_none():
    confusion = np.zeros((dataset.NUM_CLASSES, dataset.NUM_CLASSES), np.int64)
    confusion[0, 5] = 30  # 30 background pixels predicted as thread, no thread in the ground truth
    confusion[3, 3] = 100  # shaft, right
    confusion[3, 4] = 7  # shaft predicted as needle, no needle in the ground truth
    confusion[2, 1] = 9  # wrist predicted as clasper, but the ground truth has clasper pixels too
    confusion[1, 1] = 1
    assert false_positive_pixels(confusion).tolist() == [0, 0, 0, 7, 30, 0, 0, 0, 0]


def test_the_report_renders_in_headless_chromium(test_run, trained_model, tmp_path):
    if not any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")):
        pytest.skip("no Chromium installed (apt-get install chromium)")
    screenshot = tmp_path / "report.png"
    run_script(
        "bash",
        ROOT / "scripts" / "screenshot_report.sh",
        trained_model / "inference" / "report.html",
        screenshot,
        "1200,1600",
    )
    picture = cv2.imread(str(screenshot))
    assert picture.shape == (1600, 1200, 3) and picture.std() > 10  # a page with content, not a blank or error page


def test_the_python_api_of_docs_inference_md_runs_in_a_fresh_interpreter(test_run, trained_model, release, tmp_path):
    """The documented notebook calls, run as written from a folder holding trained-models/ and sarrarp/: the frame's
    labels are the script's prediction, and the score is metrics.json's."""
    text = (ROOT / "docs" / "inference.md").read_text()
    snippet = text.split("## From Python (a notebook)")[1].split("```python\n")[1].split("```")[0]
    snippet = snippet.replace("/path/to/clone", str(ROOT))
    snippet += (
        "import json\n"
        "np.save('labels.npy', labels); np.save('batch.npy', batch)\n"
        "json.dump(scores['score'], open('score.json', 'w'))\n"
    )
    (tmp_path / "trained-models").symlink_to(trained_model)
    (tmp_path / "sarrarp").symlink_to(release)
    result = run_script(sys.executable, "-c", snippet, cwd=tmp_path)
    assert "tool clasper" in result.stdout
    labels, batch = np.load(tmp_path / "labels.npy"), np.load(tmp_path / "batch.npy")
    predicted = read_label_png(trained_model / "inference" / "video_41" / "segmentation" / "000000060.png")
    np.testing.assert_array_equal(labels, predicted)
    assert batch.shape == (2, *labels.shape) and batch.dtype == np.uint8
    written = json.loads((trained_model / "inference" / "metrics.json").read_text())["score"]
    assert json.loads((tmp_path / "score.json").read_text()) == pytest.approx(written, abs=1e-9)


def test_compare_runs_reads_what_run_inference_wrote_and_finds_a_run_equal_to_itself(test_run, trained_model, tmp_path):
    output = tmp_path / "comparison"
    assert compare_runs.main([str(trained_model), str(trained_model / "inference"), "--output", str(output)]) == 0
    compared = json.loads((output / "compare.json").read_text())["compared"][0]["metrics"]
    written = json.loads((trained_model / "inference" / "metrics.json").read_text())
    assert compared["score"]["run"] == pytest.approx(written["score"], abs=1e-9)  # per_frame.csv averages to it
    assert compared["score"]["difference"] == 0 and compared["score"]["interval"] == [0, 0]
