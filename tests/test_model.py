import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub, even by accident

import sys
import time
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import GatedRepoError

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import hub  # noqa: E402
from backbone_files import backbone_normalization, load_backbone  # noqa: E402
from dataset import IGNORE_INDEX, NUM_CLASSES, PATCH_SIZE  # noqa: E402
from hub import DEFAULT_BACKBONE, BackboneError, resolve_hf_token  # noqa: E402
from losses import weighted_cross_entropy  # noqa: E402
from make_tiny_backbone import save_tiny_backbone  # noqa: E402
from model import LoRA, build_model, count_parameters  # noqa: E402
from trained_model import load_trainable_weights, save_trainable_weights, trainable_state_dict  # noqa: E402

SECRET = "hf_notARealTokenButSecret123"


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_backbone")
    save_tiny_backbone(path, hidden_size=64, layers=4, heads=4, seed=0)
    return str(path)


def make_model(backbone_dir, seed=0, **kwargs):
    torch.manual_seed(seed)  # LoRA A and the head are initialised randomly
    return build_model(backbone_dir, **kwargs)


def random_images(batch, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)


def test_load_backbone_from_directory_disables_rope_augmentation(backbone_dir):
    backbone = load_backbone(backbone_dir)
    assert backbone.config.num_register_tokens == 4
    assert backbone.config.pos_embed_rescale is None  # the saved config has 2.0, as the hub ones do
    assert backbone.config.pos_embed_shift is None and backbone.config.pos_embed_jitter is None
    mean, std = backbone_normalization(backbone_dir)
    assert mean == pytest.approx((0.485, 0.456, 0.406)) and std == pytest.approx((0.229, 0.224, 0.225))


def test_train_mode_forward_is_deterministic(backbone_dir):
    model = make_model(backbone_dir, lora=LoRA(dropout=0.0)).train()
    images = random_images(1, 64, 64)
    torch.testing.assert_close(model(images, (64, 64)), model(images, (64, 64)), rtol=0, atol=0)


def test_logits_shape_non_square(backbone_dir):
    model = make_model(backbone_dir).eval()
    with torch.no_grad():
        logits = model(random_images(2, 64, 112), output_size=(120, 200), content_size=(60, 100))
        assert logits.shape == (2, NUM_CLASSES, 120, 200)
        assert model(random_images(1, 48, 80).float(), output_size=(48, 80)).shape == (1, NUM_CLASSES, 48, 80)


class PatchIndexHead(torch.nn.Module):
    """Class 1 for patches inside the content grid, class 2 for padding patches."""

    def __init__(self, grid_w, content_grid_h, content_grid_w):
        super().__init__()
        self.grid_w, self.content_grid_h, self.content_grid_w = grid_w, content_grid_h, content_grid_w

    def forward(self, tokens):
        index = torch.arange(tokens.shape[1])
        inside = (index // self.grid_w < self.content_grid_h) & (index % self.grid_w < self.content_grid_w)
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], NUM_CLASSES)
        logits[:, inside, 1] = 10.0
        logits[:, ~inside, 2] = 10.0
        return logits


@pytest.mark.parametrize("marked_grid_h, marked_grid_w", [(2, 6), (4, 3)])  # padding rows, padding columns
def test_padding_is_cropped_at_the_content_scale(backbone_dir, marked_grid_h, marked_grid_w):
    model = make_model(backbone_dir, head={"type": "patch-mlp"}).eval()
    # 64x96 padded canvas (4x6 patches) whose top-left 32x48 (2x3 patches) is a 60x90 source image.
    # One axis at a time: at the corner the bilinear blend of three padding patches would outvote one content patch.
    model.head = PatchIndexHead(grid_w=6, content_grid_h=marked_grid_h, content_grid_w=marked_grid_w)
    with torch.no_grad():
        logits = model(random_images(1, 64, 96), output_size=(60, 90), content_size=(32, 48))
    assert logits.shape == (1, NUM_CLASSES, 60, 90)
    # Resizing the padded canvas to 60x90 would put padding in the bottom/right half.
    assert (logits.argmax(1) == 1).all()


@pytest.mark.parametrize("height, width", [(60, 64), (64, 100)])
def test_non_multiple_of_patch_size_raises(backbone_dir, height, width):
    model = make_model(backbone_dir)
    with pytest.raises(ValueError, match=f"multiples of {PATCH_SIZE}"):
        model(random_images(1, height, width), output_size=(height, width))


def test_only_lora_and_head_are_trainable(backbone_dir):
    model = make_model(backbone_dir)
    trainable_names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable_names and all("lora_" in name or name.startswith("head.") for name in trainable_names)
    assert {name.split(".")[-4] for name in trainable_names if "lora_" in name} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }
    trainable, total = count_parameters(model)
    assert trainable == sum(p.numel() for name, p in model.named_parameters() if name in trainable_names)
    assert 0 < trainable < total


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_training_moves_lora_only(backbone_dir, gradient_checkpointing):
    model = make_model(backbone_dir, gradient_checkpointing=gradient_checkpointing).train()
    if gradient_checkpointing:
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.backbone.modules())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, target = random_images(2, 32, 48), torch.randint(0, NUM_CLASSES, (2, 32, 48))
    for _ in range(3):
        loss = weighted_cross_entropy(model(images, (32, 48)), target, torch.ones(NUM_CLASSES))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], before) for n, before in frozen.items())
    assert all(not torch.equal(params[n], before) for n, before in lora.items())


def test_gradient_checkpointing_gives_the_same_lora_gradients(backbone_dir):
    grads = []
    for gradient_checkpointing in (False, True):
        model = make_model(backbone_dir, lora=LoRA(dropout=0.0), gradient_checkpointing=gradient_checkpointing).train()
        with torch.no_grad():  # non-zero LoRA B, so LoRA A gets a gradient too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.01)
        model(random_images(1, 32, 32), (32, 32)).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if "lora_" in n})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad)


def test_trainable_weights_round_trip(backbone_dir, tmp_path):
    trained = make_model(backbone_dir, seed=1).eval()
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_()  # LoRA B starts at zero: make the adapter matter
    path = tmp_path / "adapter.safetensors"
    save_trainable_weights(trainable_state_dict(trained), path)
    assert not (tmp_path / "adapter.safetensors.tmp").exists()
    fresh = make_model(backbone_dir, seed=2).eval()
    images = random_images(1, 32, 64)
    with torch.no_grad():
        assert not torch.equal(fresh(images, (32, 64)), trained(images, (32, 64)))
        load_trainable_weights(fresh, path)
        torch.testing.assert_close(fresh(images, (32, 64)), trained(images, (32, 64)), rtol=0, atol=0)


def test_loading_renamed_keys_raises(backbone_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model = make_model(backbone_dir)
    path = tmp_path / "adapter.safetensors"
    save_trainable_weights(trainable_state_dict(model), path)
    renamed = {name.replace("base_model.model.", ""): t for name, t in load_file(path).items()}
    save_file(renamed, tmp_path / "renamed.safetensors")
    with pytest.raises(ValueError, match="missing"):
        load_trainable_weights(model, tmp_path / "renamed.safetensors")


def test_resolve_hf_token_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "from-login")
    assert resolve_hf_token() == "from-login"
    (tmp_path / "hf_token.txt").write_text(" from-cwd-file\n")
    assert resolve_hf_token() == "from-cwd-file"
    monkeypatch.setenv("HF_TOKEN", "from-env\n")
    assert resolve_hf_token() == "from-env"
    token_file = tmp_path / "my_token"
    token_file.write_text("from-arg-file\n")
    assert resolve_hf_token(str(token_file)) == "from-arg-file"
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN")
    (tmp_path / "hf_token.txt").unlink()
    assert resolve_hf_token() is None


@pytest.mark.parametrize("content", [None, "  \n"])
def test_resolve_hf_token_bad_file_raises(tmp_path, content):
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    with pytest.raises(BackboneError):
        resolve_hf_token(str(token_file))


def test_hub_id_offline_with_empty_cache_raises_quickly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    with pytest.raises(BackboneError) as error:
        load_backbone(DEFAULT_BACKBONE, token=SECRET)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert message.startswith(f"cannot reach the Hugging Face hub to download {DEFAULT_BACKBONE}")
    assert "--backbone" in message and "\n" not in message and "Traceback" not in message
    assert SECRET not in message


def test_gated_repo_message_names_the_fix_and_hides_the_token(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "offline", lambda: False)

    def refuse(url, **kwargs):
        raise GatedRepoError("403 gated", response=httpx2.Response(403, request=httpx2.Request("HEAD", url)))

    monkeypatch.setattr(hub, "get_hf_file_metadata", refuse)
    with pytest.raises(BackboneError) as error:
        load_backbone(DEFAULT_BACKBONE, token=SECRET)
    message = str(error.value)
    assert message.startswith(
        f"{DEFAULT_BACKBONE} is gated and your token has not been granted access: accept "
        f"its licence at https://huggingface.co/{DEFAULT_BACKBONE}"
    )
    assert SECRET not in message


@pytest.mark.parametrize("make_path", [lambda tmp: tmp / "missing", lambda tmp: tmp])
def test_local_path_that_is_not_a_backbone_raises(tmp_path, make_path):
    with pytest.raises(BackboneError):
        load_backbone(str(make_path(tmp_path)))


def test_weighted_cross_entropy_ignores_and_weights():
    logits = torch.zeros(1, NUM_CLASSES, 1, 3)
    logits[0, 0, 0, 0] = 2.0  # pixel 0: class 0 favoured
    target = torch.tensor([[[0, 1, IGNORE_INDEX]]])
    class_weights = torch.ones(NUM_CLASSES)
    class_weights[1] = 3.0
    nll0 = -torch.log_softmax(logits[0, :, 0, 0], 0)[0]
    nll1 = -torch.log_softmax(logits[0, :, 0, 1], 0)[1]
    expected = (1.0 * nll0 + 3.0 * nll1) / (1.0 + 3.0)  # weighted mean over labelled pixels only
    torch.testing.assert_close(weighted_cross_entropy(logits, target, class_weights), expected)
    logits[0, :, 0, 2] = torch.randn(NUM_CLASSES) * 100  # the ignored pixel cannot change the loss
    torch.testing.assert_close(weighted_cross_entropy(logits, target, class_weights), expected)
