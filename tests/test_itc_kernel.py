"""The fused Triton ITC loss (kernels/itc.py) against the pure-torch reference ``blip_fast.ops._itc_loss_reference``.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before any import), in
fp32 and fp16 only; bf16, large shapes and memory are checked by the ``gpu`` tests. Every case uses fresh random
L2-normalised features, odd sizes, and kernel outputs poisoned with NaN before the kernels write them.

Tolerances (DESIGN.md §4): fp32 — our error against an fp64 reference is at most ~1e-5 relative plus twice the
error of the fp32 reference itself (at temp = 0.001 logits reach 1000, so fp32 rounding alone is ~1e-4 relative);
fp16 — at most twice the error of the reference fed the same fp16 inputs, against the fp32 reference.
The kernels are also compiled (not run) for sm_90/sm_80 on CPU, which the interpreter cannot stand in for.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from blip_fast import ops
from tests.tiny_models import assert_close, poison_kernel_outputs
from tests.triton_compile import each_triton, run_offline

itc = pytest.importorskip("blip_fast.kernels.itc")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    poison_kernel_outputs(monkeypatch, itc)


# ------------------------------------------------------------------------------------------------ helpers
def make_inputs(rows, queue, dim, ids=False, dtype=torch.float32, columns=None):
    """Random BLIP ITC inputs: features [B, D] (rows), momentum [B, D], in-batch columns [B_cols, D], queues
    [D, Q], and optional ids with repeats in the batch and in the queue."""
    unit = lambda *shape: F.normalize(torch.randn(*shape, device=DEVICE, dtype=torch.float64), dim=-1)
    inputs = {
        "image_feat": unit(rows, dim), "text_feat": unit(rows, dim),
        "image_feat_m": unit(rows, dim), "text_feat_m": unit(rows, dim),
        "image_queue": unit(queue, dim).t(), "text_queue": unit(queue, dim).t(),
    }
    if columns is not None:
        inputs["image_columns"], inputs["text_columns"] = unit(columns, dim), unit(columns, dim)
    inputs = {name: tensor.to(dtype) for name, tensor in inputs.items()}
    if ids:
        distinct = max(1, rows // 2)  # repeats in the batch, and the same ids again in the queue
        inputs["image_ids"] = torch.randint(0, distinct, (rows,), device=DEVICE)
        inputs["id_queue"] = torch.randint(0, distinct + 3, (queue,), device=DEVICE)
    return inputs


def general_reference(inputs, temp, alpha, positive_offset=0):
    """BLIP's ITC written like the ops reference, but with explicit in-batch columns (local rows against gathered
    columns, diagonal at ``row + positive_offset``) that keep their gradient (gather-with-grad)."""
    image_feat, text_feat = inputs["image_feat"], inputs["text_feat"]
    image_columns = torch.cat([inputs["image_columns"], inputs["image_queue"].t()])
    text_columns = torch.cat([inputs["text_columns"], inputs["text_queue"].t()])
    rows, total = image_feat.shape[0], image_columns.shape[0]
    if "image_ids" in inputs:
        column_ids = torch.cat([inputs["column_ids"], inputs["id_queue"]])
        positives = (inputs["image_ids"][:, None] == column_ids[None, :]).to(image_feat.dtype)
        positives = positives / positives.sum(1, keepdim=True)
    else:
        positives = torch.zeros(rows, total, dtype=image_feat.dtype, device=image_feat.device)
        positives[torch.arange(rows), torch.arange(rows) + positive_offset] = 1
    with torch.no_grad():
        i2t = alpha * (inputs["image_feat_m"] @ text_columns.t() / temp).softmax(1) + (1 - alpha) * positives
        t2i = alpha * (inputs["text_feat_m"] @ image_columns.t() / temp).softmax(1) + (1 - alpha) * positives
    loss_i2t = -(F.log_softmax(image_feat @ text_columns.t() / temp, dim=1) * i2t).sum(1).mean()
    loss_t2i = -(F.log_softmax(text_feat @ image_columns.t() / temp, dim=1) * t2i).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


GRAD_NAMES = ("image_feat", "text_feat", "temp")


def run(fn, inputs, temp, alpha, grad_names=GRAD_NAMES, dtype=None, **kwargs):
    """Call ``fn`` on leaf copies (cast to ``dtype``) and return {"loss", <name>: gradient} after backward."""
    leaves = {name: tensor.detach().clone() for name, tensor in inputs.items()}
    if dtype is not None:
        leaves = {name: t.to(dtype) if t.is_floating_point() else t for name, t in leaves.items()}
    leaves["temp"] = torch.tensor([temp], dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                                  device=DEVICE)
    for name in grad_names:
        leaves[name].requires_grad_(True)
    loss = fn(leaves, leaves["temp"], alpha, **kwargs)
    loss.backward()
    return {"loss": loss.detach(), **{name: leaves[name].grad for name in grad_names}}


def reference(leaves, temp, alpha):
    names = ("image_feat", "text_feat", "image_feat_m", "text_feat_m", "image_queue", "text_queue")
    return ops._itc_loss_reference(*(leaves[n] for n in names), temp, alpha, leaves.get("image_ids"),
                                   leaves.get("id_queue"))


def fused(leaves, temp, alpha, **kwargs):
    names = ("image_feat", "text_feat", "image_feat_m", "text_feat_m", "image_queue", "text_queue")
    extra = {name: leaves[name] for name in ("image_columns", "text_columns", "column_ids") if name in leaves}
    return itc.itc_loss(*(leaves[n] for n in names), temp, alpha, leaves.get("image_ids"), leaves.get("id_queue"),
                        **extra, **kwargs)


def check_fp32(actual, exact, fp32, rtol=1e-5):
    """fp32 kernel vs fp64 oracle: within rtol of the value's scale plus twice the fp32 reference's own error."""
    for name, expected in exact.items():
        # The loss can be exactly 0 (one row, no queue): measure it against its O(1) cross-entropy scale instead.
        scale = expected.abs().max().item() + (1.0 if name == "loss" else 0.0)
        reference_error = (fp32[name].double() - expected).abs().max().item()
        assert_close(actual[name], expected, rtol=0, atol=rtol * scale + 2 * reference_error + 1e-9, name=name)


def compare_with_reference(inputs, temp, alpha, fn=fused, reference_fn=reference, grad_names=GRAD_NAMES, **kwargs):
    exact = run(reference_fn, inputs, temp, alpha, grad_names, dtype=torch.float64)
    fp32 = run(reference_fn, inputs, temp, alpha, grad_names, dtype=torch.float32)
    actual = run(fn, inputs, temp, alpha, grad_names, dtype=torch.float32, **kwargs)
    check_fp32(actual, exact, fp32)


# ------------------------------------------------------------------------------------------------ fp32 cases
# Full B x Q grid at D=32; D=256 (the BLIP projection width) only up to B=33 to keep the interpreter cheap.
SHAPES = [(b, q, 32) for b in (1, 7, 33, 130) for q in (0, 17, 1000)]
SHAPES += [(b, q, 256) for b in (1, 7, 33) for q in (0, 17)] + [(33, 1000, 256)]


@pytest.mark.parametrize("rows,queue,dim", SHAPES)
def test_matches_reference(rows, queue, dim):
    compare_with_reference(make_inputs(rows, queue, dim), temp=0.07, alpha=0.4)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("temp", [0.001, 0.5])  # the clamp bounds of BLIP's learnable temperature
def test_alpha_and_temperature_bounds(alpha, temp):
    compare_with_reference(make_inputs(33, 1000, 32), temp=temp, alpha=alpha)


@pytest.mark.parametrize("rows,queue,dim", [(7, 17, 32), (33, 1000, 32), (130, 17, 32), (7, 1000, 256)])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_multi_positive_ids(rows, queue, dim, alpha):
    inputs = make_inputs(rows, queue, dim, ids=True)
    compare_with_reference(inputs, temp=0.07, alpha=alpha)


@pytest.mark.parametrize("ids", [False, True])
@pytest.mark.parametrize("splits", [2, 5])
def test_column_splits_merge(ids, splits):
    """Several column splits per row block (the GPU heuristic's occupancy path) merge to the same loss."""
    compare_with_reference(make_inputs(130, 1000, 32, ids=ids), temp=0.05, alpha=0.4, splits=splits)


@pytest.mark.parametrize("rank,world", [(0, 2), (1, 2), (2, 3)])
@pytest.mark.parametrize("ids", [False, True])
def test_local_rows_against_gathered_columns(rank, world, ids):
    """Local rows [B] against in-batch columns gathered from ``world`` ranks [world * B]: positives at
    ``rank * B + i`` (positive_offset), or by id."""
    rows = 7
    inputs = make_inputs(rows, 17, 32, ids=ids, columns=world * rows)
    # The rank's own momentum features sit at its slot of the gathered columns, as after all_gather.
    for modality in ("image", "text"):
        inputs[f"{modality}_columns"][rank * rows:(rank + 1) * rows] = inputs[f"{modality}_feat_m"]
    if ids:
        inputs["column_ids"] = torch.randint(0, rows, (world * rows,), device=DEVICE)
        inputs["column_ids"][rank * rows:(rank + 1) * rows] = inputs["image_ids"]
    reference_fn = lambda leaves, temp, alpha: general_reference(leaves, temp, alpha, rank * rows)
    offset = 0 if ids else rank * rows
    compare_with_reference(inputs, 0.07, 0.4, reference_fn=reference_fn, positive_offset=offset)


def test_general_reference_is_the_ops_reference():
    """The test's explicit-columns reference reduces to the ops reference when the columns are the momentum rows."""
    inputs = make_inputs(7, 17, 32, ids=True)
    inputs["image_columns"], inputs["text_columns"] = inputs["image_feat_m"], inputs["text_feat_m"]
    inputs["column_ids"] = inputs["image_ids"]
    a = run(general_reference, inputs, 0.07, 0.4, dtype=torch.float64)
    b = run(reference, inputs, 0.07, 0.4, dtype=torch.float64)
    for name in a:
        assert_close(a[name], b[name], rtol=0, atol=1e-12, name=name)


@pytest.mark.parametrize("ids", [False, True])
@pytest.mark.parametrize("rows,queue,world", [(7, 17, 1), (33, 1000, 2), (130, 0, 1)])
def test_column_gradient_mode(rows, queue, world, ids):
    """column_grad=True: the in-batch columns get d c_j = sum_i g_ij r_i / temp, like autograd of the reference
    with the columns requiring grad (queues stay detached)."""
    inputs = make_inputs(rows, queue, 32, ids=ids, columns=world * rows)
    if ids:
        inputs["column_ids"] = torch.randint(0, max(1, rows // 2), (world * rows,), device=DEVICE)
        inputs["column_ids"][:rows] = inputs["image_ids"]
    names = GRAD_NAMES + ("image_columns", "text_columns")
    compare_with_reference(inputs, 0.07, 0.4, reference_fn=general_reference, grad_names=names, column_grad=True,
                           splits=2 if rows > 100 else None)


def test_no_grad_forward_and_detached_defaults():
    """Inference (no_grad) works, and by default no gradient reaches the momentum features or the queues."""
    inputs = make_inputs(7, 17, 32)
    with torch.no_grad():
        loss = fused(inputs, torch.tensor(0.07, device=DEVICE), 0.4)  # a 0-dim temperature too
    expected = reference(inputs, torch.tensor(0.07, device=DEVICE, dtype=torch.float64), 0.4)
    assert_close(loss, expected, rtol=0, atol=1e-5 * expected.abs().item(), name="loss")
    leaves = {name: tensor.clone().requires_grad_(True) for name, tensor in inputs.items()}
    fused(leaves, torch.tensor([0.07], device=DEVICE), 0.4).backward()
    assert leaves["image_feat"].grad is not None
    for name in ("image_feat_m", "text_feat_m", "image_queue", "text_queue"):
        assert leaves[name].grad is None, name


def test_rejects_inconsistent_shapes():
    inputs = make_inputs(7, 17, 32, ids=True, columns=14)
    with pytest.raises(ValueError, match="column_ids"):
        fused(inputs, torch.tensor([0.07], device=DEVICE), 0.4)  # gathered columns without their ids
    inputs = make_inputs(7, 17, 32)
    inputs["text_feat_m"] = inputs["text_feat_m"][:5]
    with pytest.raises(ValueError, match="text_feat_m"):
        fused(inputs, torch.tensor([0.07], device=DEVICE), 0.4)


# ------------------------------------------------------------------------------------------------ queues in place
def _enqueue(inputs, pointer, count, seed):
    """BLIP's enqueue: overwrite queue columns [pointer, pointer + count) mod Q of both queues (and ids) in place."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name in ("image_queue", "text_queue", "id_queue"):
        if name not in inputs:
            continue
        queue = inputs[name]
        positions = (pointer + torch.arange(count)) % queue.shape[-1]
        if name == "id_queue":
            queue[positions] = torch.randint(0, 50, (count,), generator=generator).to(queue.device)
        else:
            fresh = F.normalize(torch.randn(queue.shape[0], count, generator=generator, dtype=torch.float64), dim=0)
            queue[:, positions] = fresh.to(queue.device, queue.dtype)


# Queue 17: wrapping past the end; queue 260 (2 column splits of 256 columns in the interpreter): enqueued columns
# straddling the split boundary, and wrapping with rows in both splits.
@pytest.mark.parametrize("queue,pointer,count,splits,ids", [(17, 14, 7, None, True),
                                                            (260, 247, 5, 2, False), (260, 258, 7, 2, True)])
def test_enqueue_between_forward_and_backward(queue, pointer, count, splits, ids):
    """``enqueue_at``: the queues are read in place and the caller overwrites ``count`` columns from ``pointer``
    (wrapping) between the loss and its backward, as the pre-trainer does; losses and gradients are those of the
    queues as they were at the forward (the fp64 reference on a copy)."""
    inputs = make_inputs(7, queue, 32, ids=ids)
    exact = run(reference, inputs, 0.07, 0.4, dtype=torch.float64)
    fp32 = run(reference, inputs, 0.07, 0.4, dtype=torch.float32)
    leaves = {name: t.detach().to(torch.float32) if t.is_floating_point() else t.clone() for name, t in inputs.items()}
    # BLIP's buffer layout: [D, Q] with contiguous columns, read by the kernels without a copy.
    for name in ("image_queue", "text_queue"):
        leaves[name] = leaves[name].t().contiguous().t()
        assert itc.queue_rows(leaves[name], torch.float32).data_ptr() == leaves[name].data_ptr()
    for name in GRAD_NAMES[:2]:
        leaves[name].requires_grad_(True)
    leaves["temp"] = torch.tensor([0.07], device=DEVICE, requires_grad=True)
    loss = fused(leaves, leaves["temp"], 0.4, splits=splits,
                 enqueue_at=(torch.tensor([pointer], device=DEVICE), count))
    _enqueue(leaves, pointer, count, seed=1)
    loss.backward()
    actual = {"loss": loss.detach(), **{name: leaves[name].grad for name in GRAD_NAMES}}
    check_fp32(actual, exact, fp32)


def test_queue_writes_before_backward_are_refused():
    """Without ``enqueue_at`` any write to the queues before the backward fails (autograd's version check); with it,
    a second write (two steps before one backward) fails instead of silently using the new values."""
    inputs = make_inputs(7, 17, 32)
    for name in ("image_queue", "text_queue"):
        inputs[name] = inputs[name].to(torch.float32).t().contiguous().t()
    for name in ("image_feat", "text_feat", "image_feat_m", "text_feat_m"):
        inputs[name] = inputs[name].to(torch.float32).requires_grad_(name in GRAD_NAMES)
    temp = torch.tensor([0.07], device=DEVICE)
    loss = fused(inputs, temp, 0.4)
    _enqueue(inputs, 0, 7, seed=1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    loss = fused(inputs, temp, 0.4, enqueue_at=(torch.tensor([0], device=DEVICE), 7))
    _enqueue(inputs, 0, 7, seed=2)
    _enqueue(inputs, 7, 7, seed=3)
    with pytest.raises(RuntimeError, match="written more than once"):
        loss.backward()


def test_queue_rows_copy_only_when_needed():
    """A [D, Q] queue in the features' dtype with contiguous columns is read as a view; a row-major or other-dtype
    queue is copied once into the kernels' [Q, D] rows."""
    column_major = torch.randn(17, 32).t()
    assert itc.queue_rows(column_major, torch.float32).data_ptr() == column_major.data_ptr()
    for queue, dtype in ((column_major.contiguous(), torch.float32), (column_major, torch.float16)):
        rows = itc.queue_rows(queue, dtype)
        assert rows.is_contiguous() and rows.dtype == dtype and rows.data_ptr() != queue.data_ptr()
        assert torch.equal(rows, queue.t().to(dtype))


def test_kernels_read_the_queues_in_place(monkeypatch):
    """Cost: the pre-trainer's call (fp16 features, queues stored fp16 column by column, enqueue declared) hands the
    kernels the queue buffers themselves and a ``count x D`` copy of the enqueued columns, where the unfused-queue
    path cast and concatenated ``2 x (B + Q) x D`` values per step. Host code only: the launches are recorded, not
    run (the other tests check the values)."""
    launches = []
    monkeypatch.setattr(itc, "_launcher", lambda kernel, device, grid: lambda **arguments: launches.append(arguments))
    rows, queue, dim, count = 7, 17, 32, 7
    inputs = make_inputs(rows, queue, dim, dtype=torch.float16)
    for name in ("image_queue", "text_queue"):
        inputs[name] = inputs[name].t().contiguous().t()
    for name in GRAD_NAMES[:2]:
        inputs[name].requires_grad_(True)
    temp = torch.tensor([0.07], device=DEVICE, requires_grad=True)
    fused(inputs, temp, 0.4, enqueue_at=(torch.tensor([3], device=DEVICE), count)).backward()
    buffers = {inputs[name].data_ptr() for name in ("image_queue", "text_queue")}
    assert len(launches) == 4  # forward and row backward, both directions
    for arguments in launches:
        assert arguments["queue_ptr"].data_ptr() in buffers and arguments["queue_ptr"].shape == (queue, dim)
        assert arguments["patch_ptr"].shape == (count, dim) and arguments["HAS_PATCH"]


@pytest.mark.parametrize("dtype,dim,expected", [
    (torch.float16, 256, {(64, 8, 2), (64, 8, 3)}),  # BLIP's D: the configs the compile test proves spill-free
    (torch.bfloat16, 64, {(64, 4, 2), (128, 4, 2), (64, 8, 2), (64, 8, 3), (128, 8, 2)}),
    (torch.float32, 256, {(64, 8, 2), (64, 8, 3)}),
])
def test_autotune_prunes_to_fitting_configs(dtype, dim, expected):
    """The CUDA autotuner benchmarks only the configs that fit (its pruning, called as a keyword launch calls it)."""
    tuner = itc._autotuned(itc._itc_forward_kernel)
    tuner.nargs = {}
    configs = tuner.prune_configs(dict(rows_ptr=torch.empty(0, dtype=dtype), BLOCK_M=64, BLOCK_D=dim))
    assert {(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs} == expected
    assert tuner.keys == ["M", "NB", "Q", "D"]  # Triton appends every tensor argument's dtype to the key


@pytest.mark.parametrize("row_blocks,quanta,slots,expected", [
    (64, 451, 132, 2),  # B=4096, Q=57,600 on an H100: 128 programs in one wave (4 splits would need two)
    (1, 451, 132, 113),  # one row block: 113 splits of 4 quanta, one wave
    (2640, 451, 132, 1),  # 20 whole waves of row blocks: no split
    (5, 3, 132, 3),  # never more splits than column quanta
    (7, 451, 1, 1),  # the interpreter: one program at a time
])
def test_wave_splits_fill_whole_waves(row_blocks, quanta, slots, expected):
    assert itc.wave_splits(row_blocks, quanta, slots) == expected


# ------------------------------------------------------------------------------------------------ fp16
@pytest.mark.parametrize("rows,queue,dim,ids,temp", [(7, 17, 32, False, 0.07), (33, 1000, 32, True, 0.001),
                                                      (33, 1000, 256, False, 0.5)])
def test_fp16_within_twice_reference_error(rows, queue, dim, ids, temp):
    """fp16 inputs: our error vs the fp32 reference <= 2x the reference's own error on the same fp16 inputs."""
    check_low_precision(make_inputs(rows, queue, dim, ids=ids), torch.float16, temp=temp)


def check_low_precision(inputs, dtype, temp=0.07, alpha=0.4):
    rounded = {name: t.to(dtype) if t.is_floating_point() else t for name, t in inputs.items()}
    exact = run(reference, inputs, temp, alpha, dtype=torch.float32)
    low = run(reference, rounded, temp, alpha)
    actual = run(fused, rounded, temp, alpha)
    for name, expected in exact.items():
        reference_error = (low[name].double() - expected.double()).abs().max().item()
        # Floor: one rounding step of the output dtype at the gradient's scale.
        floor = torch.finfo(dtype).eps * expected.abs().max().item()
        assert_close(actual[name], expected, rtol=0, atol=2 * reference_error + floor, name=name)


# ------------------------------------------------------------------------------------------------ wiring
def test_registered_as_triton_backend_for_cuda_only():
    implementation, available = ops._REGISTRY["itc_loss"]["triton"]
    assert available(torch.device("cuda")) and not available(torch.device("cpu"))


def test_importing_blip_fast_does_not_import_triton():
    code = "import sys, blip_fast, blip_fast.ops; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# Compile (not run) the kernels for real GPUs at the B=4096, D=256, queue 57,600 launch, with a launch's divisibility
# hints (tests/triton_compile.py), for the autotune configs that survive the pruning. The interpreter accepts code
# the compiler rejects (non-constexpr globals, dot shapes) and cannot see shared-memory overflows or spills, and
# without the hints fp16 compiles unpipelined.
_COMPILE_SCRIPT = """
import torch
from blip_fast.kernels import itc
from tests.triton_compile import compile_like_launch, is_pipelined, resource_usage

rows, queue, dim = 4096, 57600, 256
pointers = ("rows_ptr", "rows_m_ptr", "batch_ptr", "queue_ptr", "patch_ptr")
launch = dict(M=rows, NB=rows, NG=rows, Q=queue, D=dim, patch_len=rows, positive_offset=0, stride_r=dim, stride_rm=dim,
              stride_b=dim, stride_q=dim, alpha="fp32")


def compile_kernel(fn, arch, dtype, name, constexprs, options, span):
    args = {arg: "*" + name if arg in pointers else "*i64" if arg.endswith("ids_ptr") or arg == "patch_start_ptr"
            else "*fp32" if arg.endswith("_ptr") else launch.get(arg, span)
            for arg in fn.arg_names if arg not in constexprs}
    kernel = compile_like_launch(fn, arch, args, constexprs, options)
    # On sm_90, fp16 column tiles stream through cp.async and nothing spills, as in a real launch.
    usage = resource_usage(kernel)
    assert is_pipelined(kernel) and usage["stack"] == 0, (fn.fn.__name__, name, options, usage)
    return kernel


# fp16 on sm_90 (bf16 compiles alike). Not fp32: the exact (non-TF32) fp32 dots make a large, slow compile, and fp32
# is no training dtype; the GPU tests run it, and the autotuner skips a config that does not fit at launch.
arch, dtype, name = 90, torch.float16, "fp16"
shape = itc._shape(rows, rows + queue, dim, dtype, torch.device("cuda:0"), splits=2)
configs = itc._fitting_configs(itc._CONFIGS, {"rows_ptr": torch.empty(0, dtype=dtype)}, BLOCK_D=dim)
# Every fitting config of the row backward (the kernel with the most live tiles: where spills would show), the
# forward at the first.
for fn, config in [(itc._itc_backward_rows_kernel, config) for config in configs] + [(itc._itc_forward_kernel,
                                                                                       configs[0])]:
    constexprs = dict(HAS_IDS=True, HAS_PATCH=True, PRECISION=itc._precision(dtype), BLOCK_M=shape["BLOCK_M"],
                      BLOCK_D=shape["BLOCK_D"], **config.kwargs)
    kernel = compile_kernel(fn, arch, dtype, name, constexprs,
                            dict(num_warps=config.num_warps, num_stages=config.num_stages), shape["columns_per_split"])
    # One dot per column tile for both logit tiles (stacked rows), plus the row gradient's in the backward; four
    # column loops: in-batch, queue, and the patch's two intervals.
    dots = kernel.asm["ttgir"].count("warp_group_dot ")
    assert dots == 4 * (1 if fn is itc._itc_forward_kernel else 2), (fn.fn.__name__, dots)
constexprs = dict(HAS_IDS=True, PRECISION=itc._precision(dtype), BLOCK_M=itc._streamed_rows(torch.device("cuda"), dim),
                  BLOCK_N=64, BLOCK_D=dim)
compile_kernel(itc._itc_backward_columns_kernel, arch, dtype, name, constexprs, dict(num_warps=8, num_stages=2),
               shape["columns_per_split"])
"""


@each_triton
def test_kernels_compile_for_sm90_pipelined_without_spills(triton_site):
    pytest.importorskip("triton.backends.nvidia")
    run_offline(_COMPILE_SCRIPT, triton_site)


# ------------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("rows,queue,dim,ids", [(130, 1000, 256, False), (33, 1000, 256, True)])
def test_bf16_within_twice_reference_error(rows, queue, dim, ids):
    check_low_precision(make_inputs(rows, queue, dim, ids=ids), torch.bfloat16)


@pytest.mark.gpu
def test_large_case_matches_reference():
    """B=1024, Q=8192, D=256 in fp16 against the reference."""
    check_low_precision(make_inputs(1024, 8192, 256), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [4096, 32768])
def test_peak_memory_far_below_logit_matrix(rows):
    """BLIP's real shape (queue 57,600, D=256, fp16), fused fwd+bwd: the extra memory is O((B + Q) D), far below one
    fp32 B x (B + Q) matrix (eager holds several), and within the issue's budget (<= 0.5 GiB at 4096, < 1 GiB at
    32,768)."""
    queue, dim = 57_600, 256
    inputs = make_inputs(rows, queue, dim, dtype=torch.float16)
    leaves = {name: t.requires_grad_(name in GRAD_NAMES) for name, t in inputs.items()}
    temp = torch.tensor([0.07], device=DEVICE, requires_grad=True)
    fused(leaves, temp, 0.4).backward()  # compile outside the measurement
    for name in GRAD_NAMES[:2]:
        leaves[name].grad = None
    temp.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused(leaves, temp, 0.4).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    matrix = rows * (rows + queue) * 4
    budget = 0.5 * 2**30 if rows <= 4096 else 2**30
    assert extra < min(matrix / 4, budget), f"extra {extra / 2**20:.1f} MiB; one logit matrix {matrix / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_ops_dispatch_to_triton(monkeypatch):
    inputs = make_inputs(33, 1000, 256, ids=True)
    monkeypatch.setenv("BLIP_FAST_BACKEND", "triton")
    via_ops = lambda leaves, temp, alpha: ops.itc_loss(
        *(leaves[n] for n in ("image_feat", "text_feat", "image_feat_m", "text_feat_m", "image_queue", "text_queue")),
        temp, alpha, leaves["image_ids"], leaves["id_queue"])
    assert ops.resolve("itc_loss", torch.device("cuda")) is ops._REGISTRY["itc_loss"]["triton"][0]
    exact = run(reference, inputs, 0.07, 0.4, dtype=torch.float64)
    fp32 = run(reference, inputs, 0.07, 0.4, dtype=torch.float32)
    # fp32 on GPU: the kernels use exact (non-TF32) products for fp32, so the fp32 tolerance holds.
    check_fp32(run(via_ops, inputs, 0.07, 0.4, dtype=torch.float32), exact, fp32)
