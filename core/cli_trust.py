"""Commands that check how far labels can be trusted.

``check-dissector`` tests the dissector on annotated concepts, ``validate`` and
``mask-iou`` compare a run's units with annotations and masks, ``chance`` and
``stability`` rerun it under controls and perturbations, and ``sanity`` tests
similarity functions on synthetic units.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from mammo_dissect.core.cli_common import CliState
from mammo_dissect.core.cli_common import format_table
from mammo_dissect.core.cli_common import load_run_config
from mammo_dissect.core.cli_common import parse_options


logger = logging.getLogger("mammo_dissect")


@click.command(name="check-dissector")
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a configuration value.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def check_dissector_command(config: Path, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check whether the dissector of CONFIG sees the probe set's annotated concepts (AUROC per concept).

    The probe set must carry annotations.  Concepts whose 95% bootstrap
    interval includes 0.5 are flagged: a dissector near chance on a concept
    cannot label units with it.
    """
    from mammo_dissect.core.pipeline import dissector_check

    results = dissector_check(load_run_config(config, list(overrides)), progress=CliState.progress)
    if as_json:
        click.echo(json.dumps([result.__dict__ for result in results], indent=2))
        return
    rows = [
        (result.concept, result.n_positive, result.n_negative,
         "-" if result.auroc is None else f"{result.auroc:.3f}",
         "-" if result.ci_low is None else f"{result.ci_low:.3f} to {result.ci_high:.3f}", result.status)
        for result in results
    ]
    click.echo(format_table(["concept", "positives", "negatives", "AUROC", "95% interval", "status"], rows))
    near = [result.concept for result in results if result.status in ("near_chance", "inverted")]
    if near:
        logger.warning("the dissector is near chance or inverted on: %s", ", ".join(near))
    if not results:
        logger.warning("no annotated concept of the probe set is in the concept set; nothing was checked")


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@click.command()
@click.argument("database", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--run", "run_id", required=True, help="Run id (or a unique prefix).")
def validate(database: Path, run_id: str) -> None:
    """Measure label validity of a run: AUROC of each unit's activations for its label's annotated images.

    Uses the run's own probe-set annotations as ground truth and stores the
    results in unit_validity (summary view: layer_validity).
    """
    from mammo_dissect.core.store import Store
    from mammo_dissect.core.validity import validate_run

    with Store(database, read_only=True) as store:
        run_id = store.resolve_run_id(run_id)
    layers = validate_run(database, run_id, progress=CliState.progress)
    rows = [
        (layer.layer, f"{layer.n_labels_checked}/{layer.n_units}", layer.n_auroc,
         _number(layer.mean_auroc), _number(layer.share_above_half))
        for layer in layers
    ]
    click.echo(f"run {run_id}: label validity (AUROC of a unit's activations for its label)")
    click.echo(format_table(["layer", "labels checked", "with AUROC", "mean AUROC", "share > 0.5"], rows))


@click.command()
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a configuration value.")
@click.option("--seeds", type=click.IntRange(min=1), default=10, show_default=True, help="Random dissectors (null).")
@click.option("--shuffled", type=click.IntRange(min=0), default=3, show_default=True,
              help="Runs with the concept texts shuffled against their columns.")
def chance(config: Path, overrides: tuple[str, ...], seeds: int, shuffled: int) -> None:
    """Compare a run's mammography and distractor counts with chance (random dissectors, shuffled concepts)."""
    from mammo_dissect.core.chance import chance_controls

    report = chance_controls(load_run_config(config, list(overrides)), seeds=seeds, shuffled_concepts=shuffled,
                             progress=CliState.progress)
    click.echo(f"run {report.run_id}: counts per layer under each control (mean, 5th to 95th percentile)")
    rows = []
    for layer, controls in report.summary().items():
        for control, values in controls.items():
            mammography = values.get("n_mammography")
            validity = values.get("mean_auroc")
            rows.append((
                layer, control,
                f"{_number(mammography.mean, 1)} ({_number(mammography.p05, 1)} to {_number(mammography.p95, 1)})"
                if mammography else "-",
                f"{_number(validity.mean)} ({_number(validity.p05)} to {_number(validity.p95)})" if validity else "-",
            ))
    click.echo(format_table(["layer", "control", "units with mammography labels", "mean validity"], rows))


@click.command()
@click.argument("config", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a configuration value.")
@click.option("--bootstrap", type=click.IntRange(min=0), default=20, show_default=True, help="Bootstrap resamples of the probe images.")
@click.option("--noise", type=click.FloatRange(min=0), default=0.02, show_default=True,
              help="Standard deviation of Gaussian noise on the normalised input (0 = none).")
def stability(config: Path, overrides: tuple[str, ...], bootstrap: int, noise: float) -> None:
    """Measure how often units' labels change under resampling, input noise and concept synonyms."""
    from mammo_dissect.core.stability import stability as measure_stability

    layers = measure_stability(load_run_config(config, list(overrides)), bootstrap=bootstrap, noise=noise or None,
                               progress=CliState.progress)
    rows = [
        (layer.layer, layer.perturbation, layer.n_trials, _number(layer.mean_label_changed_share),
         _number(layer.share_units_changed))
        for layer in layers
    ]
    click.echo(format_table(["layer", "perturbation", "trials", "mean share changed", "units ever changed"], rows))


@click.command()
@click.argument("names", nargs=-1)
@click.option("--param", "param_pairs", multiple=True, metavar="KEY=VALUE",
              help="Parameter passed to the function(s), for example --param quantile=0.75.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the synthetic units.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a Markdown table.")
def sanity(names: tuple[str, ...], param_pairs: tuple[str, ...], seed: int, as_json: bool) -> None:
    """Run the missing-label and extra-label tests on similarity functions NAMES (default: all).

    Each function scores synthetic units whose ground-truth concepts are known.
    The exit code is 0 whatever the outcome; read the table.
    """
    from mammo_dissect.core.plugins import get_registry
    from mammo_dissect.core.sanity import format_sanity_table
    from mammo_dissect.core.sanity import run_sanity_checks

    registry = get_registry()
    selected = list(names) or registry.names("similarity function")
    params = parse_options(param_pairs)
    results = []
    for name in selected:
        results.extend(run_sanity_checks(registry.get("similarity function", name), params, seed=seed))
    if as_json:
        payload = [
            {
                "function": result.function,
                "params": result.params,
                "test": result.test,
                "held": result.held,
                "comparisons": result.comparisons,
                "passed": result.passed,
                "mean_complete": result.mean_complete,
                "mean_altered": result.mean_altered,
                "seed": result.seed,
            }
            for result in results
        ]
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo(format_sanity_table(results))


@click.command(name="mask-iou")
@click.argument("database", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--run", "run_id", required=True, help="Run id (or a unique prefix) on a probe set with masks.")
@click.option("--quantile", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.995,
              show_default=True, help="Activation quantile above which a unit counts as active (NetDissect uses 0.995).")
def mask_iou(database: Path, run_id: str, quantile: float) -> None:
    """Score each unit against segmentation masks: IoU of its thresholded activation map with each concept mask."""
    from mammo_dissect.core.mask_dissection import mask_iou_run

    layers = mask_iou_run(database, run_id, quantile=quantile, progress=CliState.progress)
    for layer in layers:
        best = ", ".join(f"{concept} {count}" for concept, count in sorted(layer["best_concept_units"].items()))
        click.echo(
            f"layer {layer['layer']}: {layer['n_units']} units over {layer['n_images']} images, mean best IoU "
            f"{layer['mean_best_iou']:.3f}, {layer['n_units_above_cut']} above {layer['iou_cut']} "
            f"(NetDissect's detector cut); best: {best}"
        )
    click.echo(f"stored in {database}: table unit_mask_iou, view top_mask_labels")
