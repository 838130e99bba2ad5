"""Get the target model's activations through the cache, and build the model only when needed.

Pooled activations [N x K] per layer come from the ``activations`` cache or
from one forward pass with the configured executor.  Until
:func:`ensure_target` builds the model, a plan prepared with ``lazy_target``
has :data:`UNBUILT` as its model.  :func:`collect_activation_maps` runs a
second forward pass for the spatial maps of each unit's top images.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import numpy as np

from mammo_dissect.core.cache import cache_key
from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import MammoDissectError
from mammo_dissect.core.errors import PluginError
from mammo_dissect.core.extraction import LayerActivations
from mammo_dissect.core.extraction import ResolvedLayer
from mammo_dissect.core.extraction import extract_activations
from mammo_dissect.core.extraction import forward_in_batches
from mammo_dissect.core.extraction import resolve_layers
from mammo_dissect.core.fingerprint import image_order
from mammo_dissect.core.preprocessing import describe_preprocess
from mammo_dissect.core.types import validate_options


if TYPE_CHECKING:
    import torch

    from mammo_dissect.core.pipeline import Plan


logger = logging.getLogger(__name__)


class UnbuiltModel:
    """Placeholder for a target model that was not built because every layer it is needed for is cached.

    :func:`ensure_target` builds the real model; any use of this object before that is a bug.
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise MammoDissectError(
            f"the target model was not built (its activations were all cached), so {name!r} is not "
            f"available; this is a bug in mammo-dissect: call ensure_target(plan) before using the model"
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__getattr__("forward")


UNBUILT = UnbuiltModel()


def cached_layer_depths(plan: Plan) -> dict[str, int] | None:
    """Return each requested layer's depth from its activation cache entry, or None unless all are cached.

    Only entries that record the layer's depth count.  Names that would
    resolve to the same module also give None, so the model is built and the
    layers are resolved as usual.  The arrays themselves are checked
    when :func:`cached_activations` loads them; an invalid one makes the
    model be built then.
    """
    names = [layer.name for layer in plan.layers]
    if len(set(names)) != len(names) or any(not name for name in names):
        return None
    base = activation_key_parts(plan)
    depths: dict[str, int] = {}
    for name in names:
        key = cache_key({**base, "layer": name})
        meta = plan.cache.peek_meta("activations", key)
        if meta is None or not isinstance(meta.get("layer_depth"), int):
            return None
        depths[name] = meta["layer_depth"]
    return depths


def ensure_target(plan: Plan) -> None:
    """Build the target model of a plan prepared with ``lazy_target``, if it was not built yet.

    The built target must match the loader's description in every field that
    the cache keys and the stored run use.  A mismatch is a bug in the loader,
    so it stops the run.  The layers are resolved on the built model.
    """
    if plan.target.model is not UNBUILT:
        return
    loader = plan.registry.get("target loader", plan.config.target.loader)
    logger.info("building target %s", plan.target.spec)
    target = loader.load(plan.plugin_options["target"])
    described = {
        "spec": plan.target.spec,
        "weights_path": plan.target.weights_path,
        "weights_sha256": plan.target.weights_sha256,
        "preprocessing": describe_preprocess(plan.target.preprocess),
        "token_layout": plan.target.token_layout,
    }
    loaded = {
        "spec": target.spec,
        "weights_path": target.weights_path,
        "weights_sha256": target.weights_sha256,
        "preprocessing": describe_preprocess(target.preprocess),
        "token_layout": target.token_layout,
    }
    for field_name, value in described.items():
        if loaded[field_name] != value:
            raise PluginError(
                f"target loader {plan.config.target.loader!r}: describe() gives {field_name} = {value!r} but "
                f"load() gives {loaded[field_name]!r}; this is a bug in the loader plugin, report it to its "
                f"authors; until it is fixed, run with --recompute, which always builds the model"
            )
    layers = resolve_layers(target.model, plan.config.target.layers)
    for assumed, resolved in zip(plan.layers, layers):
        if assumed.depth >= 0 and assumed.depth != resolved.depth:
            raise MammoDissectError(
                f"layer {resolved.name!r} has depth {resolved.depth} in the built model but its cached "
                f"activations record depth {assumed.depth}; the cache entry does not belong to this model: "
                f"remove it with 'mammo-dissect cache rm --kind activations' and run again"
            )
    plan.target = target
    plan.layers = layers


def activation_key_parts(plan: Plan) -> dict[str, Any]:
    """Return everything that determines a layer's pooled activations, except the layer itself."""
    options = plan.plugin_options["target"].model_dump(mode="json")
    # The weights file's hash identifies the weights; its path does not.
    options.pop("weights", None)
    return {
        "kind": "activations",
        "target_loader": plan.config.target.loader,
        "target_options": options,
        "target_spec": plan.target.spec,
        "weights_sha256": plan.target.weights_sha256,
        "preprocessing": describe_preprocess(plan.target.preprocess),
        "token_layout": plan.target.token_layout,
        "pooling": plan.config.target.pooling,
        "precision": plan.config.precision,
        "probe_fingerprint": plan.probe_fingerprint,
        # Rows follow the probe set's order, which the order-free fingerprint does not capture.
        "image_order": image_order(plan.probe_set),
        "probe_decoding": plan.probe_set.decoding,
    }


def run_executor(plan: Plan, layers: list[ResolvedLayer], out_dir: Path) -> list[LayerActivations]:
    """Extract ``layers`` into ``out_dir`` with the configured executor.

    The built-in ``local`` executor runs :func:`extract_activations` in this
    process.  An executor plugin gets the plan, the layers and the folder and
    must return the same: one ``.npy`` file [N x K] per layer in ``out_dir``
    with rows in probe-set order.
    """
    choice = plan.config.executor
    if choice.name == "local":
        if choice.options:
            raise ConfigError(f"executor 'local' takes no options, got {sorted(choice.options)}")
        return extract_activations(plan.target, layers, plan.probe_set, plan.runtime, plan.config.target.pooling, out_dir)
    executor = plan.registry.get("executor", choice.name)
    options = validate_options(executor.Options, choice.options, "executor.options")
    return executor.extract(options, plan, layers, out_dir)  # type: ignore[no-any-return]


def cached_activations(plan: Plan) -> list[LayerActivations]:
    """Return every layer's pooled activations, from the cache or from one forward pass.

    Layers found in the cache are reused.  The others are extracted together
    into a partial folder, which a run resumes after a crash, and then moved
    into the cache.
    """
    base = activation_key_parts(plan)
    keys = {layer.name: cache_key({**base, "layer": layer.name}) for layer in plan.layers}
    hits = {
        layer.name: plan.cache.load("activations", keys[layer.name], f"activations of layer {layer.name}")
        for layer in plan.layers
    }
    if any(hit is None for hit in hits.values()):
        # Building the model replaces plan.layers by the layers of the built model.
        ensure_target(plan)
    found: dict[str, LayerActivations] = {}
    missing = []
    for layer in plan.layers:
        hit = hits[layer.name]
        if hit is None:
            missing.append(layer)
        else:
            found[layer.name] = cached_entry(plan, layer, keys[layer.name], hit[1])
    if missing:
        group = cache_key({"layers": sorted(keys[layer.name] for layer in missing)})
        partial = plan.cache.root / "partial" / group
        with exclusive_lock(partial.with_name(f"{group}.lock")) as waited:
            if waited and not plan.cache.recompute:
                # Another run on the same cache may have stored these layers while this one waited.
                stored, missing = load_cached_layers(plan, missing, keys)
                found.update(stored)
            if missing:
                found.update(extract_into_cache(plan, missing, keys, partial))
    return [found[layer.name] for layer in plan.layers]


def load_cached_layers(
    plan: Plan, layers: list[ResolvedLayer], keys: dict[str, str]
) -> tuple[dict[str, LayerActivations], list[ResolvedLayer]]:
    """Return the activations of ``layers`` found in the cache, by layer name, and the layers not found."""
    found: dict[str, LayerActivations] = {}
    missing = []
    for layer in layers:
        hit = plan.cache.load("activations", keys[layer.name], f"activations of layer {layer.name}")
        if hit is None:
            missing.append(layer)
        else:
            found[layer.name] = cached_entry(plan, layer, keys[layer.name], hit[1])
    return found, missing


def cached_entry(plan: Plan, layer: ResolvedLayer, key: str, meta: dict[str, Any]) -> LayerActivations:
    """Return the activations of ``layer`` in the cache entry ``key``, whose metadata is ``meta``."""
    return LayerActivations(
        layer=layer, path=plan.cache.entry_dir("activations", key) / "array.npy",
        output_shape=list(meta.get("output_shape", [])),
    )


def extract_into_cache(
    plan: Plan, missing: list[ResolvedLayer], keys: dict[str, str], partial: Path
) -> dict[str, LayerActivations]:
    """Extract ``missing`` layers into ``partial`` with the configured executor and move them into the cache."""
    found = {}
    if plan.cache.recompute and partial.exists():
        shutil.rmtree(partial)
    for activations in run_executor(plan, missing, partial):
        name = activations.layer.name
        path = plan.cache.store_file(
            "activations",
            keys[name],
            activations.path,
            {
                "description": f"{plan.target.spec} layer {name}, {len(plan.probe_set)} images",
                "output_shape": activations.output_shape,
                "layer_depth": activations.layer.depth,
            },
        )
        found[name] = LayerActivations(layer=activations.layer, path=path, output_shape=activations.output_shape)
    shutil.rmtree(partial, ignore_errors=True)
    return found


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created when missing), waiting while another process holds it.

    Yields whether this run had to wait.  Runs that share a cache folder
    thus extract the same layers one after the other instead of writing into
    one partial folder at once.  Where ``fcntl`` is missing (Windows), no
    lock is taken.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as handle:
        waited = False
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("another run is extracting the same layers into %s; waiting for it", path.parent)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            waited = True
        try:
            yield waited
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def collect_activation_maps(
    plan: Plan, layer_activations: list[LayerActivations], columns: dict[str, list[np.ndarray]]
) -> dict[int, np.ndarray]:
    """Return each spatial layer's unit maps on the unit's top images, [units x top_k x h x w].

    A second forward pass over the union of all units' top images records
    each layer's output, average-pooled to at most ``activation_map_size``
    on each side.  The maps are cached like activations, keyed by the
    layer's activation key and the top-image indices.
    """
    import torch.nn.functional as functional

    size = plan.config.activation_map_size
    top_k = plan.config.top_k_images
    spatial = [
        (layer_id, activations) for layer_id, activations in enumerate(layer_activations)
        if len(activations.output_shape) == 3
    ]
    if not spatial:
        return {}
    base = activation_key_parts(plan)
    top: dict[int, np.ndarray] = {}
    keys: dict[int, str] = {}
    maps: dict[int, np.ndarray] = {}
    for layer_id, activations in spatial:
        indices = columns["image_index"][layer_id].reshape(-1, top_k)  # [units x top_k]
        top[layer_id] = indices
        keys[layer_id] = cache_key({
            **base, "kind": "activation_maps", "layer": activations.layer.name, "size": size,
            "top_images": hashlib.sha256(indices.astype(np.int64).tobytes()).hexdigest(),
        })
    missing = []
    for layer_id, activations in spatial:
        hit = plan.cache.load("activation_maps", keys[layer_id], f"activation maps of layer {activations.layer.name}")
        if hit is None:
            missing.append((layer_id, activations))
        else:
            maps[layer_id] = np.array(hit[0])
    if not missing:
        return maps

    ensure_target(plan)
    modules = {layer.name: layer.module for layer in plan.layers}
    images = sorted({int(index) for layer_id, _ in missing for index in np.unique(top[layer_id])})
    outputs: dict[int, torch.Tensor] = {}
    shapes = {}
    handles = []
    for layer_id, activations in missing:
        _, height, width = activations.output_shape
        shapes[layer_id] = (min(height, size), min(width, size))
        maps[layer_id] = np.zeros((top[layer_id].shape[0], top_k, *shapes[layer_id]), dtype=np.float32)

        def hook(module: Any, inputs: Any, output: Any, _id: int = layer_id) -> None:
            first = output[0] if isinstance(output, (tuple, list)) else output
            outputs[_id] = functional.adaptive_avg_pool2d(first.detach().float(), shapes[_id]).cpu()

        handles.append(modules[activations.layer.name].register_forward_hook(hook))
    model = plan.target.model.to(plan.runtime.device).eval()
    try:
        batches = forward_in_batches(
            model, plan.target.preprocess, plan.probe_set, images, plan.runtime, "activation-map pass"
        )
        for chunk in batches:
            for layer_id, _ in missing:
                pooled = outputs[layer_id].numpy()
                for position, image in enumerate(chunk):
                    units, ranks = np.nonzero(top[layer_id] == image)
                    maps[layer_id][units, ranks] = pooled[position, units]
    finally:
        for handle in handles:
            handle.remove()
    for layer_id, activations in missing:
        plan.cache.store(
            "activation_maps", keys[layer_id], maps[layer_id],
            {"description": f"activation maps of {plan.target.spec} layer {activations.layer.name}"},
        )
    return maps
