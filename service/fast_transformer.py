"""A fused forward for open_clip's plain transformer block, shared by the window pass and the text encoder.

Why: nn.MultiheadAttention's generic path and the separate bias / GELU / residual passes cost several extra memory
passes per call, which dominate for many short sequences (WinCLIP windows of 5-10 tokens, prompts of ~18 tokens).
`block_forward` computes the block's own function from its own weights: LayerNorms and linears run once over a
token matrix [T, W] holding groups of equal-length sequences, attention runs per group with SDPA (causal for text),
and on CPU the linears are oneDNN calls with bias, GELU and the residual add fused and weights pre-packed once.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


def bf16_is_fast(cpu_flags: str) -> bool:
    """Whether a CPU with these /proc/cpuinfo flags runs bf16 matmuls faster than fp32: with AMX (`amx_bf16`) only.

    AVX512-BF16 alone is not enough: on a Xeon with it and no AMX, bf16 ran at 0.63x of fp32 for ViT-B-16+ heatmaps
    (`benchmarks/heatmap.py`: bf16 matmuls at 143 GFLOP/s against 225 in fp32) and 0.83x for the embedded model
    (`benchmarks/precision_auroc.py`)."""
    return "amx_bf16" in cpu_flags.split()


def cpu_bf16_is_fast() -> bool:
    """`bf16_is_fast` for this machine's CPU (False when /proc/cpuinfo cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return bf16_is_fast(f.read())
    except OSError:
        return False


def block_ok(blk: nn.Module) -> bool:
    """True when the block is open_clip's plain ResidualAttentionBlock that `block_forward` reproduces exactly."""
    attn = getattr(blk, "attn", None)
    mlp = getattr(blk, "mlp", None)
    return (
        isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.in_proj_weight is not None
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
        and attn.batch_first
        and not hasattr(blk, "ln_1_kv")
        and hasattr(blk, "ln_1")
        and hasattr(blk, "ln_2")
        and isinstance(mlp, nn.Sequential)
        and [name for name, _ in mlp.named_children()] == ["c_fc", "gelu", "c_proj"]
    )


_LINEAR_POINTWISE = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_REORDER_WEIGHT = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _LINEAR_POINTWISE is not None else None
# oneDNN's bf16 kernels need AVX-512 (or AVX-NE-CONVERT): on other CPUs (e.g. AVX2-only) bf16 runs the plain path.
_ONEDNN_BF16 = _LINEAR_POINTWISE is not None and bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported",
                                                              lambda: False)())

# Pre-packed (oneDNN blocked-layout) copies of linear weights, per parameter and row range. Why: otherwise oneDNN
# re-lays out every weight matrix on every call, 48 times per scale; packing once was 5-10% faster where bf16 serves
# (the first round's CPU). It costs one extra copy of the transformer's linear weights (ViT-B-16-plus-240's image
# tower: about 450 MB in fp32, 225 MB in bf16), so it is on only where bf16 serves: CPUs with AMX. Elsewhere `auto`
# serves fp32 and packing gained nothing: x0.99 on AVX2 (4 blocks of one image's heatmap tokens, #17), and on a Xeon
# with AVX-512 and no AMX a batch of 8 heatmaps took 30.9 s packed and 30.4 s not, for 428 MB more peak memory
# (`benchmarks/memory.py --cases after --precisions fp32`: 2336 against 1908 MB). Memory comes first.
PREPACK_WEIGHTS = _ONEDNN_BF16 and cpu_bf16_is_fast()
_PACKED: dict[int, tuple[weakref.ref, dict[tuple[int, int], tuple[tuple, torch.Tensor]]]] = {}  # id(param) ->

def _onednn_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """oneDNN fused linear applies: CPU, fp32/bf16, no autograd needed (it has no backward)."""
    return (
        _LINEAR_POINTWISE is not None
        and x.device.type == "cpu"
        and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _ONEDNN_BF16))
        and weight.dtype == x.dtype
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def _weight_rows(weight: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    return weight if rows is None else weight[rows[0] : rows[1]]


def _packed(weight: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    """The oneDNN-packed copy of weight[rows] (cached; rebuilt when the parameter changes in place or is moved)."""
    if not PREPACK_WEIGHTS or _REORDER_WEIGHT is None:
        return _weight_rows(weight, rows)
    key = rows or (0, weight.shape[0])
    try:
        version = weight._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change in place either)
        version = -1
    stamp = (version, weight.dtype, weight.data_ptr())
    entry = _PACKED.get(id(weight))
    if entry is None or entry[0]() is not weight:  # new parameter (or a recycled id)
        entry = (weakref.ref(weight), {})
        _PACKED[id(weight)] = entry
        weakref.finalize(weight, _PACKED.pop, id(weight), None)
    per_param = entry[1]
    hit = per_param.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    packed = _REORDER_WEIGHT(_weight_rows(weight, rows).contiguous(), None)
    per_param[key] = (stamp, packed)
    return packed


def _gelu_algorithm(act: nn.Module) -> str | None:
    """oneDNN post-op name for the MLP activation, or None when it must run as its own op (e.g. QuickGELU)."""
    if type(act) is nn.GELU:
        return "tanh" if act.approximate == "tanh" else "none"
    return None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: tuple[int, int] | None = None,
            act: nn.Module | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """act(x @ W[rows].T + b[rows]) (+ residual), with bias, GELU and the residual add fused into one oneDNN call.

    Why: for many short sequences PyTorch's addmm first copies the broadcast bias into the output, then GELU and the
    residual add each take another pass over memory; in bf16 those passes cost as much as a third of the matmuls.
    Elsewhere (GPU, fp16, autograd) it is the plain F.linear path.
    """
    b = bias if bias is None or rows is None else bias[rows[0] : rows[1]]
    algo = _gelu_algorithm(act) if act is not None else None
    if _onednn_ok(x, weight) and (act is None or algo is not None):
        w = _packed(weight, rows)
        if residual is not None and act is None:
            return _LINEAR_POINTWISE.binary(x, residual, w, b, "add")
        out = _LINEAR_POINTWISE(x, w, b, "gelu" if act is not None else "none", [], algo or "")
        return out if residual is None else out + residual
    out = F.linear(x, _weight_rows(weight, rows), b)
    if act is not None:
        out = act(out)
    return out if residual is None else out + residual


def block_forward(blk: nn.Module, x: torch.Tensor, shapes: list[tuple[int, int]], first_only: bool = False,
                  causal: bool = False) -> torch.Tensor:
    """One residual attention block on groups of sequences stored as one token matrix.

    x is [T, W]: group g holds n_g sequences of L_g tokens, row-major, groups one after another (`shapes` lists
    (n_g, L_g)). LayerNorms and linears are per token, so they run once over all T tokens (large matmuls even for
    5-token windows); only attention is done per group, with SDPA. Why not `blk(x)`: nn.MultiheadAttention's generic
    path and separate bias/GELU/residual passes cost several extra memory passes per call. The function computed is
    the block's own. With `first_only` only each sequence's token 0 is produced (keys/values still come from every
    token), as [sum n_g, W]: enough for class-token pooling after the last block.
    """
    attn: nn.MultiheadAttention = blk.attn
    width = x.shape[-1]
    heads = attn.num_heads
    hd = width // heads
    w_in, b_in = attn.in_proj_weight, attn.in_proj_bias
    h = blk.ln_1(x)
    outs: list[torch.Tensor] = []
    t0 = 0
    if first_only and causal:
        raise ValueError("first_only pools token 0, which under a causal mask sees only itself")
    if first_only:
        firsts = torch.cat([t + torch.arange(n, device=x.device) * length for t, (n, length) in
                            zip(offsets(shapes), shapes)])
        kv = _linear(h, w_in, b_in, rows=(width, 3 * width))
        q_all = _linear(h[firsts], w_in, b_in, rows=(0, width))
        n0 = 0
        for n, length in shapes:
            k, v = kv[t0 : t0 + n * length].view(n, length, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
            q = q_all[n0 : n0 + n].view(n, 1, heads, hd).transpose(1, 2)
            outs.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, width))
            t0, n0 = t0 + n * length, n0 + n
        x = x[firsts]
    else:
        qkv = _linear(h, w_in, b_in)
        for n, length in shapes:
            q, k, v = qkv[t0 : t0 + n * length].view(n, length, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(n * length, width))
            t0 += n * length
    o = outs[0] if len(outs) == 1 else torch.cat(outs)
    out_proj, mlp = attn.out_proj, blk.mlp
    if isinstance(blk.ls_1, nn.Identity):
        x = _linear(o, out_proj.weight, out_proj.bias, residual=x)
    else:
        x = x + blk.ls_1(_linear(o, out_proj.weight, out_proj.bias))
    u = _linear(blk.ln_2(x), mlp.c_fc.weight, mlp.c_fc.bias, act=mlp.gelu)
    if isinstance(blk.ls_2, nn.Identity):
        return _linear(u, mlp.c_proj.weight, mlp.c_proj.bias, residual=x)
    return x + blk.ls_2(_linear(u, mlp.c_proj.weight, mlp.c_proj.bias))


def offsets(shapes: list[tuple[int, int]]) -> list[int]:
    out, t = [], 0
    for n, length in shapes:
        out.append(t)
        t += n * length
    return out
