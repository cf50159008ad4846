"""Layers shared by every family: attention, MLP, a pre-norm block that takes its
layers as arguments, and fixed sin-cos position embeddings.

Attention always goes through ``attention()`` (``F.scaled_dot_product_attention``:
fused/flash kernels where the backend has them; on AMD CPUs, short fp32 sequences, where
the flash kernel was slow there, as matmuls around a softmax: ``harness.metrics.cpu_attention``).  FLOP
counting traces SDPA, which ``harness.metrics.flops`` counts, so attention FLOPs are never
silently dropped.

An MLP whose activation is the tanh-GELU (DiT, ViViT) adds fc1's bias inside the fused
GELU's pass rather than in the GEMM (``linear_gelu_tanh``) where fc1 runs on torch's GEMM.

Every projection is a ``Linear`` (an ``nn.Linear``: same parameters, init and state
dict) whose fp32 CPU matmuls, forward and backward, run on the library that
``harness.metrics.cpu_matmul`` picks for this CPU (layers narrower than its
``ONEDNN_MIN_FEATURES`` always on ``F.linear``): torch's ``F.linear`` (MKL) on Intel and
on CPUs without AVX-512, and oneDNN (``linear()``) on AMD with AVX-512, where MKL takes an
AVX2 path at about half of what the cores do (measured on an AMD EPYC Zen 5: 2 cores, ~100
vs ~230 GFLOP/s per core; see docs/speed.md); on Zen 4 the weight gradients go to
``torch.mm`` (MKL), which is faster there at that one matmul.  Where MKL runs its AVX-512
code on AMD too (``harness.metrics.cpu_mkl``, the default where a C compiler is there),
every Linear takes ``F.linear``, as on Intel.  Under ``torch.compile`` the
oneDNN matmuls are an opaque custom op (``harness::onednn_linear``) that inductor calls
while fusing the element-wise work.  Tracing (FLOP counting), autocast, CUDA and other
dtypes take ``F.linear`` unchanged.

Under a Python dispatch mode (``torch.utils.flop_counter.FlopCounterMode``, a recorder,
``torch.export``'s tracer) the fast paths step aside for torch's own ops (``F.linear``,
``F.gelu``), which every mode understands: a mode cannot see inside oneDNN's
``mkldnn._linear_pointwise`` (FlopCounterMode counted 0 FLOPs for it) and torch.compile'd
kernels refuse to run under one (``watched``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.metrics import cpu_attention, cpu_gelu, cpu_matmul


# ------------------------------------------------------------ linear layers

def watched() -> bool:
    """Whether a Python dispatch mode is active (FlopCounterMode, a recorder, a tracer): the
    model then runs torch's own ops, which the mode sees and understands (module docstring)."""
    return torch._C._len_torch_dispatch_stack() > 0


def _mm_onednn(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ b (N, K)^T [+ bias] on oneDNN (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


def _input_grad(gy: torch.Tensor, weight: torch.Tensor, mm=None) -> torch.Tensor:
    """gy (M, N) @ weight (N, K) -> (M, K).  oneDNN reads the transposed weight in place:
    a contiguous copy of it cost more than it saved (docs/speed.md, Zen 4 section)."""
    return (mm or _mm_onednn)(gy, weight.t())


def _weight_grad(gy: torch.Tensor, x: torch.Tensor, mm=None) -> torch.Tensor:
    """gy (M, N)^T @ x (M, K) -> (N, K).  oneDNN takes both operands transposed; the wider
    one goes second (measured, DiT-S shapes at 4096 rows: 10-20% faster for N > K)."""
    mm = mm or _mm_onednn
    if gy.shape[1] < x.shape[1]:
        return mm(gy.t(), x.t())  # (N, M) @ (M, K)
    return mm(x.t(), gy.t()).t().contiguous()  # ((K, M) @ (M, N))^T


def _weight_grad_mm(gy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """gy (M, N)^T @ x (M, K) -> (N, K) on ``torch.mm`` (MKL), transposes read in place."""
    return gy.t() @ x


def _mm_weight_grad() -> bool:
    """Whether the path in force sends weight gradients to ``torch.mm`` (MKL), not oneDNN."""
    return cpu_matmul.path() == "onednn-mm-wgrad"


class _OneDNNLinear(torch.autograd.Function):
    """y = x w^T + b with the forward and the input grad on oneDNN, and the weight grad on
    oneDNN or, on the ``onednn-mm-wgrad`` path, ``torch.mm`` (``_weight_grad_mm``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.mm_wgrad = _mm_weight_grad()  # the path in force at the forward decides
        return _mm_onednn(x, weight, bias)  # (M, N)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        # a mode entered after the forward: torch's ops, in _mm_onednn's a @ b^T convention
        mm = (lambda a, b: a @ b.t()) if watched() else None
        if ctx.needs_input_grad[0]:
            gx = _input_grad(gy, weight, mm=mm)  # (M, K)
        if ctx.needs_input_grad[1]:
            gw = (_weight_grad_mm(gy, x) if ctx.mm_wgrad or mm else
                  _weight_grad(gy, x))  # (N, K)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(0)
        return gx, gw, gb


def _compile_op():
    """The same three matmuls as an opaque custom op, for ``torch.compile``: inductor fuses
    the element-wise work around it and calls oneDNN for the matmuls (it cannot lower
    ``mkldnn._linear_pointwise`` inside an autograd.Function, and its own CPU matmuls are
    MKL's).  Eager mode keeps the autograd.Function: a custom op costs ~5% on tiny models."""
    if not cpu_matmul.onednn_available() or not hasattr(torch.library, "custom_op"):
        return None
    try:
        op = torch.library.custom_op("harness::onednn_linear", _mm_onednn, mutates_args=(),
                                     schema="(Tensor a, Tensor b, Tensor? bias) -> Tensor")
    except RuntimeError as e:  # registered twice (a reloaded module): compile uses F.linear
        import warnings
        warnings.warn(f"harness::onednn_linear not registered ({e}); torch.compile will use "
                      "F.linear for fp32 CPU matmuls")
        return None

    @op.register_fake
    def _(a, b, bias):
        return a.new_empty(a.shape[0], b.shape[0])

    def setup_context(ctx, inputs, output):
        a, b, bias = inputs
        ctx.save_for_backward(a, b)
        ctx.has_bias = bias is not None
        ctx.mm_wgrad = _mm_weight_grad()

    def backward(ctx, gy):
        a, b = ctx.saved_tensors
        gb = gy.sum(0) if ctx.has_bias else None
        mm = lambda p, q: op(p, q, None)  # noqa: E731
        gw = _weight_grad_mm(gy, a) if ctx.mm_wgrad else _weight_grad(gy, a, mm=mm)
        return _input_grad(gy, b, mm=mm), gw, gb

    op.register_autograd(backward, setup_context=setup_context)
    return op


_ONEDNN_OP = _compile_op()


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and cpu_matmul.path() in cpu_matmul.ONEDNN_PATHS
            and min(weight.shape) >= cpu_matmul.ONEDNN_MIN_FEATURES
            and weight.dtype == torch.float32 and x.numel() > 0 and x.dim() >= 2
            and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not _cpu_autocast() and not watched()
            and (_ONEDNN_OP is not None or not torch.compiler.is_compiling()))


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, with fp32 CPU matmuls on oneDNN where that path is in force (see the
    module docstring)."""
    if not _use_onednn(x, weight):
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if torch.compiler.is_compiling():
        y = _ONEDNN_OP(x2, weight, bias)
    elif torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                      or (bias is not None and bias.requires_grad)):
        y = _OneDNNLinear.apply(x2, weight, bias)
    else:
        y = _mm_onednn(x2, weight, bias)
    return y.view(*lead, weight.shape[0])  # (..., N)


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear()`` (fp32 CPU matmuls on the chosen path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# ------------------------------------------------------------ attention

def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """``attention`` written out: two batched matmuls around a softmax.  Faster than the CPU
    flash kernel on short sequences (``harness.metrics.cpu_attention``); a query row whose
    keys are all masked out gets zeros, as in SDPA."""
    s = torch.matmul(q, k.transpose(-2, -1)).mul_(q.shape[-1] ** -0.5)  # (B, H, Lq, Lk)
    if mask is None:
        return torch.matmul(s.softmax(-1), v)
    if mask.dtype != torch.bool:
        return torch.matmul(s.add_(mask).softmax(-1), v)
    p = s.masked_fill_(~mask, float("-inf")).softmax(-1)
    return torch.matmul(p.nan_to_num(0.0), v)  # fully masked rows: NaN -> 0


def _use_matmul_attention(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype == torch.float32
            and k.shape[-2] <= cpu_attention.MATMUL_MAX_KEYS
            and q.numel() // q.shape[-1] >= cpu_attention.MATMUL_MIN_ROWS
            and cpu_attention.path() == "matmul"
            and not torch.jit.is_tracing() and not torch.jit.is_scripting()
            and not torch.compiler.is_compiling() and not _cpu_autocast())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) [+ mask]) v over the last two dims.

    q: (B, H, Lq, D), k/v: (B, H, Lk, D); ``mask`` is boolean (True = attend) or
    additive, broadcastable to (B, H, Lq, Lk).  Short fp32 CPU calls take
    ``matmul_attention`` where ``harness.metrics.cpu_attention``'s path is ``matmul``.
    """
    if _use_matmul_attention(q, k):
        return matmul_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def heads_of(packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, N, P, H, Dh) packed projections (q|k|v, or k|v) -> P views of (B, H, N, Dh).

    The same views as ``packed.permute(2, 0, 3, 1, 4).unbind(0)``, but unbound along P in
    place: the backward then stacks the gradients straight into the projection's layout,
    one pass, where the permuted form stacks them and then copies them back."""
    return tuple(t.transpose(1, 2) for t in packed.unbind(2))


class Attention(nn.Module):
    """Multi-head self-attention, fused qkv projection (as in timm / DiT)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        assert dim % num_heads == 0, "dim must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        q, k, v = heads_of(qkv)  # 3 x (B, H, N, Dh)
        return q, k, v

    def merge_heads(self, o: torch.Tensor) -> torch.Tensor:
        B, H, N, Dh = o.shape
        return self.proj(o.transpose(1, 2).reshape(B, N, H * Dh))  # (B, N, C)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        return self.merge_heads(attention(q, k, v, mask))


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` (queries) to a separate context (keys/values)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = Linear(dim, dim, bias=qkv_bias)
        self.kv = Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        M = context.shape[1]
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
        kv = self.kv(context).reshape(B, M, 2, self.num_heads, self.head_dim)
        k, v = heads_of(kv)  # 2 x (B, H, M, Dh)
        o = attention(q, k, v)  # (B, H, N, Dh)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module] | None = None):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = act() if act is not None else nn.GELU()
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self.act) is TanhGELU:  # fc1's bias goes into the GELU's pass where it can
            return self.fc2(linear_gelu_tanh(x, self.fc1.weight, self.fc1.bias))
        return self.fc2(self.act(self.fc1(x)))


# ------------------------------------------------------------ tanh-GELU

_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def gelu_tanh_formula(x: torch.Tensor) -> torch.Tensor:
    """0.5 x (1 + tanh(k (x + c x^3))), written as x * sigmoid(2k (x + c x^3)): the same
    function ((1 + tanh z) / 2 = sigmoid(2z)), whose sigmoid compiles to a fast exp."""
    return x * torch.sigmoid((2 * _GELU_K) * (x + _GELU_C * x * x * x))


def gelu_tanh_grad_formula(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g * d/dx gelu_tanh(x) = g * (s + x s (1 - s) 2k (1 + 3c x^2)), s = sigmoid(2k (x + c x^3))."""
    s = torch.sigmoid((2 * _GELU_K) * (x + _GELU_C * x * x * x))
    return g * (s + x * s * (1 - s) * (2 * _GELU_K) * (1 + (3 * _GELU_C) * x * x))


_GELU_KERNELS: dict = {}


def gelu_tanh_bias_formula(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(y + bias): a Linear's bias added in the activation's pass (y: (M, N), bias: (N,))."""
    return gelu_tanh_formula(y + bias)


def gelu_tanh_bias_grad_formula(g: torch.Tensor, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """g * gelu_tanh'(y + bias): the gradient with respect to y (and, summed over rows, the bias)."""
    return gelu_tanh_grad_formula(g, y + bias)


_GELU_FORMULAS = {"plain": (gelu_tanh_formula, gelu_tanh_grad_formula),
                  "bias": (gelu_tanh_bias_formula, gelu_tanh_bias_grad_formula)}


def _compiled_pair(key: str, probe):
    """``_GELU_FORMULAS[key]`` compiled by inductor (``dynamic=True``: one compile per process,
    cached on disk by inductor) and kept under ``key``.  At the first call only, ``probe()``
    gives (forward args, backward args) to run each once on, so a failure shows here, not
    mid-backward (every later call is a lookup: it happens at every fused call)."""
    if key not in _GELU_KERNELS:
        fwd, bwd = (torch.compile(f, dynamic=True, fullgraph=True) for f in _GELU_FORMULAS[key])
        fwd_args, bwd_args = probe()
        with torch.no_grad():  # as inside an autograd.Function
            fwd(*fwd_args), bwd(*bwd_args)
        _GELU_KERNELS[key] = (fwd, bwd)
    return _GELU_KERNELS[key]


def _probe_plain():
    x = torch.linspace(-8, 8, cpu_gelu.FUSED_MIN_NUMEL)
    return (x,), (x, x)


def _probe_bias():
    # y is a tensor of its own, as the model's (M, N) rows are: a view of the linspace would
    # get a graph whose guards read its base, and the first real call would recompile
    y, b = torch.linspace(-8, 8, cpu_gelu.FUSED_MIN_NUMEL).reshape(-1, 64).clone(), torch.zeros(64)
    return (y, b), (y, y, b)


def fused_gelu_tanh_kernels():
    """(forward, backward) of the tanh-GELU, one pass each over a flat tensor of any length."""
    return _compiled_pair("plain", _probe_plain)


def fused_gelu_tanh_bias_kernels():
    """(forward, backward) of ``gelu_tanh_bias_formula`` over (M, N) rows and an (N,) bias."""
    return _compiled_pair("bias", _probe_bias)


def _gelu_kernels(key: str):
    """The compiled (forward, backward) under ``key``; the same formulas run eagerly where a
    dispatch mode was entered between a forward and its backward (compiled code refuses
    to run under one)."""
    return _GELU_FORMULAS[key] if watched() else _GELU_KERNELS[key]


# The compiled kernels get plain detached tensors: a Parameter's shape would be compiled in as
# a constant (one recompile per hidden width), and requires_grad is guarded on too.

class _FusedGeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor):
        ctx.save_for_backward(x)
        fwd, _ = _gelu_kernels("plain")
        return fwd(x.detach().reshape(-1)).view(x.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        _, bwd = _gelu_kernels("plain")
        return bwd(g.detach().reshape(-1), x.detach().reshape(-1)).view(x.shape)


class _FusedGeluTanhBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, bias: torch.Tensor):
        ctx.save_for_backward(y, bias)
        fwd, _ = _gelu_kernels("bias")
        return fwd(y.detach(), bias.detach())

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        y, bias = ctx.saved_tensors
        _, bwd = _gelu_kernels("bias")
        gy = bwd(g.detach().reshape(y.shape), y.detach(), bias.detach())
        return gy, (gy.sum(0) if ctx.needs_input_grad[1] else None)


def _use_fused_gelu(x: torch.Tensor, numel: int | None = None) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and (x.numel() if numel is None else numel) >= cpu_gelu.FUSED_MIN_NUMEL
            and cpu_gelu.path() == "fused" and not watched()
            and not torch.jit.is_tracing() and not torch.jit.is_scripting())


def _fused_gelu_ready(kernels=None) -> bool:
    """Compile the fused kernels on first use (``kernels``: the function that does, by default
    ``fused_gelu_tanh_kernels``); if that fails, warn once and take torch's kernel from then
    on (e.g. a C++ toolchain inductor cannot build with)."""
    try:
        (kernels or fused_gelu_tanh_kernels)()
    except Exception as e:
        import warnings
        cpu_gelu.set_path("aten")
        warnings.warn(f"fused tanh-GELU could not be compiled ({type(e).__name__}: {e}); "
                      f"using torch's kernel (set {cpu_gelu.ENV}=aten to skip the attempt)")
        return False
    return True


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")``; large fp32 CPU tensors through one fused pass
    forward and one backward where ``harness.metrics.cpu_gelu``'s path is ``fused`` (torch's
    own CPU kernel evaluates tanh slowly; see that module)."""
    if torch.compiler.is_compiling():
        return gelu_tanh_formula(x)  # inside a compiled model inductor fuses it with the rest
    if not _use_fused_gelu(x) or not _fused_gelu_ready():
        return F.gelu(x, approximate="tanh")
    return _FusedGeluTanh.apply(x)


def bias_in_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``linear_gelu_tanh(x, weight, bias)`` adds the bias inside the fused GELU's
    pass (compiling its kernels on the first True)."""
    rows = x.numel() // max(x.shape[-1], 1)
    return not (bias is None or torch.compiler.is_compiling() or _cpu_autocast()
                or not _use_fused_gelu(x, rows * weight.shape[0])
                or weight.dtype != torch.float32 or bias.dtype != torch.float32
                or _use_onednn(x, weight)
                or not _fused_gelu_ready(fused_gelu_tanh_bias_kernels))


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """``gelu_tanh(linear(x, weight, bias))``: an MLP's first layer and its activation.

    On the fused GELU path, where the Linear is torch's (MKL) GEMM, the GEMM runs without
    its bias (``torch.mm``) and the bias is added inside the GELU's one pass, forward and
    backward (its gradient is the usual sum over rows).  ``addmm`` would first copy the bias
    into every row of its output and then accumulate onto it: one more pass over the
    block's widest activation, which a GEMM of this size does not hide (docs/speed.md).
    oneDNN's Linears add their bias inside the GEMM already, so they keep it."""
    n = weight.shape[0]
    if not bias_in_gelu(x, weight, bias):
        return gelu_tanh(linear(x, weight, bias))
    y = torch.mm(x.reshape(-1, x.shape[-1]), weight.t())  # (M, N), no bias
    return _FusedGeluTanhBias.apply(y, bias).view(*x.shape[:-1], n)


class TanhGELU(nn.GELU):
    """``nn.GELU(approximate="tanh")`` through ``gelu_tanh`` (same module type and repr)."""

    def __init__(self):
        super().__init__(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


def tanh_gelu() -> nn.Module:
    return TanhGELU()


class Block(nn.Module):
    """Pre-norm transformer block; the attention and norm layers are arguments."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 attn_layer: type[nn.Module] = Attention, norm_layer=None, act=None,
                 qkv_bias: bool = True):
        super().__init__()
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads, qkv_bias=qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask) if mask is not None else x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ------------------------------------------------------------ position embeddings

def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim): [sin | cos] with max period 10000 (MAE / DiT)."""
    assert dim % 2 == 0
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None) -> np.ndarray:
    """Fixed 2-D sin-cos embedding, (grid_h * grid_w, dim), half the dims per axis."""
    grid_w = grid_w or grid_h
    gh, gw = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                         np.arange(grid_w, dtype=np.float64), indexing="ij")
    # DiT/MAE order: first half encodes the column (w) index, second half the row (h)
    return np.concatenate([sincos_1d(dim // 2, gw), sincos_1d(dim // 2, gh)], axis=1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) timesteps -> (N, dim) sinusoidal features, [cos | sin] halves (as in DiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) *
                      torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
