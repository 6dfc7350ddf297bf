"""The model card (``README.md``) an export writes next to the weights: how to get blip_fast's outputs in transformers.

A model with BLIP's original semantics (``hf_compat=False``: what blip_fast trains, and ``.pth`` conversions) writes
``[ENC]``/``[DEC]`` over position 0 where HuggingFace's classes feed ``input_ids`` as given (DESIGN.md §2).
transformers loads such a folder without complaint (it ignores ``config.json``'s ``blip_fast_hf_compat``) and would
give other ITM scores, VQA answers or captioning logits. So the export says it, once as a warning and lastingly in
the card, with the transformers call that gives blip_fast's outputs (``tests/test_itm_enc.py`` runs it).

The card's section sits between two markers: a README already in the folder keeps its text, and a later export
replaces only the section (or removes it when the new model follows HuggingFace's semantics).
"""

from __future__ import annotations

import re

from blip_fast.config import BlipConfig

SECTION_START = "<!-- blip_fast: transformers usage -->"
SECTION_END = "<!-- /blip_fast: transformers usage -->"
_SECTION = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END) + r"\n?", re.DOTALL)

#: Per architecture: what differs in transformers, and the snippet that gives blip_fast's outputs there
#: (``model_dir``, ``processor``, ``image`` and the text are the reader's; ``{enc}``/``{dec}`` the token ids).
_USAGE = {
    "BlipForImageTextRetrieval": (
        "gives other ITM scores", """\
Its ITM head reads the text with `[ENC]` (id {enc}) over `[CLS]` at position 0, as Salesforce's `blip_retrieval.py`
and `blip_pretrain.py` (and blip_fast) write it. transformers' `BlipForImageTextRetrieval` follows `blip_itm.py`,
which feeds the ids as given, so this model loaded there as is gives **different ITM scores**. Write `[ENC]` yourself:

```python
import transformers
model = transformers.BlipForImageTextRetrieval.from_pretrained(model_dir)
inputs = processor(images=image, text=text, return_tensors="pt")
inputs["input_ids"][:, 0] = {enc}  # [ENC]
itm_logits = model(**inputs)[0]
```

ITC (`use_itm_head=False`) reads `[CLS]`: no change there."""),
    "BlipForQuestionAnswering": (
        "gives other answers", """\
Its question encoder reads `[ENC]` (id {enc}) and its answer decoder `[DEC]` (id {dec}) at position 0, as
Salesforce's `blip_vqa.py` (and blip_fast) write them. transformers' `BlipForQuestionAnswering` feeds the ids as given,
so this model loaded there as is gives **different answers**. Write them yourself:

```python
import transformers
model = transformers.BlipForQuestionAnswering.from_pretrained(model_dir)
inputs = processor(images=image, text=question, return_tensors="pt")
inputs["input_ids"][:, 0] = {enc}  # [ENC]
answer_ids = model.generate(**inputs)
```

For the training loss, also write `{dec}` ([DEC]) at position 0 of `labels`."""),
    "BlipForConditionalGeneration": (
        "gives other forward() logits", """\
`generate()` gives blip_fast's captions in transformers unchanged. `forward()` differs: this model's decoder reads
`[DEC]` (id {dec}) at position 0, as Salesforce's `blip.py` and `blip_pretrain.py` (and blip_fast) write it, where
transformers' `BlipForConditionalGeneration.forward` feeds the ids as given (**different logits and loss**):

```python
import transformers
model = transformers.BlipForConditionalGeneration.from_pretrained(model_dir)
inputs = processor(images=image, text=caption, return_tensors="pt")
inputs["input_ids"][:, 0] = {dec}  # [DEC]
logits = model(**inputs).logits
```"""),
    "BlipForNLVR": (
        "has no transformers class", """\
transformers has no BLIP NLVR2 class: load this model with `blip_fast.BlipForNLVR.from_pretrained(model_dir)`."""),
}


def deviation(architecture: str, config: BlipConfig) -> str | None:
    """What transformers does differently with this exported model (None: nothing, it follows HuggingFace)."""
    if config.hf_compat or architecture not in _USAGE:
        return None
    return _USAGE[architecture][0]


def section(architecture: str, config: BlipConfig) -> str | None:
    """The card's section for a model of ``architecture`` (None when transformers gives blip_fast's outputs)."""
    if deviation(architecture, config) is None:
        return None
    usage = _USAGE[architecture][1].format(enc=config.text.enc_token_id, dec=config.text.bos_token_id)
    return (f"{SECTION_START}\n## Using this {architecture} in transformers\n\nThis model was exported by blip_fast "
            f"with BLIP's original semantics. {usage}\n\nblip_fast (`from blip_fast import {architecture}`) loads "
            f"it with these semantics: no change needed there.\n{SECTION_END}\n")


def merged(existing: str | None, architecture: str, config: BlipConfig) -> str | None:
    """README.md's new text: ``existing`` (None: no README yet) with this model's section in place of an earlier
    export's; None when there is nothing to write."""
    new = section(architecture, config) or ""
    if existing is None:
        return f"# BLIP {architecture} (exported by blip_fast)\n\n{new}" if new else None
    if _SECTION.search(existing):
        return _SECTION.sub(lambda _: new, existing, count=1)
    return f"{existing.rstrip()}\n\n{new}" if new else existing
