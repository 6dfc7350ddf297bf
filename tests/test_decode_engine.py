"""The static decoding engine (blip_fast/decode_graphs.py, modeling/decode_step.py) against the dynamic one and
HuggingFace: the fused step's logits, beam history instead of cache copies, whole calls (the code CUDA graphs
capture, run uncaptured on CPU), buckets, the entry cache, sparse stop checks, host reads, and (GPU) graphs."""

import contextlib
import copy

import pytest
import torch

import blip_fast
from blip_fast import decode_graphs, generation
from blip_fast.decode_graphs import StaticDecoding, bucket
from blip_fast.generation import Decoding
from blip_fast.modeling import decode_step
from blip_fast.modeling.text import DecoderCache
from tests.tiny_models import tiny_hf_model

SHAPE = dict(hidden=48, text_heads=3, vision_heads=4, image_size=40, patch_size=8)
EOS = 5  # tiny_models' sep/eos id


@pytest.fixture(scope="module")
def captioner():
    """A tiny captioner whose [SEP] is likely enough that rows end at different steps."""
    model = blip_fast.BlipForConditionalGeneration.from_hf_model(tiny_hf_model("BlipForConditionalGeneration", **SHAPE))
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[EOS] += 1.0
    return model


@pytest.fixture(autouse=True)
def _fresh_static_calls():
    decode_graphs.clear_static_calls()
    yield
    decode_graphs.clear_static_calls()


def _prompt_mask(rows: int, rows_per_image: int, max_length: int, padded: bool) -> torch.Tensor:
    """``[R, max_length]`` 0/1: ones, with left padding of 0..2 prompt positions per image when ``padded`` (the rows
    of an image share their prompt, as ``generate`` repeats it; a padded position's K/V is never attended)."""
    mask = torch.ones(rows, max_length, dtype=torch.long)
    if padded:
        for row in range(rows):
            mask[row, : row // rows_per_image % 3] = 0
    return mask


def _step_logits(decoder, static: bool, image_embeds, prompts, mask, rows_per_image, script) -> list[torch.Tensor]:
    """Prefill ``prompts``, then per ``(origins, tokens)`` of ``script`` reorder the beams and feed the tokens."""
    max_length = mask.shape[1]
    if static:
        images, dtype = image_embeds.shape[0], image_embeds.dtype
        cache = decode_step.new_static_cache(decoder.bert, images, rows_per_image, max_length, image_embeds.shape[1],
                                             False, dtype, image_embeds.device)
        weights = decode_step.FusedWeights(decoder.bert)
        weights.refresh()
        decode_step.fill_context(cache, weights, image_embeds, None)
        decoding = StaticDecoding(decoder, cache, weights, mask.bool(), beams=True)
    else:
        decoding = Decoding(decoder, decoder.bert.new_cache(image_embeds, None, rows_per_image, max_length), mask)
    with torch.no_grad():
        logits = [decoding.prefill(prompts).double()]
        for origins, tokens in script:
            decoding.reorder(origins)
            logits.append(decoding.step(tokens).double())
    return logits


@pytest.mark.parametrize("images", [1, 3])
@pytest.mark.parametrize("rows_per_image", [1, 3])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded-prompt"])
def test_static_step_logits_equal_dynamic_step(captioner, images, rows_per_image, padded):
    """Same prompt, fed tokens and beam reorders: the fused static step (beam history table, no cache copies) gives
    the dynamic step's logits (physical cache reorders) to rounding in fp64, and within fp32 noise in fp32."""
    rows, prompt_length, max_length = images * rows_per_image, 4, 11
    image_embeds = torch.randn(images, 26, 48, dtype=torch.float64)
    prompts = torch.randint(6, 90, (rows, prompt_length))
    mask = _prompt_mask(rows, rows_per_image, max_length, padded)
    script = [
        (torch.arange(rows) // rows_per_image * rows_per_image + torch.randint(0, rows_per_image, (rows,)),
         torch.randint(6, 90, (rows,)))
        for _ in range(max_length - prompt_length - 1)
    ]
    decoder64 = copy.deepcopy(captioner.text_decoder).double()
    args = (image_embeds, prompts, mask, rows_per_image, script)
    oracle = _step_logits(decoder64, False, *args)
    for step, (actual, expected) in enumerate(zip(_step_logits(decoder64, True, *args), oracle)):
        assert_close_rows(actual, expected, 1e-12, f"fp64 step {step}")
    args = (image_embeds.float(), prompts, mask, rows_per_image, script)
    for static in (True, False):  # the dynamic fp32 path shows the tolerance is this model's fp32 noise, no looser
        for step, (actual, expected) in enumerate(zip(_step_logits(captioner.text_decoder, static, *args), oracle)):
            assert_close_rows(actual, expected, 5e-5, f"fp32 {'static' if static else 'dynamic'} step {step}")


def assert_close_rows(actual, expected, rtol, name):
    from tests.tiny_models import assert_close

    assert_close(actual, expected, rtol=rtol, name=name)


def test_fused_weights_follow_in_place_updates(captioner):
    """The Q|K|V and cross-K|V concatenations are derived copies (state-dict keys unchanged), refreshed in place."""
    model = copy.deepcopy(captioner)
    weights = decode_step.FusedWeights(model.text_decoder.bert)
    address = weights.qkv[0][0].data_ptr()
    with torch.no_grad():
        model.text_decoder.bert.encoder.layer[0].attention.self.key.weight.add_(1.0)
    weights.refresh()
    layer = model.text_decoder.bert.encoder.layer[0].attention.self
    assert weights.qkv[0][0].data_ptr() == address
    assert torch.equal(weights.qkv[0][0], torch.cat([layer.query.weight, layer.key.weight, layer.value.weight]))
    assert set(model.state_dict()) == set(captioner.state_dict())


@pytest.mark.parametrize("rows, fed_rows", [(6, 6), (8, 5)], ids=["all-rows", "bucket-padded"])
def test_reorder_in_place_equals_index_select(rows, fed_rows):
    """The dynamic cache's reorder: the filled prefix of the fed rows moves like an ``index_select`` of whole
    tensors; addresses stay put and nothing outside that prefix changes."""
    self_kv = torch.randn(2, 3, rows, 2, 9, 4)
    cache = DecoderCache(self_kv.clone(), [], [], None, rows_per_image=1, length=5)
    address = cache.self_kv.data_ptr()
    for _ in range(2):
        before = cache.self_kv.clone()
        origins = torch.randint(0, fed_rows, (fed_rows,))
        cache.reorder(origins)
        expected = before.clone()
        expected[:, :, :fed_rows, :, :5] = before.index_select(2, origins)[:, :, :, :, :5]
        assert torch.equal(cache.self_kv, expected)
    scratch = cache.reorder_scratch.data_ptr()
    cache.reorder(torch.arange(fed_rows))
    assert cache.self_kv.data_ptr() == address and cache.reorder_scratch.data_ptr() == scratch


@pytest.mark.parametrize("count, expected", [(1, 1), (3, 4), (8, 8), (9, 16), (33, 40), (64, 64), (65, 72),
                                             (200, 224), (256, 256), (600, 640)])
def test_bucket(count, expected):
    assert bucket(count) == expected


def _cached_calls(decoder) -> int:
    return len(decode_graphs._STATIC_CALLS.get(decoder, {}))


def test_static_calls_are_reused_per_bucket_and_bounded(captioner, monkeypatch):
    def run(images, max_length):
        captioner.generate(torch.randn(images, 3, 40, 40), max_length=max_length, cuda_graphs=True)

    monkeypatch.setattr(decode_graphs, "MAX_STATIC_CALLS", 2)  # each call is a new static program: few, short
    run(3, 6)
    first = next(iter(decode_graphs._STATIC_CALLS[captioner.text_decoder].values()))
    run(4, 6)
    assert _cached_calls(captioner.text_decoder) == 1, "3 and 4 images share bucket 4"
    run(4, 7)
    assert _cached_calls(captioner.text_decoder) == 2, "max_length is part of the key"
    for max_length in range(8, 8 + decode_graphs.MAX_STATIC_CALLS):
        run(1, max_length)
    assert _cached_calls(captioner.text_decoder) == decode_graphs.MAX_STATIC_CALLS
    assert first not in decode_graphs._STATIC_CALLS[captioner.text_decoder].values(), "least recently used evicted"


def test_cached_calls_do_not_keep_the_model_alive(captioner):
    """The cache is keyed weakly by the decoder: a model that goes away takes its buffers with it."""
    import gc
    import weakref

    model = copy.deepcopy(captioner)
    model.generate(torch.randn(2, 3, 40, 40), max_length=6, cuda_graphs=True)
    assert _cached_calls(model.text_decoder) == 1
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None and len(decode_graphs._STATIC_CALLS) == 0


@pytest.mark.parametrize("switch, kwargs, static", [
    (None, {}, False), ("1", {}, True), ("0", dict(cuda_graphs=True), True), ("1", dict(cuda_graphs=False), False),
])
def test_switch(captioner, monkeypatch, switch, kwargs, static):
    """CPU default is the dynamic path; BLIP_FAST_CUDA_GRAPHS sets the default and the setting overrides it."""
    if switch is None:
        monkeypatch.delenv("BLIP_FAST_CUDA_GRAPHS", raising=False)
    else:
        monkeypatch.setenv("BLIP_FAST_CUDA_GRAPHS", switch)
    captioner.generate(torch.randn(2, 3, 40, 40), max_length=6, **kwargs)
    assert _cached_calls(captioner.text_decoder) == int(static)


CASES = [
    pytest.param(dict(), id="greedy"),
    pytest.param(dict(num_beams=3), id="beam3"),
    pytest.param(dict(num_beams=4, num_return_sequences=2, early_stopping=True), id="beam4-ret2-early"),
    pytest.param(dict(num_beams=2, early_stopping="never", max_new_tokens=9), id="beam2-never"),
    pytest.param(dict(repetition_penalty=1.5, min_new_tokens=3, max_new_tokens=11), id="greedy-penalty"),
    pytest.param(dict(do_sample=True, top_p=0.9, num_return_sequences=3), id="nucleus"),
    pytest.param(dict(do_sample=True, top_p=0.9, num_return_sequences=3, sampler="gumbel"), id="nucleus-gumbel"),
    pytest.param(dict(do_sample=True, top_k=5, num_beams=2), id="beam-sample"),
    pytest.param(dict(do_sample=True, top_k=5, num_beams=2, sampler="gumbel"), id="beam-sample-gumbel"),
]


def _generate(model, pixel_values, prompt=None, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5) if kwargs.get("do_sample") else None
    return model.generate(pixel_values, input_ids=prompt, generator=generator, **kwargs)


def _ended_at(ids: torch.Tensor) -> list[int]:
    return [row.tolist().index(EOS) if EOS in row.tolist() else len(row) for row in ids]


BATCH_CASES = [pytest.param(case.values[0], batch, id=f"{batch}-{case.id}")
               for batch, cases in ((5, CASES), (1, CASES[:2])) for case in cases]


@pytest.mark.slow
@pytest.mark.parametrize("case, batch", BATCH_CASES)
def test_static_engine_generates_the_dynamic_ids(captioner, case, batch):
    """End to end through greedy/beam/sampling (both samplers), the static engine (uncaptured on CPU) gives the
    dynamic engine's ids, also when its cached buffers last served other images filling the whole bucket (padded
    rows stay inert). Batch 5 (bucket 8, padded rows) for every case, batch 1 for greedy and beam search."""
    case = {"max_new_tokens": 12, **case}
    pixel_values = torch.randn(batch, 3, 40, 40)
    expected = _generate(captioner, pixel_values, cuda_graphs=False, **case)
    _generate(captioner, torch.randn(bucket(batch), 3, 40, 40), cuda_graphs=True, **case)
    actual = _generate(captioner, pixel_values, cuda_graphs=True, **case)
    assert _cached_calls(captioner.text_decoder) == 1, "both calls share one bucket"
    assert torch.equal(actual, expected), f"\nstatic  {actual.tolist()}\ndynamic {expected.tolist()}"


def test_static_engine_with_padded_prompt_generates_the_dynamic_ids(captioner):
    prompt = torch.tensor([[101, 11, 12, 13, 5], [101, 0, 0, 14, 5], [101, 0, 15, 16, 5]])
    attention_mask = (prompt != 0).long()
    pixel_values = torch.randn(3, 3, 40, 40)
    for case in (dict(), dict(num_beams=3, repetition_penalty=1.3)):
        expected = captioner.generate(pixel_values, prompt, attention_mask, cuda_graphs=False, **case)
        actual = captioner.generate(pixel_values, prompt, attention_mask, cuda_graphs=True, **case)
        assert torch.equal(actual, expected), f"\nstatic  {actual.tolist()}\ndynamic {expected.tolist()}"


SPARSE_CASES = [  # (case, interval, cuda_graphs): every case on the static engine, a few on the dynamic one
    *[pytest.param(case.values[0], 3, True, id=f"static-3-{case.id}") for case in CASES[:3] + CASES[5:7]],
    *[pytest.param(case.values[0], 0, True, id=f"static-0-{case.id}") for case in (CASES[1], CASES[6])],
    *[pytest.param(case.values[0], interval, False, id=f"dynamic-{interval}-{case.id}")
      for case, interval in ((CASES[0], 0), (CASES[2], 3), (CASES[6], 3))],
]


@pytest.mark.slow
@pytest.mark.parametrize("case, interval, cuda_graphs", SPARSE_CASES)
def test_sparse_stop_checks_give_identical_output(captioner, case, interval, cuda_graphs):
    """Checking the stop flag every ``interval`` steps (0: never) decodes past HuggingFace's stop, yet the trimmed
    output is the same, on both engines (the static one cuts its program into segments there); the rows really
    end at different steps."""
    pixel_values = torch.randn(6, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    expected = _generate(captioner, pixel_values, cuda_graphs=cuda_graphs, **case)
    actual = _generate(captioner, pixel_values, stop_check_interval=interval, cuda_graphs=cuda_graphs, **case)
    assert torch.equal(actual, expected), f"\nsparse  {actual.tolist()}\ndefault {expected.tolist()}"
    ended_at = _ended_at(expected)
    assert min(ended_at) < max(ended_at), "rows should finish at different steps"


def test_fixed_length_is_detected():
    settings = generation.GenerationSettings(min_new_tokens=10, max_new_tokens=10)
    assert settings.fixed_length(4, 14)
    assert generation.GenerationSettings(min_length=13).fixed_length(4, 14)
    assert not generation.GenerationSettings(min_length=12).fixed_length(4, 14)
    assert not generation.GenerationSettings().fixed_length(1, 21)


class _HostReads:
    """Counts the tensor -> Python conversions that synchronise with the device."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in ("__bool__", "__int__", "item", "tolist"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def counted(tensor, *args):
            self.count += 1
            return original(tensor, *args)

        return counted


@pytest.mark.parametrize("case", [dict(), dict(num_beams=3), dict(do_sample=True, top_p=0.9, sampler="gumbel")],
                         ids=["greedy", "beam3", "nucleus"])
@pytest.mark.parametrize("interval", [1, 0])
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["dynamic", "static"])
def test_host_reads_per_step(captioner, monkeypatch, case, interval, cuda_graphs):
    """At most one host read per step (the stop flag) plus one for the output length; none per step with
    ``stop_check_interval=0``."""
    pixel_values = torch.randn(3, 3, 40, 40)
    prompt_length, max_length = 1, 12
    reads = _HostReads(monkeypatch)
    with torch.no_grad():
        image_embeds = captioner.vision_model(pixel_values).last_hidden_state
        reads.count = 0
        generation.generate(
            captioner.text_decoder, torch.full((3, prompt_length), 97), image_embeds, eos_token_id=EOS,
            pad_token_id=0, max_length=max_length, stop_check_interval=interval, cuda_graphs=cuda_graphs, **case,
        )
    steps = max_length - prompt_length
    assert reads.count <= (steps if interval == 1 else 0) + 1


@pytest.mark.parametrize("case", [dict(), dict(num_beams=3), dict(do_sample=True, top_p=0.9, sampler="gumbel")],
                         ids=["greedy", "beam3", "nucleus"])
def test_fixed_length_call_reads_nothing_from_the_device(captioner, case):
    """A fixed-length call on the static engine (the ViT, K/V projection, prompt and loop that one CUDA graph
    replays) has no host sync at all: no .item()/bool()/tolist() and no data-dependent-shape operator."""
    from benchmarks.bench_costs import OpCounter, host_reads

    pixel_values = torch.randn(3, 3, 40, 40)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, cuda_graphs=True, **case)
    captioner.generate(pixel_values, **kwargs)  # first call builds the static buffers
    counter = OpCounter()
    with counter, host_reads(counter):
        ids = captioner.generate(pixel_values, **kwargs)
    assert counter.syncs == 0, counter.by_op
    assert ids.shape[1] == 1 + 8


def test_decode_step_kernels_at_base_depth():
    """The budget: <= 100 kernels per decode step at base size (12 layers): 1 embedding, 8 per layer, 2 for the
    LM head. Structure does not depend on widths, so a narrow 12-layer decoder is counted."""
    from benchmarks.bench_costs import OpCounter
    from blip_fast.config import BlipConfig, TextConfig, VisionConfig

    config = BlipConfig(vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=32, patch_size=16),
                        text=TextConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                                        num_attention_heads=2, bos_token_id=100, enc_token_id=101, sep_token_id=102))
    model = blip_fast.BlipForConditionalGeneration(config).eval()
    counter = OpCounter()
    with counter.section("x"):
        pass
    steps = []

    def counted_step(*args, **kwargs):
        before = counter.kernels
        out = original(*args, **kwargs)
        steps.append(counter.kernels - before)
        return out

    original = model.text_decoder.decode_step
    model.text_decoder.decode_step = counted_step
    with counter:
        model.generate(torch.randn(2, 3, 32, 32), max_new_tokens=4, min_new_tokens=4, cuda_graphs=True)
    assert steps[1:] == [1 + 8 * 12 + 2] * (len(steps) - 1) and max(steps) <= 100


GPU_CASES = [
    pytest.param(dict(), id="greedy"),
    pytest.param(dict(num_beams=3), id="beam3"),
    pytest.param(dict(do_sample=True, top_p=0.9), id="nucleus"),
    pytest.param(dict(num_beams=3, max_new_tokens=10, min_new_tokens=10), id="beam3-fixed"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("batch", [1, 5, 64, 67])
def test_cuda_graphs_give_uncaptured_ids(captioner, dtype, case, batch):
    """Replayed CUDA graphs of whole calls (bucketed, padded rows) give the ids of the same static engine run
    uncaptured (the CPU-tested code), on first capture and when the cached graphs are reused for new images after
    serving a full bucket of others; sampling draws with the graph-safe sampler in both."""
    model = copy.deepcopy(captioner).to("cuda", dtype)
    case = {**case, "sampler": "gumbel"} if case.get("do_sample") else case

    def run(images: int, seed: int, capture: bool) -> torch.Tensor:
        pixel_values = torch.randn(images, 3, 40, 40, generator=torch.Generator().manual_seed(seed))
        generator = torch.Generator("cuda").manual_seed(7) if case.get("do_sample") else None
        decode_graphs.clear_static_calls() if not capture else None
        kwargs = {"max_new_tokens": 15, **case}
        if capture:
            return model.generate(pixel_values.to("cuda", dtype), generator=generator, cuda_graphs=True, **kwargs)
        original = decode_graphs.StaticCall.__init__

        def uncaptured(self, decoder, settings, shape, encoder, capture):
            original(self, decoder, settings, shape, encoder, False)

        decode_graphs.StaticCall.__init__ = uncaptured
        try:
            return model.generate(pixel_values.to("cuda", dtype), generator=generator, cuda_graphs=True, **kwargs)
        finally:
            decode_graphs.StaticCall.__init__ = original
            decode_graphs.clear_static_calls()

    for images, seed in [(batch, 1), (bucket(batch), 2), (batch, 3)]:
        eager, graphed = run(images, seed, False), run(images, seed, True)
        assert torch.equal(graphed, eager), f"\ngraph {graphed.tolist()}\neager {eager.tolist()}"
    calls = decode_graphs._STATIC_CALLS[model.text_decoder]
    assert len(calls) == 1 and next(iter(calls.values())).graphs is not None, "one captured call, reused"


@pytest.mark.gpu
@pytest.mark.parametrize("case", [dict(), dict(num_beams=3)], ids=["greedy", "beam3"])
def test_cuda_graphs_give_dynamic_ids_in_fp32(captioner, case):
    model = copy.deepcopy(captioner).to("cuda")
    pixel_values = torch.randn(7, 3, 40, 40, device="cuda")
    expected = model.generate(pixel_values, cuda_graphs=False, **case)
    assert torch.equal(model.generate(pixel_values, cuda_graphs=True, **case), expected)


class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeGraph:
    def pool(self):
        return "pool"


class _FakeCuda:
    """Records what ``StaticCall._capture`` asks of torch.cuda, so the capture calls are checked without a GPU."""

    def __init__(self, monkeypatch):
        self.graph_kwargs = []
        fakes = dict(Stream=lambda device=None: _FakeStream(), current_stream=lambda device=None: _FakeStream(),
                     stream=lambda stream: contextlib.nullcontext(), CUDAGraph=_FakeGraph, graph=self.graph)
        for name, value in fakes.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def graph(self, graph, **kwargs):
        self.graph_kwargs.append(kwargs)
        return contextlib.nullcontext()


def test_capture_is_thread_local(captioner, monkeypatch):
    """CapFilt captures lazily while its DataLoader's pin-memory thread makes CUDA calls; under the default "global"
    capture mode such a call invalidates the capture, so every segment is captured with thread_local errors (into
    one shared memory pool)."""
    captioner.generate(torch.randn(2, 3, 40, 40), max_new_tokens=6, stop_check_interval=2, cuda_graphs=True)
    call = next(iter(decode_graphs._STATIC_CALLS[captioner.text_decoder].values()))
    assert call.graphs is None and len(call.segments) == 3  # CPU: not captured; checks after steps 2 and 4
    fake = _FakeCuda(monkeypatch)
    with torch.no_grad():  # as generate() runs it
        call._capture()
    assert fake.graph_kwargs == [{"pool": None, "capture_error_mode": "thread_local"}] + \
        [{"pool": "pool", "capture_error_mode": "thread_local"}] * 2
    assert len(call.graphs) == len(call.snapshots) == 3


@pytest.mark.gpu
def test_capture_survives_a_pin_memory_thread(captioner):
    """The capture happens while another thread pins host memory and copies to the GPU (what a pin-memory
    DataLoader does); the graphed ids equal eager ones."""
    import threading

    model = copy.deepcopy(captioner).to("cuda")
    pixel_values = torch.randn(5, 3, 40, 40, device="cuda")
    stop = threading.Event()

    def pin_and_copy():
        while not stop.is_set():
            torch.randn(1 << 16).pin_memory().to("cuda", non_blocking=True)

    worker = threading.Thread(target=pin_and_copy, daemon=True)
    worker.start()
    try:
        graphed = model.generate(pixel_values, cuda_graphs=True, max_new_tokens=10)
    finally:
        stop.set()
        worker.join()
    assert torch.equal(graphed, model.generate(pixel_values, cuda_graphs=False, max_new_tokens=10))


@pytest.mark.parametrize("case", [dict(), dict(num_beams=3, num_return_sequences=2)], ids=["greedy", "beam3"])
def test_static_engine_returns_huggingface_output_objects(captioner, case):
    """``return_dict_in_generate`` on the static engine: the dynamic engine's sequences and beam indices (per-step
    score records route to the dynamic engine)."""
    pixel_values = torch.randn(3, 3, 40, 40)
    expected = captioner.generate(pixel_values, return_dict_in_generate=True, cuda_graphs=False, **case)
    actual = captioner.generate(pixel_values, return_dict_in_generate=True, cuda_graphs=True, **case)
    assert type(actual) is type(expected) and torch.equal(actual.sequences, expected.sequences)
    if "num_beams" in case:
        assert torch.equal(actual.beam_indices, expected.beam_indices)
