"""Regional torch.compile (``compile_layers``) against the eager step: same losses and gradients (fp32), graphs reused
across layers and steps. Inductor compiles for the CPU here (gcc), so the model is tiny and the test slow-marked."""

from __future__ import annotations

import copy

import pytest
import torch

from blip_fast.modeling import pretrain
from blip_fast.modeling.compile import compile_layers
from blip_fast.modeling.pretrain import BlipPretrainer
from tests.tiny_models import assert_close, micro_config

CONFIG = micro_config(layers=2)


def _batch(seed):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(4, 3, 16, 16, generator=generator)
    input_ids = torch.randint(5, 120, (4, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 6:] = 0  # padded to a fixed length, as the collators do when compiling
    return pixel_values, input_ids, attention_mask


def _step(model, seed):
    losses = model(*_batch(seed), alpha=0.4, image_ids=torch.arange(4))
    losses.loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                 if parameter.grad is not None}
    model.zero_grad(set_to_none=True)
    return [losses[name].detach() for name in ("loss_itc", "loss_itm", "loss_lm")], gradients


@pytest.mark.slow
def test_compiled_layers_equal_eager(monkeypatch):
    negatives = torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 0, 2])
    monkeypatch.setattr(pretrain.ops, "sample_hard_negatives", lambda *args, **kwargs: negatives)
    torch.manual_seed(0)
    eager = BlipPretrainer(CONFIG, queue_size=8).eval()  # eval: no dropout, whose random stream compile changes
    compiled = copy.deepcopy(eager)
    assert compile_layers(compiled) == 2 * 5  # two layers each: ViT, momentum ViT, text encoder, its momentum, decoder
    assert compiled.state_dict().keys() == eager.state_dict().keys()

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for seed in (0, 1):  # the second step reuses the graphs (same shapes): no recompilation
        expected_losses, expected_grads = _step(eager, seed)
        # No worker pool on a 2-core machine. Inductor's own patch, not monkeypatch: monkeypatch's undo deletes
        # the config entry, and every later compile in the process fails ("compile_threads does not exist").
        with torch._inductor.config.patch(compile_threads=1):
            losses, grads = _step(compiled, seed)
        for value, oracle in zip(losses, expected_losses):
            assert_close(value, oracle, rtol=1e-5, atol=1e-6)
        assert grads.keys() == expected_grads.keys()
        for name, gradient in expected_grads.items():
            # A gradient element summed from terms of the tensor's scale carries fp32 rounding of that scale, not of
            # its own size: under torch 2.11's inductor one of vision_proj's 512 was off by 4e-6 at scale 4.
            scale = float(gradient.abs().max())
            assert_close(grads[name], gradient, rtol=1e-4, atol=max(1e-5 * scale, 1e-6), name=name)
        if seed == 0:
            graphs = counters["stats"]["unique_graphs"]
    # One graph per distinct call signature, not per layer: ViT (grad, no grad), text (ITC with grad and without,
    # ITM, decoder).
    assert 0 < graphs <= 6, dict(counters["stats"])
    assert counters["stats"]["unique_graphs"] == graphs, "the second step recompiled"
