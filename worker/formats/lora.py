"""PEFT LoRA adapters (Alpaca-LoRA and anything `peft` saves) merged into the base weights at load:
W <- W + (B @ A) * scale, scale = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA), in float32.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`). Adapters this
merge cannot reproduce exactly (DoRA, trained biases, extra saved modules, embedding LoRA) are refused
with the reason, as are adapters whose shapes do not fit the base.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch


class LoraError(ValueError):
    pass


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise LoraError(f"{folder}: adapter_config.json not found (expected a PEFT LoRA adapter folder)")
    cfg = json.loads(cfg_path.read_text())
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise LoraError(f"{folder}: peft_type {cfg.get('peft_type')!r} is not LORA")
    if cfg.get("use_dora"):
        raise LoraError(f"{folder}: DoRA adapters are not supported (only plain LoRA merges exactly)")
    if cfg.get("bias", "none") != "none":
        raise LoraError(f"{folder}: adapters that train biases (bias={cfg['bias']!r}) are not supported")
    if cfg.get("modules_to_save"):
        raise LoraError(f"{folder}: adapters with modules_to_save ({cfg['modules_to_save']}) are not supported")
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        weights = load_file(str(folder / "adapter_model.safetensors"))
    elif (folder / "adapter_model.bin").is_file():
        weights = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise LoraError(f"{folder}: adapter_model.safetensors (or .bin) not found")
    return cfg, weights


def _module_name(key: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj', 'A')."""
    m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight", key)
    return (m.group(1), m.group(2)) if m else None


def merge_lora(state: dict[str, torch.Tensor], folder: Path) -> int:
    """Merge the adapter in `folder` into `state` (transformers' names) in place; returns modules merged."""
    cfg, weights = read_adapter(folder)
    r = int(cfg.get("r", 8))
    alpha = float(cfg.get("lora_alpha", r))
    scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        if "lora_embedding" in key or "lora_magnitude" in key:
            raise LoraError(f"{folder}: {key}: embedding LoRA / DoRA weights are not supported")
        parsed = _module_name(key)
        if parsed is None:
            raise LoraError(f"{folder}: unexpected tensor {key!r} (expected ...lora_A.weight / ...lora_B.weight)")
        pairs.setdefault(parsed[0], {})[parsed[1]] = tensor
    if not pairs:
        raise LoraError(f"{folder}: the adapter holds no LoRA weights")
    for module, ab in sorted(pairs.items()):
        target = module + ".weight"
        if target not in state:
            raise LoraError(f"{folder}: the adapter targets {module!r}, which the base model does not have")
        if set(ab) != {"A", "B"}:
            raise LoraError(f"{folder}: {module} has lora_{''.join(ab)} without its pair")
        a, b = ab["A"].float(), ab["B"].float()  # A: [r, in], B: [out, r]
        delta = (b @ a) * scale
        if cfg.get("fan_in_fan_out"):
            delta = delta.T
        w = state[target]
        if delta.shape != w.shape:
            raise LoraError(f"{folder}: {module}: the adapter's update is {tuple(delta.shape)} but the base weight is "
                            f"{tuple(w.shape)} (an adapter for another model size?)")
        state[target] = (w.float() + delta).to(w.dtype)
    return len(pairs)
