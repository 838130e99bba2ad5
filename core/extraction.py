"""Layer resolution, forward hooks, pooling and streaming of pooled activations to disk."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import numpy as np

from mammo_dissect.core.cache import write_json_atomic
from mammo_dissect.core.errors import LayerError
from mammo_dissect.core.errors import MammoDissectError
from mammo_dissect.core.errors import close_matches
from mammo_dissect.core.types import LoadedTarget
from mammo_dissect.core.types import ProbeSet
from mammo_dissect.core.types import Runtime


if TYPE_CHECKING:
    import torch


logger = logging.getLogger(__name__)

_BRACKET_INDEX = re.compile(r"\[(\d+)\]")


class NonFiniteActivationError(MammoDissectError):
    """A layer produced NaN or Inf for some probe images."""


def canonical_layer_name(name: str) -> str:
    """Translate bracket indices to dotted form: ``_blocks[3]`` -> ``_blocks.3``."""
    return _BRACKET_INDEX.sub(r".\1", name.strip()).strip(".")


@dataclass
class ResolvedLayer:
    """A requested layer found in the model's module tree."""

    requested: str
    name: str
    module: Any
    depth: int


def resolve_layers(model: torch.nn.Module, requested: Sequence[str]) -> list[ResolvedLayer]:
    """Find each requested layer by its qualified module name, never by evaluating code.

    Raises :class:`LayerError` listing every unknown name with the closest
    valid names, before any compute.
    """
    modules = dict(model.named_modules())
    order = {name: index for index, name in enumerate(modules)}
    resolved = []
    problems = []
    for name in requested:
        canonical = canonical_layer_name(name)
        if canonical in modules and canonical != "":
            resolved.append(ResolvedLayer(requested=name, name=canonical, module=modules[canonical], depth=order[canonical]))
            continue
        names = [key for key in modules if key]
        close = close_matches(canonical, names)
        hint = f"closest: {', '.join(close)}" if close else f"top-level modules: {', '.join(n for n in names if '.' not in n)}"
        problems.append(f"{name!r} ({hint})")
    if problems:
        raise LayerError(
            "unknown layer name(s): " + "; ".join(problems)
            + ". Run 'mammo-dissect layers' to list the layers of this target"
        )
    seen: dict[str, str] = {}
    for layer in resolved:
        if layer.name in seen:
            raise LayerError(f"layers {seen[layer.name]!r} and {layer.requested!r} name the same module {layer.name!r}")
        seen[layer.name] = layer.requested
    return resolved


def pool_output(output: Any, pooling: str, layout: dict[str, Any] | None = None) -> torch.Tensor:
    """Reduce one layer output to [B, K] per unit.

    4-D [B, C, H, W]: spatial mean ("avg") or maximum ("max").  3-D token
    outputs: the CLS token at ``layout["cls_index"]`` (default 0), or the mean
    of the tokens after ``layout["num_prefix_tokens"]`` when ``cls_index`` is
    None; with ``layout["token_first"]`` the layout is [T, B, D].  2-D: as is.  A tuple
    or list: its first element.  The result is a new tensor, so a later
    in-place operation cannot change it.
    """
    import torch

    if isinstance(output, (tuple, list)):
        if not output:
            raise LayerError("layer returned an empty tuple; choose another layer")
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise LayerError(f"layer output is a {type(output).__name__}, not a tensor; choose another layer")
    output = output.detach()
    if output.ndim == 4:
        pooled = output.mean(dim=(2, 3)) if pooling == "avg" else output.amax(dim=(2, 3))
    elif output.ndim == 3:
        layout = layout or {}
        tokens = output.transpose(0, 1) if layout.get("token_first", False) else output
        if "cls_index" in layout and layout["cls_index"] is None:
            # No class token: average the patch tokens after the prefix (register) tokens.
            pooled = tokens[:, int(layout.get("num_prefix_tokens", 0)):].mean(dim=1)
        else:
            pooled = tokens[:, int(layout.get("cls_index", 0))]
    elif output.ndim == 2:
        pooled = output
    else:
        raise LayerError(f"cannot pool a layer output of shape {tuple(output.shape)}; expected 2, 3 or 4 dimensions")
    return pooled.float().clone()


class _ProbeDataset:
    """Map-style dataset yielding (index, preprocessed image) for a DataLoader."""

    def __init__(self, probe_set: ProbeSet, preprocess: Any) -> None:
        self.probe_set = probe_set
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.probe_set)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.preprocess(self.probe_set.read(index))


def make_loader(
    probe_set: ProbeSet, preprocess: Any, runtime: Runtime, batch_size: int | None = None, start: int = 0
) -> Any:
    """Build a DataLoader that decodes and preprocesses images ``start`` to the end, in order."""
    from torch.utils.data import DataLoader
    from torch.utils.data import Subset

    dataset: Any = _ProbeDataset(probe_set, preprocess)
    if start:
        dataset = Subset(dataset, range(start, len(probe_set)))
    return DataLoader(
        dataset,
        batch_size=batch_size or runtime.batch_size,
        shuffle=False,
        num_workers=runtime.num_workers,
        pin_memory=runtime.device.startswith("cuda"),
    )


@dataclass
class LayerActivations:
    """Pooled activations of one layer, stored as a .npy file [N x K]."""

    layer: ResolvedLayer
    path: Path
    output_shape: list[int]

    def load(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")


PROGRESS_FILE = "progress.json"


def is_out_of_memory(exc: BaseException) -> bool:
    """Return whether ``exc`` reports that the device (or the host) ran out of memory."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def forward_in_batches(
    model: Any, preprocess: Any, probe_set: ProbeSet, indices: Sequence[int], runtime: Runtime, description: str
) -> Iterator[list[int]]:
    """Run ``model`` on probe images ``indices`` batch by batch and yield each batch's indices after its forward pass.

    The caller collects the outputs with forward hooks and must read them before it resumes the generator.
    Inference mode stays on while the generator is suspended.  A batch that runs out of memory runs again
    with half the batch size, down to one image, where the error propagates.  ``description`` names the
    pass in the warning logged on each retry.
    """
    import torch

    device_type = torch.device(runtime.device).type
    batch_size = runtime.batch_size
    start = 0
    with torch.inference_mode():
        while start < len(indices):
            chunk = list(indices[start : start + batch_size])
            batch = torch.stack([preprocess(probe_set.read(index)) for index in chunk])
            try:
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=runtime.precision == "bfloat16"):
                    model(batch.to(runtime.device))
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc) or batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                logger.warning("out of memory in the %s; retrying with batch size %d", description, batch_size)
                continue
            yield chunk
            start += len(chunk)


def _read_progress(out_dir: Path, n_images: int, layers: Sequence[ResolvedLayer]) -> dict[str, Any] | None:
    """Return the saved progress of an interrupted extraction into ``out_dir`` if it matches."""
    path = out_dir / PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if progress.get("n_images") != n_images or sorted(progress.get("layers", {})) != sorted(l.name for l in layers):
        return None
    for layer in layers:
        if not (out_dir / f"{safe_file_name(layer.name)}.npy").is_file():
            return None
    return progress


def extract_activations(
    target: LoadedTarget,
    layers: Sequence[ResolvedLayer],
    probe_set: ProbeSet,
    runtime: Runtime,
    pooling: str,
    out_dir: Path,
) -> list[LayerActivations]:
    """Run the target once over the probe set and stream every layer's pooled activations to disk.

    One forward pass per batch serves all layers.  Each batch's pooled
    activations are written into a memory-mapped .npy file per layer, so
    memory keeps one batch, not the whole probe set.  After every batch the
    number of finished images is saved in ``progress.json``; an extraction
    into the same ``out_dir`` that was killed continues from there.  When a
    batch runs out of device memory, the batch size is halved and the batch
    retried; results do not depend on the batch size.
    """
    import torch
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    model = target.model.to(runtime.device)
    model.eval()
    pooled: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    repeated_calls: set[str] = set()

    def make_hook(layer: ResolvedLayer) -> Any:
        layout = target.token_layout.get(layer.name, target.token_layout.get("*"))

        def hook(module: Any, inputs: Any, output: Any) -> None:
            first = output[0] if isinstance(output, (tuple, list)) else output
            if layer.name not in shapes and isinstance(first, torch.Tensor):
                shapes[layer.name] = list(first.shape[1:])
            if layer.name in pooled:
                repeated_calls.add(layer.name)
            pooled[layer.name] = pool_output(output, pooling, layout)

        return hook

    n_images = len(probe_set)
    paths = {layer.name: out_dir / f"{safe_file_name(layer.name)}.npy" for layer in layers}
    arrays: dict[str, np.memmap] = {}
    progress = _read_progress(out_dir, n_images, layers)
    done = 0
    if progress is not None:
        done = int(progress["rows_done"])
        shapes.update({name: info["output_shape"] for name, info in progress["layers"].items()})
        for layer in layers:
            arrays[layer.name] = np.load(paths[layer.name], mmap_mode="r+")
        logger.info("resuming extraction at image %d of %d from %s", done, n_images, out_dir)
    else:
        for stale in out_dir.glob("*.npy"):
            stale.unlink()

    handles = [layer.module.register_forward_hook(make_hook(layer)) for layer in layers]
    batch_size = runtime.batch_size
    bar = tqdm(total=n_images, initial=done, desc="target activations", unit="img", disable=not runtime.progress)
    try:
        while done < n_images:
            try:
                done = _extract_from(
                    model, layers, probe_set, target, runtime, batch_size, done,
                    pooled, shapes, repeated_calls, arrays, paths, out_dir, bar,
                )
            except (RuntimeError, MemoryError) as exc:
                if not is_out_of_memory(exc) or batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)
                logger.warning(
                    "out of memory at image %d; retrying with batch size %d: %s", done, batch_size, exc
                )
                if runtime.device.startswith("cuda"):
                    torch.cuda.empty_cache()
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    results = []
    for layer in layers:
        arrays[layer.name].flush()
        results.append(LayerActivations(layer=layer, path=paths[layer.name], output_shape=shapes.get(layer.name, [])))
    del arrays
    return results


def _extract_from(
    model: Any,
    layers: Sequence[ResolvedLayer],
    probe_set: ProbeSet,
    target: LoadedTarget,
    runtime: Runtime,
    batch_size: int,
    start_at: int,
    pooled: dict[str, Any],
    shapes: dict[str, list[int]],
    repeated_calls: set[str],
    arrays: dict[str, np.memmap],
    paths: dict[str, Path],
    out_dir: Path,
    bar: Any,
) -> int:
    """Extract images ``start_at`` to the end; return the number of images finished."""
    import torch

    n_images = len(probe_set)
    done = start_at
    loader = make_loader(probe_set, target.preprocess, runtime, batch_size=batch_size, start=start_at)
    device_type = torch.device(runtime.device).type
    with torch.inference_mode():
        for indices, batch in loader:
            pooled.clear()
            batch = batch.to(runtime.device, non_blocking=True)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=runtime.precision == "bfloat16"):
                model(batch)
            if repeated_calls:
                raise LayerError(
                    f"layer(s) {', '.join(sorted(repeated_calls))} run more than once per forward pass "
                    f"(a shared module such as an activation reused by several blocks), so their "
                    f"output is ambiguous; choose the block or convolution that contains them"
                )
            start, stop = int(indices[0]), int(indices[-1]) + 1
            for layer in layers:
                values = pooled.get(layer.name)
                if values is None:
                    raise LayerError(
                        f"layer {layer.name!r} was not called during the forward pass; "
                        f"choose a layer the model's forward() uses"
                    )
                values = values.cpu().numpy()
                if not runtime.allow_nonfinite:
                    check_finite_batch(values, layer.name, probe_set, start)
                if layer.name not in arrays:
                    arrays[layer.name] = np.lib.format.open_memmap(
                        paths[layer.name], mode="w+", dtype=np.float32, shape=(n_images, values.shape[1])
                    )
                arrays[layer.name][start:stop] = values
            for array in arrays.values():
                array.flush()
            done = stop
            write_json_atomic(
                out_dir / PROGRESS_FILE,
                {
                    "n_images": n_images,
                    "rows_done": done,
                    "layers": {layer.name: {"output_shape": shapes.get(layer.name, [])} for layer in layers},
                },
            )
            bar.update(stop - start)
    return done


def check_finite_batch(values: np.ndarray, layer: str, probe_set: ProbeSet, start: int) -> None:
    """Raise :class:`NonFiniteActivationError` naming the images whose activations are NaN or Inf."""
    bad_rows = np.where(~np.isfinite(values).all(axis=1))[0]
    if len(bad_rows):
        ids = [probe_set.images[start + int(row)].image_id for row in bad_rows[:10]]
        raise NonFiniteActivationError(
            f"layer {layer!r} produced NaN or Inf for {len(bad_rows)} image(s) of the batch starting "
            f"at image {start}: {', '.join(ids)}; check those images and the model weights"
        )


def safe_file_name(name: str) -> str:
    """Turn a layer name into a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "layer"


def layer_table(model: torch.nn.Module, input_tensor: torch.Tensor) -> list[tuple[str, str, str]]:
    """Return (name, module type, output shape) for every named module, from one forward pass."""
    import torch

    shapes: dict[str, str] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(module: Any, inputs: Any, output: Any, _name: str = name) -> None:
            first = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(first, torch.Tensor) and _name not in shapes:
                shapes[_name] = "x".join(str(size) for size in first.shape[1:])

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(input_tensor)
    finally:
        for handle in handles:
            handle.remove()
    return [
        (name, type(module).__name__, shapes.get(name, "(not called)"))
        for name, module in model.named_modules()
        if name
    ]
