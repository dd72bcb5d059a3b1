"""Fast CLIP text encoding: run only as many token positions as the batch's longest prompt needs.

open_clip's `encode_text` always runs the full context (77 positions). Prompts such as "a photo of a damaged
qwx object." use ~12, and the causal mask means positions after the end token never influence the pooled output.
Cutting the sequence (and slicing the positional embedding and the causal mask to match) gives the same result up to
float rounding, several times faster. Plain open_clip blocks run through the fused block of `fast_transformer`
(causal SDPA, fused linears), the same code as the window pass. Sorting prompts by length before batching keeps each
batch's cut tight.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .fast_transformer import block_forward, block_ok


def _text_parts(model: nn.Module):
    """The text-tower pieces of an open_clip CLIP (flat attributes) or CustomTextCLIP (`model.text`)."""
    tower = getattr(model, "text", None)
    if tower is not None and hasattr(tower, "token_embedding"):
        pool = tower.pool_type
        if tower.cls_emb is not None or tower.use_pad_mask:
            return None  # CoCa-style towers: not worth a special path, use open_clip's own encode_text
        return tower, pool
    if hasattr(model, "token_embedding"):
        return model, getattr(model, "text_pool_type", "argmax")
    return None


def encode_tokens(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Raw (unnormalised) text features for one batch of token ids, with the sequence cut to what it needs."""
    parts = _text_parts(model)
    if parts is None:
        return model.encode_text(tokens)
    tower, pool = parts
    if pool != "argmax":
        return model.encode_text(tokens)
    eot = tokens.argmax(dim=-1)
    length = int(eot.max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    blocks = tower.transformer.resblocks
    if tower.attn_mask is not None and all(block_ok(b) for b in blocks):
        # The fused block (shared with the window pass): causal SDPA instead of a sliced additive mask.
        n = x.shape[0]
        x = x.reshape(n * length, -1)
        for blk in blocks:
            x = block_forward(blk, x, [(n, length)], causal=True)
        x = x.reshape(n, length, -1)
    else:
        mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
        x = tower.transformer(x, attn_mask=mask)
    x = tower.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot]
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return x


@torch.inference_mode()
def encode_prompts(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Raw text features [N, D] (float32, CPU) for `prompts`, in input order."""
    if len(prompts) == 0:
        raise ValueError("no prompts to encode")
    tokens = tokenizer(list(prompts))
    lengths = tokens.argmax(dim=-1)
    order = torch.argsort(lengths, stable=True)
    out: torch.Tensor | None = None
    bar = tqdm(total=len(prompts), desc="encode text", unit="prompt", disable=not progress, leave=False)
    for start in range(0, len(prompts), batch_size):
        idx = order[start : start + batch_size]
        feats = encode_tokens(model, tokens[idx].to(device)).float().cpu()
        if out is None:
            out = torch.empty(len(prompts), feats.shape[1])
        out[idx] = feats
        bar.update(len(idx))
    bar.close()
    assert out is not None
    return out
