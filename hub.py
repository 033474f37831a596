"""The Hugging Face hub: Meta's DINOv3 releases by short name, the token (never printed or saved), and downloads
that fail within seconds with a sentence saying what to do (no network, a gated repository, a refused token, a
misspelt id) instead of retrying for a minute."""

import os
import re

import huggingface_hub
from huggingface_hub import get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

DEFAULT_BACKBONE = "facebook/dinov3-vitb16-pretrain-lvd1689m"  # ViT-B/16 pretrained on LVD-1689M
# Short names of Meta's released DINOv3 ViTs: web images (LVD-1689M), and satellite images (SAT-493M).
BACKBONES = {
    **{
        name: f"facebook/dinov3-{name}-pretrain-lvd1689m"
        for name in ("vits16", "vits16plus", "vitb16", "vitl16", "vith16plus", "vit7b16")
    },
    **{f"{name}-sat493m": f"facebook/dinov3-{name}-pretrain-sat493m" for name in ("vitl16", "vit7b16")},
}
PROBE_TIMEOUT_S = 5.0
TOKEN_PATTERN = re.compile(r"hf_[A-Za-z0-9]{8,}")


class BackboneError(RuntimeError):
    """The backbone or its token cannot be had; the message says what the user should do."""


def redact_tokens(text: str) -> str:
    """text with anything that looks like a Hugging Face token masked: no message ever shows one."""
    return TOKEN_PATTERN.sub("hf_***", text)


def read_token_file(path: str, label: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8").strip() or None
    except UnicodeDecodeError:
        raise BackboneError(
            f"{label} is not a UTF-8 text file: put your Hugging Face token in it as plain text"
        ) from None
    except OSError as error:
        raise BackboneError(f"cannot read {label} ({error.strerror})") from None


def resolve_hf_token(token_file: str | None = None) -> str | None:
    """Token from token_file, else $HF_TOKEN, else ./hf_token.txt, else the `hf auth login` token."""
    if token_file is not None:
        label = f"token file {token_file}" if not TOKEN_PATTERN.search(token_file) else "the --hf-token-file value"
        if not os.path.isfile(token_file):
            hint = (
                "it looks like a token itself: put the token in a file and pass the file's path"
                if TOKEN_PATTERN.search(token_file)
                else "pass the file holding your Hugging Face token"
            )
            raise BackboneError(f"{label} does not exist: {hint}")
        token = read_token_file(token_file, label)
        if not token:
            raise BackboneError(f"{label} is empty: put your Hugging Face token in it")
        return token
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return token
    if os.path.isfile("hf_token.txt"):
        token = read_token_file("hf_token.txt", "hf_token.txt")
        if token:
            return token
    token = huggingface_hub.get_token()
    return token.strip() if token else None


def offline() -> bool:
    """HF_HUB_OFFLINE as set now, not only as it was when huggingface_hub was imported."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return huggingface_hub.is_offline_mode() or env.strip().lower() in ("1", "on", "yes", "true")


def unreachable(name: str, instead: str = "pass a local --backbone directory") -> BackboneError:
    return BackboneError(f"cannot reach the Hugging Face hub to download {name}: {instead}, or run with network access")


def gated(name: str, instead: str = "pass a local --backbone directory") -> BackboneError:
    return BackboneError(
        f"{name} is gated and your token has not been granted access: accept its licence at "
        f"https://huggingface.co/{name} with the account of your token (or {instead})"
    )


def probe(name: str, token: str | None, misspelt: str = "", instead: str = "pass a local --backbone directory") -> None:
    """Fail within seconds, with a clear message, where a plain hub download would retry for ~45 s. Tells apart a
    refused token, a gated repository, a token without the right permission and a misspelt id (misspelt: what
    to check then; instead: what to do when the hub cannot be reached)."""
    misspelt = misspelt or f"check the name (short names: {', '.join(BACKBONES)})"
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json"), token=token, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError:
        raise gated(name, instead) from None
    except RepositoryNotFoundError:  # the hub answers 401 for gated repositories without a token, 404 for unknown ids
        if token is None:
            raise BackboneError(
                f"{name} needs a Hugging Face token (the DINOv3 repositories are gated), or does not exist: put your "
                "token in hf_token.txt, set HF_TOKEN or pass --hf-token-file, and check the name"
            ) from None
        raise BackboneError(f"{name} is not on the Hugging Face hub: {misspelt}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise BackboneError(
                "the Hugging Face hub refused your token (401: invalid credentials): it is mistyped, "
                "expired or revoked; make a new one at https://huggingface.co/settings/tokens"
            ) from None
        if status == 403:
            raise BackboneError(
                f"your token may not read {name} (403): give it read access to public gated "
                "repositories at https://huggingface.co/settings/tokens"
            ) from None
        raise unreachable(name, instead) from None
    except Exception:  # DNS, connection refused, timeout, offline mode: all mean the hub cannot be used
        raise unreachable(name, instead) from None


def is_hub_id(name_or_path: str) -> bool:
    return not os.path.exists(name_or_path) and name_or_path.count("/") == 1 and not name_or_path.startswith((".", "~"))


def cached_or_downloaded(name: str, token: str | None, fetch, misspelt: str = "", instead: str = ""):
    """fetch(local_files_only=True) from the local cache; else, online, a probe that turns a refusal into one
    sentence, then fetch(local_files_only=False), whose errors the caller handles."""
    instead = instead or "pass a local --backbone directory"
    try:
        return fetch(local_files_only=True)
    except OSError:
        pass  # not in the local cache
    if offline():
        raise unreachable(name, instead)
    probe(name, token, misspelt, instead)
    return fetch(local_files_only=False)


def model_snapshot(name: str, token: str | None, checkpoint: str) -> str:
    """The local folder of a trained model shared on the hub as USER/REPO (run_training.py's folder, uploaded): from
    the local cache, else downloaded with its config.json, records and the checkpoint's weights only."""
    fetch = lambda local_files_only: huggingface_hub.snapshot_download(  # noqa: E731
        name,
        token=token,
        local_files_only=local_files_only,
        allow_patterns=["*.json", "*.jsonl", "*.md", "*.png", f"{checkpoint}/*"],
    )
    misspelt = "it is not a folder here either; check the path or the id"
    return cached_or_downloaded(name, token, fetch, misspelt, "it is not a folder here either; check the path")
