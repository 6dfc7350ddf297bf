"""Worker of tests/test_momentum.py's ZeRO-3 test, started by ``deepspeed --num_gpus 2``: trains the tiny pre-trainer
for a few bf16 ZeRO-3 steps while keeping, on the side, an fp32 EMA of the gathered online weights, then compares each
rank's fp32 masters and the gathered bf16 momentum weights with it. Writes ``OUT_DIR/report.json`` from rank 0."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch

from blip_fast.config import BlipConfig
from blip_fast.modeling.momentum import _partition_bounds
from blip_fast.modeling.pretrain import BlipPretrainer

STEPS = 6
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
    "bf16": {"enabled": True},
    # Weights of up to 600 elements stay gathered between steps (persistent): biases and LayerNorms of the tiny
    # model, while its matrices are partitioned. Both EMA paths run.
    "zero_optimization": {"stage": 3, "overlap_comm": False, "stage3_param_persistence_threshold": 600},
}


def main(out_dir: str) -> None:
    deepspeed.init_distributed()
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    config = BlipConfig.tiny(vocab_size=120, image_size=16)
    model = BlipPretrainer(config, queue_size=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=DS_CONFIG)
    triples = model.momentum_parameters()
    with deepspeed.zero.GatheredParameters([m for _, _, m in triples]):
        reference = [m.detach().float().clone() for _, _, m in triples]
    start = [tensor.clone() for tensor in reference]

    generator = torch.Generator().manual_seed(rank)
    for _ in range(STEPS):
        with deepspeed.zero.GatheredParameters([online for _, online, _ in triples]):
            torch._foreach_mul_(reference, 0.995)
            torch._foreach_add_(reference, [online.detach().float() for _, online, _ in triples], alpha=0.005)
        pixel_values = torch.randn(2, 3, 16, 16, generator=generator).to(torch.bfloat16)
        input_ids = torch.randint(5, 110, (2, 7), generator=generator)
        input_ids[:, 0] = 2
        output = engine(pixel_values, input_ids, torch.ones_like(input_ids), alpha=0.4,
                        image_ids=torch.arange(2) + 2 * rank)
        engine.backward(output.loss)
        engine.step()

    kinds, master_error = {"partition": 0, "replicated": 0, "full": 0}, 0.0
    for slot, expected in zip(model.ema.slots, reference):
        kinds[slot.kind] += 1
        if slot.kind == "partition":
            begin, length = _partition_bounds(slot.momentum)
            expected, master = expected.reshape(-1)[begin : begin + length], slot.master[:length]
        else:
            master = slot.master.view_as(expected)
        master_error = max(master_error, float(((master - expected).abs() / (expected.abs() + 1e-3)).max()))
    worst_ulps = 0.0
    with deepspeed.zero.GatheredParameters([m for _, _, m in triples]):
        for (_, _, momentum), expected in zip(triples, reference):
            rounded = expected.to(torch.bfloat16).float()
            ulp = torch.finfo(torch.bfloat16).eps * rounded.abs().clamp(min=1e-30)
            worst_ulps = max(worst_ulps, float(((momentum.float() - rounded).abs() / ulp).max()))
    moved = max(float((ref - s).abs().max()) for ref, s in zip(reference, start))
    errors = torch.tensor([master_error, worst_ulps])
    torch.distributed.all_reduce(errors, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        report = {"kinds": kinds, "moved": moved, "worst_master_error": float(errors[0]),
                  "worst_ulps": float(errors[1])}
        (Path(out_dir) / "report.json").write_text(json.dumps(report))
        print(report, flush=True)


if __name__ == "__main__":
    main(next(arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")))
