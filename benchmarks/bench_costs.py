"""Cost metrics that need no GPU (DESIGN.md §6): what GPU time follows, counted, for this tree and a baseline.

Counted per revision, each in its own subprocess that imports that revision's ``blip_fast``:

- **kernels per decode step**: operators dispatched by the model's one-token step (``decode_step``), and per
  generated token of a whole fixed-length call (step + greedy/beam/sampling bookkeeping), at the preset's size.
  Counted by a ``TorchDispatchMode``: view and metadata-only operators (no kernel on a GPU) are left out; each of
  blip_fast's own fused operators (``torch.ops.blip_fast.*``) counts once. On CUDA (``--device cuda``) the torch
  profiler's CUDA kernel launches are counted too.
- **kernels and host syncs per generate call** (ViT included), fixed length (``min_new_tokens ==
  max_new_tokens``, ``stop_check_interval=0``) and HuggingFace's defaults. A host sync is an operator whose
  result the host must wait for (``.item()``/``bool()``/``int()``, data-dependent shapes: ``nonzero``,
  ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``, ``equal``) or a ``tolist``/
  ``numpy``/``cpu`` read of a tensor.
- **FLOPs per image** (``torch.utils.flop_counter.FlopCounterMode``): captioning (greedy and beam 3, prompt
  "a picture of ", 20 new tokens) and CapFilt (:class:`blip_fast.capfilt.CapFiltModels`: captioner sampling one
  caption, filter scoring the web and the synthetic caption), and the filter's FLOPs per extra caption.

Models have random weights (counts do not depend on them); captions decode to a fixed length, so random weights
that emit ``[SEP]`` early do not change the work. ``--baseline REV`` (default: the engine before issue 12) is
checked out with ``git archive`` into a temporary folder; ``--baseline none`` measures this tree only.

    python -m benchmarks.bench_costs --out benchmarks/results/costs-cpu-2core  # base/384, ~13 min of CPU time
    python -m benchmarks.bench_costs --config tiny --baseline none            # seconds
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The decoding engine before issue 12's work (kernels per step, whole-call graphs, CapFilt K/V sharing).
DEFAULT_BASELINE = "807809e"
#: Operators that run no kernel on a GPU besides views: metadata, allocation, autograd bookkeeping.
NO_KERNEL_OPS = frozenset({
    "aten.detach", "aten.lift_fresh", "aten.alias", "aten._unsafe_view", "aten.empty", "aten.empty_strided",
    "aten.empty_like", "aten.new_empty", "aten.new_empty_strided", "aten._reshape_alias", "aten.set_",
    "aten.resize_", "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.sym_storage_offset",
    "aten.is_same_size", "aten.result_type", "aten._has_compatible_shallow_copy_type", "prim.device",
})
#: Operators whose result the host must wait for on a GPU.
SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique",
    "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.equal", "aten.is_nonzero",
    "aten.allclose", "aten.nonzero_static",
})
PROMPT_IDS = [1037, 3861, 1997]  # bert-base-uncased "a picture of"
NEW_TOKENS = 20
BUDGETS = {"decode_step_kernels": 100, "fixed_call_syncs": 0}


# ============================================================================= counting
class OpCounter(TorchDispatchMode):
    """Counts dispatched operators: ``kernels`` (not views, not metadata), ``syncs``, and per-operator counts.

    ``section()`` attributes the operators dispatched inside it to a named bucket as well."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels = 0
        self.syncs = 0
        self.by_op: collections.Counter[str] = collections.Counter()
        self.sections: collections.Counter[str] = collections.Counter()
        self.section_calls: collections.Counter[str] = collections.Counter()
        self._open: list[str] = []

    @contextlib.contextmanager
    def section(self, name: str):
        self._open.append(name)
        self.section_calls[name] += 1
        try:
            yield
        finally:
            self._open.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)  # e.g. "aten.addmm"
        if name in SYNC_OPS or (name == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is None
                                and args and isinstance(args[0], torch.Tensor) and func.__name__ != "self_int"):
            self.syncs += 1
        if not func.is_view and name not in NO_KERNEL_OPS:
            self.kernels += 1
            self.by_op[name] += 1
            for section in set(self._open):
                self.sections[section] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_reads(counter: OpCounter):
    """Count ``tolist``/``numpy``/``cpu``/``__array__`` reads of tensors as host syncs: on a GPU each is a
    device-to-host copy the host waits for, which a CPU run does not dispatch as an operator."""
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu", "__array__")}

    def counting(original):
        def read(tensor, *args, **kwargs):
            counter.syncs += 1
            return original(tensor, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def counting_sections(counter: OpCounter, owner: type, method: str, section: str, when=lambda *a, **k: True):
    """Attribute the operators of every ``owner.method`` call (for which ``when(*args)`` holds) to ``section``."""
    original = getattr(owner, method)

    def wrapped(*args, **kwargs):
        if not when(*args, **kwargs):
            return original(*args, **kwargs)
        with counter.section(section):
            return original(*args, **kwargs)

    setattr(owner, method, wrapped)
    try:
        yield
    finally:
        setattr(owner, method, original)


def cuda_kernel_launches(fn) -> int:
    """CUDA kernels the profiler records while ``fn()`` runs (graph replays included where CUPTI reports them)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


# ============================================================================= models (child process)
def build_model(task: type, config: Any, device: str, dtype: torch.dtype, seed: int) -> Any:
    """A task model with random weights, made on the meta device and filled in place (BERT-like scales)."""
    with torch.device("meta"):
        model = task(config)
    model = model.to_empty(device=device)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or "layernorm" in name:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
        for buffer in model.buffers():
            buffer.zero_()
    model.tie_weights()
    return model.to(dtype).eval()


def bert_like_tokenizer(directory: Path) -> Any:
    """A BLIP tokenizer over a bert-base-uncased-shaped vocab (special tokens at BERT's ids, words ``w0...``)."""
    from blip_fast.tokenizer import BlipTokenizer

    special = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]", 1037: "a", 3861: "picture",
               1997: "of"}
    words = [special.get(index, f"w{index}") for index in range(30522)]
    path = directory / "vocab.txt"
    path.write_text("\n".join(words) + "\n", encoding="utf-8")
    return BlipTokenizer.from_vocab_file(path)


def _decoding_modes() -> dict[str, dict[str, Any]]:
    from blip_fast import generation

    nucleus = {"do_sample": True, "top_p": 0.9, "top_k": 50}
    if "sampler" in {field.name for field in dataclasses.fields(generation.GenerationSettings)}:
        nucleus["sampler"] = "gumbel"  # the draw CUDA graphs capture (a revision without it has one sampler)
    return {
        "greedy": {},
        "beam3": {"num_beams": 3},
        # CapFilt's captioner setting: nucleus top_p 0.9 with HuggingFace's default top_k 50.
        "nucleus": nucleus,
    }


def _generator(kwargs: dict[str, Any], device: str) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(0) if kwargs.get("do_sample") else None


def _clear(generation) -> None:
    """Drop cached static decoding state (the function's name changed with the whole-call engine)."""
    (getattr(generation, "clear_static_calls", None) or generation.clear_static_steps)()


def measure_decoding(captioner: Any, config: Any, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Kernels per decode step (the model's step) and per generated token (step + bookkeeping) per mode."""
    from blip_fast import generation
    from blip_fast.modeling.text import BlipTextLMHeadModel

    decoder, text = captioner.text_decoder, config.text
    images = 2
    image_embeds = torch.randn(images, config.vision.num_positions, config.vision.hidden_size, device=device,
                               dtype=dtype)
    prompt = torch.tensor([[text.bos_token_id, *PROMPT_IDS]] * images, device=device)
    results: dict[str, Any] = {}
    for mode, kwargs in _decoding_modes().items():
        totals, steps = {}, {}
        for new_tokens in (4, 8):
            _clear(generation)
            counter = OpCounter()
            one_token = lambda self, input_ids, *args, **kw: input_ids.shape[-1] == 1  # noqa: E731
            with counting_sections(counter, BlipTextLMHeadModel, "decode_step", "step", one_token), counter:
                generation.generate(
                    decoder, prompt, image_embeds, eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id,
                    generator=_generator(kwargs, device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    cuda_graphs=True, stop_check_interval=0, **kwargs,
                )
            totals[new_tokens] = counter.kernels
            calls = counter.section_calls["step"]
            steps[new_tokens] = counter.sections["step"] / calls if calls else None
        results[f"{mode}_token_kernels"] = (totals[8] - totals[4]) / 4
        if mode == "greedy":
            results["decode_step_kernels"] = steps[8]
    _clear(generation)
    return results


def measure_calls(captioner: Any, config: Any, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """Kernels, host syncs and FLOPs per ``generate`` call (ViT included) of one image, per mode."""
    from torch.utils.flop_counter import FlopCounterMode

    from blip_fast import generation

    pixel_values = torch.randn(1, 3, config.vision.image_size, config.vision.image_size, device=device, dtype=dtype)
    prompt = torch.tensor([[101, *PROMPT_IDS, 102]], device=device)  # as the tokenizer returns it
    settings = {
        "fixed": dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, stop_check_interval=0),
        "default": dict(max_new_tokens=NEW_TOKENS),
    }
    results: dict[str, Any] = {}
    for mode, kwargs in _decoding_modes().items():
        for setting, lengths in settings.items():
            _clear(generation)

            def call(kwargs=kwargs, setting=setting, lengths=lengths):
                captioner.generate(pixel_values, input_ids=prompt, generator=_generator(kwargs, device),
                                   cuda_graphs=True if setting == "fixed" else None, **lengths, **kwargs)

            call()  # steady state: the static buffers (and CUDA graphs) of this call shape exist
            counter, flops = OpCounter(), FlopCounterMode(display=False)
            with flops, counter, host_reads(counter), _cuda_sync_warnings(device) as cuda_syncs:
                call()
            results[f"{mode}_{setting}_call_syncs"] = counter.syncs + len(cuda_syncs)
            if setting == "fixed":
                results[f"{mode}_call_kernels"] = counter.kernels
                if mode != "nucleus":
                    results[f"caption_{mode}_gflop_per_image"] = flops.get_total_flops() / 1e9
                if device.startswith("cuda"):
                    results[f"{mode}_call_cuda_kernels"] = cuda_kernel_launches(call)
    _clear(generation)
    return results


@contextlib.contextmanager
def _cuda_sync_warnings(device: str):
    """On CUDA, torch's sync debug mode reports every synchronising call (device-to-host copies, syncs inside
    operators that a CPU run cannot show); yields the list of such warnings."""
    import warnings

    if not device.startswith("cuda"):
        yield []
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")


def measure_capfilt(captioner: Any, filter_model: Any, config: Any, device: str, dtype: torch.dtype,
                    workdir: Path) -> dict[str, Any]:
    """FLOPs per image of CapFilt's two stages as ``blip-fast capfilt`` runs them (one synthetic caption per
    image), and the filter's FLOPs per additional caption of an image."""
    from torch.utils.flop_counter import FlopCounterMode

    from blip_fast.capfilt import CapFiltModels, CapFiltOptions
    from blip_fast.captioning import Captioner
    from blip_fast.data.transforms import BlipImageProcessor

    tokenizer = bert_like_tokenizer(workdir)
    processor = BlipImageProcessor(size=config.vision.image_size)
    options = CapFiltOptions(captioner="-", filter="-", input="-", output="-", device=device,
                             dtype=str(dtype).removeprefix("torch."), max_length=len(PROMPT_IDS) + 1 + NEW_TOKENS,
                             min_length=len(PROMPT_IDS) + 1 + NEW_TOKENS)
    models = CapFiltModels(Captioner(captioner, processor, tokenizer), filter_model, tokenizer, processor, options)
    pixel_values = torch.randn(1, 3, config.vision.image_size, config.vision.image_size, device=device, dtype=dtype)
    web = "a picture of " + " ".join(f"w{index}" for index in range(2000, 2012))
    results: dict[str, Any] = {}
    with FlopCounterMode(display=False) as flops:
        synthetic = models.synthetic_captions(pixel_values, torch.Generator(device=device).manual_seed(0))
    results["capfilt_captioner_gflop_per_image"] = flops.get_total_flops() / 1e9
    with FlopCounterMode(display=False) as flops:
        models.match_logits(pixel_values, [[web, *synthetic[0]]])
    results["capfilt_filter_gflop_per_image"] = flops.get_total_flops() / 1e9
    results["capfilt_gflop_per_image"] = (results["capfilt_captioner_gflop_per_image"]
                                          + results["capfilt_filter_gflop_per_image"])
    extra = 3
    per_caption = []
    for captions in (1, 1 + extra):
        with FlopCounterMode(display=False) as flops:
            models.match_logits(pixel_values, [[web] * captions])
        per_caption.append(flops.get_total_flops() / 1e9)
    results["filter_gflop_per_extra_caption"] = (per_caption[1] - per_caption[0]) / extra
    return results


def measure_cuda_kernels(captioner: Any, config: Any, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """CUDA kernels per generated token of greedy decoding: the dynamic engine (eager) and the default one (the
    static engine's CUDA graphs on CUDA)."""
    from blip_fast import generation

    text = config.text
    image_embeds = torch.randn(2, config.vision.num_positions, config.vision.hidden_size, device=device, dtype=dtype)
    prompt = torch.tensor([[text.bos_token_id, *PROMPT_IDS]] * 2, device=device)
    results = {}
    for label, graphs in (("dynamic", False), ("default", None)):
        counts = {}
        for new_tokens in (4, 8):
            def call(new_tokens=new_tokens, graphs=graphs):
                generation.generate(captioner.text_decoder, prompt, image_embeds, eos_token_id=text.sep_token_id,
                                    pad_token_id=text.pad_token_id, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, stop_check_interval=0, cuda_graphs=graphs)

            call()  # capture outside the profiled call
            counts[new_tokens] = cuda_kernel_launches(call)
        results[f"cuda_token_kernels_{label}"] = (counts[8] - counts[4]) / 4
    _clear(generation)
    return results


def _count_cpu_attention_flops() -> None:
    """torch's FLOP counter knows the CUDA attention kernels but not the CPU one that SDPA runs here."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    target = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if target in flop_registry:
        return

    @register_flop_formula(target)
    def attention_flops(query_shape, key_shape, *args, out_shape=None, **kwargs) -> int:
        batch, heads, queries, head_dim = query_shape
        return 4 * batch * heads * queries * key_shape[2] * head_dim  # QK^T and PV


def measure(config_name: str, image_size: int | None, device: str, dtype_name: str, sections: list[str]) -> dict:
    """Every metric of the ``blip_fast`` importable in this process."""
    _count_cpu_attention_flops()
    with contextlib.suppress(ImportError):  # a revision before the fused decode ops has none to register
        from blip_fast.decode_ops import register_flop_formulas

        register_flop_formulas()
    import blip_fast
    from blip_fast.config import BlipConfig
    from blip_fast.modeling.blip import BlipForConditionalGeneration, BlipForImageTextRetrieval

    dtype = getattr(torch, dtype_name)
    config = BlipConfig.from_name(config_name, **({"image_size": image_size} if image_size else {}))
    results: dict[str, Any] = {"blip_fast_path": str(Path(blip_fast.__file__).parent)}
    captioner = build_model(BlipForConditionalGeneration, config, device, dtype, seed=0)
    with torch.no_grad():
        if "decoding" in sections:
            results.update(measure_decoding(captioner, config, device, dtype))
        if "calls" in sections:
            results.update(measure_calls(captioner, config, device, dtype))
        if "capfilt" in sections:
            filter_model = build_model(BlipForImageTextRetrieval, config, device, dtype, seed=1)
            with tempfile.TemporaryDirectory() as workdir:
                results.update(measure_capfilt(captioner, filter_model, config, device, dtype, Path(workdir)))
        if device.startswith("cuda") and "decoding" in sections:
            results.update(measure_cuda_kernels(captioner, config, device, dtype))
    return results


# ============================================================================= revisions (parent process)
def checkout(revision: str, into: Path) -> Path:
    """``git archive`` of ``revision`` extracted under ``into``."""
    archive = subprocess.run(["git", "archive", "--format=tar", revision], cwd=REPO_ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def measure_in_subprocess(source: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`measure` in a fresh interpreter whose ``blip_fast`` is the one under ``source``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(source), "--config", args.config,
               "--device", args.device, "--dtype", args.dtype, "--sections", args.sections]
    if args.image_size:
        command += ["--image-size", str(args.image_size)]
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run(command, cwd=source, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {source} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


METRICS = [
    # (key, label, budget or None)
    ("decode_step_kernels", "kernels per decode step (model, greedy)", BUDGETS["decode_step_kernels"]),
    ("greedy_token_kernels", "kernels per generated token, greedy (step + bookkeeping)", None),
    ("beam3_token_kernels", "kernels per generated token, beam 3", None),
    ("nucleus_token_kernels", "kernels per generated token, nucleus (top-k 50, top-p 0.9)", None),
    ("greedy_call_kernels", "kernels per generate call, greedy 20 tokens (ViT included)", None),
    ("beam3_call_kernels", "kernels per generate call, beam 3", None),
    ("nucleus_call_kernels", "kernels per generate call, nucleus", None),
    ("greedy_fixed_call_syncs", "host syncs per call, greedy, fixed length", BUDGETS["fixed_call_syncs"]),
    ("beam3_fixed_call_syncs", "host syncs per call, beam 3, fixed length", BUDGETS["fixed_call_syncs"]),
    ("nucleus_fixed_call_syncs", "host syncs per call, nucleus, fixed length", BUDGETS["fixed_call_syncs"]),
    ("greedy_default_call_syncs", "host syncs per call, greedy, HF defaults (stop check every step)", None),
    ("beam3_default_call_syncs", "host syncs per call, beam 3, HF defaults", None),
    ("nucleus_default_call_syncs", "host syncs per call, nucleus, HF defaults", None),
    ("caption_greedy_gflop_per_image", "GFLOP per image, captioning greedy", None),
    ("caption_beam3_gflop_per_image", "GFLOP per image, captioning beam 3", None),
    ("capfilt_captioner_gflop_per_image", "GFLOP per image, CapFilt captioner (1 sample)", None),
    ("capfilt_filter_gflop_per_image", "GFLOP per image, CapFilt filter (web + 1 synthetic)", None),
    ("capfilt_gflop_per_image", "GFLOP per image, CapFilt total", None),
    ("filter_gflop_per_extra_caption", "GFLOP per additional caption in the filter", None),
    ("greedy_call_cuda_kernels", "CUDA kernels per generate call, greedy (profiler)", None),
    ("beam3_call_cuda_kernels", "CUDA kernels per generate call, beam 3 (profiler)", None),
    ("nucleus_call_cuda_kernels", "CUDA kernels per generate call, nucleus (profiler)", None),
    ("cuda_token_kernels_dynamic", "CUDA kernels per greedy token, dynamic engine (cuda_graphs=False)", None),
    ("cuda_token_kernels_default", "CUDA kernels per greedy token, default engine (CUDA graphs)", None),
]


def table(results: dict[str, dict[str, Any]]) -> str:
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " | budget |", "|---|" + "---|" * len(names) + "---|"]
    for key, label, budget in METRICS:
        if not any(key in values for values in results.values()):
            continue
        cells = [_format(values.get(key)) for values in results.values()]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {'' if budget is None else f'<= {budget}'} |")
    return "\n".join(lines)


def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 or value == int(value) else f"{value:.3g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        if args.baseline != "none":
            source = checkout(args.baseline, Path(workdir))
            results[f"before ({args.baseline})"] = measure_in_subprocess(source, args)
        results["after (this tree)"] = measure_in_subprocess(REPO_ROOT, args)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="base", choices=["base", "large", "tiny"])
    parser.add_argument("--image-size", type=int, default=None, help="default: 384 for base/large, preset for tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (default on CPU) or float16/bfloat16 (CUDA default)")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with, or 'none'")
    parser.add_argument("--sections", default="decoding,calls,capfilt")
    parser.add_argument("--name", default="costs")
    parser.add_argument("--out", default=None, help="folder for <name>.json and <name>.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.image_size is None and args.config != "tiny":
        args.image_size = 384
    if args.dtype is None:
        args.dtype = "float16" if args.device.startswith("cuda") else "float32"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:  # measuring one revision: its blip_fast comes first on sys.path
        sys.path.insert(0, args.child)
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
        print(json.dumps(measure(args.config, args.image_size, args.device, args.dtype, args.sections.split(","))))
        return 0
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks import harness

    results = run(args)
    env = harness.environment(args.device)
    title = (f"### Cost metrics: {args.config}"
             f"{f' at {args.image_size} px' if args.image_size else ''}, {args.dtype}, {args.device}\n\n"
             f"{harness.environment_line(env)}\n\n")
    text = title + table(results) + "\n"
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.name}.json").write_text(json.dumps({"environment": env, "config": args.config,
                                                           "image_size": args.image_size, "results": results},
                                                          indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (out / f"{args.name}.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
