"""Issue 6 options: the multi-layer head, full resolution and the ce+dice loss (the ablation grid: test_ablate.py)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import run_inference
import run_training
from conftest import ROOT, background_scores, run_script, training_folders
from dataset import IGNORE_INDEX, NUM_CLASSES
from losses import soft_dice_loss
from model import HeadConfigError, MultiLayerHead, build_model, default_feature_layers
from trained_model import load_trained_model


@pytest.fixture(scope="module")
def release(demo_release, tmp_path_factory):
    """Our own copy: training and inference cache mask statistics in the data directory."""
    return shutil.copytree(demo_release, tmp_path_factory.mktemp("multilayer_release") / "sarrarp")


def training_args(release, backbone, output, *extra):
    return [
        ROOT / "run_training.py",
        *training_folders(release, backbone, output),
        *"--batch-size 4 --num-workers 0 --warmup-steps 1 --log-every 1".split(),
        *extra,
    ]


def records(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def multilayer_run(learnable_release, backbone, tmp_path_factory):
    output = tmp_path_factory.mktemp("multilayer") / "run"
    result = run_script(
        *training_args(
            learnable_release,
            backbone,
            output,
            *"--head multilayer --resolution full --max-steps 100 --val-every 100".split(),
            *"--batch-size 8 --warmup-steps 5 --lr 1e-3 --head-lr 3e-3".split(),
        )
    )
    return result, output


def test_default_feature_layers_are_evenly_spaced_and_end_at_the_last():
    assert default_feature_layers(12) == [3, 6, 9, 12]
    assert default_feature_layers(24) == [6, 12, 18, 24]
    assert default_feature_layers(4) == [1, 2, 3, 4]
    assert default_feature_layers(2) == [1, 2]


@pytest.mark.parametrize("layers", [[4], [1, 3], [1, 2, 3, 4]])
def test_multilayer_logits_have_the_source_size_for_non_square_padded_inputs(backbone, layers):
    torch.manual_seed(0)
    model = build_model(backbone, head={"type": "multilayer", "feature_layers": layers, "width": 64}).eval()
    assert isinstance(model.head, MultiLayerHead) and model.head_config["feature_layers"] == layers
    assert len(model.backbone.get_base_model().model.layer) == max(layers)  # deeper layers are dropped
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)  # 4x6 patches, content 60x90 of a 120x180 source
    with torch.no_grad():
        assert model.head_logits(images.float(), (4, 6)).shape == (2, NUM_CLASSES, 16, 24)  # 1/4 of the input
        assert model(images, output_size=(120, 180), content_size=(60, 90)).shape == (2, NUM_CLASSES, 120, 180)


@pytest.mark.parametrize("training", ["frozen", "lora"])
def test_the_multilayer_head_keeps_only_the_hidden_states_it_reads_with_the_same_logits(backbone, training):
    torch.manual_seed(0)
    head = {"type": "multilayer", "feature_layers": [1, 3], "width": 64}
    model = build_model(backbone, backbone_training=training, head=head).eval()
    captured = []
    model.vit().register_forward_hook(lambda module, inputs, output: captured.append(output.hidden_states))
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8).float()
    with torch.no_grad():
        logits = model.head_logits(images, (4, 6))
        everything = model.backbone(pixel_values=images, output_hidden_states=True).hidden_states  # every layer's
        features = [model.vit().norm(everything[i])[:, model.num_prefix_tokens :].float() for i in (1, 3)]
        expected = model.head(features, (4, 6))
    kept = [i for i, state in enumerate(captured[0]) if state is not None]
    assert kept == [1, 3] and len(everything) == 4  # embeddings and layers 1-3 (layer 4 is dropped: unused)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("layers", [[0], [5], [2, 2]])
def test_a_bad_feature_layer_gives_a_clear_error(backbone, layers):
    with pytest.raises(HeadConfigError, match="give distinct 1-based layer indices from 1 to 4"):
        build_model(backbone, head={"type": "multilayer", "feature_layers": layers})


def test_a_bad_feature_layer_on_the_command_line_is_one_line(release, backbone, tmp_path, capsys):
    arguments = training_args(release, backbone, tmp_path / "run", "--head", "multilayer", "--feature-layers", "2,7")
    assert run_training.main([str(a) for a in arguments[1:]]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # above it: transformers' loading progress
        "error: feature layers [2, 7] do not fit this 4-layer backbone: give distinct 1-based layer indices from 1 to 4"
    )


def test_the_multilayer_head_learns_the_demo_data_and_records_its_settings(multilayer_run, learnable_release):
    result, output = multilayer_run
    assert "head: {'type': 'multilayer', 'feature_layers': [1, 2, 3, 4], 'width': 256}" in result.stdout
    config = json.loads((output / "config.json").read_text())
    assert config["head"] == {"type": "multilayer", "feature_layers": [1, 2, 3, 4], "width": 256}
    assert config["loss"] == {"type": "ce"}
    assert 0 < config["parameters"]["head"] < config["parameters"]["trainable"]
    assert all(r["peak_memory_mb"] > 0 for r in records(output) if "loss" in r)
    validation = [r["val"] for r in records(output) if "val" in r][-1]
    background = background_scores(learnable_release, json.loads((output / "split.json").read_text())["val"])
    assert validation["mIoU"] > background["mIoU"] + 0.05


def test_a_multilayer_checkpoint_reloads_in_run_inference_without_extra_flags(multilayer_run, learnable_release):
    _, output = multilayer_run
    model, config = load_trained_model(output)
    assert isinstance(model.head, MultiLayerHead) and config["head"]["type"] == "multilayer"
    assert (
        run_inference.main(
            [
                "--data-directory",
                str(learnable_release),
                "--model-directory",
                str(output),
                *"--split val --batch-size 4 --num-workers 0".split(),
            ]
        )
        == 0
    )
    scores = json.loads((output / "inference" / "metrics.json").read_text())
    assert scores["frames"] == 6 * len(json.loads((output / "split.json").read_text())["val"])


def test_full_resolution_trains_a_step_with_the_multilayer_head_and_dice(release, backbone, tmp_path):
    output = tmp_path / "full"
    flags = "--resolution full --max-steps 1 --head multilayer --head-width 32 --loss ce+dice --dice-weight 0.5".split()
    arguments = training_args(release, backbone, output, *flags)
    assert run_training.main([str(a) for a in arguments[1:]]) == 0
    config = json.loads((output / "config.json").read_text())
    assert config["resolution"]["content_size"] == [96, 128] and config["resolution"]["padded_size"] == [96, 128]
    assert config["loss"] == {"type": "ce+dice", "dice_weight": 0.5}
    assert [r["step"] for r in records(output) if "loss" in r] == [1]


def logits_of(probabilities):
    """Logits whose softmax is probabilities (B, C, H, W) over classes, up to ~1e-9."""
    return probabilities.clamp_min(1e-12).log()


def test_dice_is_zero_for_a_perfect_prediction_and_ignores_ignored_pixels():
    target = torch.tensor([[[0, 1, 5], [5, 9, IGNORE_INDEX]]])
    logits = 30.0 * F.one_hot(target.clamp(max=NUM_CLASSES - 1), NUM_CLASSES).permute(0, 3, 1, 2).float()
    logits[0, :, 1, 2] = 0.0
    logits[0, 3, 1, 2] = 30.0  # confidently wrong, but on an ignored pixel
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_by_hand():
    # pixel 0: target 1, p1 = 0.75, p2 = 0.25; pixel 1: target 2, p1 = 0.25, p2 = 0.75; pixel 2: ignored.
    # dice_1 = 2 * 0.75 / (0.75 + 0.25 + 1) = 0.75, dice_2 likewise; classes 3..9 are absent from both target
    # and prediction and left out, background is never counted: loss = mean(1 - 0.75, 1 - 0.75) = 0.25.
    probabilities = torch.zeros(1, NUM_CLASSES, 1, 3)
    probabilities[0, 1:3, 0, 0] = torch.tensor([0.75, 0.25])
    probabilities[0, 1:3, 0, 1] = torch.tensor([0.25, 0.75])
    probabilities[0, 4, 0, 2] = 1.0
    target = torch.tensor([[[1, 2, IGNORE_INDEX]]])
    logits = logits_of(probabilities).requires_grad_()
    loss = soft_dice_loss(logits, target)
    assert loss.item() == pytest.approx(0.25, abs=1e-6)
    loss.backward()
    assert logits.grad[0, :, 0, 2].abs().max() == 0  # the ignored pixel gets no gradient


def test_dice_counts_a_class_that_is_only_predicted_and_is_zero_on_background_only():
    probabilities = torch.zeros(1, NUM_CLASSES, 1, 2)
    probabilities[0, 0, 0, 0] = probabilities[0, 7, 0, 1] = 1.0  # class 7 predicted where the truth is background
    target = torch.zeros(1, 1, 2, dtype=torch.long)
    assert soft_dice_loss(logits_of(probabilities), target).item() == pytest.approx(1.0, abs=1e-6)
    background = torch.zeros(1, 1, 2, dtype=torch.long)
    empty = soft_dice_loss(
        logits_of(F.one_hot(background, NUM_CLASSES).permute(0, 3, 1, 2).float()).requires_grad_(), background
    )
    assert empty.item() == 0.0 and empty.requires_grad
