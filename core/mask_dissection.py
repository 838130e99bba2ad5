"""NetDissect-style mask IoU of every unit of a stored run with the probe set's segmentation masks.

For probe sets whose images carry a label image in ``metadata["mask_path"]``
(such as ``ddsm-seg66``), :func:`mask_iou_run` scores each unit of the run's
spatial layers against each tissue concept (:data:`MASK_CONCEPTS`) as in
network dissection (Bau et al., CVPR 2017):

1. Threshold pass.  One forward pass over all probe images records each
   unit's spatial maps at the layer's own resolution and keeps, per unit,
   only the largest values needed to read off the ``quantile`` (0.995 keeps
   the top 0.5 %).  The threshold equals ``numpy.quantile`` over all values
   of all maps (linear interpolation) whenever those values fit in the
   memory budget.  Otherwise each image contributes the same number of
   spatial positions, drawn uniformly with a fixed seed, and the threshold
   is the quantile of that sample.
2. IoU pass.  A second forward pass upsamples each unit's map to the
   label image's size (bilinear), binarises it with ``map > threshold``, and
   adds its intersection and union with each concept mask to per-unit sums.
   The IoU is the summed intersection over the summed union over all images.

Memory stays bounded: no full-resolution map is kept beyond the image and
unit chunk being scored.  Results go to ``unit_mask_iou``; the view
``top_mask_labels`` gives each unit's best concept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import numpy as np
import pyarrow as pa

from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import LayerError
from mammo_dissect.core.errors import ProbeSetError
from mammo_dissect.core.errors import StoreError
from mammo_dissect.core.extraction import NonFiniteActivationError
from mammo_dissect.core.extraction import ResolvedLayer
from mammo_dissect.core.extraction import forward_in_batches
from mammo_dissect.core.fingerprint import check_image_order
from mammo_dissect.core.masks import label_mask
from mammo_dissect.plugins.probe_sets.ddsm_seg66 import TISSUE_CONCEPTS


if TYPE_CHECKING:
    import torch

    from mammo_dissect.core.pipeline import Plan
    from mammo_dissect.core.plugins import Registry


logger = logging.getLogger(__name__)

#: Concept text of each label-image value that is scored: the DDSM-66 tissue labels
#: (255 pectoral muscle, 192 fibroglandular tissue, 128 fatty tissue).  Background (64) is not a concept.
MASK_CONCEPTS: dict[int, str] = dict(TISSUE_CONCEPTS)

#: Best IoU above which NetDissect counts a unit as a detector of its concept (Bau et al. 2017 use 0.04).
IOU_CUT = 0.04

#: Memory for the largest activation values kept per unit in the threshold pass, over all layers.
DEFAULT_MEMORY_MIB = 256

#: Size of one chunk of upsampled unit maps in the IoU pass.
CHUNK_BYTES = 64 * 1024 * 1024

#: Probe-set preprocessing steps that keep an image's geometry, so the label image still lines up with it.
GEOMETRY_PRESERVING_STEPS = frozenset({"resize", "replicate_channels"})

#: Seed of the spatial positions drawn when a unit's values do not fit in the memory budget.
SAMPLE_SEED = 0


@dataclass
class SpatialLayer:
    """A stored spatial layer of the run, resolved in the re-prepared model."""

    layer_id: int
    name: str
    resolved: ResolvedLayer
    n_units: int
    height: int
    width: int


@dataclass
class QuantileSampler:
    """Streaming per-unit quantile: keeps the largest values of each unit's (possibly sampled) positions.

    With ``n`` values in all, ``numpy.quantile`` (linear) reads the sorted
    values at ``lo = floor(q * (n - 1))`` and ``lo + 1``, so the ``n - lo``
    largest values are enough for an exact result.
    """

    quantile: float
    #: Values per image that enter the quantile (all ``height * width`` positions, or a sample of them).
    per_image: int
    #: Positions of the map, ``height * width``.
    positions: int
    #: Number of values in all, ``images * per_image``.
    total: int
    #: Largest values so far [units x keep], descending after :meth:`thresholds`.
    top: torch.Tensor
    generator: torch.Generator

    @property
    def keep(self) -> int:
        return int(self.top.shape[1])

    @property
    def sampled(self) -> bool:
        return self.per_image < self.positions

    def add(self, maps: torch.Tensor) -> None:
        """Add a batch of maps [B x units x h x w]."""
        import torch

        flat = maps.flatten(2)  # [B, K, h*w]
        if self.sampled:
            picks = [torch.randperm(self.positions, generator=self.generator)[: self.per_image] for _ in range(len(flat))]
            index = torch.stack(picks).to(flat.device)
            flat = torch.gather(flat, 2, index.unsqueeze(1).expand(-1, flat.shape[1], -1))
        values = flat.permute(1, 0, 2).reshape(flat.shape[1], -1)
        merged = torch.cat([self.top, values.to(self.top.device)], dim=1)
        self.top = torch.topk(merged, k=self.keep, dim=1).values

    def thresholds(self) -> np.ndarray:
        """Return each unit's threshold, as ``numpy.quantile`` of all added values."""
        position = self.quantile * (self.total - 1)
        lo = math.floor(position)
        hi = min(lo + 1, self.total - 1)
        descending = self.top.double().cpu().numpy()
        low_value = descending[:, self.total - 1 - lo]
        high_value = descending[:, self.total - 1 - hi]
        return low_value + (position - lo) * (high_value - low_value)


def new_sampler(
    quantile: float, n_images: int, n_units: int, height: int, width: int, budget_bytes: int, device: Any
) -> QuantileSampler:
    """Return a sampler that keeps at most about ``budget_bytes`` of float32 values for ``n_units`` units."""
    import torch

    positions = height * width
    per_image = positions
    cap = max(16, budget_bytes // (4 * n_units))
    if _values_to_keep(quantile, n_images * positions) > cap:
        # Draw fewer positions per image so that the kept values, about (1 - q) of them, fit the cap.
        # Two positions less absorb the rounding in _values_to_keep.
        share = cap / _values_to_keep(quantile, n_images * positions)
        per_image = max(1, math.floor(positions * share) - 2)
    total = n_images * per_image
    keep = _values_to_keep(quantile, total)
    return QuantileSampler(
        quantile=quantile,
        per_image=per_image,
        positions=positions,
        total=total,
        top=torch.full((n_units, keep), float("-inf"), device=device),
        generator=torch.Generator().manual_seed(SAMPLE_SEED),
    )


def _values_to_keep(quantile: float, total: int) -> int:
    return total - math.floor(quantile * (total - 1))


# ---------------------------------------------------------------- inputs


def check_masks(plan: Plan) -> None:
    """Raise :class:`ProbeSetError` unless every probe image has a label image that lines up with it."""
    reader = plan.probe_set.reader
    missing = [image.image_id for image in plan.probe_set.images if not image.metadata.get("mask_path")]
    if missing:
        raise ProbeSetError(
            f"probe set {reader!r} has {len(missing)} image(s) without metadata['mask_path'] "
            f"(first: {', '.join(missing[:5])}); mask IoU needs a probe set with segmentation masks, such as ddsm-seg66"
        )
    absent = [str(image.metadata["mask_path"]) for image in plan.probe_set.images if not Path(image.metadata["mask_path"]).is_file()]
    if absent:
        raise ProbeSetError(
            f"{len(absent)} label image(s) of probe set {reader!r} not found (first: {', '.join(absent[:3])}); restore them"
        )
    moved = [step.get("step") for step in plan.probe_set.preprocessing if step.get("step") not in GEOMETRY_PRESERVING_STEPS]
    if moved:
        raise ConfigError(
            f"probe set {reader!r} uses preprocessing step(s) {moved}, which move pixels, but the label images are "
            f"not transformed with them; run the dissection with only {sorted(GEOMETRY_PRESERVING_STEPS)} steps"
        )


def read_mask_labels(path: str | Path) -> np.ndarray:
    """Read a label image as uint8 [H, W]."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.uint8)


def spatial_layers(plan: Plan, stored: list[tuple[int, str, int, list[int]]]) -> list[SpatialLayer]:
    """Match the run's stored 4-D layers (one output [C, H, W] per image) to the re-prepared model's modules."""
    resolved = {layer.name: layer for layer in plan.layers}
    layers = []
    for layer_id, name, n_units, shape in stored:
        if shape is None or len(shape) != 3:
            logger.info("layer %s has output shape %s, not [C, H, W]: no mask IoU", name, shape)
            continue
        if name not in resolved:
            raise LayerError(
                f"layer {name!r} of the run is not found in the re-prepared target {plan.target.spec!r}; "
                f"the target changed since the run, so run the dissection again"
            )
        layers.append(SpatialLayer(layer_id, name, resolved[name], int(n_units), int(shape[1]), int(shape[2])))
    if not layers:
        names = ", ".join(name for _, name, _, _ in stored)
        raise LayerError(
            f"the run has no layer with spatial output [C, H, W] (layers: {names}); "
            f"mask IoU needs convolutional layers, so run a dissection of one"
        )
    return layers


# ---------------------------------------------------------------- forward passes


def layer_outputs(
    plan: Plan, layers: list[SpatialLayer], indices: list[int], description: str
) -> Iterator[tuple[list[int], dict[int, torch.Tensor]]]:
    """Run the target over probe images ``indices`` and yield each batch's indices and float32 layer outputs by layer id."""
    import torch
    from tqdm import tqdm

    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for layer in layers:

        def hook(module: Any, inputs: Any, output: Any, _id: int = layer.layer_id) -> None:
            first = output[0] if isinstance(output, (tuple, list)) else output
            outputs[_id] = first.detach().float()

        handles.append(layer.resolved.module.register_forward_hook(hook))
    model = plan.target.model.to(plan.runtime.device).eval()
    bar = tqdm(total=len(indices), desc=description, unit="image", disable=not plan.runtime.progress)
    try:
        for chunk in forward_in_batches(model, plan.target.preprocess, plan.probe_set, indices, plan.runtime, description):
            for layer in layers:
                if not bool(torch.isfinite(outputs[layer.layer_id]).all()):
                    ids = ", ".join(plan.probe_set.images[index].image_id for index in chunk)
                    raise NonFiniteActivationError(
                        f"layer {layer.name!r} has NaN or Inf activations on one of the images {ids}, which the "
                        f"run did not drop; check the images and the model weights"
                    )
            yield chunk, outputs
            bar.update(len(chunk))
    finally:
        bar.close()
        for handle in handles:
            handle.remove()


def unit_thresholds(
    plan: Plan, layers: list[SpatialLayer], indices: list[int], quantile: float, memory_mib: int
) -> dict[int, np.ndarray]:
    """Return each layer's per-unit activation thresholds at ``quantile`` over all images (first pass)."""
    budget = memory_mib * 1024 * 1024 // len(layers)
    samplers = {
        layer.layer_id: new_sampler(
            quantile, len(indices), layer.n_units, layer.height, layer.width, budget, plan.runtime.device
        )
        for layer in layers
    }
    for layer in layers:
        sampler = samplers[layer.layer_id]
        if sampler.sampled:
            logger.warning(
                "layer %s: the top values of all %d positions per image do not fit in %d MiB, so the threshold "
                "is the quantile of %d positions per image drawn with seed %d",
                layer.name, sampler.positions, memory_mib, sampler.per_image, SAMPLE_SEED,
            )
    for _, outputs in layer_outputs(plan, layers, indices, "mask IoU thresholds"):
        for layer in layers:
            samplers[layer.layer_id].add(outputs[layer.layer_id])
    return {layer_id: sampler.thresholds() for layer_id, sampler in samplers.items()}


def concept_masks(labels: np.ndarray, concepts: Mapping[int, str]) -> np.ndarray:
    """Return boolean masks [concepts x H x W] of the label image, in the order of ``concepts``."""
    return np.stack([label_mask(labels, value) for value in concepts])


def accumulate_iou(
    plan: Plan,
    layers: list[SpatialLayer],
    indices: list[int],
    thresholds: dict[int, np.ndarray],
    concepts: Mapping[int, str],
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Return each layer's summed intersections and unions [units x concepts] over all images (second pass)."""
    import torch
    import torch.nn.functional as functional

    device = plan.runtime.device
    sums = {
        layer.layer_id: (np.zeros((layer.n_units, len(concepts))), np.zeros((layer.n_units, len(concepts))))
        for layer in layers
    }
    cuts = {layer_id: torch.from_numpy(values).float().to(device) for layer_id, values in thresholds.items()}
    for chunk, outputs in layer_outputs(plan, layers, indices, "mask IoU"):
        for position, index in enumerate(chunk):
            labels = read_mask_labels(plan.probe_set.images[index].metadata["mask_path"])
            masks = torch.from_numpy(concept_masks(labels, concepts)).to(device)
            flat_masks = masks.flatten(1).float()  # [concepts, H*W]
            mask_area = flat_masks.sum(dim=1).double()
            height, width = labels.shape
            step = max(1, CHUNK_BYTES // (4 * height * width))
            for layer in layers:
                maps = outputs[layer.layer_id][position]  # [K, h, w]
                intersections, unions = sums[layer.layer_id]
                for first in range(0, layer.n_units, step):
                    part = maps[first : first + step].unsqueeze(1)
                    upsampled = functional.interpolate(part, size=(height, width), mode="bilinear", align_corners=False)
                    active = (upsampled.squeeze(1) > cuts[layer.layer_id][first : first + step, None, None]).flatten(1).float()
                    # Counts stay exact in float32 up to 2**24 pixels per image.
                    both = (active @ flat_masks.T).double()  # [units, concepts]
                    area = active.sum(dim=1).double()[:, None]
                    intersections[first : first + step] += both.cpu().numpy()
                    unions[first : first + step] += (area + mask_area[None, :] - both).cpu().numpy()
    return sums


# ---------------------------------------------------------------- results


def iou_table(
    layers: list[SpatialLayer],
    sums: dict[int, tuple[np.ndarray, np.ndarray]],
    thresholds: dict[int, np.ndarray],
    concepts: Mapping[int, str],
    quantile: float,
) -> tuple[pa.Table, dict[int, np.ndarray]]:
    """Return the ``unit_mask_iou`` rows (without ``run_id``) and each layer's IoU matrix [units x concepts]."""
    texts = list(concepts.values())
    parts = []
    ious = {}
    for layer in layers:
        intersections, unions = sums[layer.layer_id]
        iou = np.divide(intersections, unions, out=np.zeros_like(intersections), where=unions > 0)
        ious[layer.layer_id] = iou
        n_units, n_concepts = iou.shape
        parts.append(pa.table({
            "layer_id": pa.array(np.full(n_units * n_concepts, layer.layer_id, dtype=np.int32)),
            "unit": pa.array(np.repeat(np.arange(n_units, dtype=np.int32), n_concepts)),
            "concept": pa.array(texts * n_units, pa.string()),
            "iou": pa.array(iou.reshape(-1)),
            "threshold": pa.array(np.repeat(thresholds[layer.layer_id].astype(np.float64), n_concepts)),
            "quantile": pa.array(np.full(n_units * n_concepts, quantile, dtype=np.float64)),
        }))
    return pa.concat_tables(parts), ious


def layer_summary(layer: SpatialLayer, iou: np.ndarray, texts: list[str], quantile: float, n_images: int) -> dict[str, Any]:
    """Summarise one layer: mean best IoU, units above :data:`IOU_CUT`, and how many units each concept wins."""
    best = iou.max(axis=1)
    winners = iou.argmax(axis=1)
    return {
        "layer_id": layer.layer_id,
        "layer": layer.name,
        "n_units": layer.n_units,
        "n_images": n_images,
        "quantile": quantile,
        "mean_best_iou": float(best.mean()),
        "max_best_iou": float(best.max()),
        "iou_cut": IOU_CUT,
        "n_units_above_cut": int((best > IOU_CUT).sum()),
        "best_concept_units": {text: int((winners == index).sum()) for index, text in enumerate(texts)},
    }


def _prepare_run(
    config: dict[str, Any],
    fingerprint: str | None,
    registry: Registry | None,
    progress: bool,
    image_ids: list[str] | None = None,
) -> Plan:
    from mammo_dissect.core.config import load_config
    from mammo_dissect.core.pipeline import prepare

    plan = prepare(load_config(None, data=config), registry, progress=progress)
    if fingerprint and plan.probe_fingerprint != fingerprint:
        raise ProbeSetError(
            f"the probe images at {plan.probe_set.root} changed since the run (fingerprint "
            f"{plan.probe_fingerprint[:12]} instead of {fingerprint[:12]}); restore them, or run the "
            f"dissection again and score the new run"
        )
    if image_ids is not None:
        check_image_order(
            [image.image_id for image in plan.probe_set.images], image_ids, plan.probe_set.root,
            "run the dissection again and score the new run",
        )
    return plan


def mask_iou_run(
    database: str | Path,
    run_id: str,
    quantile: float = 0.995,
    progress: bool = False,
    *,
    registry: Registry | None = None,
    memory_mib: int = DEFAULT_MEMORY_MIB,
) -> list[dict[str, Any]]:
    """Score every unit of a completed run's spatial layers against the probe set's tissue masks by IoU.

    The run's stored configuration is prepared again (same probe set, target
    and layers), the probe images must be unchanged and carry
    ``metadata["mask_path"]``.  Rows go to ``unit_mask_iou`` (one per unit
    and concept), replacing the run's earlier rows in one transaction.

    :param run_id: a run id or a unique prefix of one.
    :param quantile: activation quantile over all images and positions that
        binarises a unit's maps; NetDissect uses 0.995.
    :param memory_mib: memory for the per-unit top values of the threshold
        pass; beyond it the threshold comes from a seeded sample of positions.
    :returns: one summary per scored layer (see :func:`layer_summary`).
        ``n_units_above_cut`` counts units whose best IoU exceeds 0.04, the
        cut NetDissect uses to call a unit a concept detector.
    """
    from mammo_dissect.core.store import Store
    from mammo_dissect.core.validity import write_rows

    if not 0.0 < quantile < 1.0:
        raise ConfigError(f"quantile must be between 0 and 1 (exclusive), got {quantile}; NetDissect uses 0.995")
    if memory_mib < 1:
        raise ConfigError(f"memory_mib must be at least 1, got {memory_mib}")
    with Store(Path(database)) as store:
        run_id = store.resolve_run_id(run_id)
        run = store.get_run(run_id)
        if run["status"] != "completed":
            raise StoreError(
                f"run {run_id} in {database} has status {run['status']!r}; only completed runs can be scored"
            )
        _, stored = store.query(
            "SELECT layer_id, name, n_units, output_shape FROM layers WHERE run_id = ? ORDER BY layer_id", [run_id]
        )
        _, id_rows = store.query("SELECT image_id FROM probe_images WHERE run_id = ? ORDER BY image_index", [run_id])
    plan = _prepare_run(
        run["config"], run.get("probe_fingerprint"), registry, progress, [image_id for (image_id,) in id_rows]
    )
    check_masks(plan)
    layers = spatial_layers(plan, [(int(a), str(b), int(c), list(d) if d is not None else None) for a, b, c, d in stored])
    dropped = set((run.get("extra") or {}).get("dropped_images") or [])
    indices = [index for index, image in enumerate(plan.probe_set.images) if image.image_id not in dropped]
    if dropped:
        logger.info("run %s: %d image(s) with non-finite activations left out, as in the run", run_id, len(dropped))
    logger.info(
        "run %s: mask IoU of %d layer(s) on %d image(s) at quantile %g", run_id, len(layers), len(indices), quantile
    )

    thresholds = unit_thresholds(plan, layers, indices, quantile, memory_mib)
    sums = accumulate_iou(plan, layers, indices, thresholds, MASK_CONCEPTS)
    table, ious = iou_table(layers, sums, thresholds, MASK_CONCEPTS, quantile)
    texts = list(MASK_CONCEPTS.values())
    summaries = [layer_summary(layer, ious[layer.layer_id], texts, quantile, len(indices)) for layer in layers]

    with Store(Path(database)) as store:
        write_rows(store, run_id, {"unit_mask_iou": table}, {"unit_mask_iou": "true"})
    for summary in summaries:
        logger.info(
            "run %s layer %s: mean best IoU %.4f, %d of %d units above %.2f",
            run_id, summary["layer"], summary["mean_best_iou"], summary["n_units_above_cut"], summary["n_units"], IOU_CUT,
        )
    return summaries
