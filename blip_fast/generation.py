"""The decoding engine: greedy, nucleus/top-k sampling and beam search over a :class:`DecoderCache`.

Semantics are HuggingFace ``generate``'s (same keyword arguments and defaults, same logits processing order, same
beam bookkeeping), so token ids match ``transformers`` exactly in fp32. What differs is the work: the image's
cross-attention K/V are projected once and shared by every beam/sample of the image (they attend as extra query
rows), and the self-attention cache is preallocated to the maximum length.

On CUDA each one-token step is a static, fixed-address step (:meth:`BlipTextModel.decode_step`) captured once as a
CUDA graph per (model, bucket of images, rows per image, max length, context, dtype) and replayed every step; the
graphs and their buffers are kept per model (:data:`MAX_STATIC_STEPS` most recently used) and reused by later
calls. ``cuda_graphs=False`` or ``BLIP_FAST_CUDA_GRAPHS=0`` turns this off; ``cuda_graphs=True`` on a CPU runs the
static step without capture. The host reads one flag per step (the stop check), or one per ``stop_check_interval``
steps, or none until the end (``stop_check_interval=0``), with identical output.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from blip_fast.modeling.outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

if TYPE_CHECKING:
    from blip_fast.modeling.text import BlipTextLMHeadModel, DecoderCache

#: Static steps (buffers + CUDA graph) kept per model, least recently used dropped first.
MAX_STATIC_STEPS = 4


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
    #: Every n-gram of this size may occur once per row (prompt included); 0 turns it off.
    no_repeat_ngram_size: int = 0
    use_cache: bool = True
    #: HuggingFace's output switches: with ``return_dict_in_generate`` the call returns a
    #: ``GenerateDecoderOnlyOutput`` (beam search: ``GenerateBeamDecoderOnlyOutput``) instead of the ids, holding the
    #: processed per-step scores (``output_scores``, also the beams' ``sequences_scores``) and raw logits.
    return_dict_in_generate: bool = False
    output_scores: bool = False
    output_logits: bool = False
    #: blip_fast only. Static decode step captured as CUDA graphs; None: ``BLIP_FAST_CUDA_GRAPHS`` (0/1) if set,
    #: else on for CUDA and off elsewhere. True on a CPU runs the static step without capture.
    cuda_graphs: bool | None = None
    #: blip_fast only. Read the stop flag every this many steps (1: every step, like HuggingFace; 0: never, decode
    #: to the maximum length). The output is the same; fewer checks mean fewer host syncs and maybe wasted steps.
    stop_check_interval: int = 1
    #: Beam sampling only: rank the sampled candidates by score before choosing which may end, as transformers
    #: >= 5.24 does; False keeps them in draw order, as transformers 4.x to 5.23 do (same distribution, other ids
    #: under one seed). ``blip_fast.interop.sorts_sampled_beams(version)`` says which one a transformers does.
    sort_sampled_beams: bool = True

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
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if not self.use_cache:
            raise ValueError("blip_fast always decodes with a cache (use_cache=False is not supported)")
        if self.stop_check_interval < 0:
            raise ValueError(f"stop_check_interval must be >= 0, got {self.stop_check_interval}")

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

    def uses_static_step(self, device: torch.device) -> bool:
        if self.cuda_graphs is not None:
            return self.cuda_graphs
        switch = os.environ.get("BLIP_FAST_CUDA_GRAPHS")
        return device.type == "cuda" if switch is None else switch.strip() != "0"

    def check_stop(self, steps_done: int) -> bool:
        """Whether to read the stop flag after ``steps_done`` generated tokens."""
        return self.stop_check_interval > 0 and steps_done % self.stop_check_interval == 0

    @property
    def records_steps(self) -> bool:
        """Whether the call returns per-step scores or logits (each step then keeps a copy of ``[R, V]``)."""
        return self.return_dict_in_generate and (self.output_scores or self.output_logits)


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
        if s.no_repeat_ngram_size and length >= s.no_repeat_ngram_size:
            scores = _ban_repeated_ngrams(scores, sequences, s.no_repeat_ngram_size)
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


def _ban_repeated_ngrams(scores: torch.Tensor, sequences: torch.Tensor, size: int) -> torch.Tensor:
    """-inf for each token that would repeat an n-gram of ``size`` already in its row of ``sequences [R, T]``.

    The next token completes a repeat when the row's last ``size - 1`` tokens open an earlier n-gram; that n-gram's
    last token is banned. Windows that do not match scatter into a spare column past the vocabulary.
    """
    vocab = scores.shape[-1]
    windows = sequences.unfold(1, size, 1)  # [R, T - size + 1, size]
    suffix = sequences[:, sequences.shape[1] - size + 1 :]  # [R, size - 1]
    opens_repeat = (windows[..., :-1] == suffix[:, None, :]).all(dim=-1)  # [R, T - size + 1]
    banned = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, torch.where(opens_repeat, windows[..., -1], vocab), True)
    return scores.masked_fill(banned[:, :vocab], -float("inf"))


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


class StepRecord:
    """Per-step copies of the raw logits and processed scores ``[R, V]`` that HuggingFace returns, when asked for.

    Copies, because a static step's logits buffer is overwritten by the next step; recorded steps past HuggingFace's
    stopping point (a sparse stop check) are trimmed at the end.
    """

    def __init__(self, settings: GenerationSettings) -> None:
        self.active = settings.records_steps
        self._scores: list[torch.Tensor] | None = [] if self.active and settings.output_scores else None
        self._logits: list[torch.Tensor] | None = [] if self.active and settings.output_logits else None

    def add(self, logits: torch.Tensor, scores: torch.Tensor) -> None:
        if self._scores is not None:
            self._scores.append(scores.clone())
        if self._logits is not None:
            self._logits.append(logits.clone())

    def scores(self, steps: int) -> tuple[torch.Tensor, ...] | None:
        return None if self._scores is None else tuple(self._scores[:steps])

    def logits(self, steps: int) -> tuple[torch.Tensor, ...] | None:
        return None if self._logits is None else tuple(self._logits[:steps])


class StaticStep:
    """Fixed-address inputs, cache and output of the one-token decode step over a bucket of images, optionally
    captured as a CUDA graph. A call feeds the leading rows; the bucket's other rows are inert (finite, unread)."""

    def __init__(self, cache: DecoderCache) -> None:
        rows, device = cache.self_kv.shape[2], cache.self_kv.device
        self.cache = cache
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)  # [R_bucket, 1]
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.keep = torch.ones(rows, cache.max_length, dtype=torch.bool, device=device)  # prompt padding -> False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [R_bucket, V], the captured graph's output

    def capture(self, decoder: BlipTextLMHeadModel) -> None:
        """Warm up on a side stream (allocator, lazy kernel compilation), then capture one step."""
        side = torch.cuda.Stream(self.tokens.device)
        side.wait_stream(torch.cuda.current_stream(self.tokens.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                decoder.decode_step(self.tokens, self.position, self.keep, self.cache)
        torch.cuda.current_stream(self.tokens.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a CUDA call from another thread during capture (CapFilt's DataLoader pin-memory thread)
            # must not invalidate it, as it would under the default "global" mode.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.logits = decoder.decode_step(self.tokens, self.position, self.keep, self.cache)
        except RuntimeError as error:
            raise RuntimeError(
                f"CUDA-graph capture of the decode step failed ({error}); generate with cuda_graphs=False or set "
                "BLIP_FAST_CUDA_GRAPHS=0"
            ) from error
        self.graph = graph

    def load(
        self,
        decoder: BlipTextLMHeadModel,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> None:
        """Bind one call: its images' cross K/V and its rows' padding mask ``[R, max_length]`` (0/1)."""
        decoder.bert.fill_context(self.cache, encoder_hidden_states, encoder_attention_mask)
        rows = mask.shape[0]
        self.keep[:rows].copy_(mask.bool())
        self.keep[rows:] = True

    def __call__(self, decoder: BlipTextLMHeadModel, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens [R]`` at the cache length -> logits ``[R, V]`` (valid until the next call)."""
        rows = tokens.shape[0]
        self.tokens[:rows, 0].copy_(tokens)
        self.position.fill_(self.cache.length)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = decoder.decode_step(self.tokens, self.position, self.keep, self.cache)
        self.cache.length += 1
        return logits[:rows]


def bucket(count: int) -> int:
    """Image-count buckets of the static step: powers of two up to 64, then multiples of 64. Its rows are
    ``bucket(images) * rows_per_image``, so every image keeps its rows together as the shared-K/V layout needs."""
    if count <= 64:
        return 1 << max(0, count - 1).bit_length()
    return -(-count // 64) * 64


_STATIC_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> OrderedDict[key, StaticStep]


def clear_static_steps(decoder: BlipTextLMHeadModel | None = None) -> None:
    """Free the cached static steps (buffers and CUDA graphs) of ``decoder``, or of every model."""
    if decoder is None:
        _STATIC_STEPS.clear()
    else:
        _STATIC_STEPS.pop(decoder, None)


def static_step(
    decoder: BlipTextLMHeadModel,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: torch.Tensor | None,
    rows_per_image: int,
    max_length: int,
) -> StaticStep:
    """The cached static step fitting this call (made, and on CUDA captured, on first use).

    The key holds the parameters' addresses: a graph replays whatever lives there, so moving or re-creating the
    weights (``.half()``, ``.to()``) must not reuse it, while in-place updates are seen.
    """
    if max_length > decoder.config.max_position_embeddings:  # the static step cannot check positions on the host
        raise ValueError(f"max_length {max_length} exceeds max_position_embeddings "
                         f"{decoder.config.max_position_embeddings}")
    images, context_length = encoder_hidden_states.shape[:2]
    dtype, device = encoder_hidden_states.dtype, encoder_hidden_states.device
    capture = device.type == "cuda"
    key = (bucket(images), rows_per_image, max_length, context_length, encoder_attention_mask is not None, dtype,
           device, capture, tuple(parameter.data_ptr() for parameter in decoder.parameters()))
    steps = _STATIC_STEPS.setdefault(decoder, OrderedDict())
    if key in steps:
        steps.move_to_end(key)
        return steps[key]
    cache = decoder.bert.static_cache(
        key[0], rows_per_image, max_length, context_length, encoder_attention_mask is not None, dtype, device
    )
    step = StaticStep(cache)
    if capture:
        step.capture(decoder)
    steps[key] = step
    while len(steps) > MAX_STATIC_STEPS:
        steps.popitem(last=False)
    return step


class Decoding:
    """One call's model side for the search loops: the prompt pass, then one token per row per step, and beam
    reorders. This base runs every step through the model's ordinary (dynamic-shape) forward."""

    def __init__(self, decoder: BlipTextLMHeadModel, cache: DecoderCache, mask: torch.Tensor) -> None:
        self.decoder, self.cache, self.mask = decoder, cache, mask  # mask [R, max_length] 0/1

    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        """Feed ``prompts [R, P]`` -> next-token logits ``[R, V]`` in fp32."""
        return self._forward(prompts)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``tokens [R]`` -> next-token logits ``[R, V]`` in fp32."""
        return self._forward(tokens[:, None])

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        visible = self.mask[:, : self.cache.length + tokens.shape[1]]
        return self.decoder(tokens, visible, cache=self.cache).logits[:, -1].float()


class StaticDecoding(Decoding):
    """Prompt through the dynamic forward, every later token through a :class:`StaticStep` (a graph on CUDA)."""

    def __init__(self, decoder: BlipTextLMHeadModel, static: StaticStep, mask: torch.Tensor) -> None:
        super().__init__(decoder, static.cache, mask)
        self.static = static

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.static(self.decoder, tokens)


@torch.no_grad()
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
) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
    """Continue the prompts ``input_ids [B, P]`` conditioned on ``encoder_hidden_states [B, N, D]``.

    Returns ``[B * num_return_sequences, L]`` token ids including the prompt, padded like HuggingFace (greedy and
    sampling pad finished rows with ``pad_token_id``; beam search fills with ``pad_token_id or eos_token_id``), or
    with ``return_dict_in_generate=True`` HuggingFace's output object holding them as ``sequences``.
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
    if settings.uses_static_step(encoder_hidden_states.device):
        static = static_step(decoder, encoder_hidden_states, encoder_attention_mask, rows_per_image, max_length)
        static.load(decoder, encoder_hidden_states, encoder_attention_mask, mask)
        decoding = StaticDecoding(decoder, static, mask)
    else:
        cache = decoder.bert.new_cache(encoder_hidden_states, encoder_attention_mask, rows_per_image, max_length)
        decoding = Decoding(decoder, cache, mask)
    prompts = input_ids.repeat_interleave(rows_per_image, dim=0)

    search = _beam_search if settings.num_beams > 1 else _sample
    output = search(decoding, prompts, processor, settings, max_length, eos_token_id, pad_token_id, generator)
    return output if settings.return_dict_in_generate else output.sequences


def _sample(
    decoding: Decoding, prompts, processor, settings, max_length, eos_token_id, pad_token_id, generator
) -> GenerateDecoderOnlyOutput:
    """Greedy (argmax) or multinomial sampling, one token per row per step.

    HuggingFace stops once every row has ended; ``steps_taken`` counts the steps it would have run (on device), so
    decoding past that point (a sparse stop check) is trimmed away: those steps only append padding.
    """
    rows, prompt_length = prompts.shape
    record = StepRecord(settings)
    sequences = torch.full((rows, max_length), pad_token_id, dtype=torch.long, device=prompts.device)
    sequences[:, :prompt_length] = prompts
    unfinished = torch.ones(rows, dtype=torch.bool, device=prompts.device)
    steps_taken = torch.zeros((), dtype=torch.long, device=prompts.device)
    logits = decoding.prefill(prompts)
    for length in range(prompt_length, max_length):
        steps_taken += unfinished.any()
        scores = processor(logits, sequences[:, :length])
        record.add(logits, scores)
        if settings.do_sample:
            next_tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            next_tokens = scores.argmax(dim=-1)
        next_tokens = torch.where(unfinished, next_tokens, pad_token_id)
        sequences[:, length] = next_tokens
        unfinished &= next_tokens != eos_token_id
        done = length + 1 - prompt_length
        if length + 1 == max_length or (settings.check_stop(done) and not bool(unfinished.any())):
            break
        logits = decoding.step(next_tokens)
    steps = int(steps_taken)
    return GenerateDecoderOnlyOutput(
        sequences=sequences[:, : prompt_length + steps], scores=record.scores(steps), logits=record.logits(steps)
    )


def _beam_search(
    decoding: Decoding, prompts, processor, settings, max_length, eos_token_id, pad_token_id, generator
) -> GenerateBeamDecoderOnlyOutput:
    """HuggingFace's vectorised beam search: keep ``2 * num_beams`` candidates per step so ``num_beams`` stay alive
    even when the best ones end; finished hypotheses are scored ``sum_logprobs / generated_len ** length_penalty``.

    HuggingFace's three stop conditions are fused into one device flag (one host read per checked step); once it
    is set the finished set is frozen, so steps decoded past it (a sparse stop check) change nothing and are not
    counted in ``steps_taken`` (the steps HuggingFace runs, which the per-step records are trimmed to).
    """
    num_beams, device = settings.num_beams, prompts.device
    rows, prompt_length = prompts.shape
    batch = rows // num_beams
    candidates = 2 * num_beams
    fill = pad_token_id or eos_token_id  # HuggingFace's output fill value (pad 0 is falsy there too)
    generated = max_length - prompt_length
    record = StepRecord(settings)

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
    stopped = torch.zeros((), dtype=torch.bool, device=device)
    steps_taken = torch.zeros((), dtype=torch.long, device=device)
    is_top_beam = torch.arange(candidates, device=device) < num_beams
    batch_offset = torch.arange(batch, device=device)[:, None] * num_beams

    logits = decoding.prefill(prompts)
    for length in range(prompt_length, max_length):
        steps_taken += ~stopped
        log_probs = processor(logits.log_softmax(dim=-1), running.view(rows, max_length)[:, :length])
        record.add(logits, log_probs)
        vocab = log_probs.shape[-1]
        total = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).view(batch, -1)
        if settings.do_sample:
            picks = torch.multinomial(total.softmax(dim=-1), candidates, generator=generator)
            top_scores = total.gather(1, picks)
            if settings.sort_sampled_beams:
                top_scores, order = top_scores.sort(dim=-1, descending=True)
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

        # Merge newly ended top candidates into the finished set (unless the search has already stopped).
        just_ended = ended & is_top_beam
        ended_scores = top_scores / ((length + 1 - prompt_length) ** settings.length_penalty)
        batch_full = is_finished.all(dim=-1, keepdim=True) & (settings.early_stopping is True)
        ended_scores = ended_scores + batch_full.float() * -1e9 + (~can_improve).float() * -1e9
        ended_scores = ended_scores + (~just_ended).float() * -1e9
        best = torch.cat([finished_scores, ended_scores], dim=1).topk(num_beams, dim=1).indices
        finished = _unless(stopped, finished, _gather_beams(torch.cat([finished, cand_sequences], dim=1), best))
        finished_origins = _unless(
            stopped, finished_origins, _gather_beams(torch.cat([finished_origins, cand_origins], dim=1), best)
        )
        finished_scores = _unless(
            stopped, finished_scores, _gather_beams(torch.cat([finished_scores, ended_scores], dim=1), best)
        )
        is_finished = _unless(stopped, is_finished, _gather_beams(torch.cat([is_finished, just_ended], dim=1), best))

        decoding.reorder(running_origins[:, :, length - prompt_length].flatten())
        can_improve = can_improve & _may_improve(running_scores, finished_scores, is_finished, length + 1,
                                                 prompt_length, max_length, settings)
        all_done = is_finished.all() & (settings.early_stopping is True)
        stopped = stopped | ~can_improve.any() | all_done | ended.all()
        if length + 1 == max_length or (settings.check_stop(length + 1 - prompt_length) and bool(stopped)):
            break
        logits = decoding.step(running.view(rows, max_length)[:, length])

    returned = settings.num_return_sequences
    sequences = finished[:, :returned].flatten(0, 1)
    origins = finished_origins[:, :returned].flatten(0, 1)  # [B * returned, generated], -1 past each end
    generated_length = int((origins >= 0).sum(dim=1).max())
    steps = int(steps_taken) if record.active else 0
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences[:, : prompt_length + generated_length],
        sequences_scores=finished_scores[:, :returned].flatten() if settings.output_scores else None,
        scores=record.scores(steps),
        logits=record.logits(steps),
        beam_indices=origins[:, :generated_length].int(),  # HuggingFace's dtype
    )


def _unless(stopped: torch.Tensor, frozen: torch.Tensor, updated: torch.Tensor) -> torch.Tensor:
    """``frozen`` once the search has stopped (0-d bool on device), else ``updated``; no host read."""
    return torch.where(stopped, frozen, updated)


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
