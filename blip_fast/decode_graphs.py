"""The static decoding engine: a whole ``generate`` call on fixed buffers, captured as CUDA graphs on CUDA.

A call is one program over preallocated tensors: refresh the fused weights, run the image encoder (the ViT for
captioning, ViT + question encoder for VQA) when it is given, project every layer's cross-attention K/V into the
cache (one GEMM), prefill the prompt, then one :mod:`blip_fast.search` step per position: the model step
(:func:`blip_fast.modeling.decode_step.decode_step`, ~100 kernels at base size) plus the greedy/beam/sampling
bookkeeping, all on the device. The program is cut into *segments* at the positions where the host reads the stop
flag (``stop_check_interval``; none when the length is fixed or the interval is 0, so the whole call is one
graph). On CUDA each segment is captured once per :class:`StaticCall` (every position at its own place, so the
search code keeps Python-int positions) and replayed; elsewhere the same functions run eagerly — the CPU tests
exercise exactly the code that is captured.

Calls are bucketed by image count (:func:`bucket`); a bucket's padded images are inert (their rows never delay
the stop nor reach the output). Entries are kept per decoder, :data:`MAX_STATIC_CALLS` most recently used, keyed
by everything a graph bakes in: shapes, settings, dtype, device and the parameters' addresses (moving or
re-creating the weights must not reuse a graph, while in-place updates are seen: the fused copies are refreshed
inside the graph at every call).
"""

from __future__ import annotations

import inspect
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from blip_fast import sampling, search
from blip_fast.modeling import decode_step as static_step

#: Static calls (buffers + CUDA graphs) kept per decoder, least recently used dropped first.
MAX_STATIC_CALLS = 4

_STATIC_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> OrderedDict[key, StaticCall]


def bucket(count: int) -> int:
    """Image-count buckets: powers of two up to 8, then multiples of 8 up to 128, of 32 up to 512, then of 64
    (65 images decode as 72, not 128). A bucket's rows are ``bucket(images) * rows_per_image``."""
    if count <= 8:
        return 1 << max(0, count - 1).bit_length()
    step = 8 if count <= 128 else 32 if count <= 512 else 64
    return -(-count // step) * step


def clear_static_calls(decoder=None) -> None:
    """Free the cached static calls (buffers and CUDA graphs) of ``decoder``, or of every model."""
    if decoder is None:
        _STATIC_CALLS.clear()
    else:
        _STATIC_CALLS.pop(decoder, None)


class StaticDecoding:
    """The model side of a static call: prompt and tokens through :func:`decode_step` over a
    :class:`~blip_fast.modeling.decode_step.StaticCache`. Beam reorders rewrite a ``[rows, max_length]`` history
    table (which cache row holds each row's position-t K/V) instead of moving the cache."""

    def __init__(self, decoder, cache: static_step.StaticCache, weights: static_step.FusedWeights, keep: Tensor,
                 beams: bool) -> None:
        self.decoder, self.cache, self.weights, self.keep = _weak(decoder), cache, weights, keep
        rows, max_length, device = cache.rows, cache.max_length, keep.device
        self.positions = torch.arange(max_length, device=device)  # position p is the 0-d view positions[p]
        self.identity = torch.arange(rows, device=device)[:, None].expand(rows, max_length)
        self.earlier = torch.arange(max_length, device=device)[None, :] < self.positions[:, None]  # [p, t]: t < p
        self.history = self.identity.clone() if beams else None
        self.length = 0

    def prefill(self, prompts: Tensor) -> Tensor:
        if self.history is not None:
            self.history.copy_(self.identity)
        logits = self.decoder.decode_step(prompts, self.positions[0], self.keep, self.cache, self.weights,
                                          self.history)
        self.length = prompts.shape[1]
        return logits

    def step(self, tokens: Tensor) -> Tensor:
        logits = self.decoder.decode_step(tokens[:, None], self.positions[self.length], self.keep, self.cache,
                                          self.weights, self.history)
        self.length += 1
        return logits

    def reorder(self, rows: Tensor) -> None:
        """Row ``r`` continues row ``rows[r]``: its filled positions now come from that row's history."""
        torch.where(self.earlier[self.length], self.history.index_select(0, rows), self.identity, out=self.history)


def _weak(obj):
    """A proxy for a model (or a bound method of one) held by a cached call: the cache is keyed weakly by the
    decoder, so its values must not keep the model alive."""
    if inspect.ismethod(obj):
        method = weakref.WeakMethod(obj)
        return lambda *args: method()(*args)
    return weakref.proxy(obj)


def _output_shape(encoder: Callable, inputs: list) -> tuple[tuple[int, ...], torch.dtype]:
    """The per-image shape and dtype of ``encoder(*inputs)``, traced with fake tensors (no compute). Gradient mode
    keeps compiled paths (:func:`blip_fast.modeling.vit.vision_states`) out of the trace."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True), torch.enable_grad():
        example = encoder(*inputs)
    return tuple(example.shape[1:]), example.dtype


def _parameter_addresses(module) -> tuple:
    return tuple(parameter.data_ptr() for parameter in module.parameters()) if module is not None else ()


class StaticCall:
    """Buffers, search program and (on CUDA) graphs of one call shape; :meth:`__call__` runs one call."""

    def __init__(self, decoder, settings, shape: dict[str, Any], encoder: Callable | None, capture: bool) -> None:
        self.settings, self.capture = settings, capture
        self.encoder = _weak(encoder) if encoder is not None else None
        images, rows_per_image = shape["images"], shape["rows_per_image"]
        prompt_length, max_length, device = shape["prompt_length"], shape["max_length"], shape["device"]
        rows = images * rows_per_image
        self.prompt_length, self.max_length, self.fixed = prompt_length, max_length, shape["fixed"]
        self.prompts = torch.zeros(rows, prompt_length, dtype=torch.long, device=device)
        self.keep = torch.ones(rows, max_length, dtype=torch.bool, device=device)
        self.ignore = torch.zeros(rows, prompt_length, dtype=torch.bool, device=device) \
            if shape["ignore_for_penalty"] else None
        self.seed = torch.zeros((), dtype=torch.long, device=device)
        # Encoder inputs: tensors get bucket-sized buffers, other values (flags, None) are part of the key.
        self.encoder_inputs = [torch.zeros(images, *spec[1], dtype=spec[2], device=device) if spec[0] == "tensor"
                               else spec[1] for spec in shape["encoder_inputs"]]
        if encoder is not None:
            context, dtype = _output_shape(encoder, self.encoder_inputs)
            self.states = None
        else:
            context, dtype = shape["context"], shape["dtype"]
            self.states = torch.zeros(images, *context, dtype=dtype, device=device)
        self.context_mask = torch.ones(images, context[0], dtype=torch.long, device=device) \
            if shape["masked_context"] else None
        beams = settings.num_beams > 1
        self.live = torch.zeros(images if beams else rows, dtype=torch.bool, device=device)
        self.cache = static_step.new_static_cache(decoder.bert, images, rows_per_image, max_length, context[0],
                                                  shape["masked_context"], dtype, device)
        self.weights = static_step.FusedWeights(_weak(decoder.bert))
        self.decoding = StaticDecoding(decoder, self.cache, self.weights, self.keep, beams)
        from blip_fast.generation import LogitsProcessor

        sampler = None
        if settings.do_sample:
            gumbel = settings.sampler == "gumbel" or (settings.sampler == "auto" and capture)
            sampler = search.GumbelSampler(settings, self.seed, 2 if beams else 1) if gumbel \
                else search.MultinomialSampler(None)
        warp = beams or not isinstance(sampler, search.GumbelSampler)  # the Gumbel token draw warps by itself
        processor = LogitsProcessor(settings, prompt_length, shape["eos_token_id"], self.ignore, warp=warp)
        program = search.BeamSearch if beams else search.TokenSearch
        self.search = program(self.decoding, self.prompts, processor, settings, max_length, shape["eos_token_id"],
                              shape["pad_token_id"], sampler, self.live)
        self.segments = self._segments()
        self.graphs: list[torch.cuda.CUDAGraph] | None = None
        self.snapshots: list[dict[str, Tensor]] = []

    def _segments(self) -> list[range]:
        """Positions per segment: cut after every position where the host reads the stop flag."""
        lengths = range(self.prompt_length, self.max_length)
        if self.fixed or self.settings.stop_check_interval == 0:
            return [lengths]
        cuts = [length + 1 for length in lengths
                if length + 1 < self.max_length and self.settings.check_stop(length + 1 - self.prompt_length)]
        bounds = [self.prompt_length, *cuts, self.max_length]
        return [range(start, end) for start, end in zip(bounds, bounds[1:])]

    def _prologue(self) -> None:
        self.weights.refresh()
        states = self.encoder(*self.encoder_inputs) if self.encoder is not None else self.states
        static_step.fill_context(self.cache, self.weights, states, self.context_mask)
        self.search.begin()

    def _segment(self, index: int) -> None:
        if index == 0:
            self._prologue()
        for length in self.segments[index]:
            self.search.step(length)

    def _snapshot(self) -> dict[str, Tensor]:
        """The search's state tensors after a segment (a captured step may rebind them to fresh tensors)."""
        return {name: value for name, value in vars(self.search).items() if isinstance(value, Tensor)}

    def _capture(self) -> None:
        """Warm up (Triton compiles, allocator) with one eager pass on a side stream, then capture each segment in
        order into graphs sharing one memory pool. Thread-local capture mode: DataLoader threads may run."""
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for index in range(len(self.segments)):
                self._segment(index)
        current.wait_stream(side)
        self.graphs, self.snapshots, pool = [], [], None
        try:
            for index in range(len(self.segments)):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self._segment(index)
                pool = graph.pool()
                self.graphs.append(graph)
                self.snapshots.append(self._snapshot())
        except RuntimeError as error:
            self.graphs = None
            raise RuntimeError(
                f"CUDA-graph capture of generate failed ({error}); generate with cuda_graphs=False or set "
                "BLIP_FAST_CUDA_GRAPHS=0"
            ) from error

    def __call__(self, prompts: Tensor, keep: Tensor, ignore: Tensor | None, states: Tensor | None,
                 context_mask: Tensor | None, encoder_inputs: tuple, live: int, seed: Tensor | None,
                 generator: torch.Generator | None = None) -> Any:
        """Load one call's inputs into the leading slots of the buffers, run it, return a copy of the output."""
        rows = prompts.shape[0]
        self.prompts[:rows].copy_(prompts)
        self.keep[:rows].copy_(keep)
        if self.ignore is not None:
            self.ignore[:rows].copy_(ignore)
        if states is not None:
            self.states[: states.shape[0]].copy_(states)
        if self.context_mask is not None:
            self.context_mask[: context_mask.shape[0]].copy_(context_mask)
        for buffer, value in zip(self.encoder_inputs, encoder_inputs):
            if isinstance(buffer, Tensor):
                buffer[: value.shape[0]].copy_(value)
        self.live.fill_(False)
        self.live[:live] = True
        if seed is not None:
            self.seed.copy_(seed)
        if isinstance(self.search.sampler, search.MultinomialSampler):
            self.search.sampler.generator, self.search.sampler.rows = generator, live
        if self.capture and self.graphs is None:
            self._capture()
        for index in range(len(self.segments)):
            if self.graphs is not None:
                self.graphs[index].replay()
                vars(self.search).update(self.snapshots[index])
            else:
                self._segment(index)
            if index + 1 < len(self.segments) and bool(self.search.stopped()):
                break
        output = self.search.finish(rows, self.max_length if self.fixed else None)
        for name, value in vars(output).items():  # the buffers are the next call's: hand out copies
            if isinstance(value, Tensor):
                setattr(output, name, value.clone())
        return output


def _key(decoder, settings, shape: dict[str, Any], encoder, capture: bool) -> tuple:
    owner = getattr(encoder, "__self__", encoder)
    encoder_id = (id(owner), getattr(encoder, "__func__", None), _parameter_addresses(owner)) \
        if encoder is not None else None
    return (settings, tuple(sorted(shape.items())), encoder_id, capture, _parameter_addresses(decoder))


def static_call(decoder, settings, shape: dict[str, Any], encoder: Callable | None) -> StaticCall:
    """The cached :class:`StaticCall` fitting this call (made, and on CUDA captured, on first use)."""
    device = shape["device"]
    if shape["max_length"] > decoder.config.max_position_embeddings:
        raise ValueError(f"max_length {shape['max_length']} exceeds max_position_embeddings "
                         f"{decoder.config.max_position_embeddings}")
    capture = device.type == "cuda" and not (settings.do_sample and settings.sampler == "multinomial")
    key = _key(decoder, settings, shape, encoder, capture)
    calls = _STATIC_CALLS.setdefault(decoder, OrderedDict())
    if key in calls:
        calls.move_to_end(key)
        return calls[key]
    call = StaticCall(decoder, settings, shape, encoder, capture)
    calls[key] = call
    while len(calls) > MAX_STATIC_CALLS:
        calls.popitem(last=False)
    return call


def generate(decoder, settings, prompts: Tensor, keep: Tensor, ignore: Tensor | None, rows_per_image: int,
             max_length: int, eos_token_id: int, pad_token_id: int, states: Tensor | None,
             context_mask: Tensor | None, encoder: Callable | None, encoder_inputs: tuple,
             generator: torch.Generator | None, fixed: bool) -> Any:
    """Run one call on the static engine. ``prompts [R, P]`` (rows of an image consecutive), ``keep [R,
    max_length]`` bool, and either ``states [C, N, D]`` or ``encoder(*encoder_inputs)`` computing them (tensors
    batched by image; other values are constants of the entry)."""
    images = prompts.shape[0] // rows_per_image
    spec = tuple(("tensor", tuple(value.shape[1:]), value.dtype) if isinstance(value, Tensor) else ("value", value)
                 for value in encoder_inputs)
    shape = dict(images=bucket(images), rows_per_image=rows_per_image, prompt_length=prompts.shape[1],
                 max_length=max_length, fixed=fixed, ignore_for_penalty=ignore is not None,
                 masked_context=context_mask is not None, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                 device=prompts.device, encoder_inputs=spec,
                 context=None if states is None else tuple(states.shape[1:]),
                 dtype=None if states is None else states.dtype)
    call = static_call(decoder, settings, shape, encoder)
    seed = sampling.seed_from(generator, prompts.device) if isinstance(call.search.sampler, search.GumbelSampler) \
        else None
    live = images if settings.num_beams > 1 else prompts.shape[0]
    return call(prompts, keep, ignore, states, context_mask, encoder_inputs, live, seed, generator)
