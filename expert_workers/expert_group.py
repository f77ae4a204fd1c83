"""ExpertGroup: the routed experts placed on one device, loaded from the checkpoint, computed grouped."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from expert_workers.expert_pairs import ExpertPairs, sort_by_expert
from expert_workers.expert_weights import LayerWeights, Scratch, widened_expert_ffn
from expert_workers.grouped_ffn import grouped_expert_ffn
from expert_workers.kernels import fused_moe, fused_moe_fp8
from model_core.checkpoint import CheckpointReader
from model_core.compute_choices import KERNELS, QUANTIZATIONS
from model_core.half_matmul import matmul_dtype
from model_core.kernel_runtime import triton_available
from model_core.layout import expert_shapes, expert_weight_names
from model_core.spec import ModelSpec


class ExpertRequestError(ValueError):
    """A forward request does not fit this group (wrong layer, shape, dtype or expert); the message names the field."""


class PlacementVersionMissing(ExpertRequestError):
    """The call names a placement version this group does not hold (yet): a replica that Ray restarted with its
    creation-time placement, before it adopted the current one. Transports send the call again, elsewhere or
    once the replica caught up."""


def select_rows(batch: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows of a layer's whole batch that one group computes (the Ray transport puts a layer's batch in shared
    memory once for every group on the gateway's node, and each call names its rows); ExpertRequestError naming
    `rows` when they do not index the batch."""
    if batch.dim() != 2:
        raise ExpertRequestError(f"hidden.shape={list(batch.shape)}: expected the layer's batch [T, H]")
    if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        dtype = str(rows.dtype).removeprefix("torch.")
        raise ExpertRequestError(f"rows: {dtype}{list(rows.shape)}: expected a 1-D int32 or int64 tensor")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= batch.shape[0]):
        raise ExpertRequestError(f"rows: values in [{int(rows.min())}, {int(rows.max())}], expected [0, "
                                 f"{batch.shape[0]}) (the batch's rows)")
    return batch.index_select(0, rows.long())


def _check_distinct(ids: torch.Tensor) -> None:
    """ExpertRequestError naming the first token row of ids [T, K] that names an expert twice (a token is routed
    to K distinct experts; -1, an expert elsewhere, may repeat)."""
    if ids.shape[1] < 2:
        return
    s = ids.sort(dim=1).values
    twice = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)  # [T, K-1]
    if bool(twice.any()):
        row = int(twice.any(dim=1).nonzero()[0])
        expert = int(s[row, 1:][twice[row]][0])
        raise ExpertRequestError(f"expert_ids[{row}]: expert {expert} appears more than once, expected distinct ids "
                                 f"per token (-1 may repeat)")


def _check_fp8_kernel(block: tuple[int, int], device: torch.device) -> None:
    """ValueError, before anything loads, where FP8-resident experts cannot run the Triton FP8 kernel."""
    bi = block[1]
    if bi < 16 or bi & (bi - 1):
        raise ValueError(f"quantization_config.weight_block_size={list(block)}: the Triton FP8 kernel needs a block "
                         f"width that is a power of two >= 16 (got {bi}); serve with quantization: none")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"quantization='fp8' on {device} (compute capability {major}.{minor}): FP8 tensor cores need "
                         "8.9 or newer (Ada, Hopper); serve with quantization: none")


@dataclass(frozen=True)
class ExpertResult:
    output: torch.Tensor  # [T, H] in hidden's dtype
    tokens_per_expert: torch.Tensor  # [E_local] on the group's device, in `experts_in(layer)` order: the counts of
    # the one sort by expert the FFN used, for the server span; not sent (the gateway counts its routing itself)
    compute_ms: float
    merged_calls: int = 1  # the calls computed in the same pass (expert_workers/merging.py), this one included


@dataclass
class ExpertLayout:
    """One placement version on a group: the experts it hosts per MoE layer and their stacked weights."""

    version: int
    layer_experts: dict[int, list[int]]  # layer -> expert ids, in the order of the stacks
    local_index: dict[int, torch.Tensor]  # layer -> [E] global id -> row in the stacks, -1 where not hosted
    weights: dict[int, LayerWeights]  # layer -> the stacks (FP8-resident ones with their scale tiles)

    @property
    def w_gate_up(self) -> dict[int, torch.Tensor]:
        """layer -> [E_local, 2I, H] (float8_e4m3fn when FP8-resident)."""
        return {layer: w.w_gate_up for layer, w in self.weights.items()}

    @property
    def w_down(self) -> dict[int, torch.Tensor]:
        """layer -> [E_local, H, I]."""
        return {layer: w.w_down for layer, w in self.weights.items()}

    @property
    def weight_bytes(self) -> int:
        """Bytes of the stacks, FP8 scale tiles included."""
        return sum(w.nbytes for w in self.weights.values())


class ExpertGroup:
    """Holds, for every MoE layer, the stacked weights of the experts it hosts there and nothing else: `expert_ids`
    in every layer, or `layer_experts[layer]` where the placement gives a layer its own layout (copies of hot
    experts, EPLB).

    Re-placement loads a new placement version beside the current one (`stage`, reusing the experts it already
    holds), serves each call with the version the call names, and frees the old one (`release`).
    Transports (in-process, Ray, gRPC) are thin shells around `run`.
    """

    def __init__(
        self,
        model_dir: str | Path,
        expert_ids: Sequence[int],
        dtype: torch.dtype = torch.float32,
        spec: ModelSpec | None = None,
        device: int = 0,
        kernel: str = "auto",
        torch_device: str = "cpu",
        layer_experts: Mapping[int, Sequence[int]] | None = None,
        version: int = 0,
        half_matmul: str = "auto",
        quantization: str = "auto",
    ) -> None:
        """device: the group's index in the placement; torch_device: where its weights live ('cpu', 'cuda');
        kernel: 'triton' (fused Triton kernels; CUDA, or CPU under TRITON_INTERPRET=1), 'torch', or 'auto'
        (Triton on CUDA, torch on CPU); layer_experts: {MoE layer: expert ids} where a layer differs;
        version: the placement version these experts belong to; half_matmul: how a half-precision model
        multiplies on a CPU with the torch kernel (model_core.half_matmul: its weights may be held in float32);
        quantization: how a block-wise FP8 checkpoint's experts are held: 'fp8' (as stored, with their scale tiles;
        computed by the FP8 Triton kernel, or on the torch path widened one hit expert at a time), 'none' (widened on
        read), 'auto' (fp8 when the checkpoint is FP8)."""
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: expected one of {KERNELS}")
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={quantization!r}: expected one of {QUANTIZATIONS}")
        self.spec = spec or ModelSpec.from_dir(model_dir)
        if quantization == "fp8" and self.spec.fp8_block is None:
            raise ValueError(f"quantization='fp8': {model_dir} is not a block-wise FP8 checkpoint (config.json has no "
                             "quantization_config); use 'auto' or 'none'")
        # FP8-resident experts: the checkpoint's scale block; None: weights widened to the model's dtype on read.
        self.fp8_block = self.spec.fp8_block if quantization != "none" else None
        self.torch_device = torch.device(torch_device)
        self.kernel = ("triton" if self.torch_device.type == "cuda" else "torch") if kernel == "auto" else kernel
        if self.fp8_block is not None and self.kernel == "triton":
            _check_fp8_kernel(self.fp8_block, self.torch_device)
        self.device = device
        self.dtype = dtype
        if self.kernel == "triton" and not triton_available(self.torch_device):
            raise ValueError(f"kernel='triton' on {self.torch_device}: needs CUDA, or TRITON_INTERPRET=1 on CPU")
        # The weight stacks' dtype: the model's, or float32 on a CPU without its half-precision instructions.
        self.matmul_dtype = dtype if self.kernel == "triton" else matmul_dtype(dtype, self.torch_device, half_matmul)
        self.reader = CheckpointReader.for_model(model_dir, self.spec)  # refuses a checkpoint the config does not fit
        self.scratch = Scratch()  # per thread: the FP8 torch path widens one expert at a time into it
        self._lock = threading.Lock()  # guards _layouts and version (a background stage adds to them)
        self._layouts: dict[int, ExpertLayout] = {}
        self.version = version
        self.stage(version, expert_ids, layer_experts)

    # -- placement versions ------------------------------------------------------------------------------
    def stage(self, version: int, expert_ids: Sequence[int],
              layer_experts: Mapping[int, Sequence[int]] | None = None) -> ExpertLayout:
        """Load placement `version` beside what is held (experts already held are copied, not read again). Calls
        naming `version` are served from it at once; the current version (`version` attribute) is unchanged."""
        per_layer = self._per_layer(expert_ids, layer_experts)
        with self._lock:
            held = list(self._layouts.values())
        n = self.spec.n_routed_experts
        local_index, weights = {}, {}
        for layer, ids in per_layer.items():
            index = torch.full((n,), -1, dtype=torch.long)
            index[torch.tensor(ids)] = torch.arange(len(ids))
            local_index[layer] = index.to(self.torch_device)  # ids arrive on the host (Ray, gRPC) or here
            weights[layer] = LayerWeights.stack([self._expert_rows(held, layer, e) for e in ids], self.fp8_block)
        layout = ExpertLayout(version, per_layer, local_index, weights)
        with self._lock:
            self._layouts[version] = layout
        return layout

    def _expert_rows(self, held: list[ExpertLayout], layer: int, e: int) -> tuple[torch.Tensor, ...]:
        """Expert e's tensors in `layer` (LayerWeights.rows): copied from a held version that has it (FP8 scales
        with their weights), else read from the checkpoint. Each tensor goes to the device as read (safetensors
        reads to host memory): the host never holds more than one expert at a time."""
        have = next((h for h in held if h.local_index[layer][e] >= 0), None)
        if have is not None:
            return have.weights[layer].rows(int(have.local_index[layer][e]))
        named = zip(expert_weight_names(layer, e), expert_shapes(self.spec), strict=True)
        if self.fp8_block is not None:  # kept as stored: FP8 values and their float32 scale tiles
            (g, sg), (u, su), (d, sd) = (self.reader.get_fp8(name, shape) for name, shape in named)
            return tuple(t.to(self.torch_device) for t in (torch.cat([g, u]), d, torch.cat([sg, su]), sd))
        g, u, d = (  # rounded to the model's dtype, then held in matmul_dtype (exact: only ever wider)
            self.reader.get(name, shape, self.dtype).to(self.torch_device, self.matmul_dtype) for name, shape in named)
        return torch.cat([g, u], dim=0), d

    def release(self, keep: int) -> None:
        """Make `keep` the current version and free every other one (their calls must have finished)."""
        with self._lock:
            if keep not in self._layouts:
                raise ValueError(f"version={keep}: not loaded on this group (loaded: {sorted(self._layouts)})")
            self._layouts = {keep: self._layouts[keep]}
            self.version = keep

    @property
    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._layouts)

    def layout(self, version: int | None = None) -> ExpertLayout:
        """The layout calls naming `version` use (None: the current one)."""
        with self._lock:
            v = self.version if version is None else version
            layout = self._layouts.get(v)
            loaded = sorted(self._layouts)
        if layout is None:
            raise PlacementVersionMissing(f"placement_version={v}: not loaded on this group (device {self.device}; "
                                     f"loaded: {loaded})")
        return layout

    def _per_layer(self, expert_ids: Sequence[int],
                   layer_experts: Mapping[int, Sequence[int]] | None) -> dict[int, list[int]]:
        n = self.spec.n_routed_experts
        per_layer = {layer: list(expert_ids) for layer in self.spec.moe_layers}
        for layer, ids in (layer_experts or {}).items():
            if layer not in per_layer:
                raise ValueError(f"layer_experts: layer {layer} is not an MoE layer ({self.spec.moe_layers})")
            per_layer[layer] = list(ids)
        for layer, ids in per_layer.items():
            bad = [e for e in ids if not 0 <= e < n]
            if bad or len(set(ids)) != len(ids) or not ids:
                where = "expert_ids" if layer not in (layer_experts or {}) else f"layer_experts[{layer}]"
                raise ValueError(f"{where}={ids}: expected distinct ids in [0, {n})")
        return per_layer

    # -- the current version, as the transports and tests read it ----------------------------------------
    @property
    def layer_experts(self) -> dict[int, list[int]]:
        return self.layout().layer_experts

    @property
    def expert_ids(self) -> list[int]:
        """Every expert held in some layer of the current version."""
        return sorted({e for ids in self.layer_experts.values() for e in ids})

    @property
    def local_index(self) -> dict[int, torch.Tensor]:
        return self.layout().local_index

    @property
    def w_gate_up(self) -> dict[int, torch.Tensor]:
        return self.layout().w_gate_up

    @property
    def w_down(self) -> dict[int, torch.Tensor]:
        return self.layout().w_down

    @property
    def weight_dtype(self) -> str:
        """What the expert weights are held as, for memory reports: 'float8_e4m3fn+scales[bo x bi]' or a dtype."""
        if self.fp8_block is not None:
            return f"float8_e4m3fn+scales[{self.fp8_block[0]}x{self.fp8_block[1]}]"
        return str(self.matmul_dtype).removeprefix("torch.")

    @property
    def weight_bytes(self) -> int:
        """Bytes of routed-expert weights held (FP8 scale tiles included), every loaded version counted."""
        with self._lock:
            return sum(layout.weight_bytes for layout in self._layouts.values())

    def check(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              version: int | None = None) -> ExpertLayout:
        """Validate a request from a transport; raises ExpertRequestError naming the field. Returns the layout
        (placement version) that serves it."""
        layout = self.layout(version)
        self._check_layer(layer)
        h = self.spec.hidden_size
        if hidden.dim() != 2 or hidden.shape[1] != h:
            raise ExpertRequestError(f"hidden.shape={list(hidden.shape)}: expected [T, {h}]")
        if not hidden.is_floating_point():
            raise ExpertRequestError(f"hidden.dtype={hidden.dtype}: expected a floating-point dtype")
        t = hidden.shape[0]
        if topk_ids.dim() != 2 or topk_ids.shape[0] != t:
            raise ExpertRequestError(f"expert_ids.shape={list(topk_ids.shape)}: expected [T={t}, K] to match hidden")
        if topk_ids.shape[1] > self.spec.top_k:  # bounds the pairs (T x K) one call can make the group sort
            raise ExpertRequestError(f"expert_ids.shape={list(topk_ids.shape)}: expected K <= {self.spec.top_k} "
                                     f"(the model's num_experts_per_tok)")
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise ExpertRequestError(f"expert_ids.dtype={topk_ids.dtype}: expected int32 or int64")
        if topk_weights.shape != topk_ids.shape:
            raise ExpertRequestError(
                f"weights.shape={list(topk_weights.shape)}: expected {list(topk_ids.shape)} like expert_ids"
            )
        if not topk_weights.is_floating_point():
            raise ExpertRequestError(f"weights.dtype={topk_weights.dtype}: expected a floating-point dtype")
        local_index = layout.local_index[layer]
        ids = topk_ids.to(local_index.device, torch.long)
        n = self.spec.n_routed_experts
        out_of_range = ids[(ids < -1) | (ids >= n)]
        if out_of_range.numel():
            raise ExpertRequestError(f"expert_ids: {out_of_range[:5].tolist()} outside [-1, {n})")
        _check_distinct(ids)
        wanted = ids[ids >= 0]
        foreign = torch.unique(wanted[local_index[wanted] < 0])
        if foreign.numel():
            raise ExpertRequestError(f"expert_ids: experts {foreign[:8].tolist()} are not hosted on this group "
                                     f"(device {self.device}) in layer {layer}, placement version {layout.version}")
        return layout

    def run(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
            version: int | None = None) -> ExpertResult:
        """Checked forward for transports: every non-negative id must be hosted here in placement `version`
        (None: the current one)."""
        layout = self.check(layer, hidden, topk_ids, topk_weights, version)
        start = time.perf_counter()
        local_index = layout.local_index[layer]
        topk_ids = topk_ids.to(local_index.device)  # the in-process gateway's ids are already there
        local = torch.where(topk_ids >= 0, local_index[topk_ids.long().clamp(min=0)], -1)  # [T, K] stack rows
        pairs = sort_by_expert(local, len(layout.layer_experts[layer]))  # once: the FFN and the counts read it
        out = self._compute(layout, layer, hidden, local, topk_weights, pairs)
        return ExpertResult(out, pairs.counts, (time.perf_counter() - start) * 1e3)

    def experts_in(self, layer: int, version: int | None = None) -> list[int]:
        """The experts this group hosts in `layer`, in the order of its weight stacks and `tokens_per_expert`."""
        return self.layout(version).layer_experts[layer]

    def _check_layer(self, layer: int) -> None:
        if layer not in self.spec.moe_layers:
            raise ExpertRequestError(f"layer={layer}: not an MoE layer (MoE layers: {self.spec.moe_layers})")

    def _compute(self, layout: ExpertLayout, layer: int, hidden: torch.Tensor, local: torch.Tensor,
                 weights: torch.Tensor, pairs: ExpertPairs) -> torch.Tensor:
        """local: [T, K] rows of the layer's stacks (-1 = elsewhere), on the group's device, sorted into `pairs`."""
        x, w = hidden.to(self.torch_device, self.dtype), weights.to(self.torch_device)
        lw = layout.weights[layer]
        if self.kernel == "triton" and lw.fp8:
            out = fused_moe_fp8(x, lw.w_gate_up, lw.s_gate_up, lw.w_down, lw.s_down, lw.block, local, w, pairs=pairs)
        elif self.kernel == "triton":
            out = fused_moe(x, lw.w_gate_up, lw.w_down, local, w, pairs=pairs)
        elif lw.fp8:
            out = widened_expert_ffn(x, lw, w, pairs, self.matmul_dtype, self.scratch)
        else:
            out = grouped_expert_ffn(x, lw.w_gate_up, lw.w_down, local, w, pairs=pairs)
        return out.to(hidden.device, hidden.dtype)
