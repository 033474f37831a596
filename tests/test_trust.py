"""Trust every result (issue 21): settings mean what they say, inputs are checked before work starts, and every fault is
one line. Each test is a case a careful or a careless user meets; each failed on the main of before."""

import contextlib
import errno
import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import imageio_ffmpeg
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import backbone_files
import cross_validate
import files
import inference
import memory
import model as model_module
import report
import run_directory
import run_inference
import run_training
import test_backbone_files
import video
from conftest import ROOT, decode_all, resumable_state, training_folders
from make_tiny_backbone import save_tiny_backbone
from test_reliability import one_line_error, train_in_process

sys.path.insert(0, str(ROOT / "benchmarks"))
import ablate  # noqa: E402

INFER = ROOT / "run_inference.py"


@pytest.fixture(scope="module")
def release(demo_release, tmp_path_factory):
    """Our own copy of the demo release (training caches mask statistics in it)."""
    return shutil.copytree(demo_release, tmp_path_factory.mktemp("trust") / "sarrarp")


@pytest.fixture(scope="module")
def trained(release, backbone, tmp_path_factory):
    """A finished 2-step run. Copy it to change it."""
    output = tmp_path_factory.mktemp("trained") / "run"
    assert train_in_process(release, backbone, output, "--max-steps", "2") == 0
    return output


def recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def refused(capsys, *argv) -> str:
    """run_training.py's one-line refusal (exit code 2) of these arguments."""
    with pytest.raises(SystemExit) as exit_code:
        run_training.parse_args([str(a) for a in argv])
    assert exit_code.value.code == 2
    return one_line_error(capsys.readouterr().err)


# ----------------------------------------------------------------------------- 4. settings mean what they say


def test_the_command_line_overrides_the_recipe_aliases_included(tmp_path):
    low = recipe(tmp_path, "low_res: true\nmax_steps: 50\n")
    args = run_training.parse_args(["--config", str(low), "--resolution", "half", "--epochs", "3"])
    assert (args.resolution, args.max_steps, args.epochs) == ("half", None, 3)
    quarter = recipe(tmp_path, "resolution: full\nepochs: 4\n")
    args = run_training.parse_args(["--config", str(quarter), "--low-res", "--max-steps", "7"])
    assert (args.resolution, args.max_steps) == ("quarter", 7)


def test_a_switch_in_a_recipe_takes_true_or_false_and_every_switch_can_be_turned_off(tmp_path, capsys):
    quoted = recipe(tmp_path, 'cache_frames: "false"\n')
    assert "cache_frames is a switch: write true or false, not 'false'" in refused(capsys, "--config", quoted)
    on = recipe(tmp_path, "cache_frames: true\ngradient_checkpointing: true\n")
    args = run_training.parse_args(["--config", str(on), "--no-cache-frames"])
    assert (args.cache_frames, args.gradient_checkpointing) == (False, True)


def test_a_mutual_exclusion_says_which_side_came_from_the_recipe(tmp_path, capsys):
    folds = recipe(tmp_path, "folds: 2\nfold: 0\n")
    line = refused(capsys, "--config", folds, "--val-videos", "video_01")
    assert f"--val-videos and --folds (from --config {folds}) both choose the validation videos" in line


def test_a_zero_backbone_learning_rate_trains_the_backbone_at_zero(backbone):
    model = model_module.build_model(str(backbone), backbone_training="full")
    args = run_training.parse_args(["--backbone-training", "full", "--backbone-lr", "0", "--lr", "1e-3"])
    groups = run_training.parameter_groups(model, args)
    assert groups[0]["lr"] == args.head_lr and all(group["lr"] == 0 for group in groups[1:])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--layer-decay", "0.5"], "--layer-decay applies to --backbone-training full"),
        (["--backbone-training", "frozen", "--lora-rank", "8"], "--lora-rank applies to --backbone-training lora"),
        (["--head", "multilayer", "--head-hidden", "64"], "--head-hidden applies to --head mlp and patch-mlp"),
        (["--dice-weight", "2"], "--dice-weight applies to --loss ce+dice"),
        (["--val-videos", "video_01", "--val-fraction", "0.3"], "--val-fraction applies to a random split"),
    ],
)
def test_an_option_that_has_no_effect_in_the_chosen_mode_is_refused(arguments, message, capsys):
    assert message in refused(capsys, *arguments)


def test_a_recipe_setting_that_the_mode_does_not_use_is_dropped_with_a_note_not_recorded(tmp_path, capsys):
    seed_like = recipe(tmp_path, "lora_rank: 8\nhead_hidden: 2560\n")
    args = run_training.parse_args(
        ["--config", str(seed_like), "--backbone-training", "frozen", "--head", "multilayer"]
    )
    assert (args.lora_rank, args.head_hidden) == (16, None)  # the defaults: config.json records what was used
    notes = capsys.readouterr().err
    assert f"note: --lora-rank (from --config {seed_like}) applies to --backbone-training lora: not used" in notes


def test_every_lora_target_must_name_a_layer_of_the_backbone(release, backbone, tmp_path, capsys):
    for targets, named in ((["q_proj", "qproj"], "qproj"), (["nothing"], "nothing")):
        output = tmp_path / targets[-1]
        assert train_in_process(release, backbone, output, "--max-steps", "1", "--lora-targets", *targets) == 1
        line = one_line_error(capsys.readouterr().err)
        assert f"LoRA targets {named} name no linear layer of the backbone: choose from" in line and "q_proj" in line
        assert not output.exists()  # refused before anything was written


def test_a_recipe_with_yaml_aliases_is_refused_before_it_can_expand(tmp_path, capsys):
    laughs = recipe(tmp_path, 'a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n')
    assert "aliases (*name) are not allowed in a settings file" in refused(capsys, "--config", laughs)


# ----------------------------------------------------------------------------- 5. inputs are checked before work starts


@pytest.mark.parametrize(
    "arguments",
    [
        ["--lr", "inf"],
        ["--lr", "nan"],
        ["--image-mean", "0.5", "nan", "0.5", "--image-std", "0.2", "0.2", "0.2"],
        ["--image-mean", "0.5", "0.5", "0.5", "--image-std", "0.2", "0.2", "inf"],
    ],
)
def test_nan_and_infinite_values_are_refused_when_parsed(arguments, capsys):
    assert "is not a finite number" in refused(capsys, *arguments)


def test_an_infinite_value_in_a_recipe_is_refused(tmp_path, capsys):
    assert "is not a finite number" in refused(capsys, "--config", recipe(tmp_path, "lr: .inf\n"))


@pytest.mark.parametrize("scale", ["1e-9", "400"])
def test_test_time_scales_have_sane_bounds(scale, capsys):
    with pytest.raises(SystemExit):
        run_inference.parse_args(["--tta-scales", "1", scale])
    assert "--tta-scales must be from 0.1 to 4.0 times the training resolution" in capsys.readouterr().err


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--eval-only", "--tta", "flip"], "--tta applies to predicting (not --eval-only"),
        (["--every", "10"], "--every applies to --input VIDEO"),
        (["--input", "x.mp4", "--all-frames"], "--all-frames applies to the release's videos"),
    ],
)
def test_an_inference_option_that_has_no_effect_is_refused(arguments, message, capsys):
    with pytest.raises(SystemExit):
        run_inference.parse_args(arguments)
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- 6. one line, never a traceback


def test_an_edited_head_or_lora_setting_in_config_json_is_one_line(release, trained, tmp_path, capsys):
    for key, value in (("head", {"type": "mlp", "hidden": 64}), ("lora", {"rank": 4})):
        model = shutil.copytree(trained, tmp_path / key)
        config = json.loads((model / "config.json").read_text())
        config[key] = {**config[key], **value}
        (model / "config.json").write_text(json.dumps(config))
        assert run_inference.main(["--data-directory", str(release), "--model-directory", str(model)]) == 1
        line = one_line_error(capsys.readouterr().err)
        assert "does not match this model" in line and "differ in shape" in line
        assert not (model / "inference").exists()


@pytest.mark.parametrize(
    "raised, said",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out of GPU memory"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"), "out of main memory"),
        (RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. "), "a data loader worker died"),
    ],
)
def test_memory_that_runs_out_during_inference_is_one_line(release, trained, monkeypatch, capsys, raised, said):
    def out_of_memory(*args, **kwargs):
        raise raised

    monkeypatch.setattr(model_module.SegmentationModel, "forward", out_of_memory)
    assert run_inference.main(["--data-directory", str(release), "--model-directory", str(trained)]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: {said}") and line.endswith("then run it again")


def test_ctrl_c_in_training_is_one_line_and_the_run_resumes(release, backbone, tmp_path, monkeypatch, capsys):
    output, real_step, steps = tmp_path / "run", run_training.train_step, []

    def interrupted_at_step_3(training, batches, step):
        steps.append(step)
        if step == 3:
            raise KeyboardInterrupt
        return real_step(training, batches, step)

    monkeypatch.setattr(run_training, "train_step", interrupted_at_step_3)
    arguments = ("--max-steps", "4", "--checkpoint-every", "1")
    assert train_in_process(release, backbone, output, *arguments) == 130
    line = one_line_error(capsys.readouterr().err)
    assert line == "error: interrupted, with nothing half-written under a final name: continue with --resume to go on"
    assert not list(output.glob(".*.partial")) and not list((output / "last").glob(".*.partial"))
    monkeypatch.undo()
    assert train_in_process(release, backbone, output, *arguments, "--resume") == 0
    assert torch.load(output / "checkpoint.pt", weights_only=True)["step"] == 4


def test_ctrl_c_in_inference_is_one_line(release, trained, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_module.SegmentationModel, "forward", interrupted)
    output = tmp_path / "predictions"
    arguments = ["--data-directory", str(release), "--model-directory", str(trained), "--output", str(output)]
    assert run_inference.main(arguments) == 130
    assert one_line_error(capsys.readouterr().err).startswith("error: interrupted")


def test_a_full_disk_is_named_as_such_even_in_torch_s_words(tmp_path, monkeypatch):
    def torch_on_a_full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 320 vs 256")

    monkeypatch.setattr(torch, "save", torch_on_a_full_disk)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=0))
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    parts = (model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))
    with pytest.raises(run_directory.SaveError, match=r"checkpoint.pt \(no space left on device\)"):
        run_directory.save_checkpoint(tmp_path / "checkpoint.pt", *resumable_state(*parts, {"step": 1}))


def test_a_full_disk_during_inference_names_the_file(release, trained, tmp_path, monkeypatch, capsys):
    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.Path, "write_bytes", full)
    output = tmp_path / "predictions"
    arguments = ["--data-directory", str(release), "--model-directory", str(trained), "--output", str(output)]
    assert run_inference.main(arguments) == 1
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: could not write {output}") and line.endswith("(no space left on device)")


def test_report_links_are_url_encoded(tmp_path):
    frame = {"video": "video_01", "frame": "a#1?%", "IoU": [0.5] * 9, "NSD": [0.5] * 9, "false_positives": [0] * 9}
    picture = tmp_path / "video_01" / "visualisations" / "a#1?%.png"
    picture.parent.mkdir(parents=True)
    picture.write_bytes(b"png")
    card = report.frame_card(frame, "caption", tmp_path)
    assert (
        'href="video_01/visualisations/a%231%3F%25.png"' in card
        and 'src="video_01/visualisations/a%231%3F%25.png"' in card
    )


# ----------------------------------------------------------------------------- 1. nothing of the user's is deleted


def infer(*argv) -> int:
    return run_inference.main([str(a) for a in argv])


def test_predicting_into_the_ground_truth_is_refused_before_anything_is_written(release, trained, capsys):
    test = release / "test"
    before = {p: p.read_bytes() for p in test.rglob("segmentation/*.png")}
    assert infer("--data-directory", release, "--model-directory", trained, "--output", test) == 1
    line = one_line_error(capsys.readouterr().err)
    assert f"{test} is the ground truth" in line and "choose an output folder apart from the inputs" in line
    assert {p: p.read_bytes() for p in test.rglob("segmentation/*.png")} == before
    assert not list(test.glob(".*")) and not (test / "metrics.json").exists()


@pytest.fixture
def images(release, tmp_path):
    """A folder of two frames of the release, as a user's folder of images."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, frame in zip(
        ("first.png", "second.png"), sorted((release / "test" / "video_41" / "frames").glob("*.png"))
    ):
        shutil.copy(frame, folder / name)
    return folder


def test_an_output_folder_holding_or_inside_the_input_is_refused_and_the_input_kept(trained, images, capsys):
    kept = {p: p.read_bytes() for p in images.iterdir()}
    assert infer("--model-directory", trained, "--input", images, "--output", images.parent) == 1
    assert "holds the --input" in one_line_error(capsys.readouterr().err)
    assert infer("--model-directory", trained, "--input", images, "--output", images / "out") == 1
    assert "lies inside the --input" in one_line_error(capsys.readouterr().err)
    assert {p: p.read_bytes() for p in images.iterdir()} == kept


def test_files_the_user_put_in_an_output_folder_are_never_removed_or_replaced(trained, images, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "mine.png").write_bytes(b"the user's")
    assert infer("--model-directory", trained, "--input", images, "--output", out) == 0
    assert (out / "masks" / "mine.png").read_bytes() == b"the user's"  # left alone: not ours, not in the way
    assert sorted(p.name for p in (out / "masks").glob("*.png")) == ["first.png", "mine.png", "second.png"]
    (out / "overlays" / "first.jpg").unlink()
    (out / "overlays" / "first.jpg").write_bytes(b"the user's overlay")  # now in the way of the next run
    assert infer("--model-directory", trained, "--input", images, "--output", out) == 1
    line = one_line_error(capsys.readouterr().err)
    assert f"{out / 'overlays' / 'first.jpg'} exists and was not written by run_inference.py" in line
    assert (out / "overlays" / "first.jpg").read_bytes() == b"the user's overlay"


def test_a_run_that_fails_half_way_leaves_the_earlier_outputs_as_they_were(trained, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert infer("--model-directory", trained, "--input", images, "--output", out) == 0
    earlier = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")}
    (images / "second.png").write_bytes(b"not an image any more")
    assert infer("--model-directory", trained, "--input", images, "--output", out) == 1
    assert "second.png: unreadable image" in one_line_error(capsys.readouterr().err)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.name.startswith(".")} == earlier


def test_two_inference_runs_into_one_output_are_refused(release, trained, tmp_path, capsys):
    out = tmp_path / "predictions"
    out.mkdir()
    held = files.lock_file(out / ".lock")  # as a running inference holds it
    try:
        assert infer("--data-directory", release, "--model-directory", trained, "--output", out) == 1
    finally:
        held.close()
    assert "another run_inference.py run (pid" in one_line_error(capsys.readouterr().err)
    assert infer("--data-directory", release, "--model-directory", trained, "--output", out) == 0


def test_training_into_the_training_data_is_refused(release, backbone, capsys):
    inside = release / "train" / "models"
    assert train_in_process(release, backbone, inside, "--max-steps", "1") == 1
    assert "lies inside the training data" in one_line_error(capsys.readouterr().err)
    assert not inside.exists()


# ----------------------------------------------------------------------------- 3. the video path is exact or says not


def test_two_images_that_share_a_name_are_refused_before_anything_is_written(trained, images, tmp_path, capsys):
    shutil.copy(images / "first.png", images / "first.jpg")
    out = tmp_path / "out"
    assert infer("--model-directory", trained, "--input", images, "--output", out) == 1
    line = one_line_error(capsys.readouterr().err)
    assert f"{images / 'first.jpg'} and {images / 'first.png'} share a name, and would share a mask" in line
    assert not (out / "masks").exists()


def test_a_video_that_decodes_to_fewer_frames_than_its_container_says_is_refused(release, trained, tmp_path, capsys):
    damaged = tmp_path / "damaged.avi"
    data = bytearray((release / "train" / "video_01" / "video_left.avi").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4000] = bytes(4000)  # zeroed packets: the decoder drops frames
    damaged.write_bytes(bytes(data))
    out = tmp_path / "out"
    assert infer("--model-directory", trained, "--input", damaged, "--output", out, "--save-masks") == 1
    line = one_line_error(capsys.readouterr().err)
    assert f"{damaged} decodes to 176 frames but its container says 180: it is damaged or truncated" in line
    assert not out.exists()  # no overlay, no misnumbered mask


def test_a_truncated_video_is_refused_too(release, trained, tmp_path, capsys):
    truncated = tmp_path / "truncated.avi"
    data = (release / "train" / "video_01" / "video_left.avi").read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    assert infer("--model-directory", trained, "--input", truncated, "--output", tmp_path / "out") == 1
    assert "but its container says 180: it is damaged or truncated" in one_line_error(capsys.readouterr().err)


def test_an_odd_sized_video_is_padded_not_rescaled_and_says_so(trained, tmp_path, capsys):
    odd = tmp_path / "odd.mkv"  # lossless FFV1 keeps the odd size (OpenCV's own writers round it)
    writer = imageio_ffmpeg.write_frames(
        str(odd), (129, 73), fps=10, codec="ffv1", macro_block_size=1, pix_fmt_out="bgr0", ffmpeg_log_level="error"
    )
    writer.send(None)
    for i in range(5):
        writer.send(np.full((73, 129, 3), 40 * i, np.uint8))
    writer.close()
    out = tmp_path / "out"
    assert infer("--model-directory", trained, "--input", odd, "--output", out) == 0
    assert "(5 frames at 10 fps, 129x73, padded to 130x74 for H.264)" in capsys.readouterr().out
    overlay = decode_all(out / "overlay.mp4")
    assert len(overlay) == 5 and overlay[0].shape == (74, 130, 3)
    assert np.abs(overlay[2][-1].astype(int)).max() < 40 and np.abs(overlay[2][:, -1].astype(int)).max() < 40  # black


# ----------------------------------------------------------------------------- 2. every result tied to what made it


def test_a_backbone_replaced_after_training_is_refused_at_inference(release, tmp_path, capsys):
    backbone = tmp_path / "tiny-dinov3"
    save_tiny_backbone(backbone)
    output = tmp_path / "run"
    assert train_in_process(release, backbone, output, "--max-steps", "1") == 0
    save_tiny_backbone(backbone, seed=1)  # another backbone under the same name
    capsys.readouterr()
    assert infer("--data-directory", release, "--model-directory", output) == 1
    line = one_line_error(capsys.readouterr().err)
    assert f"the backbone {backbone} is not the one {output} was trained with" in line
    assert not (output / "inference").exists()


def test_re_scoring_refuses_predictions_that_other_weights_made(release, trained, tmp_path, capsys):
    model = shutil.copytree(trained, tmp_path / "run")
    assert infer("--data-directory", release, "--model-directory", model) == 0
    weights = model / "best" / "weights.safetensors"
    tensors = load_file(weights)
    save_file({name: tensor + 1 for name, tensor in tensors.items()}, weights)  # trained again since
    assert infer("--data-directory", release, "--model-directory", model, "--eval-only") == 1
    line = one_line_error(capsys.readouterr().err)
    assert f"were made with other weights than {weights} holds now" in line and "without --eval-only" in line


def test_resume_refuses_replaced_frames(release, backbone, tmp_path, monkeypatch, capsys):
    data = shutil.copytree(release, tmp_path / "sarrarp")
    output, real_step = tmp_path / "run", run_training.train_step

    def interrupted_at_step_2(training, batches, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_step(training, batches, step)

    monkeypatch.setattr(run_training, "train_step", interrupted_at_step_2)
    assert train_in_process(data, backbone, output, "--max-steps", "3", "--checkpoint-every", "1") == 130
    monkeypatch.undo()
    first, second = sorted((data / "train" / "video_01" / "frames").glob("*.png"))[:2]
    swapped = first.read_bytes()
    first.write_bytes(second.read_bytes())
    second.write_bytes(swapped)
    capsys.readouterr()
    assert train_in_process(data, backbone, output, "--max-steps", "3", "--resume") == 1
    assert "--resume refused: the frames differ (replaced or swapped)" in one_line_error(capsys.readouterr().err)


@pytest.fixture(scope="module")
def folds(release, backbone, tmp_path_factory):
    """Two cross-validation runs of two 2-step folds, at two learning rates."""
    root = tmp_path_factory.mktemp("folds")
    for lr in ("1e-3", "2e-3"):
        training = [*"--resolution quarter --batch-size 2 --num-workers 0 --warmup-steps 1 --max-steps 2".split()]
        arguments = ["train", "--folds", "2", "--output-directory", str(root / lr), "--", "--lr", lr, *training]
        assert cross_validate.main([*arguments, "--data-directory", str(release), "--backbone", str(backbone)]) == 0
    return root


def test_the_fold_runner_refuses_folds_trained_with_other_settings(release, backbone, folds, capsys):
    training = [*"--resolution quarter --batch-size 2 --num-workers 0 --warmup-steps 1 --max-steps 2".split()]
    arguments = ["train", "--folds", "2", "--output-directory", str(folds / "1e-3"), "--", "--lr", "5e-3", *training]
    assert cross_validate.main([*arguments, "--data-directory", str(release), "--backbone", str(backbone)]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert f"{folds / '1e-3' / 'fold_0'} was trained with other settings (--lr 0.001 -> 0.005)" in line


def test_scoring_refuses_folds_of_two_runs_and_an_unfinished_fold(release, folds, tmp_path, capsys):
    mixed = ["score", str(folds / "1e-3" / "fold_0"), str(folds / "2e-3" / "fold_1"), "--data-directory", str(release)]
    assert cross_validate.main([*mixed, "--output", str(tmp_path / "mixed")]) == 1
    assert "were trained with other settings (--lr 0.001 vs 0.002)" in one_line_error(capsys.readouterr().err)
    unfinished = shutil.copytree(folds / "2e-3", tmp_path / "unfinished")
    checkpoint = run_directory.load_checkpoint(unfinished / "fold_1" / "checkpoint.pt")
    parts = checkpoint_parts()
    state = {**checkpoint, "finished": False}
    run_directory.save_checkpoint(unfinished / "fold_1" / "checkpoint.pt", *resumable_state(*parts, state))
    score = ["score", str(unfinished / "fold_0"), str(unfinished / "fold_1"), "--data-directory", str(release)]
    assert cross_validate.main(score) == 1
    assert f"{unfinished / 'fold_1'} has not finished training" in one_line_error(capsys.readouterr().err)


def checkpoint_parts():
    """A model, optimizer, schedule and scaler whose state a checkpoint is written from."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    return (
        model,
        optimizer,
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        torch.amp.GradScaler("cpu", enabled=False),
    )


def test_ablate_reuses_nothing_once_the_recipe_file_changes(tmp_path):
    recipe_file = recipe(tmp_path, "lr: 1.0e-4\n")
    argv = ["--data-directory", str(tmp_path / "data"), "--output-directory", str(tmp_path / "ablation")]
    args = ablate.parse_args([*argv, "--recipe", str(recipe_file), *"--heads mlp --losses ce".split()])
    config = ablate.expand_grid(args.backbones, ["lora"], ["16"], ["mlp"], ["ce"], ["half"])[0]
    run = tmp_path / "ablation" / ablate.configuration_name(config)
    run.mkdir(parents=True)
    files.write_json_atomically(run / ablate.SETTINGS_FILE, ablate.run_settings(args, config, run))
    recipe_file.write_text("lr: 3.0e-4\n")  # the same path, other contents
    assert ablate.settings_change(run, ablate.run_settings(args, config, run)) == "--lr 0.0001 -> 0.0003"


# ----------------------------------------------------------------------------- 5. more inputs checked first


def test_test_videos_are_found_once_the_same_way_for_prediction_and_scoring(release, trained, tmp_path):
    data = shutil.copytree(release, tmp_path / "sarrarp")
    (data / "test" / "nested").mkdir()
    (data / "test" / "video_41").rename(data / "test" / "nested" / "video_41")  # one level down: a video
    shutil.copytree(data / "test" / "video_42", data / "test" / "copy of 42")  # not named video_*: not a video
    out = tmp_path / "predictions"
    assert infer("--data-directory", data, "--model-directory", trained, "--output", out) == 0
    assert sorted(json.loads((out / "metrics.json").read_text())["videos"]) == ["video_41", "video_42"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")) == [
        "video_41",
        "video_42",
    ]


def test_a_config_json_with_a_resolution_scale_out_of_range_is_one_line(release, trained, tmp_path, capsys):
    for scale in (0, -0.5, 3):
        model = shutil.copytree(trained, tmp_path / f"scale{scale}")
        config = json.loads((model / "config.json").read_text())
        config["resolution"]["scale"] = scale
        (model / "config.json").write_text(json.dumps(config))
        assert infer("--data-directory", release, "--model-directory", model) == 1
        assert f"resolution.scale {scale} is not in (0, 1]" in one_line_error(capsys.readouterr().err)


def test_a_batch_that_cannot_fit_is_refused_before_work_saying_what_it_needs_and_what_fits(
    release, trained, tmp_path, monkeypatch, capsys
):
    needs, check_fits = [], memory.check_fits
    monkeypatch.setattr(memory, "check_fits", lambda need, *rest: needs.append(need) or check_fits(need, *rest))
    output = tmp_path / "predictions"
    arguments = [*f"--model-directory {trained} --output {output} --tta-scales 1 4".split(), "--data-directory"]
    assert run_inference.main([*arguments, str(release), "--batch-size", "4"]) == 0
    shutil.rmtree(output)
    capsys.readouterr()

    monkeypatch.setattr(memory, "free_bytes", lambda device: int(0.6 * needs[0]))
    assert run_inference.main([*arguments, str(release), "--batch-size", "4"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "a batch of 4 frames in 2 passes (up to " in line and ") needs at least " in line
    assert "of main memory beyond the weights" in line and "at most --batch-size 2 can fit" in line
    assert line.endswith("lower --batch-size or the largest --tta-scales") and not output.exists()
    assert run_inference.main([*arguments, str(release), "--batch-size", "2"]) == 0
    capsys.readouterr()

    monkeypatch.setattr(memory, "free_bytes", lambda device: 1024)
    video = release / "test" / "video_41" / "video_left.avi"
    arguments = [*f"--model-directory {trained} --input {video} --output {tmp_path / 'video'}".split()]
    assert run_inference.main(arguments) == 1
    assert "even one frame does not fit" in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "video").exists()


def test_the_memory_estimate_counts_what_a_batch_holds_without_allocating_it(backbone):
    model = model_module.build_model(str(backbone), head={"type": "mlp"}).eval()

    def batch_need(batch, source=(1080, 1920), content=(540, 960)):
        padded = tuple(-(-side // 16) * 16 for side in content)
        passes = [inference.Pass(model, 0, content, padded, flip=False)]
        inputs = lambda: [torch.empty(batch, 3, *content, dtype=torch.uint8)]  # noqa: E731
        return memory.peak_bytes(lambda: inference.predict(passes, inputs(), source, contextlib.nullcontext))

    one, four = batch_need(1), batch_need(4)
    logits = 10 * 1080 * 1920 * 4  # float32 logits of one frame at the source size
    assert logits < one < 3 * logits and 3.9 < four / one < 4.1
    huge = batch_need(64, source=(4320, 7680), content=(4320, 7680))  # ~ 100 GiB, counted, never allocated
    assert huge > 64 * 10 * 4320 * 7680 * 4
    passes = [inference.Pass(model, 0, (540, 960), (544, 960), flip=False)]
    real = inference.predict(
        passes, [torch.zeros(1, 3, 540, 960, dtype=torch.uint8)], (1080, 1920), contextlib.nullcontext
    )
    assert type(real) is torch.Tensor  # nothing fake left behind in a cache


def test_a_weight_file_holding_nan_is_refused(tmp_path):
    model = test_backbone_files.random_hf_model()
    state = test_backbone_files.meta_layout(model)
    state["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    with pytest.raises(backbone_files.WeightFileError, match="holds NaN or infinite values in 1 tensor"):
        backbone_files.load_weight_file(path, any_architecture=True)


def test_a_weight_file_cut_short_is_refused_naming_its_blocks_unless_the_user_opts_in(release, tmp_path, capsys):
    vit_s = transformers.DINOv3ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6)
    vit_s.intermediate_size = 64  # a thin MLP keeps the file small: the check reads width and depth
    state = test_backbone_files.meta_layout(transformers.DINOv3ViTModel(vit_s))
    torch.save(state, tmp_path / "vits16.pth")
    assert backbone_files.load_weight_file(tmp_path / "vits16.pth").config.num_hidden_layers == 12
    torch.save({k: v for k, v in state.items() if not k.startswith(("blocks.10.", "blocks.11."))}, tmp_path / "cut.pth")

    with pytest.raises(backbone_files.WeightFileError, match="blocks 0-9 of width 384, which is no released DINOv3"):
        backbone_files.load_weight_file(tmp_path / "cut.pth")
    output = tmp_path / "run"
    argv = [*training_folders(release, tmp_path / "cut.pth", output), "--max-steps", "1"]
    assert run_training.main([str(a) for a in argv]) == 1
    assert "is the file cut short? Pass --any-backbone-architecture" in one_line_error(capsys.readouterr().err)
    assert not output.exists()
    opted_in = backbone_files.load_weight_file(tmp_path / "cut.pth", any_architecture=True)
    assert opted_in.config.num_hidden_layers == 10
    assert "--any-backbone-architecture applies to a .pth/.safetensors --backbone" in refused(
        capsys, "--backbone", "vits16", "--any-backbone-architecture"
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_rope_base_of_a_low_precision_copy_of_meta_s_checkpoint_is_exact(dtype):
    periods = 100.0 ** (4 * torch.arange(16, dtype=torch.float64) / 64)
    assert backbone_files.rope_settings(periods.to(dtype), "copy.pth") == (64, 100.0)


def interrupted(command: list[str], folder, first_output: str) -> str:
    """Start command, press Ctrl-C once a file matching first_output exists under folder; the stderr of its exit
    code 130."""
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(folder.glob(first_output)) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    return stderr


def test_ctrl_c_on_the_video_path_is_one_line_and_leaves_no_overlay(release, trained, tmp_path):
    out = tmp_path / "out"
    video = release / "test" / "video_41" / "video_left.avi"
    command = [
        sys.executable,
        str(INFER),
        "--model-directory",
        str(trained),
        "--input",
        str(video),
        "--output",
        str(out),
    ]
    stderr = interrupted([*command, *"--save-masks --batch-size 1 --tta flip".split()], out, ".staging-*/masks/*.png")
    assert one_line_error(stderr).startswith("error: interrupted")
    assert not (out / "overlay.mp4").exists() and not list((out / "masks").glob("*.png"))


def test_an_overlay_stopped_before_its_first_frame_prints_nothing_beside_the_one_line(tmp_path, capfd, caplog):
    halt = threading.Event()
    halt.set()  # Ctrl-C before the first frame reached the encoder
    assert video.encode_frames(tmp_path / "overlay.mp4", (48, 64), 30.0, None, queue.Queue(), halt) == 0
    assert capfd.readouterr().err == "" and caplog.records == []  # no warning of imageio-ffmpeg's either


def test_ctrl_c_in_frame_extraction_is_one_line_and_the_next_run_finishes(release, tmp_path):
    data = shutil.copytree(release, tmp_path / "sarrarp", ignore=shutil.ignore_patterns("frames"))
    command = [sys.executable, str(ROOT / "scripts" / "extract_frames.py"), str(data), "--rate", "all", "--jobs", "2"]
    stderr = interrupted(command, data, "*/video_*/frames/*.png")
    assert (
        one_line_error(stderr)
        == "error: interrupted; the frames written so far are kept, run the same command again to finish"
    )
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and not list(data.rglob(".*.partial"))
