"""Lazy safetensors checkpoint reading by tensor name (single file or sharded with an index), refusing what would
serve a wrong model: files that are not regular or lie outside the checkpoint, tensor names other than those the
config implies, weights that are not floating point or hold NaN / inf."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Collection, Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from model_core.fp8 import FP8, dequantize_blocks, nan_codes, scale_grid
from model_core.layout import checkpoint_layout
from model_core.spec import ModelSpec

INDEX_NAME = "model.safetensors.index.json"
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SINGLE_NAME = "model.safetensors"
SHOWN_NAMES = 5  # how many offending tensor names an error lists


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, unreadable, misplaced or has the wrong shape, dtype or values; the
    message names it."""


def is_routed_expert_tensor(name: str) -> bool:
    return ".mlp.experts." in name


class CheckpointReader:
    """Opens a Hugging Face checkpoint directory and reads tensors one name at a time.

    Nothing is read until `get` is called; `loaded` records every name read so a process can
    prove which tensors it touched (the gateway never reads routed experts). Every tensor read is checked on the
    way: a floating-point dtype (float8 only with its scales), and no NaN or inf in the dtype it is returned in
    (each process scans exactly the tensors it serves; one min/max pass, a few percent of a load: no opt-out).
    """

    def __init__(self, path: str | Path, fp8_block: tuple[int, int] | None = None) -> None:
        """fp8_block: the scale block of block-wise FP8 weights (ModelSpec.fp8_block); float8 tensors are then
        dequantized on read with their `<name>_scale_inv`, and refused without one."""
        self.path = Path(path)
        self.fp8_block = fp8_block
        self._roots = self._allowed_roots()
        self._handles: dict[str, object] = {}
        self.file_of: dict[str, str] = self._map_names()
        self.loaded: set[str] = set()

    @classmethod
    def for_model(cls, path: str | Path, spec: ModelSpec) -> CheckpointReader:
        """The reader of a process serving `spec`: refused unless the checkpoint holds exactly the tensors its
        config.json implies (see check_names)."""
        reader = cls(path, spec.fp8_block)
        reader.check_names(checkpoint_layout(spec), spec)
        return reader

    def check_names(self, expected: Collection[str], spec: ModelSpec) -> None:
        """CheckpointError naming the first tensors that `expected` (config.json's layout) lacks or the checkpoint
        lacks: a config with fewer layers or no shared experts would otherwise serve a truncated model. Tolerated
        beside `expected`: FP8 scales, the multi-token-prediction layers config.json declares
        (num_nextn_predict_layers, which transformers skips too) and an lm_head that tied embeddings replace."""
        present = set(self.file_of)
        mtp = tuple(f"model.layers.{i}." for i in range(spec.num_hidden_layers,
                                                          spec.num_hidden_layers + spec.mtp_layers))
        extra = [n for n in present.difference(expected)
                 if not n.startswith(mtp)
                 and not (self.fp8_block is not None and n.removesuffix("_scale_inv") in expected)
                 and not (spec.tie_word_embeddings and n == "lm_head.weight")]
        missing = [n for n in expected if n not in present]
        problems = []
        if extra:
            problems.append(f"{len(extra)} tensors not used by config.json (is num_hidden_layers, n_routed_experts "
                            f"or n_shared_experts too small?): {_first(extra)}")
        if missing:
            problems.append(f"missing {len(missing)} tensors config.json implies: {_first(missing)}")
        if problems:
            raise CheckpointError(f"{self.path}: " + "; ".join(problems))

    def _allowed_roots(self) -> list[Path]:
        """Where the checkpoint's files may lie once links are followed: its directory, and for a snapshot of the
        Hugging Face hub cache (models--org--name/snapshots/<revision>, files linked to ../../blobs) its blobs."""
        root = self.path.resolve()
        blobs = root.parent.parent / "blobs"
        return [root, blobs] if root.parent.name == "snapshots" and blobs.is_dir() else [root]

    def _regular_file(self, entry: object, source: Path) -> str:
        """`entry` (a file name from `source`: the index, or the directory itself) checked before anything opens
        it: a plain relative name of a regular file that stays inside the checkpoint (a FIFO would block the
        open, a path outside would serve another model's weights)."""
        if not isinstance(entry, str) or not entry:
            raise CheckpointError(f"{source}: shard {entry!r}: expected a file name")
        if Path(entry).is_absolute() or ".." in Path(entry).parts:
            raise CheckpointError(f"{source}: shard {entry!r} is outside {self.path} (absolute or with '..'); "
                                  "expected a file name inside it")
        file = self.path / entry
        try:
            mode = os.stat(file).st_mode
        except FileNotFoundError:
            raise CheckpointError(f"{source}: names shard {entry!r}, which is not in {self.path}") from None
        except OSError as exc:
            raise CheckpointError(f"{file}: cannot stat ({exc})") from None
        resolved = file.resolve()
        if not any(resolved.is_relative_to(root) for root in self._roots):
            raise CheckpointError(f"{source}: shard {entry!r} links to {resolved}, outside {self.path}")
        if not stat.S_ISREG(mode):
            raise CheckpointError(f"{file}: not a regular file (a weights file cannot be a FIFO, device or directory)")
        return entry

    def _map_names(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if os.path.lexists(index):
            self._regular_file(INDEX_NAME, self.path)
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError, OSError, RecursionError) as exc:  # ValueError: JSON, UTF-8
                raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({exc})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: weight_map: expected an object of tensor name -> shard file, got "
                                      f"{_json_type(weight_map)}")
            bad = next(((n, f) for n, f in weight_map.items() if not isinstance(f, str)), None)
            if bad is not None:
                raise CheckpointError(f"{index}: weight_map[{bad[0]!r}]={bad[1]!r}: expected a shard file name")
            for file in sorted(set(weight_map.values())):
                self._regular_file(file, index)
            return dict(weight_map)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no {INDEX_NAME} and no *.safetensors files")
        names: dict[str, str] = {}
        for file in files:
            for name in self._open(self._regular_file(file.name, self.path)).keys():
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
        """Read one tensor, check its shape and dtype, optionally cast it, check its values are finite."""
        file = self.file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        tensor = self._read(file, name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.path / file}: tensor {name!r} has shape {list(tensor.shape)}, expected {list(shape)}"
            )
        if tensor.dtype in FLOAT8:
            tensor = self._dequantize(name, tensor)
        stored = tensor
        if dtype is not None:
            tensor = tensor.to(dtype)
        if not all_finite(tensor):
            self._refuse_non_finite(name, file, stored, tensor)
        self.loaded.add(name)
        return tensor

    def _read(self, file: str, name: str) -> torch.Tensor:
        """The stored tensor, refused unless floating point (an integer tensor would be converted silently)."""
        try:
            tensor = self._open(file).get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{self.path / file}: cannot read tensor {name!r} ({exc})") from None
        if not tensor.is_floating_point():
            raise CheckpointError(f"{self.path / file}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}: "
                                  "expected a floating-point dtype (float32, bfloat16, float16; float8 with scales)")
        return tensor

    def _refuse_non_finite(self, name: str, file: str, stored: torch.Tensor, served: torch.Tensor) -> None:
        bad = int((~torch.isfinite(served)).sum())
        where = "" if served is stored or not all_finite(stored) else (
            f" once cast to {str(served.dtype).removeprefix('torch.')}, the serving dtype (values beyond its range)")
        raise CheckpointError(f"{self.path / file}: tensor {name!r} has {bad} non-finite value{'s' * (bad != 1)} "
                              f"(NaN or inf) of {served.numel()}{where}")

    def get_fp8(self, name: str, shape: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight float8_e4m3fn, scale_inv float32 [ceil(out/bo), ceil(in/bi)]) as stored, nothing widened: for
        processes that keep FP8 weights resident. Refused unless the tensor is float8_e4m3fn with its scales, and
        unless both are finite (the weight's bytes are checked for e4m3fn's NaN codes; nothing is widened)."""
        file = self.file_of.get(name)
        if file is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        weight = self._read(file, name)
        if tuple(weight.shape) != tuple(shape):
            raise CheckpointError(f"{self.path / file}: tensor {name!r} has shape {list(weight.shape)}, expected "
                                  f"{list(shape)}")
        if weight.dtype != FP8:
            raise CheckpointError(f"{self.path / file}: tensor {name!r} is {str(weight.dtype).removeprefix('torch.')}: "
                                  "expected float8_e4m3fn to keep it FP8-resident (quantization: fp8); "
                                  "use quantization: none to widen the checkpoint's weights on read")
        scale = self._scales(name, weight)
        if not all_finite(scale):
            self._refuse_non_finite(f"{name}_scale_inv", self.file_of[f"{name}_scale_inv"], scale, scale)
        nans = int(nan_codes(weight).sum())  # e4m3fn has no inf: its only non-finite codes are the two NaNs
        if nans:
            raise CheckpointError(f"{self.path / file}: tensor {name!r} has {nans} non-finite value{'s' * (nans != 1)} "
                                  f"(NaN) of {weight.numel()}")
        self.loaded.add(name)
        return weight, scale

    def _scales(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The float32 scale_inv tiles of float8 tensor `name`, refused when absent or of the wrong shape."""
        scale_name = f"{name}_scale_inv"
        if self.fp8_block is None or scale_name not in self.file_of:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} is {weight.dtype} but "
                + ("config.json has no quantization_config" if self.fp8_block is None else f"{scale_name!r} is missing")
            )
        scale = self._read(self.file_of[scale_name], scale_name).float()
        expected = scale_grid(tuple(weight.shape), self.fp8_block)
        if tuple(scale.shape) != expected:
            raise CheckpointError(f"{self.path}: {scale_name!r} has shape {list(scale.shape)}, expected "
                                  f"{list(expected)} for blocks of {list(self.fp8_block)}")
        self.loaded.add(scale_name)
        return scale

    def _dequantize(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """W = fp8 · scale_inv, one scale per (block_out × block_in) tile (DeepSeek-V3's FP8 release)."""
        return dequantize_blocks(weight, self._scales(name, weight), self.fp8_block)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or inf, by one min/max reduction (both propagate NaN, and an inf is one of
    them): on a CPU 20-60x faster than torch.isfinite(tensor).all(), which is not vectorized for bfloat16."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _first(names: list[str]) -> list[str]:
    """The first few names in model order (layer 2 before layer 10)."""
    key = [tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)) for n in names]
    return [n for _, n in sorted(zip(key, names, strict=True))][:SHOWN_NAMES]


def _json_type(value: object) -> str:
    names = {list: "a list", dict: "an object", str: "a string", bool: "a boolean"}
    return names.get(type(value), type(value).__name__)
