"""Tiny random HuggingFace BLIP models and comparison helpers shared by the parity tests."""

from __future__ import annotations

import re

import torch

TEXT_DEFAULTS = dict(
    vocab_size=99, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=40, bos_token_id=97,
    sep_token_id=5, eos_token_id=5, pad_token_id=0,
)


def tiny_hf_config(hidden=48, text_heads=3, vision_heads=4, image_size=40, patch_size=8, vision_layers=2, **text):
    """A transformers ``BlipConfig``; text and vision widths are equal because HF's VQA decoder needs that."""
    import transformers

    return transformers.BlipConfig(
        text_config={**TEXT_DEFAULTS, "hidden_size": hidden, "num_attention_heads": text_heads, **text},
        vision_config=dict(
            hidden_size=hidden, intermediate_size=40, num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads, image_size=image_size, patch_size=patch_size,
        ),
        image_text_hidden_size=24,
    )


def _init_std(name: str) -> float:
    # Strong cross-attention and a calm text stack: captions then depend on the image and stay varied instead of
    # collapsing onto one repeated token.
    if "crossattention" in name:
        return 0.6
    return 0.08 if name.startswith(("text_", "itm_head")) else 0.3


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Re-draw every parameter: HF's init (vision std 1e-10, zero biases) would hide mistakes behind near-zeros."""
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "LayerNorm" in name or "layer_norm" in name:
                parameter.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                parameter.copy_(_init_std(name) * noise)
    return model.eval()


def tiny_hf_model(task: str, **config_kwargs):
    import transformers

    return randomize_(getattr(transformers, task)(tiny_hf_config(**config_kwargs)))


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float | None = None, name: str = "tensor"
) -> None:
    """``|a - e| <= atol + rtol * |e|`` elementwise (atol defaults to rtol * max|e|); NaN always fails (kernel outputs
    are NaN-poisoned, so an unwritten element must not pass). Reports how many elements and which indices differ."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if atol is None:
        atol = rtol * float(expected.abs().max())
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual - expected).abs()
    bad = ~(error <= atol + rtol * expected.abs())
    if bad.any():
        first = [tuple(index) for index in bad.nonzero()[:5].tolist()]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ (max abs error "
            f"{float(error.nan_to_num(float('inf')).max()):.3g}, atol {atol:.3g}, rtol {rtol:.3g}); first at {first}"
        )


def to_original_key(key: str) -> str:
    """HF name -> Salesforce BLIP name, written independently of checkpoint.py's table."""
    fixed = {
        "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
        "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
    }
    if key in fixed:
        return fixed[key]
    key = key.replace("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj.")
    key = key.replace("vision_model.post_layernorm.", "visual_encoder.norm.")
    match = re.match(r"vision_model\.encoder\.layers\.(\d+)\.(.*)", key)
    if match:
        block, rest = match.groups()
        for hf_name, original_name in [("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."),
                                       ("self_attn.qkv.", "attn.qkv."), ("self_attn.projection.", "attn.proj.")]:
            rest = rest.replace(hf_name, original_name)
        key = f"visual_encoder.blocks.{block}.{rest}"
    return key


def poison_kernel_outputs(monkeypatch, kernel_module) -> None:
    """Make a kernel module's ``_output_buffer`` return NaN-filled tensors, so an element a kernel forgets to write
    fails the comparison (DESIGN.md §4: never test on zeros)."""

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernel_module, "_output_buffer", poisoned)


def save_tiny_captioner(out_dir, captions, image_size=64):
    """A random tiny blip_fast captioner with a WordPiece vocab trained on ``captions`` (+ the prompt) and its image
    processor, saved as one HuggingFace-layout dir ``out_dir/model``; returns that dir."""
    from blip_fast.config import BlipConfig
    from blip_fast.data.transforms import BlipImageProcessor
    from blip_fast.modeling.blip import BlipForConditionalGeneration
    from blip_fast.tokenizer import BlipTokenizer

    tokenizer = BlipTokenizer.train(list(captions) + ["a picture of"], vocab_size=200)
    config = BlipConfig.tiny(image_size=image_size).for_tokenizer(tokenizer)
    torch.manual_seed(0)
    model_dir = out_dir / "model"
    BlipForConditionalGeneration(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    BlipImageProcessor(size=image_size).save_pretrained(model_dir)
    return model_dir


def decode_attention_inputs(images, heads, rows, keys, head_dim, masked=False, device="cpu"):
    """fp64 query ``[C, H, rows, Dh]``, key/value ``[C, H, N, Dh]`` and a boolean keep mask ``[C, 1, 1, N]`` (or
    None) that drops ~30% of the keys, never all of an image's. The query scale gives peaked and flat rows alike."""
    query = torch.randn(images, heads, rows, head_dim, device=device, dtype=torch.float64) * 2
    key, value = (torch.randn(images, heads, keys, head_dim, device=device, dtype=torch.float64) for _ in range(2))
    keep = None
    if masked:
        keep = torch.rand(images, 1, 1, keys, device=device) > 0.3
        keep[..., torch.randint(0, keys, ())] = True
    return query, key, value, keep


def additive(keep, dtype):
    """The additive form of a boolean keep mask (None stays None)."""
    from blip_fast import ops

    return None if keep is None else ops.additive_mask(keep, dtype)


def sdpa(query, key, value, mask):
    """The decode-attention oracle: SDPA with beams as query rows."""
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)


def micro_config(layers: int = 1):
    """A blip_fast BlipConfig of width 32 and ``layers`` layers per stack: pre-training steps in milliseconds."""
    from blip_fast.config import BlipConfig, TextConfig, VisionConfig

    return BlipConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                            image_size=16, patch_size=8),
        text=TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=2, max_position_embeddings=16, bos_token_id=126, enc_token_id=127),
        image_text_hidden_size=16,
    )
