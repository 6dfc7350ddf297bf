"""The decoding engine's fast paths vs its dynamic path: the static step, in-place beam reorder, the static-step
cache, sparse stop checks, and (GPU) CUDA graphs. The oracle is the dynamic path, itself checked against
HuggingFace in test_hf_parity.py."""

import contextlib
import copy

import pytest
import torch

import blip_fast
from blip_fast import generation
from blip_fast.generation import Decoding, StaticDecoding, bucket, static_step
from blip_fast.modeling.text import DecoderCache
from tests.tiny_models import assert_close, tiny_hf_model

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
def _fresh_static_steps():
    generation.clear_static_steps()
    yield
    generation.clear_static_steps()


def _prompt_mask(rows: int, prompt_length: int, max_length: int, padded: bool) -> torch.Tensor:
    """``[R, max_length]`` 0/1: ones, with left padding of 0..2 prompt positions per row when ``padded``."""
    mask = torch.ones(rows, max_length, dtype=torch.long)
    if padded:
        for row in range(rows):
            mask[row, : row % 3] = 0
    return mask


def _step_logits(decoder, static: bool, image_embeds, prompts, mask, rows_per_image, script) -> list[torch.Tensor]:
    """Prefill ``prompts``, then per ``(origins, tokens)`` of ``script`` reorder the beams and feed the tokens."""
    max_length = mask.shape[1]
    if static:
        step = static_step(decoder, image_embeds, None, rows_per_image, max_length)
        step.load(decoder, image_embeds, None, mask)
        assert step.cache.self_kv.shape[2] == bucket(image_embeds.shape[0]) * rows_per_image
        decoding = StaticDecoding(decoder, step, mask)
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
    """Same prompt, fed tokens and beam reorders: the static step gives the dynamic step's logits to rounding in
    fp64; in fp32 both paths are within 5e-5 of that (this tiny random model amplifies rounding to ~1e-5)."""
    rows, prompt_length, max_length = images * rows_per_image, 4, 11
    image_embeds = torch.randn(images, 26, 48, dtype=torch.float64)
    prompts = torch.randint(6, 90, (rows, prompt_length))
    mask = _prompt_mask(rows, prompt_length, max_length, padded)
    script = [
        (torch.arange(rows) // rows_per_image * rows_per_image + torch.randint(0, rows_per_image, (rows,)),
         torch.randint(6, 90, (rows,)))
        for _ in range(max_length - prompt_length - 1)
    ]
    decoder64 = copy.deepcopy(captioner.text_decoder).double()
    args = (image_embeds, prompts, mask, rows_per_image, script)
    oracle = _step_logits(decoder64, False, *args)
    for step, (actual, expected) in enumerate(zip(_step_logits(decoder64, True, *args), oracle)):
        assert_close(actual, expected, rtol=1e-12, name=f"fp64 step {step}")

    args = (image_embeds.float(), prompts, mask, rows_per_image, script)
    for static in (True, False):  # the dynamic fp32 path shows the tolerance is this model's fp32 noise, no looser
        for step, (actual, expected) in enumerate(zip(_step_logits(captioner.text_decoder, static, *args), oracle)):
            assert_close(actual, expected, rtol=5e-5, name=f"fp32 {'static' if static else 'dynamic'} step {step}")


@pytest.mark.parametrize("rows, fed_rows", [(6, 6), (8, 5)], ids=["all-rows", "bucket-padded"])
def test_reorder_in_place_equals_index_select(rows, fed_rows):
    """The filled prefix of the fed rows moves like the old ``index_select`` of whole tensors; addresses stay put
    and nothing outside that prefix changes."""
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


@pytest.mark.parametrize("count, expected", [(1, 1), (3, 4), (33, 64), (64, 64), (65, 128), (200, 256)])
def test_bucket(count, expected):
    assert bucket(count) == expected


def test_static_steps_are_reused_per_bucket_and_bounded(captioner):
    decoder = captioner.text_decoder
    first = static_step(decoder, torch.randn(3, 26, 48), None, 1, 12)
    assert static_step(decoder, torch.randn(4, 26, 48), None, 1, 12) is first, "3 and 4 images share bucket 4"
    assert static_step(decoder, torch.randn(4, 26, 48), None, 1, 13) is not first, "max_length is part of the key"
    for max_length in range(14, 14 + generation.MAX_STATIC_STEPS):
        static_step(decoder, torch.randn(1, 26, 48), None, 1, max_length)
    assert static_step(decoder, torch.randn(3, 26, 48), None, 1, 12) is not first, "least recently used evicted"


def _cached_steps(decoder) -> int:
    return len(generation._STATIC_STEPS.get(decoder, {}))


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
    assert _cached_steps(captioner.text_decoder) == int(static)


CASES = [
    pytest.param(dict(), id="greedy"),
    pytest.param(dict(num_beams=3), id="beam3"),
    pytest.param(dict(num_beams=4, num_return_sequences=2, early_stopping=True), id="beam4-ret2-early"),
    pytest.param(dict(num_beams=2, early_stopping="never", max_new_tokens=9), id="beam2-never"),
    pytest.param(dict(repetition_penalty=1.5, min_new_tokens=3, max_new_tokens=11), id="greedy-penalty"),
    pytest.param(dict(do_sample=True, top_p=0.9, num_return_sequences=3), id="nucleus"),
    pytest.param(dict(do_sample=True, top_k=5, num_beams=2), id="beam-sample"),
]


def _generate(model, pixel_values, prompt=None, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(5) if kwargs.get("do_sample") else None
    return model.generate(pixel_values, input_ids=prompt, generator=generator, **kwargs)


def _ended_at(ids: torch.Tensor) -> list[int]:
    return [row.tolist().index(EOS) if EOS in row.tolist() else len(row) for row in ids]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch", [1, 5])
def test_static_step_generates_the_dynamic_ids(captioner, case, batch):
    """End to end through greedy/beam/sampling, the static step (uncaptured on CPU) gives the dynamic path's ids,
    also when its cached buffers last served other images filling the whole bucket (stale rows stay inert)."""
    pixel_values = torch.randn(batch, 3, 40, 40)
    expected = _generate(captioner, pixel_values, cuda_graphs=False, **case)
    _generate(captioner, torch.randn(bucket(batch), 3, 40, 40), cuda_graphs=True, **case)
    actual = _generate(captioner, pixel_values, cuda_graphs=True, **case)
    assert _cached_steps(captioner.text_decoder) == 1, "both calls share one bucket"
    assert torch.equal(actual, expected), f"\nstatic  {actual.tolist()}\ndynamic {expected.tolist()}"


def test_static_step_with_padded_prompt_generates_the_dynamic_ids(captioner):
    prompt = torch.tensor([[101, 11, 12, 13, 5], [101, 0, 0, 14, 5], [101, 0, 15, 16, 5]])
    attention_mask = (prompt != 0).long()
    pixel_values = torch.randn(3, 3, 40, 40)
    for case in (dict(), dict(num_beams=3, repetition_penalty=1.3)):
        expected = captioner.generate(pixel_values, prompt, attention_mask, cuda_graphs=False, **case)
        actual = captioner.generate(pixel_values, prompt, attention_mask, cuda_graphs=True, **case)
        assert torch.equal(actual, expected), f"\nstatic  {actual.tolist()}\ndynamic {expected.tolist()}"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("interval", [0, 3])
def test_sparse_stop_checks_give_identical_output(captioner, case, interval):
    """Checking the stop flag every ``interval`` steps (0: never) decodes past HuggingFace's stop, yet the trimmed
    output is the same; the rows really end at different steps."""
    pixel_values = torch.randn(6, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    expected = _generate(captioner, pixel_values, **case)
    actual = _generate(captioner, pixel_values, stop_check_interval=interval, **case)
    assert torch.equal(actual, expected), f"\nsparse  {actual.tolist()}\ndefault {expected.tolist()}"
    ended_at = _ended_at(expected)
    assert min(ended_at) < max(ended_at), "rows should finish at different steps"


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


@pytest.mark.parametrize("case", [dict(), dict(num_beams=3), dict(do_sample=True, top_p=0.9)],
                         ids=["greedy", "beam3", "nucleus"])
@pytest.mark.parametrize("interval", [1, 0])
def test_host_reads_per_step(captioner, monkeypatch, case, interval):
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
            pad_token_id=0, max_length=max_length, stop_check_interval=interval, **case,
        )
    steps = max_length - prompt_length
    assert reads.count <= (steps if interval == 1 else 0) + 1


GPU_CASES = [
    pytest.param(dict(), id="greedy"),
    pytest.param(dict(num_beams=3), id="beam3"),
    pytest.param(dict(do_sample=True, top_p=0.9), id="nucleus"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("batch", [1, 5, 64, 67])
def test_cuda_graphs_give_eager_ids(captioner, dtype, case, batch):
    """Replayed CUDA graphs (bucketed, padded rows) give the ids of eager decoding, on first capture and when the
    cached graph is rebound to new images after serving a full bucket of others."""
    model = copy.deepcopy(captioner).to("cuda", dtype)

    def run(images: int, seed: int, cuda_graphs: bool) -> torch.Tensor:
        pixel_values = torch.randn(images, 3, 40, 40, generator=torch.Generator().manual_seed(seed))
        generator = torch.Generator("cuda").manual_seed(7) if case.get("do_sample") else None
        return model.generate(pixel_values.to("cuda", dtype), generator=generator, cuda_graphs=cuda_graphs,
                              max_new_tokens=15, **case)

    for images, seed in [(batch, 1), (bucket(batch), 2), (batch, 3)]:
        eager, graphed = run(images, seed, False), run(images, seed, True)
        assert torch.equal(graphed, eager), f"\ngraph {graphed.tolist()}\neager {eager.tolist()}"
    steps = generation._STATIC_STEPS[model.text_decoder]
    assert len(steps) == 1 and next(iter(steps.values())).graph is not None, "one captured graph, reused"


class _FakeStream:
    def wait_stream(self, other):
        pass


class _FakeCuda:
    """Records what ``StaticStep.capture`` asks of torch.cuda, so the capture call is checked without a GPU."""

    def __init__(self, monkeypatch):
        self.graph_kwargs = []
        fakes = dict(Stream=lambda device=None: _FakeStream(), current_stream=lambda device=None: _FakeStream(),
                     stream=lambda stream: contextlib.nullcontext(), CUDAGraph=lambda: "graph", graph=self.graph)
        for name, value in fakes.items():
            monkeypatch.setattr(torch.cuda, name, value)

    def graph(self, graph, **kwargs):
        self.graph_kwargs.append(kwargs)
        return contextlib.nullcontext()


def test_capture_is_thread_local(captioner, monkeypatch):
    """CapFilt captures lazily while its DataLoader's pin-memory thread makes CUDA calls; under the default "global"
    capture mode such a call invalidates the capture, so the step must be captured with thread_local errors."""
    fake = _FakeCuda(monkeypatch)
    image_embeds = torch.randn(2, 26, 48)
    step = static_step(captioner.text_decoder, image_embeds, None, rows_per_image=1, max_length=10)
    assert step.graph is None  # CPU: not captured
    with torch.no_grad():  # as generate() runs it
        step.capture(captioner.text_decoder)
    assert fake.graph_kwargs == [{"capture_error_mode": "thread_local"}]
    assert step.graph == "graph" and step.logits.shape == (step.tokens.shape[0], captioner.config.text.vocab_size)


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
