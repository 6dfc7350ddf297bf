"""The decoding engine: greedy, nucleus/top-k sampling and beam search over a :class:`DecoderCache`.

Semantics are HuggingFace ``generate``'s (same keyword arguments and defaults, same logits processing order, same
beam bookkeeping), so token ids match ``transformers`` exactly in fp32. What differs is the work: the image's
cross-attention K/V are projected once and shared by every beam/sample of the image (they attend as extra query
rows), and the self-attention cache is preallocated to the maximum length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from blip_fast.modeling.text import BlipTextLMHeadModel, DecoderCache


@dataclass(frozen=True)
class GenerationSettings:
    """HuggingFace's generation arguments with HuggingFace's defaults; lengths count the prompt."""

    #: None (HuggingFace's default): 20 new tokens, capped at the position-embedding table.
    max_length: int | None = None
    max_new_tokens: int | None = None
    min_length: int = 0
    min_new_tokens: int | None = None
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.num_return_sequences < 1:
            raise ValueError("num_beams and num_return_sequences must be >= 1")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) > num_beams ({self.num_beams})")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ValueError("greedy search returns one sequence per input; use do_sample=True or num_beams > 1")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not self.use_cache:
            raise ValueError("blip_fast always decodes with a cache (use_cache=False is not supported)")

    @classmethod
    def from_kwargs(cls, **kwargs) -> GenerationSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unsupported generate() arguments {unknown}; supported: {sorted(known)}")
        return cls(**{name: value for name, value in kwargs.items() if value is not None})

    def total_length(self, prompt_length: int, max_positions: int) -> int:
        if self.max_new_tokens is not None:
            return prompt_length + self.max_new_tokens
        if self.max_length is None:
            return min(prompt_length + 20, max_positions)
        return self.max_length


class LogitsProcessor:
    """HuggingFace's processors, in HuggingFace's order, for one ``generate`` call."""

    def __init__(
        self, settings: GenerationSettings, prompt_length: int, eos_token_id: int, ignore_for_penalty: torch.Tensor | None
    ) -> None:
        self.settings = settings
        self.prompt_length = prompt_length
        self.eos_token_id = eos_token_id
        self.ignore_for_penalty = ignore_for_penalty  # [R, prompt_length] bool: left padding of the prompt
        self.min_tokens_to_keep = 2 if settings.num_beams > 1 else 1

    def __call__(self, scores: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        """scores ``[R, V]`` (logits, or log-probs in beam search) for the next token after ``sequences [R, T]``."""
        s = self.settings
        length = sequences.shape[1]
        if s.repetition_penalty != 1.0:
            scores = self._penalize_repeats(scores, sequences)
        if length < s.min_length or (s.min_new_tokens is not None and length - self.prompt_length < s.min_new_tokens):
            scores = scores.clone()
            scores[:, self.eos_token_id] = -float("inf")
        if s.do_sample:
            if s.temperature != 1.0:
                scores = scores / s.temperature
            if s.top_k:
                scores = _top_k(scores, max(s.top_k, self.min_tokens_to_keep))
            if s.top_p < 1.0:
                scores = _top_p(scores, s.top_p, self.min_tokens_to_keep)
        return scores

    def _penalize_repeats(self, scores: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
        vocab = scores.shape[-1]
        if self.ignore_for_penalty is not None:  # send ignored prompt positions to a spare column
            sequences = sequences.clone()
            sequences[:, : self.prompt_length].masked_fill_(self.ignore_for_penalty, vocab)
        seen = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
        seen = seen.scatter_(1, sequences, True)[:, :vocab]
        penalty = self.settings.repetition_penalty
        penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
        return torch.where(seen, penalized, scores)


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, scores.shape[-1])
    threshold = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < threshold, -float("inf"))


def _top_p(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose cumulative probability is at most ``1 - top_p``."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -min_tokens_to_keep:] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return scores.masked_fill(remove, -float("inf"))


def generate(
    decoder: BlipTextLMHeadModel,
    input_ids: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    **kwargs,
) -> torch.Tensor:
    """Continue the prompts ``input_ids [B, P]`` conditioned on ``encoder_hidden_states [B, N, D]``.

    Returns ``[B * num_return_sequences, L]`` token ids including the prompt, padded like HuggingFace (greedy and
    sampling pad finished rows with ``pad_token_id``; beam search fills with ``pad_token_id or eos_token_id``).
    ``kwargs`` are :class:`GenerationSettings` fields; ``generator`` seeds sampling.
    """
    settings = GenerationSettings.from_kwargs(**kwargs)
    batch, prompt_length = input_ids.shape
    max_length = settings.total_length(prompt_length, decoder.config.max_position_embeddings)
    if max_length <= prompt_length:
        raise ValueError(f"max_length {max_length} leaves no room after a prompt of {prompt_length} tokens")
    rows_per_image = settings.num_beams if settings.num_beams > 1 else settings.num_return_sequences
    rows = batch * rows_per_image
    device = input_ids.device

    mask = torch.ones(rows, max_length, dtype=torch.long, device=device)
    ignore_for_penalty = None
    if attention_mask is not None:
        prompt_mask = attention_mask.to(device).long().repeat_interleave(rows_per_image, dim=0)
        mask[:, :prompt_length] = prompt_mask
        first_kept = (prompt_mask != 0).int().argmax(dim=1, keepdim=True)
        ignore_for_penalty = torch.arange(prompt_length, device=device)[None, :] < first_kept
    processor = LogitsProcessor(settings, prompt_length, eos_token_id, ignore_for_penalty)
    cache = decoder.bert.new_cache(encoder_hidden_states, encoder_attention_mask, rows_per_image, max_length)
    prompts = input_ids.repeat_interleave(rows_per_image, dim=0)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens [R, T]`` at the cache position -> next-token logits ``[R, V]`` in fp32."""
        visible = mask[:, : cache.length + tokens.shape[1]]
        return decoder(tokens, visible, cache=cache).logits[:, -1].float()

    if settings.num_beams > 1:
        return _beam_search(step, prompts, cache, processor, settings, max_length, eos_token_id, pad_token_id, generator)
    return _sample(step, prompts, processor, settings, max_length, eos_token_id, pad_token_id, generator)


def _sample(step, prompts, processor, settings, max_length, eos_token_id, pad_token_id, generator) -> torch.Tensor:
    """Greedy (argmax) or multinomial sampling, one token per row per step."""
    rows, prompt_length = prompts.shape
    sequences = torch.full((rows, max_length), pad_token_id, dtype=torch.long, device=prompts.device)
    sequences[:, :prompt_length] = prompts
    unfinished = torch.ones(rows, dtype=torch.bool, device=prompts.device)
    logits = step(prompts)
    length = prompt_length
    while True:
        scores = processor(logits, sequences[:, :length])
        if settings.do_sample:
            next_tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        next_tokens = torch.where(unfinished, next_tokens, pad_token_id)
        sequences[:, length] = next_tokens
        unfinished &= next_tokens != eos_token_id
        length += 1
        if length >= max_length or not unfinished.any():
            return sequences[:, :length]
        logits = step(next_tokens[:, None])


def _beam_search(
    step, prompts, cache: DecoderCache, processor, settings, max_length, eos_token_id, pad_token_id, generator
) -> torch.Tensor:
    """HuggingFace's vectorised beam search: keep ``2 * num_beams`` candidates per step so ``num_beams`` stay alive
    even when the best ones end; finished hypotheses are scored ``sum_logprobs / generated_len ** length_penalty``.
    """
    num_beams, device = settings.num_beams, prompts.device
    rows, prompt_length = prompts.shape
    batch = rows // num_beams
    candidates = 2 * num_beams
    fill = pad_token_id or eos_token_id  # HuggingFace's output fill value (pad 0 is falsy there too)
    generated = max_length - prompt_length

    running = torch.full((batch, num_beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :prompt_length] = prompts.view(batch, num_beams, prompt_length)
    running_scores = torch.zeros(batch, num_beams, device=device)
    running_scores[:, 1:] = -1e9  # only the first (identical) beam may expand at the first step
    running_origins = torch.full((batch, num_beams, generated), -1, dtype=torch.long, device=device)
    finished = running.clone()
    finished_scores = torch.full((batch, num_beams), -1e9, device=device)
    finished_origins = running_origins.clone()
    is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
    can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)
    is_top_beam = torch.arange(candidates, device=device) < num_beams
    batch_offset = torch.arange(batch, device=device)[:, None] * num_beams

    logits = step(prompts)
    length = prompt_length
    while True:
        log_probs = processor(logits.log_softmax(dim=-1), running.view(rows, max_length)[:, :length])
        vocab = log_probs.shape[-1]
        total = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).view(batch, -1)
        if settings.do_sample:
            picks = torch.multinomial(total.softmax(dim=-1), candidates, generator=generator)
            top_scores, order = total.gather(1, picks).sort(dim=-1, descending=True)
            picks = picks.gather(1, order)
        else:
            top_scores, picks = total.topk(candidates, dim=1)
        source_beam = picks // vocab  # [B, 2K]
        cand_sequences = _gather_beams(running, source_beam)
        cand_sequences[:, :, length] = picks % vocab
        cand_origins = _gather_beams(running_origins, source_beam)
        cand_origins[:, :, length - prompt_length] = source_beam + batch_offset
        ended = (cand_sequences[:, :, length] == eos_token_id) | (length + 1 >= max_length)

        # Continue with the best candidates that did not end.
        alive_scores = top_scores + ended.float() * -1e9
        keep = alive_scores.topk(num_beams, dim=1).indices
        running = _gather_beams(cand_sequences, keep)
        running_scores = _gather_beams(alive_scores, keep)
        running_origins = _gather_beams(cand_origins, keep)

        # Merge newly ended top candidates into the finished set.
        just_ended = ended & is_top_beam
        ended_scores = top_scores / ((length + 1 - prompt_length) ** settings.length_penalty)
        batch_full = is_finished.all(dim=-1, keepdim=True) & (settings.early_stopping is True)
        ended_scores = ended_scores + batch_full.float() * -1e9 + (~can_improve).float() * -1e9
        ended_scores = ended_scores + (~just_ended).float() * -1e9
        best = torch.cat([finished_scores, ended_scores], dim=1).topk(num_beams, dim=1).indices
        finished = _gather_beams(torch.cat([finished, cand_sequences], dim=1), best)
        finished_scores = _gather_beams(torch.cat([finished_scores, ended_scores], dim=1), best)
        finished_origins = _gather_beams(torch.cat([finished_origins, cand_origins], dim=1), best)
        is_finished = _gather_beams(torch.cat([is_finished, just_ended], dim=1), best)

        cache.reorder(running_origins[:, :, length - prompt_length].flatten())
        length += 1
        can_improve = can_improve & _may_improve(running_scores, finished_scores, is_finished, length, prompt_length,
                                                 max_length, settings)
        all_done = bool(is_finished.all()) and settings.early_stopping is True
        if not bool(can_improve.any()) or all_done or bool(ended.all()):
            break
        logits = step(running.view(rows, max_length)[:, length - 1 : length])

    returned = settings.num_return_sequences
    sequences = finished[:, :returned].flatten(0, 1)
    origins = finished_origins[:, :returned].flatten(0, 1)
    output_length = prompt_length + int((origins >= 0).sum(dim=1).max())
    return sequences[:, :output_length]


def _may_improve(running_scores, finished_scores, is_finished, length, prompt_length, max_length, settings):
    """HuggingFace's early-stop heuristic: can the best running beam still beat the worst finished one?"""
    if settings.early_stopping == "never" and settings.length_penalty > 0.0:
        best_length = max_length - prompt_length
    else:
        best_length = length - prompt_length
    best_running = running_scores[:, :1] / (best_length**settings.length_penalty)
    worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, -1.0e9)
    return (best_running > worst_finished).any(dim=-1, keepdim=True)


def _gather_beams(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Select beams ``indices [B, K']`` from ``tensor [B, K, ...]``."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)
