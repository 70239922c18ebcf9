"""Trained weights from local files: ``--teacher-weights PATH``.

PATH is a state_dict (``.pt`` / ``.pth`` read with ``torch.load(weights_only=True)``, or ``.safetensors``), a
checkpoint of this package (``last.pt``, ``previous.pt``, ``best.pt``: its teacher's weights, or the network of a
run without a teacher such as ``--mode base``), or a run folder (its ``last.pt``). Nothing is downloaded.

Keys are matched as they are, then with the prefixes wrappers add or remove (``module.`` from DDP, ``model.`` from
the timm/torchvision wrappers, ``inner.`` from this package's checkpoints). Anything that still does not fit is an
error naming the first parameters that differ.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from spacedkd_fast.config import setting_name

_WRAPPER_PREFIXES = ("inner.", "module.", "model.", "_orig_mod.")


def load_error_reason(exc: BaseException) -> str:
    """A torch.load failure in a few words: the first sentence of its first line (torch's own message goes on for
    a paragraph), at most 160 characters, or the exception's type when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0].split(". ")[0][:160] if text else type(exc).__name__


def read_state_dict(path: str) -> dict[str, Tensor]:
    """The tensors of ``path`` (see the module docstring)."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "last.pt"
    if not file.exists():
        raise FileNotFoundError(f"{setting_name('teacher_weights')} {path}: no such file")
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError(f"{setting_name('teacher_weights')} {path}: reading .safetensors needs "
                                      f"safetensors: pip install safetensors") from exc
        return load_file(str(file))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torn files and foreign pickles raise many types
        raise ValueError(f"{setting_name('teacher_weights')} {path}: cannot read {file.name} ({type(exc).__name__}: "
                         f"{load_error_reason(exc)})") from exc
    if isinstance(state, dict) and "roles" in state and "format" in state:  # a checkpoint of this package
        roles = state["roles"]
        role = "teacher" if "teacher" in roles else "student"
        state = roles[role]["model"]
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # Lightning and friends
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{setting_name('teacher_weights')} {path}: {file.name} holds no state_dict (a dict of "
                         f"tensors)")
    return state


def _variants(keys: list[str]):
    """``(strip, add)`` prefix pairs a state_dict's keys may need: as saved first, then every known prefix removed
    (when all keys have it) and/or added."""
    strips = [""] + [p for p in _WRAPPER_PREFIXES if keys and all(k.startswith(p) for k in keys)]
    for strip in strips:
        for add in ("", *_WRAPPER_PREFIXES):
            yield strip, add


def load_weights(module: nn.Module, path: str, what: str = "teacher") -> None:
    """Load ``path`` into ``module`` (strict), matching wrapper prefixes.

    Raises:
        ValueError: the weights do not fit (the first differing parameters are named).
    """
    saved = read_state_dict(path)
    target = module.state_dict()
    best = None
    for strip, add in _variants(list(saved)):
        renamed = {add + k[len(strip):]: v for k, v in saved.items()}
        if renamed.keys() == target.keys():
            best = renamed
            break
    if best is None:
        missing = [k for k in target if k not in saved]
        unexpected = [k for k in saved if k not in target]
        raise ValueError(f"--{what}-weights {path} does not fit the {what} model: {len(missing)} of its parameters "
                         f"are not in the file (e.g. {missing[:3]}), {len(unexpected)} in the file are not in the "
                         f"model (e.g. {unexpected[:3]})")
    shapes = [f"{k}: file {tuple(v.shape)}, model {tuple(target[k].shape)}" for k, v in best.items()
              if v.shape != target[k].shape]
    if shapes:
        raise ValueError(f"--{what}-weights {path} does not fit the {what} model; shapes differ for "
                         f"{'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}")
    module.load_state_dict(best)
