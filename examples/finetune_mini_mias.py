"""Fine-tune EfficientNet-Lite0 on mini-MIAS background tissue, dissect both models, compare.

The recipe is sized for a CPU (2 threads, a few minutes) and seeded:

1. Split the 161 mini-MIAS patients (images mdb{2k-1} and mdb{2k} are one
   patient) into training and held-out patients with a seeded shuffle.
2. Fine-tune EfficientNet-Lite0 with its ImageNet weights at 224 x 224 to
   classify background tissue F/G/D (fatty, fatty-glandular, dense-glandular):
   a new 3-class linear head, AdamW, horizontal flips, batch-norm statistics
   frozen at their ImageNet values.
3. Save the fine-tuned backbone together with the untouched ImageNet 1000-class
   head (``_fc``), because the ``efficientnet-lite`` target loader builds a
   1000-class model and loads weights strictly.  The 3-class tissue head is
   saved beside it for reference.  Dissected layers lie before ``_fc``, so
   keeping the ImageNet head changes no dissection result.
4. Dissect the ImageNet model and the fine-tuned one on the held-out images
   with the annotation dissector and the ``mammography-basic`` concept set,
   into one database, and render the comparison report.

Run from the repository root::

    .venv/bin/python examples/finetune_mini_mias.py --out finetune-mini-mias

It prints the held-out accuracy and the comparison numbers recorded in
``docs/finetune.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mammo_dissect.core import analyses
from mammo_dissect.core.config import load_config
from mammo_dissect.core.images import read_image
from mammo_dissect.core.pipeline import run
from mammo_dissect.core.report import render_comparison
from mammo_dissect.plugins.targets.efficientnet_lite import EfficientNetLiteLoader
from mammo_dissect.plugins.targets.efficientnet_lite import EfficientNetLiteOptions


logger = logging.getLogger("finetune_mini_mias")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mini-mias"
TISSUE_CLASSES = ("F", "G", "D")
LAYERS = ["_blocks.2", "_blocks.8", "_blocks.15", "_conv_head"]


def read_tissue_labels(root: Path) -> dict[str, str]:
    """Return the background-tissue code (F, G or D) of every refnum in ``labels.csv``."""
    tissue: dict[str, str] = {}
    with open(root / "labels.csv", newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            tissue[row["refnum"]] = row["background_tissue"]
    return tissue


def patient_of(refnum: str) -> int:
    """Return the patient number k of image mdb{2k-1} or mdb{2k}."""
    number = int(refnum[3:])
    return (number + 1) // 2


def split_patients(refnums: list[str], held_out_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split images by patient with a seeded shuffle; return (training, held-out) refnums."""
    patients = sorted({patient_of(refnum) for refnum in refnums})
    random.Random(seed).shuffle(patients)
    n_held_out = round(held_out_fraction * len(patients))
    held_out_patients = set(patients[:n_held_out])
    training = [refnum for refnum in refnums if patient_of(refnum) not in held_out_patients]
    held_out = [refnum for refnum in refnums if patient_of(refnum) in held_out_patients]
    return training, held_out


def load_tensors(root: Path, refnums: list[str], preprocess: Any) -> torch.Tensor:
    """Decode and preprocess the images once, as the target loader's preprocessing does."""
    return torch.stack([preprocess(read_image(root / "images" / f"{refnum}.png")) for refnum in refnums])


def freeze_batch_norm(model: torch.nn.Module) -> None:
    """Keep batch-norm running statistics at their ImageNet values during training."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()


def evaluate(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> float:
    """Return the accuracy of ``model`` on ``inputs``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            logits = model(inputs[start : start + batch_size])
            correct += int((logits.argmax(1) == targets[start : start + batch_size]).sum())
    return correct / len(inputs)


def fine_tune(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    held_out: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> list[dict[str, float]]:
    """Train ``model`` in place and return per-epoch loss and held-out accuracy."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    history = []
    for epoch in range(epochs):
        model.train()
        freeze_batch_norm(model)
        order = torch.randperm(len(inputs), generator=generator)
        total_loss = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            images = inputs[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            loss = torch.nn.functional.cross_entropy(model(images), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += float(loss.detach()) * len(batch)
        accuracy = evaluate(model, held_out[0], held_out[1], batch_size)
        history.append({"epoch": epoch + 1, "loss": total_loss / len(inputs), "held_out_accuracy": accuracy})
        logger.info("epoch %d: training loss %.4f, held-out accuracy %.3f", epoch + 1, history[-1]["loss"], accuracy)
    return history


def write_held_out_root(source: Path, target: Path, refnums: list[str]) -> Path:
    """Write a mini-MIAS-shaped folder with the held-out images and their label rows."""
    if target.exists():
        shutil.rmtree(target)
    (target / "images").mkdir(parents=True)
    keep = set(refnums)
    with open(source / "labels.csv", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if row["refnum"] in keep]
        fields = reader.fieldnames or []
    with open(target / "labels.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    shutil.copy(source / "Info.txt", target / "Info.txt")
    for refnum in refnums:
        shutil.copy(source / "images" / f"{refnum}.png", target / "images" / f"{refnum}.png")
    return target


def dissection_config(name: str, root: Path, weights: Path | None, out: Path, top_k: int) -> dict[str, Any]:
    """Build the raw run configuration of one dissection on the held-out images."""
    options: dict[str, Any] = {"model": "efficientnet-lite0"}
    if weights is not None:
        options["weights"] = str(weights)
    return {
        "name": name,
        "probe_set": {"name": "mini-mias", "options": {"root": str(root)}},
        "target": {"loader": "efficientnet-lite", "options": options, "layers": LAYERS, "pooling": "avg"},
        "dissector": {"name": "annotation"},
        "concept_set": {"name": "mammography-basic"},
        "similarity": {"name": "soft_wpmi", "params": {"top_k": top_k}},
        "top_n": 5,
        "top_k_images": 5,
        "permutations": 10,
        "seed": 0,
        "batch_size": 16,
        "device": "cpu",
        "cache_dir": str(out / "cache"),
        "database": str(out / "finetune.duckdb"),
    }


def summarise(database: Path, run_ids: list[str]) -> dict[str, Any]:
    """Collect the numbers recorded in docs/finetune.md."""
    summary: dict[str, Any] = {"layers": analyses.layer_summary(database, run_ids)}
    summary["passing_global"] = analyses.passing_layer_summary(database, run_ids, threshold="global")
    summary["categories_global"] = analyses.passing_categories(database, run_ids, threshold="global")
    summary["label_changes"] = len(analyses.label_changes(database, run_ids[0], run_ids[1]))
    summary["concept_changes"] = analyses.concept_changes(database, run_ids[0], run_ids[1], threshold="global")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="mini-MIAS folder (labels.csv, images/)")
    parser.add_argument("--out", type=Path, default=Path("finetune-mini-mias"), help="output folder")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--held-out-fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--similarity-top-k", type=int, default=20, help="soft_wpmi top_k (below the held-out count)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    tissue = read_tissue_labels(args.data)
    refnums = sorted(tissue)
    training, held_out = split_patients(refnums, args.held_out_fraction, args.seed)
    logger.info("%d training images, %d held-out images", len(training), len(held_out))

    loaded = EfficientNetLiteLoader().load(EfficientNetLiteOptions(model="efficientnet-lite0"))
    model = loaded.model
    imagenet_head = {key: value.clone() for key, value in model._fc.state_dict().items()}
    model._fc = torch.nn.Linear(model._fc.in_features, len(TISSUE_CLASSES))

    class_index = {code: index for index, code in enumerate(TISSUE_CLASSES)}
    train_x = load_tensors(args.data, training, loaded.preprocess)
    train_y = torch.tensor([class_index[tissue[refnum]] for refnum in training])
    held_x = load_tensors(args.data, held_out, loaded.preprocess)
    held_y = torch.tensor([class_index[tissue[refnum]] for refnum in held_out])
    majority = float(torch.bincount(held_y).max()) / len(held_y)
    logger.info("images decoded after %.1f s", time.perf_counter() - started)

    train_started = time.perf_counter()
    history = fine_tune(
        model, train_x, train_y, (held_x, held_y), args.epochs, args.batch_size, args.learning_rate, args.seed
    )
    train_seconds = time.perf_counter() - train_started

    tissue_head = model._fc
    torch.save(tissue_head.state_dict(), out / "tissue_head.pth")
    model._fc = torch.nn.Linear(tissue_head.in_features, 1000)
    model._fc.load_state_dict(imagenet_head)
    weights = out / "efficientnet-lite0-mini-mias-tissue.pth"
    torch.save(model.state_dict(), weights)

    root = write_held_out_root(args.data, out / "held-out", held_out)
    run_ids = []
    for name, weights_file in (("ImageNet", None), ("fine-tuned on mini-MIAS tissue", weights)):
        config = load_config(None, data=dissection_config(name, root, weights_file, out, args.similarity_top_k))
        outcome = run(config, progress=False)
        run_ids.append(outcome.run_id)
    database = out / "finetune.duckdb"
    index = render_comparison(database, run_ids, out / "report")

    summary = {
        "training_images": len(training),
        "held_out_images": len(held_out),
        "held_out_majority_share": majority,
        "history": history,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - started,
        "run_ids": run_ids,
        "report": str(index),
        **summarise(database, run_ids),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
