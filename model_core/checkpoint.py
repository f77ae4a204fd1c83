"""Lazy safetensors checkpoint reading by tensor name (single file or sharded with an index)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from model_core.spec import ModelSpec

INDEX_NAME = "model.safetensors.index.json"
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, unreadable or has the wrong shape; the message names it."""


def expert_weight_names(layer: int, expert: int) -> tuple[str, str, str]:
    """On-disk names of one routed expert's (gate, up, down) projections."""
    prefix = f"model.layers.{layer}.mlp.experts.{expert}"
    return f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight"


def is_routed_expert_tensor(name: str) -> bool:
    return ".mlp.experts." in name


class CheckpointReader:
    """Opens a Hugging Face checkpoint directory and reads tensors one name at a time.

    Nothing is read until `get` is called; `loaded` records every name read so a process can
    prove which tensors it touched (the gateway never reads routed experts).
    """

    def __init__(self, path: str | Path, fp8_block: tuple[int, int] | None = None) -> None:
        """fp8_block: the scale block of block-wise FP8 weights (ModelSpec.fp8_block); float8 tensors are then
        dequantized on read with their `<name>_scale_inv`, and refused without one."""
        self.path = Path(path)
        self.fp8_block = fp8_block
        self._handles: dict[str, object] = {}
        self.file_of: dict[str, str] = self._map_names()
        self.loaded: set[str] = set()

    def _map_names(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({exc})") from None
            for file in set(weight_map.values()):
                if not (self.path / file).is_file():
                    raise CheckpointError(f"{index}: names shard {file!r}, which is not in {self.path}")
            return dict(weight_map)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no {INDEX_NAME} and no *.safetensors files")
        names: dict[str, str] = {}
        for file in files:
            for name in self._open(file.name).keys():
                names[name] = file.name
        return names

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.path / file), framework="pt")
            except Exception as exc:  # safetensors raises several types for a damaged header
                raise CheckpointError(f"{self.path / file}: cannot open as safetensors ({exc})") from None
        return self._handles[file]

    def names(self) -> list[str]:
        return sorted(self.file_of)

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get(
        self,
        name: str,
        shape: Iterable[int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Read one tensor, check its shape, optionally cast it."""
        file = self.file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        try:
            tensor = self._open(file).get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{self.path / file}: cannot read tensor {name!r} ({exc})") from None
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.path / file}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}"
            )
        if tensor.dtype in FLOAT8:
            tensor = self._dequantize(name, tensor)
        self.loaded.add(name)
        return tensor.to(dtype) if dtype is not None else tensor

    def _dequantize(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """W = fp8 · scale_inv, one scale per (block_out × block_in) tile (DeepSeek-V3's FP8 release)."""
        scale_name = f"{name}_scale_inv"
        if self.fp8_block is None or scale_name not in self.file_of:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is {weight.dtype} but "
                + ("config.json has no quantization_config" if self.fp8_block is None else f"{scale_name!r} is missing")
            )
        bo, bi = self.fp8_block
        out, inp = weight.shape
        scale = self._open(self.file_of[scale_name]).get_tensor(scale_name).float()
        expected = (-(-out // bo), -(-inp // bi))
        if tuple(scale.shape) != expected:
            raise CheckpointError(f"{self.path}: {scale_name!r} has shape {list(scale.shape)}, expected "
                                  f"{list(expected)} for blocks of {list(self.fp8_block)}")
        self.loaded.add(scale_name)
        full = scale.repeat_interleave(bo, 0)[:out].repeat_interleave(bi, 1)[:, :inp]
        return weight.float() * full


def expert_shapes(spec: ModelSpec) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Shapes of one routed expert's (gate, up, down) weights: [I, H], [I, H], [H, I]."""
    h, i = spec.hidden_size, spec.moe_intermediate_size
    return (i, h), (i, h), (h, i)
