"""Regional ``torch.compile`` of the training step: each ViT block and each text layer, not the whole model.

The step repeats two layer types (12 ViT blocks run by the online and the momentum encoders; 12 text layers run as
unimodal encoder, image-grounded encoder and decoder), so compiling one layer's code serves every layer: PyTorch
treats module parameters as graph inputs (``inline_inbuilt_nn_modules``), and a graph is compiled per distinct
input signature (grad or no-grad, with or without cross-attention, mask shape), not per layer. What stays eager: the
embeddings, the K/V projections of the cross-attention context, the losses (the fused ITC kernel, the chunked LM
loss), the momentum EMA and the queues — they hold host logic, custom kernels, or are already one kernel.

Shapes must be static for the graphs to be reused: images are, and text is padded to a fixed length (the training
collators pad to ``max_text_length`` when compiling). The compiled forward is a bound method set on the instance:
hooks on the layer module (DeepSpeed's) stay outside the graph and state-dict keys are unchanged. The eager layers
are the reference (``tests/test_compile.py`` compares them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from blip_fast.modeling.text import BlipTextLayer
from blip_fast.modeling.vit import BlipEncoderLayer


def compile_layers(model: nn.Module, **options: Any) -> int:
    """Compile every ViT block's ``forward`` and every text layer's cache-free :meth:`BlipTextLayer.block` of
    ``model`` in place; ``options`` go to ``torch.compile`` (default ``dynamic=False``). Returns how many layers."""
    options.setdefault("dynamic", False)
    compiled = 0
    for module in model.modules():
        if isinstance(module, BlipEncoderLayer):
            module.forward = torch.compile(module.forward, **options)
        elif isinstance(module, BlipTextLayer):
            module.block = torch.compile(module.block, **options)
        else:
            continue
        compiled += 1
    return compiled

