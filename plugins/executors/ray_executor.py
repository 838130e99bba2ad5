"""The ``ray`` executor: activation extraction with Ray Data, on one machine or a cluster.

The dataset is the probe images' indices.  ``map_batches`` sends batches of
indices to a pool of actors (:class:`ExtractionActor`).  Each actor builds the
target once from the target loader's name and validated options, then for
every batch decodes and preprocesses the images, runs one forward pass with
hooks on the requested layers and pools each output with
:func:`mammo_dissect.core.extraction.pool_output`, as the local executor does.
The actors return the indices and the pooled rows, Ray writes them as Parquet
files, and the driver reads those files and assembles one ``.npy`` file
[N x K] per layer in probe-set order.  Workers never open the DuckDB database.

Ray is imported only when this executor runs.  Install it with
``pip install "mammo-dissect[ray]"``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import numpy as np
from pydantic import Field

from mammo_dissect.core.errors import ConfigError
from mammo_dissect.core.errors import LayerError
from mammo_dissect.core.errors import MammoDissectError
from mammo_dissect.core.extraction import LayerActivations
from mammo_dissect.core.extraction import NonFiniteActivationError
from mammo_dissect.core.extraction import ResolvedLayer
from mammo_dissect.core.extraction import is_out_of_memory
from mammo_dissect.core.extraction import pool_output
from mammo_dissect.core.extraction import resolve_layers
from mammo_dissect.core.extraction import safe_file_name
from mammo_dissect.core.hookspecs import hookimpl
from mammo_dissect.core.plugins import DEFAULT_PLUGINS
from mammo_dissect.core.types import Options
from mammo_dissect.core.types import ProbeSet


if TYPE_CHECKING:
    import torch

    from mammo_dissect.core.pipeline import Plan


logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "mammo-dissect[ray]"'
INDEX_COLUMN = "index"
SHAPES_COLUMN = "output_shapes"
PARQUET_FOLDER = "parquet"


class RayExecutorError(MammoDissectError):
    """The Ray executor cannot run (Ray missing, or a worker failed)."""


class RayOptions(Options):
    """Options of the ``ray`` executor (``[executor] options = {...}``)."""

    #: Ray cluster to join: None starts a local Ray on this machine, "auto" joins the cluster
    #: started with ``ray start`` on this node, "ray://host:10001" joins a remote cluster.
    address: str | None = None
    #: CPUs of the local Ray started when ``address`` is None (None: all CPUs of this machine).
    num_cpus: int | None = Field(default=None, ge=1)
    #: GPUs reserved by each extraction actor (0: the actors run on the CPU).
    num_gpus_per_actor: float = Field(default=0, ge=0)
    #: CPUs reserved by each extraction actor.
    num_cpus_per_actor: float = Field(default=1, gt=0)
    #: Number of extraction actors; each one loads the target once.
    concurrency: int = Field(default=1, ge=1)
    #: Images per forward pass (None: the run's ``batch_size``).
    batch_size: int | None = Field(default=None, ge=1)


def import_ray() -> Any:
    """Import Ray, or raise :class:`RayExecutorError` saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayExecutorError(
            f"executor 'ray' needs Ray Data, which is not installed ({exc}); "
            f'install it with: {INSTALL_HINT}, or set [executor] name = "local"'
        ) from None
    return ray


def plugin_modules_of(plan: Plan) -> list[str]:
    """Return the module that registered the plan's target loader, unless it is built in.

    Workers rebuild the registry from module names, because the plan and its
    registry may not pickle.  A built-in loader needs no extra module.
    """
    loader_name = plan.config.target.loader
    plugin_name = plan.registry.origin("target loader", loader_name)
    if plugin_name in DEFAULT_PLUGINS:
        return []
    plugin = plan.registry.manager.get_plugin(plugin_name)
    if not inspect.ismodule(plugin):
        raise RayExecutorError(
            f"target loader {loader_name!r} was registered by plugin {plugin_name!r}, which is not an importable "
            f"module, so Ray workers cannot rebuild it; register the loader from a module (an entry point) "
            f'or use [executor] name = "local"'
        )
    return [plugin.__name__]


class ExtractionActor:
    """Ray Data callable class: loads the target once, then pools a batch of images per call."""

    def __init__(
        self,
        plugin_modules: list[str],
        loader_name: str,
        loader_options: dict[str, Any],
        layer_names: list[str],
        probe_set: ProbeSet,
        pooling: str,
        device: str,
        precision: str,
    ) -> None:

        from mammo_dissect.core.plugins import Registry
        from mammo_dissect.core.plugins import create_manager
        from mammo_dissect.core.types import validate_options

        modules = [importlib.import_module(name) for name in plugin_modules]
        registry = Registry(create_manager(extra_plugins=modules, load_entry_points=False))
        loader = registry.get("target loader", loader_name)
        self.target = loader.load(validate_options(loader.Options, loader_options, "target.options"))
        self.layers = resolve_layers(self.target.model, layer_names)
        self.probe_set = probe_set
        self.pooling = pooling
        self.device = device
        self.precision = precision
        self.model = self.target.model.to(device).eval()
        self.pooled: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, list[int]] = {}
        self.repeated_calls: set[str] = set()
        for layer in self.layers:
            layer.module.register_forward_hook(self._make_hook(layer))

    def _make_hook(self, layer: ResolvedLayer) -> Any:
        import torch

        layout = self.target.token_layout.get(layer.name, self.target.token_layout.get("*"))

        def hook(module: Any, inputs: Any, output: Any) -> None:
            first = output[0] if isinstance(output, (tuple, list)) else output
            if layer.name not in self.shapes and isinstance(first, torch.Tensor):
                self.shapes[layer.name] = list(first.shape[1:])
            if layer.name in self.pooled:
                self.repeated_calls.add(layer.name)
            self.pooled[layer.name] = pool_output(output, self.pooling, layout)

        return hook

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return the batch's indices, each layer's pooled rows as float32 bytes, and the output shapes."""
        import torch

        indices = np.asarray(batch["id"], dtype=np.int64)
        images = torch.stack([self.target.preprocess(self.probe_set.read(int(index))) for index in indices])
        pooled = self._forward_splitting(images)
        out: dict[str, np.ndarray] = {INDEX_COLUMN: indices}
        for position, layer in enumerate(self.layers):
            rows = np.ascontiguousarray(pooled[layer.name].numpy(), dtype=np.float32)
            # Raw float32 bytes keep the values exact and need no tensor extension type to read back.
            out[layer_column(position)] = np.array([row.tobytes() for row in rows], dtype=object)
        shapes = json.dumps({layer.name: self.shapes.get(layer.name, []) for layer in self.layers})
        out[SHAPES_COLUMN] = np.array([shapes] * len(indices), dtype=object)
        return out


    def _forward_splitting(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return each layer's pooled rows [B x K] on the CPU, halving the batch while the device runs out of memory.

        Results do not depend on the split, because every image is pooled on its own.
        """
        import torch

        try:
            return self._forward(images)
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc) or images.shape[0] == 1:
                raise
            logger.warning("out of memory on a batch of %d images; running it in two halves: %s", images.shape[0], exc)
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
        middle = images.shape[0] // 2
        first = self._forward_splitting(images[:middle])
        second = self._forward_splitting(images[middle:])
        return {name: torch.cat([first[name], second[name]]) for name in first}

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run one forward pass and return each requested layer's pooled rows on the CPU."""
        import torch

        self.pooled.clear()
        device_type = torch.device(self.device).type
        with torch.inference_mode():
            on_device = images.to(self.device)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
                self.model(on_device)
        if self.repeated_calls:
            raise LayerError(
                f"layer(s) {', '.join(sorted(self.repeated_calls))} run more than once per forward pass "
                f"(a shared module such as an activation reused by several blocks), so their "
                f"output is ambiguous; choose the block or convolution that contains them"
            )
        result = {}
        for layer in self.layers:
            values = self.pooled.get(layer.name)
            if values is None:
                raise LayerError(
                    f"layer {layer.name!r} was not called during the forward pass; "
                    f"choose a layer the model's forward() uses"
                )
            result[layer.name] = values.float().cpu()
        return result


def layer_column(position: int) -> str:
    """Return the Parquet column name of the layer at ``position`` in the request."""
    return f"layer_{position}"


class RayExecutor:
    """Executor plugin that extracts pooled activations with Ray Data."""

    name = "ray"
    description = "Ray Data: a pool of actors, each loading the target once; local Ray or a cluster"
    Options = RayOptions

    def extract(
        self, options: Options, plan: Plan, layers: list[ResolvedLayer], out_dir: Path
    ) -> list[LayerActivations]:
        """Extract ``layers`` over the plan's probe set into one ``.npy`` file [N x K] per layer in ``out_dir``."""
        assert isinstance(options, RayOptions)
        ray = import_ray()
        out_dir.mkdir(parents=True, exist_ok=True)
        parquet_dir = out_dir / PARQUET_FOLDER
        if parquet_dir.exists():
            shutil.rmtree(parquet_dir)

        check_resources(options)
        started_here = start_ray(ray, options)
        try:
            write_parquet_files(ray, options, plan, layers, parquet_dir)
        finally:
            if started_here:
                ray.shutdown()

        results = assemble_layers(parquet_dir, plan.probe_set, layers, out_dir)
        shutil.rmtree(parquet_dir, ignore_errors=True)
        return results


def check_resources(options: RayOptions) -> None:
    """Raise :class:`ConfigError` when the actors would take every CPU of the local Ray.

    Ray Data also needs a CPU for the tasks that read the index range and
    write Parquet.  Without one, the pipeline stalls with no error (seen with Ray 2.60).
    """
    if options.address is not None:
        return
    num_cpus = options.num_cpus or os.cpu_count() or 1
    reserved = options.concurrency * options.num_cpus_per_actor
    if reserved >= num_cpus:
        raise ConfigError(
            f"executor.options: concurrency={options.concurrency} actors x num_cpus_per_actor="
            f"{options.num_cpus_per_actor} reserve {reserved:g} of the local Ray's {num_cpus} CPUs; "
            f"leave at least one CPU for reading and writing by lowering concurrency or raising num_cpus"
        )


def start_ray(ray: Any, options: RayOptions) -> bool:
    """Connect to the Ray cluster set in ``options``, or start a local one; return True when this call started Ray."""
    if ray.is_initialized():
        logger.info("using the Ray instance already started in this process")
        return False
    # Ray sends usage statistics unless this variable is 0, and runs must stay offline.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if options.address is None:
        logger.info("starting a local Ray with %s CPUs", options.num_cpus or "all")
        ray.init(
            num_cpus=options.num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
        )
    else:
        logger.info("joining the Ray cluster at %s", options.address)
        ray.init(address=options.address, log_to_driver=False)
    return True


def write_parquet_files(ray: Any, options: RayOptions, plan: Plan, layers: list[ResolvedLayer], parquet_dir: Path) -> None:
    """Run the actors over every probe image and write their output as Parquet files in ``parquet_dir``."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = plan.runtime.progress
    # Without this, Ray Data replaces a worker's exception with a UserCodeException that
    # keeps only its text, and the run could not report a ProbeSetError or LayerError as such.
    if hasattr(context, "raise_original_map_exception"):
        context.raise_original_map_exception = True
    n_images = len(plan.probe_set)
    device = plan.config.device
    if device.startswith("cuda") and options.num_gpus_per_actor > 0:
        # Ray sets CUDA_VISIBLE_DEVICES for each actor, so its GPUs are always numbered from 0.
        device = "cuda"
    elif device.startswith("cuda"):
        device = "cpu"
        logger.warning(
            "device=%r but num_gpus_per_actor=0, so the Ray actors run on the CPU; "
            "set num_gpus_per_actor = 1 to give each actor a GPU", plan.config.device,
        )
    target_options = plan.plugin_options["target"].model_dump(mode="json", by_alias=True)
    dataset = ray.data.range(n_images).map_batches(
        ExtractionActor,
        fn_constructor_kwargs={
            "plugin_modules": plugin_modules_of(plan),
            "loader_name": plan.config.target.loader,
            "loader_options": target_options,
            "layer_names": [layer.name for layer in layers],
            "probe_set": plan.probe_set,
            "pooling": plan.config.target.pooling,
            "device": device,
            "precision": plan.config.precision,
        },
        batch_size=options.batch_size or plan.runtime.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=options.concurrency),
        num_cpus=options.num_cpus_per_actor,
        num_gpus=options.num_gpus_per_actor,
    )
    logger.info("extracting %d images with %d Ray actor(s) into %s", n_images, options.concurrency, parquet_dir)
    try:
        dataset.write_parquet(str(parquet_dir))
    except Exception as exc:
        cause = project_error_in(exc)
        if cause is not None:
            raise cause from None
        raise RayExecutorError(
            f"Ray extraction failed: {type(exc).__name__}: {exc}; see the worker logs under Ray's session folder"
        ) from exc


def project_error_in(exc: BaseException) -> MammoDissectError | None:
    """Return the mammo-dissect error that a worker raised, found in Ray's chain of wrapped exceptions."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # Ray wraps a worker's exception in a RayTaskError subclass of the original type;
        # the original itself is in its ``cause`` attribute.
        inner = getattr(current, "cause", None)
        if isinstance(current, MammoDissectError) and not isinstance(inner, BaseException):
            return current
        pending.extend([inner if isinstance(inner, BaseException) else None, current.__cause__, current.__context__])
    return None


def assemble_layers(
    parquet_dir: Path, probe_set: ProbeSet, layers: list[ResolvedLayer], out_dir: Path
) -> list[LayerActivations]:
    """Read the Parquet files and write each layer's rows, in probe-set order, to ``out_dir``."""
    import pyarrow.parquet as pq

    n_images = len(probe_set)
    files = sorted(parquet_dir.glob("*.parquet"))
    arrays: dict[str, np.ndarray] = {}
    seen = np.zeros(n_images, dtype=bool)
    shapes: dict[str, list[int]] = {}
    for file in files:
        table = pq.read_table(file)
        if table.num_rows == 0:
            continue
        indices = np.asarray(table.column(INDEX_COLUMN).to_numpy(), dtype=np.int64)
        if np.any(indices < 0) or np.any(indices >= n_images) or np.any(seen[indices]):
            raise RayExecutorError(
                f"Parquet file {file} contains image indices outside 0..{n_images - 1} or seen in another file; "
                f"remove {parquet_dir} and run again"
            )
        seen[indices] = True
        shapes = shapes or json.loads(table.column(SHAPES_COLUMN)[0].as_py())
        for position, layer in enumerate(layers):
            blobs = table.column(layer_column(position)).to_pylist()
            rows = np.stack([np.frombuffer(blob, dtype=np.float32) for blob in blobs])
            if layer.name not in arrays:
                arrays[layer.name] = np.lib.format.open_memmap(
                    out_dir / f"{safe_file_name(layer.name)}.npy", mode="w+", dtype=np.float32,
                    shape=(n_images, rows.shape[1]),
                )
            check_finite_rows(rows, indices, layer.name, probe_set)
            arrays[layer.name][indices] = rows
    if not seen.all():
        missing = np.flatnonzero(~seen)
        raise RayExecutorError(
            f"the Ray output in {parquet_dir} is missing {len(missing)} of {n_images} images "
            f"(first: {', '.join(str(int(index)) for index in missing[:10])}); run again"
        )
    results = []
    for layer in layers:
        arrays[layer.name].flush()
        results.append(
            LayerActivations(
                layer=layer,
                path=out_dir / f"{safe_file_name(layer.name)}.npy",
                output_shape=list(shapes.get(layer.name, [])),
            )
        )
    del arrays
    return results


def check_finite_rows(rows: np.ndarray, indices: np.ndarray, layer: str, probe_set: ProbeSet) -> None:
    """Raise :class:`NonFiniteActivationError` naming the images whose rows are NaN or Inf."""
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        ids = [probe_set.images[int(indices[row])].image_id for row in bad[:10]]
        raise NonFiniteActivationError(
            f"layer {layer!r} produced NaN or Inf for {len(bad)} image(s): {', '.join(ids)}; "
            f"check those images and the model weights"
        )


@hookimpl
def register_executors(register: Any) -> None:
    register(RayExecutor())
