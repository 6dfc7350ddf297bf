"""pytest-benchmark entry points: the tiny-config variants of bench_vit and bench_generate, HF vs blip_fast.

Run with ``python -m pytest benchmarks --benchmark-only`` (or ``make bench``); each case is one benchmark group so
pytest-benchmark prints the two engines side by side.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_capfilt, bench_decode_attention, bench_generate, bench_vit

GENERATE_CASES = {"greedy_bs1": 1, "greedy_bs256": 8, "beam3_bs64": 4, "nucleus_bs256": 8}  # case -> tiny batch
VIT_BATCHES = (1, 16)


def _model_or_skip(models: dict, errors: dict, engine: str):
    if engine not in models:
        pytest.skip(f"{engine} unavailable: {errors.get(engine, 'not built')}")
    return models[engine]


@pytest.fixture(scope="module")
def generate_models(bench_device):
    _, models, errors = bench_generate.build_models("tiny", bench_device, torch.float32)
    return models, errors


@pytest.fixture(scope="module")
def vit_models(bench_device):
    vision, models, errors = bench_vit.build_models("tiny", bench_device, torch.float32)
    return vision, models, errors


@pytest.mark.parametrize("engine", bench_generate.ENGINES)
@pytest.mark.parametrize("case_name", sorted(GENERATE_CASES))
def test_generate_tiny(benchmark, generate_models, bench_device, case_name, engine):
    models, errors = generate_models
    model = _model_or_skip(models, errors, engine)
    case = bench_generate.CASES[case_name]
    batch = GENERATE_CASES[case_name]
    benchmark.group = f"generate-{case_name}-bs{batch}"
    size = model.config.vision_config.image_size if engine == "hf" else model.config.vision.image_size
    pixel_values = torch.randn(batch, 3, size, size, device=bench_device)
    generate = bench_generate.make_generate(model, pixel_values, case, new_tokens=20)
    tokens = benchmark.pedantic(generate, rounds=3, warmup_rounds=1)
    assert tokens.shape[0] == batch * case.generate_kwargs.get("num_return_sequences", 1)


@pytest.mark.parametrize("engine", bench_vit.ENGINES)
@pytest.mark.parametrize("batch", VIT_BATCHES)
def test_vit_tiny(benchmark, vit_models, bench_device, batch, engine):
    vision, models, errors = vit_models
    model = _model_or_skip(models, errors, engine)
    benchmark.group = f"vit-forward-bs{batch}"
    pixel_values = torch.randn(batch, 3, vision.image_size, vision.image_size, device=bench_device)
    hidden = benchmark.pedantic(bench_vit.make_forward(model, pixel_values), rounds=5, warmup_rounds=1)
    assert hidden.shape == (batch, vision.num_positions, vision.hidden_size)


@pytest.fixture(scope="module")
def capfilt_engines(bench_device, tmp_path_factory):
    return bench_capfilt.build_engines("tiny", tmp_path_factory.mktemp("capfilt"), bench_device, torch.float32)


@pytest.mark.parametrize("engine", bench_capfilt.ENGINES)
def test_capfilt_tiny(benchmark, capfilt_engines, bench_device, engine):
    image_size, pipelines, errors = capfilt_engines
    pipeline = _model_or_skip(pipelines, errors, engine)
    case = bench_capfilt.Case(batch=4, num_captions=3)
    benchmark.group = "capfilt-k3-bs4"
    pixel_values = torch.randn(case.batch, 3, image_size, image_size, device=bench_device)
    p_match = benchmark.pedantic(bench_capfilt.make_pipeline_call(pipeline, pixel_values, case, length=20), rounds=3,
                                 warmup_rounds=1)
    assert p_match.shape == (case.batch * (1 + case.num_captions),)


@pytest.mark.parametrize("engine", bench_decode_attention.ENGINES)
@pytest.mark.parametrize("images,rows", [(4, 1), (4, 3)])
def test_decode_attention_tiny(benchmark, bench_device, images, rows, engine):
    shape = bench_decode_attention.TINY
    benchmark.group = f"decode-attention-c{images}-r{rows}"
    make = lambda n: torch.randn(images, shape["heads"], n, shape["head_dim"], device=bench_device)
    query, key, value = make(rows), make(shape["keys"]), make(shape["keys"])
    calls = bench_decode_attention.engine_calls(bench_device, query, key, value, rows)
    if engine not in calls:
        pytest.skip(f"{engine} unavailable on {bench_device}")
    out = benchmark.pedantic(calls[engine], rounds=5, warmup_rounds=1)
    assert out.shape == query.shape
