"""``from_pretrained``'s keyword arguments: transformers' (dtype, device_map, hub options, ...) and blip_fast's.

transformers 5 semantics: ``dtype`` (or its older spelling ``torch_dtype``) is a ``torch.dtype``, its name
(``"float16"``) or ``"auto"`` (the default: the checkpoint's dtype, from ``config.json`` or else the weights);
``device_map`` is ``"auto"``, a device (``"cuda"``, ``"cuda:1"``, ``"cpu"``, an index, a ``torch.device``) or a
dict that maps every module to one device (``{"": 0}``). blip_fast loads a model onto one device: a map that
spreads modules over several is an error saying so. ``attn_implementation`` is accepted and has no effect
(blip_fast picks its attention kernels itself), ``low_cpu_mem_usage`` is always in effect (the model is built on the
meta device and each tensor is loaded once). Any other keyword is a ``TypeError`` listing what is supported.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from blip_fast import hub

logger = logging.getLogger("blip_fast")

#: blip_fast's own ``from_pretrained`` keywords (see :func:`blip_fast.checkpoint.load_pretrained`).
BLIP_FAST_KWARGS = ("device", "strict", "hf_compat", "config", "tokenizer")
#: transformers keywords accepted with no effect here, and why.
NO_EFFECT = {
    "attn_implementation": "blip_fast picks its attention kernels itself",
    "low_cpu_mem_usage": "blip_fast always builds on the meta device and loads each tensor once",
}
#: ``device_map`` strategies that spread a model over devices; with one device they all mean "the first GPU".
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
SUPPORTED = sorted({"dtype", "torch_dtype", "device_map", "use_safetensors", *NO_EFFECT, *BLIP_FAST_KWARGS,
                    *hub.HubOptions.__dataclass_fields__})


def parse_dtype(value: Any) -> torch.dtype | str | None:
    """A ``torch.dtype``, ``"auto"`` or None from what transformers accepts (``"float16"``, ``"torch.bfloat16"``)."""
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ValueError(f"dtype must be a torch.dtype, its name (e.g. 'float16') or 'auto', got {value!r}")


def device_from_map(device_map: Any) -> torch.device | None:
    """The one device a ``device_map`` names (None: leave the model on the CPU it is loaded on)."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = {str(_one_device(value)) for value in device_map.values()}
        if len(devices) != 1:
            raise ValueError(
                f"device_map puts modules on {len(devices)} devices ({', '.join(sorted(devices))}); blip_fast loads "
                "a BLIP model onto one device: pass device_map=<device> (or {'': <device>})"
            )
        return torch.device(devices.pop())
    if device_map in AUTO_MAPS:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return _one_device(device_map)


def _one_device(value: Any) -> torch.device:
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    if value in ("disk", "meta"):
        raise ValueError(f"device_map value {value!r}: blip_fast keeps every weight in memory on one device")
    try:
        return torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device_map value {value!r} is not a device (expected 'cpu', 'cuda', 'cuda:N', N, "
                         "'auto' or a dict of them)") from None


def checkpoint_dtype(directory: str | os.PathLike | None, state: dict[str, torch.Tensor]) -> torch.dtype:
    """transformers' ``"auto"``: the ``dtype``/``torch_dtype`` of ``directory``'s ``config.json`` (a model
    directory's; None for a ``.pth``), else the first floating weight's."""
    import json

    config_path = None if directory is None else os.path.join(os.fspath(directory), "config.json")
    if config_path is not None and os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        name = config.get("dtype") or config.get("torch_dtype")
        if name is not None:
            return parse_dtype(name)
    return next((tensor.dtype for tensor in state.values() if tensor.is_floating_point()), torch.float32)


def split_kwargs(owner: str, kwargs: dict[str, Any]) -> tuple[hub.HubOptions, dict[str, Any]]:
    """transformers' and blip_fast's keywords -> (hub options, :func:`~blip_fast.checkpoint.load_pretrained`
    keywords); raises ``TypeError``/``ValueError`` with the supported list for anything else."""
    kwargs = dict(kwargs)
    options = hub.HubOptions.pop_from(kwargs)
    dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
    if dtype is not None and torch_dtype is not None and parse_dtype(dtype) != parse_dtype(torch_dtype):
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass one of them")
    load = {"torch_dtype": parse_dtype(dtype if dtype is not None else torch_dtype) or "auto"}
    device = device_from_map(kwargs.pop("device_map", None))
    if device is not None:
        if kwargs.get("device") is not None and torch.device(kwargs["device"]) != device:
            raise ValueError(f"device={kwargs['device']!r} and device_map={device} disagree; pass one of them")
        kwargs["device"] = device
    load["use_safetensors"] = kwargs.pop("use_safetensors", None)
    for name, reason in NO_EFFECT.items():
        if kwargs.pop(name, None) is not None:
            logger.debug("%s.from_pretrained: %s has no effect (%s)", owner, name, reason)
    load.update({name: kwargs.pop(name) for name in BLIP_FAST_KWARGS if name in kwargs})
    if kwargs:
        raise TypeError(f"{owner}.from_pretrained() got unsupported arguments {sorted(kwargs)}; supported: {SUPPORTED}")
    return options, load
