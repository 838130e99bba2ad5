"""Layer resolution, hooks and pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mammo_dissect.core.errors import LayerError
from mammo_dissect.core.extraction import canonical_layer_name
from mammo_dissect.core.extraction import pool_output
from mammo_dissect.core.extraction import resolve_layers


def vgg_like() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    model.features = nn.Sequential(*[nn.Conv2d(3, 3, 3, padding=1) if i % 2 == 0 else nn.ReLU(inplace=True) for i in range(30)])
    return model


@pytest.mark.parametrize(
    ("requested", "expected"),
    [("features.0", "features.0"), ("features[28]", "features.28"), ("features.28", "features.28"), (" features[2] ", "features.2")],
)
def test_resolve_dotted_and_bracket_names(requested, expected):
    (layer,) = resolve_layers(vgg_like(), [requested])
    assert layer.name == expected


def test_resolve_unknown_name_lists_close_names():
    with pytest.raises(LayerError) as error:
        resolve_layers(vgg_like(), ["feature.28"])
    assert "closest: features.28" in str(error.value)


def test_resolve_rejects_code():
    with pytest.raises(LayerError):
        resolve_layers(vgg_like(), ["__import__('os').system('true')"])


def test_resolve_rejects_same_module_twice():
    with pytest.raises(LayerError) as error:
        resolve_layers(vgg_like(), ["features.2", "features[2]"])
    assert "name the same module" in str(error.value)


def test_canonical_name_nested_brackets():
    assert canonical_layer_name("encoder.layers[3].blocks[0]") == "encoder.layers.3.blocks.0"


def test_pool_avg_and_max():
    output = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(pool_output(output, "avg"), output.mean(dim=(2, 3)))
    assert torch.equal(pool_output(output, "max"), output.amax(dim=(2, 3)))


def test_pool_tokens_takes_cls():
    tokens = torch.randn(2, 5, 8)
    assert torch.equal(pool_output(tokens, "avg"), tokens[:, 0])


def test_pool_tokens_token_first_layout():
    tokens = torch.randn(5, 2, 8)
    assert torch.equal(pool_output(tokens, "avg", {"token_first": True}), tokens[0])


def test_pool_tuple_takes_first():
    first = torch.randn(2, 4)
    assert torch.equal(pool_output((first, torch.randn(2, 9)), "avg"), first)


def test_pool_rejects_5d():
    with pytest.raises(LayerError):
        pool_output(torch.randn(1, 2, 3, 4, 5), "avg")


def test_hooked_output_survives_inplace_relu(tiny_config, tiny_registry):
    """The pooled conv output equals a direct call of the conv, though an in-place ReLU follows it."""
    import copy

    from mammo_dissect.core.config import load_config
    from mammo_dissect.core.extraction import extract_activations
    from mammo_dissect.core.pipeline import prepare

    plan = prepare(load_config(None, data=copy.deepcopy(tiny_config)), tiny_registry, progress=False)
    layers = resolve_layers(plan.target.model, ["features.0"])
    (stored,) = extract_activations(plan.target, layers, plan.probe_set, plan.runtime, "avg", plan.cache.root / "test-extract")
    image = plan.target.preprocess(plan.probe_set.read(3)).unsqueeze(0)
    with torch.no_grad():
        direct = plan.target.model.features[0](image).mean(dim=(2, 3))[0]
    assert torch.allclose(torch.from_numpy(stored.load()[3].copy()), direct, atol=1e-6)
    assert bool((direct < 0).any()), "the check needs negative values that the in-place ReLU would zero"


class FakeProbe:
    """Probe images that are constant 2 x 2 arrays, read by index."""

    def read(self, index: int) -> np.ndarray:
        return np.full((2, 2), float(index), dtype=np.float32)


def limited_model(limit: int, seen: list[int]):
    """Return a model that raises PyTorch's out-of-memory error on batches larger than ``limit``."""
    import torch

    def model(batch):
        seen.append(batch.shape[0])
        if batch.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return batch

    return model


def test_forward_in_batches_halves_on_oom(caplog):
    import torch

    from mammo_dissect.core.extraction import forward_in_batches
    from mammo_dissect.core.types import Runtime

    seen: list[int] = []
    batches = list(
        forward_in_batches(limited_model(2, seen), torch.from_numpy, FakeProbe(), list(range(7)),
                           Runtime(batch_size=7), "activation-map pass")
    )
    assert seen == [7, 3, 1, 1, 1, 1, 1, 1, 1]
    assert [index for batch in batches for index in batch] == list(range(7))
    assert "out of memory in the activation-map pass; retrying with batch size 3" in caplog.text


def test_forward_in_batches_raises_at_one_image():
    import torch

    from mammo_dissect.core.extraction import forward_in_batches
    from mammo_dissect.core.types import Runtime

    with pytest.raises(torch.OutOfMemoryError):
        list(forward_in_batches(limited_model(0, []), torch.from_numpy, FakeProbe(), [0, 1], Runtime(batch_size=2), "x"))


def test_forward_in_batches_passes_other_errors():
    import torch

    from mammo_dissect.core.extraction import forward_in_batches
    from mammo_dissect.core.types import Runtime

    seen: list[int] = []

    def broken(batch):
        seen.append(batch.shape[0])
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(forward_in_batches(broken, torch.from_numpy, FakeProbe(), [0, 1, 2, 3], Runtime(batch_size=4), "x"))
    assert seen == [4]
