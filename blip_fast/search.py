"""HuggingFace's decoding searches as step programs: ``begin()``, ``step(length)`` per generated position,
``stopped()`` (a device flag), ``finish()``.

Greedy/sampling (:class:`TokenSearch`) and beam search (:class:`BeamSearch`) keep HuggingFace's semantics (same
processors in the same order, same beam bookkeeping), so token ids match ``transformers`` exactly in fp32. Every
step is device work only: a host read happens only where a driver asks ``bool(search.stopped())`` between steps, and
in ``finish()`` when the output length is not known in advance. That is what lets the static engine
(:mod:`blip_fast.decode_graphs`) capture ``begin`` and runs of steps as CUDA graphs, with the very code that the
dynamic engine and the CPU run: each step is captured at its own position, so ``length`` stays a Python int.

Both searches take a *decoding* (the model side: ``prefill(prompts)``, ``step(tokens)``, ``reorder(rows)``, each
returning next-token logits ``[R, V]`` in the model dtype) and optional ``live`` masks: a static engine pads the
batch to a bucket, and padded rows/images must neither delay the stop nor count in the output length.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from blip_fast import sampling
from blip_fast.modeling.outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput


class StepRecord:
    """Per-step copies of the raw logits and processed scores ``[R, V]`` that HuggingFace returns, when asked for.

    fp32 copies, because the next step overwrites the decoder's buffers; recorded steps past HuggingFace's stopping
    point (a sparse stop check) are trimmed at the end.
    """

    def __init__(self, settings) -> None:
        self.active = settings.records_steps
        self._scores: list[torch.Tensor] | None = [] if self.active and settings.output_scores else None
        self._logits: list[torch.Tensor] | None = [] if self.active and settings.output_logits else None

    def add(self, logits: torch.Tensor, scores: torch.Tensor) -> None:
        if self._scores is not None:
            self._scores.append(scores.to(torch.float32, copy=True))
        if self._logits is not None:
            self._logits.append(logits.to(torch.float32, copy=True))  # HuggingFace upcasts the raw logits

    def scores(self, steps: int) -> tuple[torch.Tensor, ...] | None:
        return None if self._scores is None else tuple(self._scores[:steps])

    def logits(self, steps: int) -> tuple[torch.Tensor, ...] | None:
        return None if self._logits is None else tuple(self._logits[:steps])


class MultinomialSampler:
    """HuggingFace's draw: ``torch.multinomial`` over the warped distribution (same draws as HuggingFace under the
    same seed; not graph-capturable). The logits processor applies temperature/top-k/top-p first. ``rows``: draw
    for the leading rows only (a static engine's padded rows must not consume the generator's stream)."""

    warps_in_processor = True

    def __init__(self, generator: torch.Generator | None, rows: int | None = None) -> None:
        self.generator, self.rows = generator, rows

    def tokens(self, scores: Tensor, length: int) -> Tensor:
        return self._draw(scores, 1).squeeze(1)

    def beam_candidates(self, total: Tensor, count: int, length: int) -> Tensor:
        return self._draw(total, count)

    def _draw(self, scores: Tensor, count: int) -> Tensor:
        rows = scores.shape[0] if self.rows is None else self.rows
        drawn = torch.multinomial(scores[:rows].softmax(dim=-1), count, generator=self.generator)
        if rows == scores.shape[0]:
            return drawn
        return torch.cat([drawn, drawn.new_zeros(scores.shape[0] - rows, count)])


class GumbelSampler:
    """The graph-safe draw (:mod:`blip_fast.sampling`): top-k, then top-p on the survivors, Philox noise from a
    seed in device memory (``seed``, a 0-d int64 tensor the caller refills per call)."""

    warps_in_processor = False

    def __init__(self, settings: Any, seed: Tensor, min_keep: int) -> None:
        self.settings, self.seed, self.min_keep = settings, seed, min_keep

    def tokens(self, scores: Tensor, length: int) -> Tensor:
        s = self.settings
        return sampling.sample(scores, s.top_k, s.top_p, s.temperature, self.min_keep, self.seed, length)

    def beam_candidates(self, total: Tensor, count: int, length: int) -> Tensor:
        """``count`` candidates without replacement (Gumbel-top-k) from ``softmax(total)``; warped beforehand."""
        noise = sampling.gumbel_noise(self.seed, total.shape[0], total.shape[1], length)
        return (total + noise).topk(count, dim=-1).indices


class TokenSearch:
    """Greedy (argmax) or sampling, one token per row per step (HuggingFace's ``_sample``).

    HuggingFace stops once every row has ended; ``steps_taken`` counts the steps it would have run (on device), so
    steps decoded past that point (a sparse stop check) are trimmed away: they only append padding.
    """

    def __init__(self, decoding, prompts: Tensor, processor, settings, max_length: int, eos_token_id: int,
                 pad_token_id: int, sampler=None, live: Tensor | None = None) -> None:
        self.decoding, self.prompts, self.processor, self.settings = decoding, prompts, processor, settings
        self.max_length, self.eos_token_id, self.pad_token_id = max_length, eos_token_id, pad_token_id
        self.sampler, self.live = sampler, live

    def begin(self) -> None:
        rows, prompt_length = self.prompts.shape
        device = self.prompts.device
        self.sequences = torch.full((rows, self.max_length), self.pad_token_id, dtype=torch.long, device=device)
        self.sequences[:, :prompt_length] = self.prompts
        self.unfinished = torch.ones(rows, dtype=torch.bool, device=device) if self.live is None \
            else self.live.clone()
        self.steps_taken = torch.zeros((), dtype=torch.long, device=device)
        self.record = StepRecord(self.settings)
        self.logits = self.decoding.prefill(self.prompts)

    def step(self, length: int) -> None:
        """Choose every row's token at position ``length`` and feed it (unless it is the last position)."""
        s = self.settings
        self.steps_taken += self.unfinished.any()
        logits = self.logits.float() if s.do_sample or s.repetition_penalty != 1.0 else self.logits
        # The raw logits are read again only when recorded: otherwise the processor may overwrite them in place.
        scores = self.processor(logits, self.sequences[:, :length],
                                in_place=logits is not self.logits or not self.record.active)
        self.record.add(self.logits, scores)
        next_tokens = self.sampler.tokens(scores, length) if s.do_sample else scores.argmax(dim=-1)
        next_tokens = torch.where(self.unfinished, next_tokens, self.pad_token_id)
        self.sequences[:, length] = next_tokens
        self.unfinished &= next_tokens != self.eos_token_id
        if length + 1 < self.max_length:
            self.logits = self.decoding.step(next_tokens)

    def stopped(self) -> Tensor:
        return ~self.unfinished.any()

    def finish(self, rows: int | None = None, length: int | None = None) -> GenerateDecoderOnlyOutput:
        """The first ``rows`` sequences, cut to ``length`` (default: HuggingFace's, read from the device), with the
        recorded per-step scores/logits when asked for."""
        if length is None:
            length = self.prompts.shape[1] + int(self.steps_taken)
        steps = length - self.prompts.shape[1]
        return GenerateDecoderOnlyOutput(sequences=self.sequences[:rows, :length],
                                         scores=_rows(self.record.scores(steps), rows),
                                         logits=_rows(self.record.logits(steps), rows))


class BeamSearch:
    """HuggingFace's vectorised beam search: keep ``2 * num_beams`` candidates per step so ``num_beams`` stay alive
    even when the best ones end; finished hypotheses are scored ``sum_logprobs / generated_len ** length_penalty``.

    HuggingFace's three stop conditions are fused into one device flag; once it is set the finished set is frozen,
    so steps decoded past it (a sparse stop check) change nothing. ``live [B]`` marks real images of a padded batch.
    """

    def __init__(self, decoding, prompts: Tensor, processor, settings, max_length: int, eos_token_id: int,
                 pad_token_id: int, sampler=None, live: Tensor | None = None) -> None:
        self.decoding, self.prompts, self.processor, self.settings = decoding, prompts, processor, settings
        self.max_length, self.eos_token_id, self.sampler, self.live = max_length, eos_token_id, sampler, live
        self.fill = pad_token_id or eos_token_id  # HuggingFace's output fill value (pad 0 is falsy there too)
        prompt_length = prompts.shape[1]
        # HuggingFace divides by Python floats ``length ** length_penalty``: the same values, looked up per step.
        self.length_scale = {length: float(length - prompt_length) ** settings.length_penalty
                             for length in range(prompt_length + 1, max_length + 1)}

    def begin(self) -> None:
        s, device = self.settings, self.prompts.device
        num_beams, (rows, prompt_length) = s.num_beams, self.prompts.shape
        batch, candidates = rows // num_beams, 2 * num_beams
        generated = self.max_length - prompt_length
        self.running = torch.full((batch, num_beams, self.max_length), self.fill, dtype=torch.long, device=device)
        self.running[:, :, :prompt_length] = self.prompts.view(batch, num_beams, prompt_length)
        self.running_scores = torch.zeros(batch, num_beams, device=device)
        self.running_scores[:, 1:] = -1e9  # only the first (identical) beam may expand at the first step
        self.running_origins = torch.full((batch, num_beams, generated), -1, dtype=torch.long, device=device)
        self.finished = self.running.clone()
        self.finished_scores = torch.full((batch, num_beams), -1e9, device=device)
        self.finished_origins = self.running_origins.clone()
        self.is_finished = torch.zeros(batch, num_beams, dtype=torch.bool, device=device)
        self.can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device) if self.live is None \
            else self.live[:, None].clone()
        self.padding = None if self.live is None else ~self.live[:, None]  # [B, 1]: images that are not real
        self.stop_flag = torch.zeros((), dtype=torch.bool, device=device)
        self.steps_taken = torch.zeros((), dtype=torch.long, device=device)  # the steps HuggingFace runs
        self.record = StepRecord(s)
        self.is_top_beam = torch.arange(candidates, device=device) < num_beams
        self.batch_offset = torch.arange(batch, device=device)[:, None] * num_beams
        self.logits = self.decoding.prefill(self.prompts)

    def step(self, length: int) -> None:
        s, num_beams = self.settings, self.settings.num_beams
        rows, prompt_length = self.prompts.shape
        batch, candidates = rows // num_beams, 2 * num_beams
        if self.record.active:
            self.steps_taken += ~self.stop_flag
        log_probs = self.processor(self.logits.log_softmax(dim=-1, dtype=torch.float32),
                                   self.running.view(rows, self.max_length)[:, :length], in_place=True)
        self.record.add(self.logits, log_probs)
        vocab = log_probs.shape[-1]
        total = (log_probs.view(batch, num_beams, vocab) + self.running_scores[:, :, None]).view(batch, -1)
        if s.do_sample:
            picks = self.sampler.beam_candidates(total, candidates, length)
            top_scores = total.gather(1, picks)
            if s.sort_sampled_beams:  # transformers >= 5.24 ranks the draws; older versions keep draw order
                top_scores, order = top_scores.sort(dim=-1, descending=True)
                picks = picks.gather(1, order)
        else:
            top_scores, picks = total.topk(candidates, dim=1)
        source_beam = picks // vocab  # [B, 2K]
        cand_sequences = _gather_beams(self.running, source_beam)
        cand_sequences[:, :, length] = picks % vocab
        cand_origins = _gather_beams(self.running_origins, source_beam)
        cand_origins[:, :, length - prompt_length] = source_beam + self.batch_offset
        ended = cand_sequences[:, :, length] == self.eos_token_id
        if length + 1 >= self.max_length:
            ended = torch.ones_like(ended)

        # Continue with the best candidates that did not end.
        alive_scores = torch.add(top_scores, ended, alpha=-1e9)  # one kernel for HuggingFace's x + mask * -1e9
        keep = alive_scores.topk(num_beams, dim=1).indices
        self.running = _gather_beams(cand_sequences, keep)
        self.running_scores = _gather_beams(alive_scores, keep)
        self.running_origins = _gather_beams(cand_origins, keep)

        # Merge newly ended top candidates into the finished set (unless the search has already stopped).
        just_ended = ended & self.is_top_beam
        ended_scores = top_scores / self.length_scale[length + 1]
        if s.early_stopping is True:  # else HuggingFace adds -0.0 here, which changes nothing
            ended_scores = torch.add(ended_scores, self.is_finished.all(dim=-1, keepdim=True), alpha=-1e9)
        ended_scores = torch.add(ended_scores, ~self.can_improve, alpha=-1e9)
        ended_scores = torch.add(ended_scores, ~just_ended, alpha=-1e9)
        best = torch.cat([self.finished_scores, ended_scores], dim=1).topk(num_beams, dim=1).indices
        stopped = self.stop_flag
        self.finished = _unless(stopped, self.finished,
                                _gather_beams(torch.cat([self.finished, cand_sequences], dim=1), best))
        self.finished_origins = _unless(stopped, self.finished_origins,
                                        _gather_beams(torch.cat([self.finished_origins, cand_origins], dim=1), best))
        self.finished_scores = _unless(stopped, self.finished_scores,
                                       _gather_beams(torch.cat([self.finished_scores, ended_scores], dim=1), best))
        self.is_finished = _unless(stopped, self.is_finished,
                                   _gather_beams(torch.cat([self.is_finished, just_ended], dim=1), best))

        if length + 1 < self.max_length:
            self.decoding.reorder(self.running_origins[:, :, length - prompt_length].flatten())
        self.can_improve = self.can_improve & self._may_improve(length + 1)
        done_finished, done_ended = self.is_finished, ended
        if self.padding is not None:
            done_finished, done_ended = done_finished | self.padding, done_ended | self.padding
        self.stop_flag = stopped | ~self.can_improve.any() | done_ended.all()
        if s.early_stopping is True:
            self.stop_flag = self.stop_flag | done_finished.all()
        if length + 1 < self.max_length:
            self.logits = self.decoding.step(self.running.view(rows, self.max_length)[:, length])

    def _may_improve(self, length: int) -> Tensor:
        """HuggingFace's early-stop heuristic: can the best running beam still beat the worst finished one?"""
        s = self.settings
        if s.early_stopping == "never" and s.length_penalty > 0.0:
            scale = self.length_scale[self.max_length]
        else:
            scale = self.length_scale[length]
        best_running = self.running_scores[:, :1] / scale
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(dim=1, keepdim=True).values, -1.0e9)
        return (best_running > worst_finished).any(dim=-1, keepdim=True)

    def stopped(self) -> Tensor:
        return self.stop_flag

    def finish(self, rows: int | None = None, length: int | None = None) -> GenerateBeamDecoderOnlyOutput:
        """The best ``num_return_sequences`` hypotheses of the first ``rows // num_beams`` images, cut to
        ``length`` (default: HuggingFace's, read from the device), with HuggingFace's beam outputs."""
        s = self.settings
        returned, prompt_length = s.num_return_sequences, self.prompts.shape[1]
        images = None if rows is None else rows // s.num_beams
        sequences = self.finished[:images, :returned].flatten(0, 1)
        origins = self.finished_origins[:images, :returned].flatten(0, 1)  # [B * returned, generated], -1 past ends
        if length is None:
            length = prompt_length + int((origins >= 0).sum(dim=1).max())
        steps = int(self.steps_taken) if self.record.active else 0
        return GenerateBeamDecoderOnlyOutput(
            sequences=sequences[:, :length],
            sequences_scores=self.finished_scores[:images, :returned].flatten() if s.output_scores else None,
            scores=_rows(self.record.scores(steps), rows),
            logits=_rows(self.record.logits(steps), rows),
            beam_indices=origins[:, : length - prompt_length].int(),  # HuggingFace's dtype
        )


def _rows(steps: tuple[Tensor, ...] | None, rows: int | None) -> tuple[Tensor, ...] | None:
    """Per-step records of the first ``rows`` rows (a static engine's bucket has more)."""
    return None if steps is None else tuple(step[:rows] for step in steps)


def _unless(stopped: Tensor, frozen: Tensor, updated: Tensor) -> Tensor:
    """``frozen`` once the search has stopped (0-d bool on device), else ``updated``; no host read."""
    return torch.where(stopped, frozen, updated)


def _gather_beams(tensor: Tensor, indices: Tensor) -> Tensor:
    """Select beams ``indices [B, K']`` from ``tensor [B, K, ...]``: one gather (an expanded index is a view)."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return tensor.gather(1, indices.expand(-1, -1, *tensor.shape[2:]))


def run(search, settings, prompt_length: int, max_length: int, fixed_length: bool) -> None:
    """Drive ``search`` eagerly: ``begin``, then one ``step`` per position, reading the stop flag where
    ``settings.check_stop`` says (never with a fixed length: nothing can stop early)."""
    search.begin()
    for length in range(prompt_length, max_length):
        search.step(length)
        if length + 1 < max_length and not fixed_length and settings.check_stop(length + 1 - prompt_length) \
                and bool(search.stopped()):
            break
