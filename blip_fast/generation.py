"""The decoding engine's entry point: greedy, nucleus/top-k sampling and beam search, HuggingFace's semantics.

Semantics are HuggingFace ``generate``'s (same keyword arguments and defaults, same logits processing order, same
beam bookkeeping), so token ids match ``transformers`` exactly in fp32. What differs is the work: the image's
cross-attention K/V are projected once and shared by every beam/sample of the image (they attend as extra query
rows), caches are preallocated to the maximum length, and the searches (:mod:`blip_fast.search`) run on the device
with the host reading at most one flag per checked step.

Two engines run the same searches. The *static* engine (:mod:`blip_fast.decode_graphs`) runs a whole call on fixed
buffers through the fused decode step, and on CUDA captures it as CUDA graphs (the image encoder, the K/V
projection, the prompt and the token loop included); ``cuda_graphs=False`` or ``BLIP_FAST_CUDA_GRAPHS=0`` turns it
off, ``cuda_graphs=True`` on a CPU runs it without capture. The *dynamic* engine (the CPU default, and the
oracle) runs the model's ordinary forward with a :class:`~blip_fast.modeling.text.DecoderCache`. The host reads the
stop flag every ``stop_check_interval`` steps (0: never), with identical output; when the length is fixed
(``min_new_tokens == max_new_tokens``) it reads nothing at all.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from blip_fast import decode_graphs, sampling, search
from blip_fast.decode_graphs import bucket, clear_static_calls  # noqa: F401  (public: cache control)
from blip_fast.errors import is_kind
from blip_fast.modeling.outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput

if TYPE_CHECKING:
    from blip_fast.modeling.text import BlipTextLMHeadModel, DecoderCache

SAMPLERS = ("auto", "multinomial", "gumbel")
#: What each annotated kind of a generation setting accepts.
_KINDS = {"int": numbers.Integral, "float": numbers.Real, "bool": bool, "str": str}


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
    #: blip_fast only. How sampling draws: "multinomial" is HuggingFace's ``torch.multinomial`` (same draws under the
    #: same seed), "gumbel" the graph-safe sampler of :mod:`blip_fast.sampling` (same distribution, Philox draws);
    #: "auto": gumbel inside CUDA graphs, multinomial elsewhere.
    sampler: str = "auto"

    def __post_init__(self) -> None:
        self._check_types()
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
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")

    def _check_types(self) -> None:
        """Each setting of its annotated kind (a bool is no number; numpy's are): a string "3" from a hand-edited
        generation_config.json would otherwise fail as a comparison of str and int."""
        for spec in dataclasses.fields(self):
            value, kinds = getattr(self, spec.name), [kind.strip() for kind in spec.type.split("|")]
            if value is None and "None" in kinds:
                continue
            if not is_kind(value, *(_KINDS[kind] for kind in kinds if kind != "None")):
                raise TypeError(f"{spec.name} must be {' or '.join(kinds)}, got {value!r}")

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

    def fixed_length(self, prompt_length: int, max_length: int) -> bool:
        """Whether every call decodes to ``max_length``: ``[SEP]`` is blocked (min length) at every position whose
        ``[SEP]`` could end the search early, so the output length is known without reading the device."""
        last_open = max_length - 2
        if last_open < prompt_length:
            return True
        return self.min_length > last_open or (
            self.min_new_tokens is not None and prompt_length + self.min_new_tokens > last_open)


class LogitsProcessor:
    """HuggingFace's processors, in HuggingFace's order, for one ``generate`` call. ``warp=False`` leaves
    temperature/top-k/top-p to a sampler that applies them itself (:class:`blip_fast.search.GumbelSampler`)."""

    def __init__(
        self, settings: GenerationSettings, prompt_length: int, eos_token_id: int,
        ignore_for_penalty: torch.Tensor | None, warp: bool = True,
    ) -> None:
        self.settings = settings
        self.prompt_length = prompt_length
        self.eos_token_id = eos_token_id
        self.ignore_for_penalty = ignore_for_penalty  # [R, prompt_length] bool: left padding of the prompt
        self.min_tokens_to_keep = 2 if settings.num_beams > 1 else 1
        self.warp = warp

    def __call__(self, scores: torch.Tensor, sequences: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """scores ``[R, V]`` (logits, or log-probs in beam search) for the next token after ``sequences [R, T]``.

        ``in_place``: ``scores`` is the caller's to overwrite, so the repetition penalty and the min-length mask
        write only the entries they change (O(R * T) and O(R)) instead of copying ``[R, V]`` first."""
        s = self.settings
        length = sequences.shape[1]
        if s.repetition_penalty != 1.0:
            scores = self._penalize_repeats(scores, sequences, in_place)
            in_place = True  # from here on, scores is this call's own tensor either way
        if s.no_repeat_ngram_size and length >= s.no_repeat_ngram_size:
            scores = _ban_repeated_ngrams(scores, sequences, s.no_repeat_ngram_size)
            in_place = True
        if length < s.min_length or (s.min_new_tokens is not None and length - self.prompt_length < s.min_new_tokens):
            scores = scores if in_place else scores.clone()
            scores[:, self.eos_token_id] = -float("inf")
        if s.do_sample and self.warp:
            if s.temperature != 1.0:
                scores = scores / s.temperature
            if s.top_k:
                scores = _top_k(scores, max(s.top_k, self.min_tokens_to_keep))
            if s.top_p < 1.0:
                scores = _top_p(scores, s.top_p, self.min_tokens_to_keep)
        return scores

    def _penalize_repeats(self, scores: torch.Tensor, sequences: torch.Tensor, in_place: bool) -> torch.Tensor:
        """HuggingFace's gather/scatter over the ids already in each row (O(rows * length), not O(rows * vocab); out
        of place it also copies ``scores``, as HuggingFace does); ignored prompt positions read the row's last token
        instead, which always counts. A repeated id writes the same value each time, so the scatter is exact."""
        ids = sequences
        if self.ignore_for_penalty is not None:
            prompt = torch.where(self.ignore_for_penalty, sequences[:, -1:], sequences[:, : self.prompt_length])
            ids = torch.cat([prompt, sequences[:, self.prompt_length :]], dim=1)
        seen = scores.gather(1, ids)
        penalty = self.settings.repetition_penalty
        penalised = torch.where(seen < 0, seen * penalty, seen / penalty)
        return scores.scatter_(1, ids, penalised) if in_place else scores.scatter(1, ids, penalised)


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


class Decoding:
    """The dynamic engine's model side: the prompt pass, then one token per row per step through the model's
    ordinary (dynamic-shape) forward, and beam reorders of the :class:`DecoderCache`. Logits in the model dtype."""

    def __init__(self, decoder: BlipTextLMHeadModel, cache: DecoderCache, mask: torch.Tensor) -> None:
        self.decoder, self.cache, self.mask = decoder, cache, mask  # mask [R, max_length] 0/1

    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        """Feed ``prompts [R, P]`` -> next-token logits ``[R, V]``."""
        return self._forward(prompts)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ``tokens [R]`` -> next-token logits ``[R, V]``."""
        return self._forward(tokens[:, None])

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        visible = self.mask[:, : self.cache.length + tokens.shape[1]]
        return self.decoder(tokens, visible, cache=self.cache).logits[:, -1]


@torch.no_grad()
def generate(
    decoder: BlipTextLMHeadModel,
    input_ids: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    encoder: Callable[..., torch.Tensor] | None = None,
    encoder_inputs: tuple = (),
    **kwargs,
) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
    """Continue the prompts ``input_ids [B, P]`` conditioned on ``encoder_hidden_states [B, N, D]``.

    Returns ``[B * num_return_sequences, L]`` token ids including the prompt, padded like HuggingFace (greedy and
    sampling pad finished rows with ``pad_token_id``; beam search fills with ``pad_token_id or eos_token_id``), or
    with ``return_dict_in_generate=True`` HuggingFace's output object holding them as ``sequences``.
    ``kwargs`` are :class:`GenerationSettings` fields; ``generator`` seeds sampling. Instead of the states, a caller
    may pass ``encoder`` and ``encoder_inputs`` (tensors batched by image, and constants): the states are then
    ``encoder(*encoder_inputs)``, computed inside the static engine's CUDA graph.
    """
    settings = GenerationSettings.from_kwargs(**kwargs)
    batch, prompt_length = input_ids.shape
    max_length = settings.total_length(prompt_length, decoder.config.max_position_embeddings)
    if max_length <= prompt_length:
        raise ValueError(f"max_length {max_length} leaves no room after a prompt of {prompt_length} tokens")
    if (encoder is None) == (encoder_hidden_states is None):
        raise ValueError("pass either encoder_hidden_states or encoder (with encoder_inputs)")
    rows_per_image = settings.num_beams if settings.num_beams > 1 else settings.num_return_sequences
    device = input_ids.device
    fixed = settings.fixed_length(prompt_length, max_length)

    keep = torch.ones(batch * rows_per_image, max_length, dtype=torch.long, device=device)
    ignore_for_penalty = None
    if attention_mask is not None:
        prompt_mask = attention_mask.to(device).long().repeat_interleave(rows_per_image, dim=0)
        keep[:, :prompt_length] = prompt_mask
        first_kept = (prompt_mask != 0).int().argmax(dim=1, keepdim=True)
        ignore_for_penalty = torch.arange(prompt_length, device=device)[None, :] < first_kept
    if settings.repetition_penalty == 1.0:
        ignore_for_penalty = None
    prompts = input_ids.repeat_interleave(rows_per_image, dim=0)

    if settings.uses_static_step(device) and not decoder.training and not settings.records_steps:
        output = decode_graphs.generate(
            decoder, settings, prompts, keep.bool(), ignore_for_penalty, rows_per_image, max_length, eos_token_id,
            pad_token_id, encoder_hidden_states, encoder_attention_mask, encoder, encoder_inputs, generator, fixed,
        )
        return output if settings.return_dict_in_generate else output.sequences
    if encoder is not None:
        encoder_hidden_states = encoder(*encoder_inputs)
    sampler = None
    if settings.do_sample:
        sampler = search.MultinomialSampler(generator) if settings.sampler != "gumbel" else \
            search.GumbelSampler(settings, sampling.seed_from(generator, device), 2 if settings.num_beams > 1 else 1)
    warp = settings.num_beams > 1 or not isinstance(sampler, search.GumbelSampler)
    processor = LogitsProcessor(settings, prompt_length, eos_token_id, ignore_for_penalty, warp=warp)
    cache = decoder.bert.new_cache(encoder_hidden_states, encoder_attention_mask, rows_per_image, max_length)
    program = search.BeamSearch if settings.num_beams > 1 else search.TokenSearch
    running = program(Decoding(decoder, cache, keep), prompts, processor, settings, max_length, eos_token_id,
                      pad_token_id, sampler)
    search.run(running, settings, prompt_length, max_length, fixed)
    output = running.finish(length=max_length if fixed else None)
    return output if settings.return_dict_in_generate else output.sequences
