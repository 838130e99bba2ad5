"""Builders of Mammo-CLIP files in the official format, with random weights and tiny text towers.

The files are written as the official trainer writes them: ``torch.save`` of a
dict with ``model``, ``optimizer``, ``scheduler``, ``config`` (omegaconf
``DictConfig`` and ``ListConfig`` objects), ``epoch`` and ``train_loss``
(a numpy scalar).  omegaconf is not installed, so :func:`fake_omegaconf`
installs stand-in classes under omegaconf's module names for the duration
of one ``torch.save``; the pickle then names ``omegaconf.listconfig.ListConfig``
and the other classes exactly as a real checkpoint does.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import types
import typing
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


#: Tiny vocabulary: BERT's special tokens, then lower-case words and characters.
VOCAB_WORDS = list(dict.fromkeys([
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "mass", "spiculated", "calcification", "dense", "tissue", "breast", "benign", "malignant",
    "mammogram", "showing", "a", "of", "the", "round", "oval", "fatty", "##s", "##ed",
    *"abcdefghijklmnopqrstuvwxyz",
    *[f"##{letter}" for letter in "abcdefghijklmnopqrstuvwxyz"],
]))
BERT_HIDDEN = 32
BERT_LAYERS = 2
BERT_HEADS = 2
ENCODER_NAMES = {"b5": "tf_efficientnet_b5_ns-detect", "b2": "tf_efficientnetv2-detect"}


# ---------------------------------------------------------------- omegaconf stand-ins


@contextlib.contextmanager
def fake_omegaconf() -> Iterator[types.SimpleNamespace]:
    """Register stand-ins named like omegaconf's classes in ``sys.modules`` for one block."""
    modules = {name: types.ModuleType(name) for name in ("omegaconf", "omegaconf.base", "omegaconf.nodes", "omegaconf.listconfig", "omegaconf.dictconfig")}

    class Metadata:
        def __init__(self, key: Any) -> None:
            self.ref_type = typing.Any
            self.object_type = None
            self.optional = True
            self.key = key
            self.flags = {}
            self.flags_root = False
            self.resolver_cache = defaultdict(dict)

    class ContainerMetadata(Metadata):
        def __init__(self, key: Any, object_type: type) -> None:
            super().__init__(key)
            self.object_type = object_type
            self.key_type = typing.Any
            self.element_type = typing.Any

    class AnyNode:
        def __init__(self, value: Any, key: Any, parent: Any) -> None:
            self._metadata = Metadata(key)
            self._parent = parent
            self._val = value

    class ListConfig:
        def __init__(self, values: list, key: Any = None, parent: Any = None) -> None:
            self._metadata = ContainerMetadata(key, list)
            self._parent = parent
            self._content = [wrap(value, index, self) for index, value in enumerate(values)]

    class DictConfig:
        def __init__(self, values: dict, key: Any = None, parent: Any = None) -> None:
            self._metadata = ContainerMetadata(key, dict)
            self._parent = parent
            self._content = {name: wrap(value, name, self) for name, value in values.items()}

    def wrap(value: Any, key: Any, parent: Any) -> Any:
        if isinstance(value, dict):
            return DictConfig(value, key, parent)
        if isinstance(value, list):
            return ListConfig(value, key, parent)
        return AnyNode(value, key, parent)

    placements = {
        "omegaconf.base": (Metadata, ContainerMetadata),
        "omegaconf.nodes": (AnyNode,),
        "omegaconf.listconfig": (ListConfig,),
        "omegaconf.dictconfig": (DictConfig,),
    }
    for module_name, classes in placements.items():
        for cls in classes:
            cls.__module__ = module_name
            cls.__qualname__ = cls.__name__
            setattr(modules[module_name], cls.__name__, cls)
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield types.SimpleNamespace(DictConfig=DictConfig, ListConfig=ListConfig, wrap=wrap)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def training_config(variant: str, omegaconf: types.SimpleNamespace) -> dict:
    """Return a configuration like Mammo-CLIP's: a plain dict holding omegaconf containers."""
    return {
        "model": omegaconf.DictConfig(
            {
                "name": "clip_custom",
                "image_encoder": {"name": ENCODER_NAMES[variant], "source": "cnn", "model_type": "cnn"},
                "text_encoder": {"name": "huggingface_bert", "pretrained": True},
                "projection_head": {"name": "linear", "proj_dim": 512},
            }
        ),
        "tokenizer": {"pretrained_model_name_or_path": "emilyalsentzer/Bio_ClinicalBERT"},
        "loss": omegaconf.ListConfig([{"name": "clip"}, "image_text"]),
        "train": {"epochs": 10, "batch_size": 16},
    }


# ---------------------------------------------------------------- models


def write_tokenizer_dir(directory: Path, with_config: bool = True) -> Path:
    """Write vocab.txt and config.json of a tiny lower-case BERT, readable by AutoTokenizer offline."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(VOCAB_WORDS) + "\n", encoding="utf-8")
    if with_config:
        config = {
            "model_type": "bert",
            "vocab_size": len(VOCAB_WORDS),
            "hidden_size": BERT_HIDDEN,
            "num_hidden_layers": BERT_LAYERS,
            "num_attention_heads": BERT_HEADS,
            "intermediate_size": 64,
            "max_position_embeddings": 300,
        }
        (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def bert_config() -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(VOCAB_WORDS),
        hidden_size=BERT_HIDDEN,
        num_hidden_layers=BERT_LAYERS,
        num_attention_heads=BERT_HEADS,
        intermediate_size=64,
        max_position_embeddings=300,
    )


def calibrate_batch_norm(model: torch.nn.Module, input_size: tuple[int, int], batches: int = 3, seed: int = 0) -> None:
    """Set every batch norm's running statistics from random batches (cumulative average)."""
    generator = torch.Generator().manual_seed(seed)
    norms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(4, 3, *input_size, generator=generator))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()


@functools.lru_cache(maxsize=4)
def build_reference_encoder(variant: str, seed: int = 0) -> torch.nn.Module:
    """Build lukemelas' EfficientNet (no ``_fc``) with random weights and calibrated batch norm.

    The result is cached for the whole test session, so callers must not change it.
    """
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(seed)
    name = {"b5": "efficientnet-b5", "b2": "efficientnet-b2"}[variant]
    encoder = EfficientNet.from_name(name, include_top=False)
    calibrate_batch_norm(encoder, (64, 48), seed=seed)
    return encoder


@functools.lru_cache(maxsize=4)
def build_clip_state(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return a Mammo-CLIP ``model`` state dict in the official key layout with random weights."""
    from transformers import BertModel

    encoder = build_reference_encoder(variant, seed)
    torch.manual_seed(seed + 1)
    bert = BertModel(bert_config(), add_pooling_layer=True)
    image_dim = int(encoder._conv_head.weight.shape[0])
    image_projection = torch.nn.Linear(image_dim, 16)
    text_projection = torch.nn.Linear(BERT_HIDDEN, 16)
    state: dict[str, torch.Tensor] = {}
    state.update({f"image_encoder.{key}": value for key, value in encoder.state_dict().items()})
    state.update({f"text_encoder.text_encoder.{key}": value for key, value in bert.state_dict().items()})
    state.update({f"image_projection.projection.{key}": value for key, value in image_projection.state_dict().items()})
    state.update({f"text_projection.projection.{key}": value for key, value in text_projection.state_dict().items()})
    state["logit_scale"] = torch.tensor(np.log(1 / 0.07), dtype=torch.float32)
    return {key: value.clone() for key, value in state.items()}


def optimizer_and_scheduler_states(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Return an AdamW and a OneCycleLR state dict after one step on the projection weights."""
    parameters = [torch.nn.Parameter(state[key].clone()) for key in state if "text_projection." in key]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    sum(parameter.sum() for parameter in parameters).backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=10)
    return optimizer.state_dict(), scheduler.state_dict()


def save_official(path: Path, variant: str, model_state: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Save ``model_state`` as the official trainer does, config with omegaconf objects included."""
    optimizer_state, scheduler_state = optimizer_and_scheduler_states(model_state)
    with fake_omegaconf() as omegaconf:
        checkpoint = {
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": scheduler_state,
            "config": training_config(variant, omegaconf),
            "epoch": 7,
            "train_loss": np.float64(0.4321),
        }
        checkpoint.update(extra or {})
        torch.save(checkpoint, path)
    return path


def reference_image_embedding(state: dict[str, torch.Tensor], variant: str, images: torch.Tensor) -> torch.Tensor:
    """Compute image embeddings with an independent lukemelas encoder and ``nn.Linear``."""
    from efficientnet_pytorch import EfficientNet

    name = {"b5": "efficientnet-b5", "b2": "efficientnet-b2"}[variant]
    encoder = EfficientNet.from_name(name, include_top=False)
    encoder.load_state_dict({key[14:]: value for key, value in state.items() if key.startswith("image_encoder.")})
    encoder.eval()
    weight = state["image_projection.projection.weight"]
    projection = torch.nn.Linear(weight.shape[1], weight.shape[0])
    projection.load_state_dict({"weight": weight, "bias": state["image_projection.projection.bias"]})
    with torch.no_grad():
        pooled = torch.nn.functional.adaptive_avg_pool2d(encoder.extract_features(images), 1).flatten(1)
        return projection(pooled)


def reference_text_embedding(state: dict[str, torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Compute text embeddings with an independent ``BertModel`` and ``nn.Linear``."""
    from transformers import BertModel

    bert = BertModel(bert_config(), add_pooling_layer=True)
    prefix = "text_encoder.text_encoder."
    bert.load_state_dict({key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)})
    bert.eval()
    weight = state["text_projection.projection.weight"]
    projection = torch.nn.Linear(weight.shape[1], weight.shape[0])
    projection.load_state_dict({"weight": weight, "bias": state["text_projection.projection.bias"]})
    with torch.no_grad():
        hidden = bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(-1) - 1
        return projection(hidden[torch.arange(hidden.shape[0]), last])
