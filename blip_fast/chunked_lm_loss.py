"""LM head + label-smoothed cross-entropy in row chunks: the ``[tokens, vocab]`` logits are never stored whole.

BLIP's LM loss projects every decoder state onto the 30,524-token vocabulary and takes a label-smoothed (0.1)
cross-entropy, mean over the non-ignored targets. Done plainly, the logits (and their fp32 copy, softmax and
gradient) are the largest tensors of the step: at 90 captions x 29 targets, ~320 MB each in fp32. Here each chunk
of rows is projected, reduced to its per-row loss, turned into its logits' gradient and multiplied back into the
gradients of the states, the weight and the bias *in the forward*, then dropped (Liger-Kernel's fused linear
cross-entropy works the same way). The backward only scales the stored gradients by the upstream gradient (the loss
is a scalar), so the FLOPs are those of the plain computation: one projection and two gradient products.

For row ``i`` with logits ``z`` over ``V`` classes, target ``t`` and smoothing ``eps`` (PyTorch's definition):
``loss_i = lse(z) - (1 - eps) * z_t - eps * mean_j z_j`` and ``d loss_i / d z_j = softmax(z)_j - (1 - eps) *
[j == t] - eps / V``. Ignored rows (target ``ignore_index``) contribute nothing; the mean divides by the valid rows
(0 / 0 = NaN when none is valid, as ``F.cross_entropy``). Logits are formed in the inputs' dtype (bf16 matmuls
accumulate in fp32) and reduced in fp32; weight and bias gradients accumulate over the chunks in fp32.
"""

from __future__ import annotations

import torch

#: Logit elements per chunk: 16 M fp32 logits (64 MiB) keep the products large enough to run at full speed on a
#: GPU while the peak stays far below the whole logits' (a 90 x 29-token batch x 30,524 vocabulary is 80 M).
CHUNK_ELEMENTS = 1 << 24


class ChunkedLMHeadLoss(torch.autograd.Function):
    """``mean_i CE(hidden_i @ weight.T + bias, targets_i)`` with label smoothing; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                label_smoothing: float, ignore_index: int, chunk_rows: int) -> torch.Tensor:
        rows, vocab = hidden.shape[0], weight.shape[0]
        needs_grad = ctx.needs_input_grad[:3]
        valid = targets != ignore_index  # [N]
        count = valid.sum()
        # The mean's denominator is known before any chunk: each chunk's gradient is final when computed.
        scale = 1.0 / count.clamp(min=1).float()
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if needs_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_grad[1] else None
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if needs_grad[2] else None
        for start in range(0, rows, chunk_rows):
            chunk = slice(start, min(start + chunk_rows, rows))
            states, target, keep = hidden[chunk], targets[chunk], valid[chunk]
            logits = torch.nn.functional.linear(states, weight, bias).float()  # [n, V]
            safe_target = torch.where(keep, target, 0)[:, None]
            target_logit = logits.gather(1, safe_target).squeeze(1)
            lse = torch.logsumexp(logits, dim=1)
            row_loss = lse - (1.0 - label_smoothing) * target_logit - label_smoothing * logits.mean(dim=1)
            total = total + torch.where(keep, row_loss, 0.0).sum()
            if not any(needs_grad):
                continue
            # d loss / d logits, in place of the logits (scaled by the mean, zero on ignored rows).
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits.scatter_add_(1, safe_target, torch.full_like(target_logit, label_smoothing - 1.0)[:, None])
            grad_logits.sub_(label_smoothing / vocab).mul_(torch.where(keep, scale, 0.0)[:, None])
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[chunk])
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ states).float()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / count.float()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        scale = grad_output.float()
        return (
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(weight_dtype),
            None if grad_bias is None else (grad_bias * scale).to(bias_dtype),
            None, None, None, None,
        )


def chunked_lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, label_smoothing: float = 0.0, ignore_index: int = -100,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean label-smoothed CE of ``hidden [N, D] @ weight.T [D, V] + bias [V]`` against ``targets [N]``
    (``ignore_index`` skipped), in chunks of ``chunk_rows`` rows (default: :data:`CHUNK_ELEMENTS` logits)."""
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if not torch.is_grad_enabled():  # the forward computes gradients for whichever input requires them
        hidden, weight, bias = hidden.detach(), weight.detach(), None if bias is None else bias.detach()
    return ChunkedLMHeadLoss.apply(hidden.contiguous(), weight, bias, targets, float(label_smoothing),
                                   int(ignore_index), int(chunk_rows))
