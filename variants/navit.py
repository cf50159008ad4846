"""NaViT (Dehghani et al., NeurIPS 2023): a ViT classifier over images at native resolution.

``forward(images)`` takes a list of (C, H, W) images of different sizes and returns logits
(N_images, num_classes).  How the images become one batch is the ablation arm:

    batching = "pack"    NaViT: each image is its own token sequence; sequences are packed
                         (``pack_first_fit`` / ``pack_next_fit``) into rows of at most
                         ``max_seq_len`` tokens; block-diagonal attention (an image attends only
                         to itself) and masked pooling (one vector per image)
               "pad"     each image's sequence padded to the longest in the batch, key-padding mask
               "resize"  standard ViT: every image resized to input_size x input_size

plus factorised x/y position embeddings (``pos_emb``: additive | stacked | multiplicative,
indexed by ``pos_coords``: absolute | fractional), continuous token dropping in training
(``token_drop``: constant | beta | resolution) and resolution sampling (``res_sampling``).

Attention of packs: FlexAttention with a document-id block mask on CUDA; on CPU the
"grouped" path (images of equal token count batched into one SDPA call each, no mask;
nearby counts share a call under a key mask where that is cheaper, ``GROUP_CALL_COST``),
chosen by measurement (see ``CPU_PACK_ATTENTION``).  Padding never changes an image's
output (tested to 1e-5 against the image run alone).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness.data.varres import sample_sizes
from harness.errors import ConfigError
from harness.metrics.speed import check_compile_supported, compiled
from harness.registry import Variant, register

from .common import Attention, Block, Mlp, attention, heads_of

Batching = Literal["pack", "pad", "resize"]
Packing = Literal["first_fit", "next_fit"]
PosEmb = Literal["additive", "stacked", "multiplicative"]
PosCoords = Literal["absolute", "fractional"]
Pooling = Literal["attention", "mean"]
TokenDrop = Literal["none", "constant", "beta", "resolution"]
ResSampling = Literal["native", "random"]
AttnImpl = Literal["auto", "grouped", "loop", "dense_mask", "flex"]

# Pack attention on CPU, chosen by measurement (python -m harness.bench_packing --paths
# --threads 1): navit-ti width 192, depth 4, 64 images of 8-64 px at skew 2, patch 4, packs of
# 256; median ms per train step / inference step, one thread:
#   grouped 438 / 143   dense_mask 487 / 160   loop 525 / 146   (pad: 2592 / 798)
# grouped keeps the attention work at sum(n_i^2) in few calls; dense_mask computes L^2 per
# pack, loop pays one call per image.  With every length distinct, grouped becomes loop,
# less the calls that buckets of nearby lengths save (GROUP_CALL_COST, measured later).
CPU_PACK_ATTENTION = "grouped"


@dataclass
class NaViTConfig:
    # figures a NaViT trial reports besides the task's (study objectives may name them)
    METRICS: ClassVar[tuple[str, ...]] = (
        "padding_fraction", "images_per_pack", "real_tokens", "padded_tokens", "dropped_tokens",
        "tokens_per_real_token", "gflops_useful_fwd", "gflops_wasted_fwd", "wasted_fraction")
    patch_size: int = 4             # p: an H x W image becomes (H/p) * (W/p) tokens
    hidden_size: int = 64           # width d
    depth: int = 4                  # transformer blocks
    num_heads: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    in_channels: int = 1
    input_size: int = 64            # resize target ("resize"); the largest side expected otherwise
    max_seq_len: int = 256          # tokens per pack; >= (input_size / p)^2 so any image fits
    packing: Packing = "first_fit"  # greedy first-fit (NaViT) or next-fit (only the last pack open)
    batching: Batching = "pack"     # the ablation arm: pack | pad | resize
    pos_emb: PosEmb = "additive"    # how the x and y embeddings combine (additive: best in NaViT)
    pos_coords: PosCoords = "absolute"  # patch index, or index / side (transfers across sizes)
    max_grid: int = 16              # learned position slots per axis (fractional: buckets)
    pooling: Pooling = "attention"  # MAP head (learned probe) or masked mean, per image
    token_drop: TokenDrop = "none"  # training only: how each image's drop rate is drawn (mean drop_rate)
    drop_rate: float = 0.0          # mean drop rate r: constant r | Beta with mean r | r * n / mean n
    drop_concentration: float = 4.0  # beta: rates ~ Beta(r k, (1 - r) k), k this (smaller: wider)
    res_sampling: ResSampling = "native"  # training only: keep native size, or resample each image
    res_range: tuple[int, int] = (8, 64)  # random: side of the equal-area square ~ U(lo, hi) pixels
    attn_impl: AttnImpl = "auto"    # pack attention; auto: flex on CUDA, CPU_PACK_ATTENTION on CPU
    # torch.compile the transformer blocks (one block's graph, called for each; tokenizing
    # and packing stay eager): on a GPU a packed step at small width is bound by launching
    # kernels (docs/speed.md, H200), and compiled blocks launch far fewer; FlexAttention is
    # meant to run compiled
    compile_blocks: bool = False

    def validate(self) -> None:
        for k in ("patch_size", "hidden_size", "depth", "num_heads", "num_classes", "in_channels",
                  "input_size", "max_seq_len", "max_grid"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads="
                              f"{self.num_heads}")
        if self.pos_emb == "stacked" and self.hidden_size % 2:
            raise ConfigError(f"pos_emb='stacked' needs an even hidden_size, got {self.hidden_size}")
        if self.input_size % self.patch_size:
            raise ConfigError(f"patch_size={self.patch_size} does not divide input_size="
                              f"{self.input_size}; valid: "
                              f"{[p for p in range(1, self.input_size + 1) if self.input_size % p == 0]}")
        side = self.input_size // self.patch_size
        if self.max_seq_len < side * side:
            raise ConfigError(f"max_seq_len={self.max_seq_len} is shorter than one input_size "
                              f"image ({side}x{side}={side * side} tokens); use >= {side * side}")
        if self.pos_coords == "absolute" and self.max_grid < side:
            raise ConfigError(f"max_grid={self.max_grid} < {side} patches per side of an "
                              f"input_size={self.input_size} image; use max_grid >= {side} or "
                              "pos_coords='fractional'")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ConfigError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.drop_concentration <= 0:
            raise ConfigError(f"drop_concentration must be > 0, got {self.drop_concentration}")
        lo, hi = self.res_range
        if not self.patch_size <= lo <= hi:
            raise ConfigError(f"res_range=({lo}, {hi}) must satisfy patch_size={self.patch_size}"
                              f" <= lo <= hi")
        if self.res_sampling == "random" and self.pos_coords == "absolute" and \
                hi > self.max_grid * self.patch_size:
            raise ConfigError(f"res_range hi={hi} px can exceed max_grid={self.max_grid} absolute "
                              f"position slots (x patch {self.patch_size}); lower it or use "
                              "pos_coords='fractional'")
        if self.compile_blocks:
            check_compile_supported("compile_blocks=true", "set compile_blocks false")
        if self.token_drop == "none" and self.drop_rate:
            raise ConfigError(f"drop_rate={self.drop_rate} with token_drop='none' drops nothing; "
                              "pick token_drop constant | beta | resolution")

    def check_device(self, device: str) -> None:
        """On a CPU, compiled blocks need a C++ compiler (``registry.check_config_device``)."""
        if self.compile_blocks:
            check_compile_supported("compile_blocks=true", "set compile_blocks false", device)


# ------------------------------------------------------------------ core ideas

def pack_first_fit(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Greedy first-fit (NaViT): each sequence, in order, goes into the first pack with room."""
    packs: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        _check_fits(n, max_len)
        for j, r in enumerate(room):
            if n <= r:
                packs[j].append(i)
                room[j] -= n
                break
        else:
            packs.append([i])
            room.append(max_len - n)
    return packs


def pack_next_fit(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Next-fit: only the last pack is open; a sequence that does not fit closes it."""
    packs: list[list[int]] = []
    room = 0
    for i, n in enumerate(lengths):
        _check_fits(n, max_len)
        if not packs or n > room:
            packs.append([])
            room = max_len
        packs[-1].append(i)
        room -= n
    return packs


def _check_fits(n: int, max_len: int) -> None:
    if n > max_len:
        raise ConfigError(f"an image of {n} tokens does not fit in max_seq_len={max_len}; raise "
                          "max_seq_len or cap the image size")


def keep_count(n: int, rate: float) -> int:
    """Tokens kept of ``n`` at drop ``rate``: round((1 - rate) * n), at least 1."""
    return max(1, min(n, int(math.floor((1.0 - rate) * n + 0.5))))


def drop_tokens(tokens: torch.Tensor, rate: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """A random subset of ``keep_count(n, rate)`` rows of ``tokens`` (n, ...), order kept."""
    n = tokens.shape[0]
    keep = torch.randperm(n, generator=generator)[: keep_count(n, rate)].sort().values
    return tokens[keep.to(tokens.device)]


MAX_DROP_RATE = 0.9  # resolution-dependent rates are capped here


def drop_rates(kind: TokenDrop, lengths: Sequence[int], cfg: NaViTConfig,
               generator: torch.Generator | None = None) -> list[float]:
    """One drop rate per image, each distribution with mean ``cfg.drop_rate`` = r.

    constant: r for every image; beta: Beta(r k, (1 - r) k) (NaViT's continuous dropping);
    resolution: r * n / mean(n) over the batch, capped at MAX_DROP_RATE (big images drop more).
    """
    r = cfg.drop_rate
    if kind == "none" or r == 0:
        return [0.0] * len(lengths)
    if kind == "constant":
        return [r] * len(lengths)
    if kind == "beta":  # Beta via numpy, seeded from the torch generator (reproducible)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        k = cfg.drop_concentration
        rates = np.random.default_rng(seed).beta(r * k, (1 - r) * k, size=len(lengths))
        return rates.clip(0.0, 0.99).tolist()
    mean = sum(lengths) / len(lengths)
    return [min(MAX_DROP_RATE, r * n / mean) for n in lengths]


def sample_resolution(height: int, width: int, r_range: tuple[int, int], patch_size: int,
                      generator: torch.Generator | None = None) -> tuple[int, int]:
    """A random resolution with the image's aspect ratio: area r^2, r ~ U(r_range), p-multiples."""
    lo, hi = r_range
    r = lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))
    ratio = math.sqrt(height / width)
    h = max(1, round(r * ratio / patch_size)) * patch_size
    w = max(1, round(r / ratio / patch_size)) * patch_size
    return h, w


def block_diagonal_mask(doc: torch.Tensor) -> torch.Tensor:
    """(B, L) image ids (-1: padding) -> (B, 1, L, L) bool, True where q and k share an id."""
    return doc[:, None, :, None] == doc[:, None, None, :]


def flex_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


_FLEX = None


def _flex_attention(q, k, v, block_mask):
    """Compiled FlexAttention on CUDA; eager elsewhere (CPU: inference only, slow: for checks)."""
    global _FLEX
    from torch.nn.attention.flex_attention import flex_attention
    if q.device.type != "cuda" or torch.compiler.is_compiling():  # (compiled blocks: traced in)
        return flex_attention(q, k, v, block_mask=block_mask)
    if _FLEX is None:
        _FLEX = compiled(flex_attention)  # automatic dynamic shapes: the pack count varies
    return _FLEX(q, k, v, block_mask=block_mask)


# ------------------------------------------------------------------ token layout

@dataclass
class Layout:
    """Which images share a row (a pack, or one image per row) and how long rows are."""
    rows: list[list[int]]           # image indices per row
    lengths: list[int]              # tokens per image (after dropping)
    length: int                     # L: tokens per row

    def runs(self) -> list[list[tuple[int, int]]]:
        """(start, n tokens) of each image in its row, per row."""
        out = []
        for row in self.rows:
            n = [self.lengths[i] for i in row]
            out.append(list(zip(_offsets(n).tolist(), n)))
        return out

    @property
    def real(self) -> int:
        return sum(self.lengths)

    @property
    def padded(self) -> int:
        return len(self.rows) * self.length - self.real

    @property
    def slots(self) -> int:         # K: most images in one row
        return max(len(r) for r in self.rows)


def index_tensor(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 numpy array -> tensor.  ``frombuffer`` (unlike ``from_numpy``) leaves no
    ``aten::lift_fresh`` in traced graphs, which fvcore would list as an unsupported op."""
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size == 0:
        return torch.zeros(arr.shape, dtype=torch.long, device=device)
    return torch.frombuffer(arr, dtype=torch.long).view(arr.shape).to(device)


def patch_layout(shapes: np.ndarray, p: int, max_grid: int, pos_coords: str
                 ) -> tuple[np.ndarray, ...]:
    """Where each patch of a batch of images lies in their pixels laid end to end, and its
    position-embedding slots; per token (T = sum of gh*gw), images in order, patches
    row-major (as ``x.reshape(C, gh, p, gw, p).permute(1, 3, 0, 2, 4)`` orders them):

    run_start     flat index of the patch's first pixel (channel 0, top row)
    run_stride    the image's width W: the next pixel row of the patch is W further
    image_stride  H * W: the next channel is that much further
    ys, xs        slots of the patch in the position embedding (``pos_coords``)

    shapes: (N, 3) ints, each image's (C, H, W) with H and W multiples of p.  ConfigError
    for an image beyond ``max_grid`` absolute slots."""
    C, H, W = shapes[:, 0], shapes[:, 1], shapes[:, 2]
    gh, gw = H // p, W // p
    n = gh * gw
    if pos_coords == "absolute" and len(n) and max(gh.max(), gw.max()) > max_grid:
        i = int(np.argmax(np.maximum(gh, gw)))
        raise ConfigError(
            f"an image of {gh[i]}x{gw[i]} patches is beyond max_grid={max_grid} absolute position "
            f"slots per axis; use pos_coords='fractional' (any size), raise max_grid,"
            f" or cap the image size at {max_grid * p} px")
    img = np.repeat(np.arange(len(n)), n)                        # (T,) image of each token
    within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    gy, gx = within // gw[img], within % gw[img]
    start = (np.cumsum(C * H * W) - C * H * W)[img]              # the image's first pixel
    run_start = start + gy * p * W[img] + gx * p
    if pos_coords == "absolute":
        ys, xs = gy, gx
    else:  # fractional: the patch centre's position in [0, 1), bucketed into max_grid slots
        ys = (2 * gy + 1) * max_grid // (2 * gh[img])
        xs = (2 * gx + 1) * max_grid // (2 * gw[img])
    return run_start, W[img], (H * W)[img], ys, xs


def _offsets(lengths: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)


def row_indices(layout: Layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (B, L) row layout as index tensors.

    src (B*L,): flat token feeding each slot (T: the zero padding row); doc (B, L): slot of
    the image within its row, -1 for padding; image_slot (N,): row * K + slot of each image.
    """
    lengths, L, k = layout.lengths, layout.length, layout.slots
    offsets = _offsets(lengths)
    starts, counts, slot_ids = [], [], []
    image_slot = np.zeros(len(lengths), np.int64)
    for b, row in enumerate(layout.rows):
        used = 0
        for s, i in enumerate(row):
            starts.append(offsets[i])
            counts.append(lengths[i])
            slot_ids.append(s)
            image_slot[i] = b * k + s
            used += lengths[i]
        if L > used:
            starts.append(-1)
            counts.append(L - used)
            slot_ids.append(-1)
    counts = np.asarray(counts, np.int64)
    within = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    start = np.repeat(np.asarray(starts, np.int64), counts)
    src = np.where(start >= 0, start + within, layout.real)
    doc = np.repeat(np.asarray(slot_ids, np.int64), counts).reshape(len(layout.rows), L)
    return index_tensor(src, device), index_tensor(doc, device), index_tensor(image_slot, device)


@dataclass
class AttnContext:
    """How every block attends, built once per forward."""
    path: str                       # sdpa | sdpa_key_padding | dense_mask | loop | flex | grouped
    mask: torch.Tensor | None = None            # boolean, broadcastable to (B, H, L, L)
    segments: list[list[tuple[int, int]]] = field(default_factory=list)  # loop: (start, n) per row
    block_mask: object = None                   # flex: BlockMask from document ids
    buckets: list["Bucket"] = field(default_factory=list)  # grouped: one SDPA call each
    tail: int = 0                               # grouped: padding rows after the real tokens


FLEX_BLOCK = 128  # FlexAttention's default sparse block (query and key)


def block_sparsity(layout: Layout, block: int = FLEX_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Which (query block, key block) tiles of each row hold some / only same-image pairs.

    Each row is its images' runs of tokens, then the padding run (doc -1, which matches only
    itself, as in the mask); positions past the row, up to a whole block, match nothing.
    Returns (partial, full), bool (B, nb, nb): full where all block x block pairs match,
    partial where some but not all do -- what ``create_block_mask`` finds by evaluating the
    mask over all B x L x L pairs, here from the runs' overlaps with the blocks."""
    L = layout.length
    nb = -(-L // block)
    runs = [[s + n for s, n in row] + [L] for row in layout.runs()]  # run ends, padding last
    S = max(len(r) for r in runs)
    end = np.array([r + [L] * (S - len(r)) for r in runs], np.int64)  # (empty runs at L)
    start = np.concatenate([np.zeros((len(runs), 1), np.int64), end[:, :-1]], axis=1)
    lo = np.arange(nb, dtype=np.int64) * block
    overlap = np.clip(np.minimum(end[..., None], lo + block) - np.maximum(start[..., None], lo),
                      0, None)  # (B, S, nb): tokens of run s in block j
    pairs = np.einsum("bsi,bsj->bij", overlap, overlap)  # matching pairs per tile
    full = pairs == block * block
    return (pairs > 0) & ~full, full


def flex_block_mask(layout: Layout, doc: torch.Tensor, block: int = FLEX_BLOCK):
    """FlexAttention's BlockMask for the packs, built on the host from the layout.

    The same tensors as ``create_block_mask(same_image, B, None, L, L)`` (a test compares
    them), without evaluating the mask on the device: that is dozens of small kernels and
    about 6 ms of host time per forward (measured on the meta device), and a packed step on
    a GPU is bound by its host (docs/speed.md). Here: numpy, one copy to the device, views.
    A torch whose BlockMask takes other arguments gets ``create_block_mask``."""
    from torch.nn.attention.flex_attention import BlockMask
    B, L = (int(s) for s in doc.shape)
    partial, full = block_sparsity(layout, block)
    parts = []
    for m in (partial, full, partial.transpose(0, 2, 1), full.transpose(0, 2, 1)):
        parts += [m.sum(-1), np.argsort(~m, axis=-1, kind="stable")]  # counts, then indices
    flat = torch.from_numpy(np.concatenate([a.reshape(-1) for a in parts]).astype(np.int32))
    flat = flat.to(doc.device)
    views, pos = [], 0
    for a in parts:
        views.append(flat[pos: pos + a.size].view(B, 1, *a.shape[1:]))
        pos += a.size
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
             "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
    try:
        return BlockMask(seq_lengths=(L, L), **dict(zip(names, views)), BLOCK_SIZE=(block, block),
                         mask_mod=same_image_mod(doc))
    except TypeError:
        return create_flex_block_mask(doc, block)


def same_image_mod(doc: torch.Tensor):
    """FlexAttention's mask_mod for the packs: a query sees the keys of its own image."""
    def same_image(b, h, q_idx, kv_idx):
        return doc[b, q_idx] == doc[b, kv_idx]
    return same_image


def create_flex_block_mask(doc: torch.Tensor, block: int = FLEX_BLOCK):
    """The packs' BlockMask from torch's ``create_block_mask``: the mask evaluated over all
    B x L x L pairs on doc's device (what ``flex_block_mask`` derives on the host)."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, L = (int(s) for s in doc.shape)
    return create_block_mask(same_image_mod(doc), B, None, L, L, device=doc.device, BLOCK_SIZE=block)


def row_context(layout: Layout, doc: torch.Tensor, path: str) -> AttnContext:
    """Attention over the (B, L) row layout: key padding, dense block mask, loop or flex."""
    if path == "key_padding":
        if not layout.padded:
            return AttnContext("sdpa")
        return AttnContext("sdpa_key_padding", mask=(doc >= 0)[:, None, None, :])  # (B, 1, 1, L)
    if path == "dense_mask":
        return AttnContext(path, mask=block_diagonal_mask(doc))  # (B, 1, L, L)
    if path == "flex":
        return AttnContext(path, block_mask=flex_block_mask(layout, doc))
    return AttnContext("loop", segments=layout.runs())


def grouped_order(lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Images sorted by token count: the token permutation, each image's rank, the groups.

    perm (T,): flat token index in sorted order; rank (N,): position of image i in the sorted
    order; groups: (n tokens, m images) of each run of equal length.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # stable: ties keep order
    counts = np.asarray([lengths[i] for i in order], np.int64)
    starts = _offsets(lengths)[order]
    perm = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    groups: list[tuple[int, int]] = []
    for n in counts.tolist():
        if groups and groups[-1][0] == n:
            groups[-1] = (n, groups[-1][1] + 1)
        else:
            groups.append((n, 1))
    return perm, rank, groups


# Grouped attention's fixed cost of one SDPA call (forward + backward, with the views and
# autograd nodes around it) in units of attention work per image, n^2 for an n-token image.
# Runs of nearby lengths share one call, padded to the longest with a key mask, when the
# padding costs less than the call it saves (``bucket_runs``); 0 keeps one call per length.
# Measured on a 2-core AMD EPYC Zen 3, the vit-pytorch comparison's NaViT (width 192, depth
# 12, 64 images of 8-64 px at skew 2, 31 distinct lengths), costs alternated per step in one
# process (a one-off script): 2048 makes 31 calls 12 and was 1.02x (24 rounds) and 1.04x
# (14 rounds) faster than 0 for a train / inference step; 1024 and 4096 were within noise of
# it; 65536 (4 calls) was slower (0.97x train).  ``python -m harness.bench_packing --depth 12
# --call-costs 0 1024 2048 4096 16384`` re-measures it (docs/speed.md has the Zen 4 run).
GROUP_CALL_COST = 2048


@dataclass
class Bucket:
    """Consecutive runs of the length-sorted token rows attended in one SDPA call: m images
    padded to n tokens.  ``rows`` real token rows in; one run needs no gather."""
    rows: int
    n: int
    m: int
    gather: torch.Tensor | None = None   # (m*n,) row of the bucket's slice for each slot
    scatter: torch.Tensor | None = None  # (rows,) slot of each real row
    mask: torch.Tensor | None = None     # (m, 1, 1, n) bool: True where the key is real


def bucket_runs(groups: Sequence[tuple[int, int]], call_cost: float) -> list[list[tuple[int, int]]]:
    """Greedy merge of length-sorted runs (n tokens, m images): the next run joins the open
    bucket when padding the bucket's images up to its length costs less attention work
    (m_bucket * (n_next^2 - n_max^2)) than the ``call_cost`` of a separate call."""
    out: list[list[tuple[int, int]]] = []
    m_open = 0
    for n, m in groups:
        if out and m_open * (n * n - out[-1][-1][0] ** 2) < call_cost:
            out[-1].append((n, m))
            m_open += m
        else:
            out.append([(n, m)])
            m_open = m
    return out


def make_buckets(groups: Sequence[tuple[int, int]], call_cost: float,
                 device: torch.device) -> list[Bucket]:
    """The SDPA calls of the grouped path, with the index tensors each merged bucket needs
    (built once per forward, shared by every block)."""
    out = []
    for runs in bucket_runs(groups, call_cost):
        n_max, m_all = runs[-1][0], sum(m for _, m in runs)
        rows = sum(n * m for n, m in runs)
        if len(runs) == 1:
            out.append(Bucket(rows, n_max, m_all))
            continue
        lengths = np.repeat([n for n, _ in runs], [m for _, m in runs])  # (m_all,)
        slot = np.arange(n_max)[None, :]                                  # (1, n_max)
        real = slot < lengths[:, None]                                    # (m_all, n_max)
        first = _offsets(lengths)[:, None]                                # first row per image
        gather = np.where(real, first + slot, 0)  # padding slots read row 0: masked as keys,
        scatter = np.flatnonzero(real)            # dropped as queries
        out.append(Bucket(rows, n_max, m_all, index_tensor(gather.reshape(-1), device),
                          index_tensor(scatter, device),
                          torch.from_numpy(real).to(device)[:, None, None, :]))
    return out


# ------------------------------------------------------------------ layers

class PackedAttention(Attention):
    """Self-attention where an image attends only to itself, as ``ctx`` says."""

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        if ctx.path == "grouped":
            return self.proj(self.grouped(x, ctx))
        if ctx.path == "loop":
            return self.proj(self.loop(x, ctx))
        q, k, v = self.split_heads(x)  # 3 x (B, H, L, Dh)
        if ctx.path == "flex":
            o = _flex_attention(q, k, v, ctx.block_mask)
        else:
            o = attention(q, k, v, ctx.mask)  # (B, H, L, Dh)
        return self.merge_heads(o)

    def grouped(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """x: (1, R, C) token rows sorted by image length, padding rows last.  Each run of
        images with n tokens is a contiguous (m*n) slice: one unmasked SDPA call per run, or
        per bucket of nearby runs, gathered to the bucket's length under a key mask."""
        C = int(x.shape[-1])
        H, Dh = self.num_heads, self.head_dim
        sizes = [b.rows for b in ctx.buckets] + ([ctx.tail] if ctx.tail else [])
        parts = self.qkv(x[0]).split(sizes)  # (rows, 3C) per bucket
        outs = []
        for b, g in zip(ctx.buckets, parts):
            if b.gather is not None:
                g = g.index_select(0, b.gather)  # (m*n, 3C)
            q, k, v = heads_of(g.view(b.m, b.n, 3, H, Dh))  # 3 x (m, H, n, Dh)
            o = attention(q, k, v, b.mask).transpose(1, 2).reshape(b.m * b.n, C)  # (m*n, C)
            outs.append(o if b.scatter is None else o.index_select(0, b.scatter))  # (rows, C)
        if ctx.tail:
            outs.append(x.new_zeros(ctx.tail, C))  # padding rows attend to nothing
        return torch.cat(outs)[None]  # (1, R, C)

    def loop(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        B, L, C = (int(s) for s in x.shape)
        q, k, v = self.split_heads(x)  # 3 x (B, H, L, Dh)
        rows = []
        for b, segs in enumerate(ctx.segments):
            parts = [attention(q[b:b + 1, :, s:s + n], k[b:b + 1, :, s:s + n], v[b:b + 1, :, s:s + n])
                     for s, n in segs]  # each (1, H, n, Dh)
            used = sum(n for _, n in segs)
            if used < L:
                parts.append(q.new_zeros(1, self.num_heads, L - used, self.head_dim))
            rows.append(torch.cat(parts, dim=2))
        o = torch.cat(rows)  # (B, H, L, Dh)
        return o.transpose(1, 2).reshape(B, L, C)


class FactorisedPosEmb(nn.Module):
    """Learned x and y embeddings, combined by addition, stacking or multiplication."""

    def __init__(self, dim: int, max_grid: int, kind: PosEmb):
        super().__init__()
        self.kind = kind
        d = dim // 2 if kind == "stacked" else dim
        self.pos_y = nn.Parameter(torch.zeros(max_grid, d))
        self.pos_x = nn.Parameter(torch.zeros(max_grid, d))

    def forward(self, yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        ey, ex = F.embedding(yi, self.pos_y), F.embedding(xi, self.pos_x)  # (T, d)
        if self.kind == "additive":
            return ey + ex
        if self.kind == "stacked":
            return torch.cat([ey, ex], dim=-1)
        return ey * ex


class PoolHead(nn.Module):
    """One vector per image from its own tokens only: MAP (learned probe) or masked mean."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, kind: Pooling):
        super().__init__()
        self.kind, self.num_heads = kind, num_heads
        if kind == "attention":  # big_vision MAPHead: probe attends, then a residual MLP
            self.probe = nn.Parameter(torch.zeros(1, 1, dim))
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
            self.proj = nn.Linear(dim, dim)
            self.norm = nn.LayerNorm(dim, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, member: torch.Tensor | None) -> torch.Tensor:
        """x: (B, L, D); member: (B, K, L) bool, True where token l belongs to slot k."""
        B, L, D = x.shape
        K = 1 if member is None else member.shape[1]
        if self.kind == "mean":
            if member is None:
                return x.mean(1, keepdim=True)  # (B, 1, D)
            w = member.to(x.dtype)
            w = w / w.sum(-1, keepdim=True).clamp(min=1)  # (B, K, L)
            return torch.einsum("bkl,bld->bkd", w, x)  # (B, K, D)
        H, Dh = self.num_heads, D // self.num_heads
        q = self.q(self.probe).view(1, H, 1, Dh).expand(B, H, K, Dh)  # (B, H, K, Dh)
        k, v = heads_of(self.kv(x).view(B, L, 2, H, Dh))  # 2 x (B, H, L, Dh)
        mask = None
        if member is not None:  # empty slots (a row with fewer images) attend everywhere, unused
            mask = torch.logical_or(member, ~member.any(-1, keepdim=True))[:, None]  # (B, 1, K, L)
        o = self.proj(attention(q, k, v, mask).transpose(1, 2).reshape(B, K, D))  # (B, K, D)
        return o + self.mlp(self.norm(o))

    def grouped(self, x: torch.Tensor, groups: list[tuple[int, int]]) -> torch.Tensor:
        """x: (R, D) rows sorted by image length, padding last -> (N, D) in that image order."""
        D = int(x.shape[-1])
        sizes = [n * m for n, m in groups]
        x = x[: sum(sizes)]  # (T, D) without the padding rows
        if self.kind == "mean":
            return torch.cat([g.view(m, n, D).mean(1) for (n, m), g in zip(groups, x.split(sizes))])
        H, Dh = self.num_heads, D // self.num_heads
        q = self.q(self.probe).view(1, H, 1, Dh)
        outs = []
        for (n, m), g in zip(groups, self.kv(x).split(sizes)):
            k, v = heads_of(g.view(m, n, 2, H, Dh))  # 2 x (m, H, n, Dh)
            outs.append(attention(q.expand(m, H, 1, Dh), k, v).reshape(m, D))  # (m, D)
        o = self.proj(torch.cat(outs))  # (N, D)
        return o + self.mlp(self.norm(o))


# ------------------------------------------------------------------ the model

class NaViT(Variant):
    """forward(list of (C, H, W) images) -> logits (N, num_classes)."""

    def __init__(self, cfg: NaViTConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = nn.Linear(cfg.in_channels * p * p, d)  # flattened patch -> token
        self.pos_embed = FactorisedPosEmb(d, cfg.max_grid, cfg.pos_emb)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio, attn_layer=PackedAttention)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.pool = PoolHead(d, cfg.num_heads, cfg.mlp_ratio, cfg.pooling)
        self.head = nn.Linear(d, cfg.num_classes)
        self._stats = defaultdict(int)
        self._last_tokens: list[int] | None = None
        self._compiled_block = None     # compile_blocks: torch.compile(_block_step), made once
        # the grouped path's call cost for this instance (None: GROUP_CALL_COST); a speed
        # knob with no effect on the outputs (``harness.bench_packing --call-costs`` sets it)
        self.group_call_cost: float | None = None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Every initialisation in one place (timm / big_vision ViT)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):  # the patch embedding too: it is a Linear
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        pe = self.pos_embed
        if self.cfg.pos_emb == "multiplicative":
            # 1 + N(0, .02): the product starts as a constant plus (about) the additive embedding,
            # so x and y slots learn as fast as additive ones (N(0, .02) each would give .0004)
            nn.init.normal_(pe.pos_y, mean=1.0, std=0.02)
            nn.init.normal_(pe.pos_x, mean=1.0, std=0.02)
        else:
            nn.init.normal_(pe.pos_y, std=0.02)
            nn.init.normal_(pe.pos_x, std=0.02)
        if self.cfg.pooling == "attention":
            nn.init.normal_(self.pool.probe, std=0.02)
        nn.init.zeros_(self.head.weight)  # zero head: every class equally likely at the start

    # ------------------------------------------------------------ images -> tokens
    def attn_path(self, device: torch.device | None = None) -> str:
        """The attention implementation this model uses on ``device`` (for tags)."""
        if self.cfg.batching != "pack":
            return "key_padding"
        if self.cfg.attn_impl != "auto":
            return self.cfg.attn_impl
        device = device or next(self.parameters()).device
        return "flex" if flex_available(device) else CPU_PACK_ATTENTION

    def preprocess(self, images: Sequence[torch.Tensor],
                   generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Resize (resize arm / resolution sampling), then crop each side to a multiple of p."""
        cfg, p = self.cfg, self.cfg.patch_size
        out = []
        for x in images:
            if x.dim() != 3 or x.shape[0] != cfg.in_channels:
                raise ConfigError(f"NaViT expects (C={cfg.in_channels}, H, W) images, got "
                                  f"{tuple(x.shape)}")
            h, w = int(x.shape[-2]), int(x.shape[-1])  # ints, also while tracing
            if cfg.batching == "resize":
                h = w = cfg.input_size
            elif self.training and cfg.res_sampling == "random":
                h, w = sample_resolution(h, w, cfg.res_range, p, generator)
            elif h < p or w < p:
                h, w = max(h, p), max(w, p)
            if (h, w) != (int(x.shape[-2]), int(x.shape[-1])):
                shrink = h < int(x.shape[-2]) or w < int(x.shape[-1])
                x = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False,
                                  antialias=shrink)[0]
            if h % p or w % p:  # centre crop to whole patches
                dh, dw = (h % p) // 2, (w % p) // 2
                x = x[:, dh: dh + h - h % p, dw: dw + w - w % p]
            out.append(x)
        return out

    def coords(self, gh: int, gw: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Position-embedding slots (y, x) of a gh x gw patch grid, row-major."""
        _, _, _, y, x = patch_layout(np.array([[1, gh, gw]]), 1, self.cfg.max_grid,
                                     self.cfg.pos_coords)
        return index_tensor(y, device), index_tensor(x, device)

    def tokenize(self, images: Sequence[torch.Tensor], generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, list[int], list[int]]:
        """Images -> flat tokens (T, D) with position embeddings, tokens per image before and
        after dropping (dropping only in training)."""
        cfg, p = self.cfg, self.cfg.patch_size
        images = self.preprocess(images, generator)
        shapes = np.array([[int(s) for s in x.shape] for x in images], np.int64)  # ints, also while tracing
        C, device = int(shapes[0, 0]), images[0].device
        # every image's pixels in one flat buffer, then each patch row (p pixels) gathered from
        # it in one call: a fixed handful of kernels per batch, not a copy per image (on a GPU
        # the per-image launches cost more than a packed step's compute)
        layout = np.stack(patch_layout(shapes, p, cfg.max_grid, cfg.pos_coords))  # (5, T)
        run_start, run_stride, image_stride, ys, xs = index_tensor(layout, device).unbind(0)  # one copy
        chan = torch.arange(C, device=device).repeat_interleave(p)  # (C*p,) channel of each patch row
        prow = torch.arange(p, device=device).repeat(C)              # (C*p,) row within the patch
        rows = run_start[:, None] + image_stride[:, None] * chan + run_stride[:, None] * prow  # (T, C*p)
        flat = torch.cat([x.reshape(-1) for x in images])
        patches = flat.unfold(0, p, 1).index_select(0, rows.reshape(-1))  # (T*C*p, p)
        tok = self.patch_embed(patches.reshape(-1, C * p * p))  # (T, D)
        tok = tok + self.pos_embed(ys, xs)  # (T, D)
        native = ((shapes[:, 1] // p) * (shapes[:, 2] // p)).tolist()
        lengths = list(native)
        if self.training and cfg.token_drop != "none":
            rates = drop_rates(cfg.token_drop, native, cfg, generator)
            keep, off = [], 0
            for i, (n, r) in enumerate(zip(native, rates)):
                keep.append(drop_tokens(torch.arange(off, off + n), r, generator))
                lengths[i] = int(keep[-1].numel())
                off += n
            tok = tok.index_select(0, torch.cat(keep).to(tok.device))  # (T_kept, D)
        return tok, lengths, native

    def layout(self, lengths: list[int], path: str) -> Layout:
        """Rows of the batch: packs (pack) or one image per row (pad, resize)."""
        cfg = self.cfg
        if cfg.batching != "pack":
            return Layout([[i] for i in range(len(lengths))], list(lengths), max(lengths))
        pack = pack_first_fit if cfg.packing == "first_fit" else pack_next_fit
        rows = pack(lengths, cfg.max_seq_len)
        # flex keeps a static length (compiled kernels); eager paths trim to the fullest pack,
        # which removes nothing but padding
        length = cfg.max_seq_len if path == "flex" else max(sum(lengths[i] for i in r) for r in rows)
        return Layout(rows, list(lengths), length)

    # ------------------------------------------------------------------ forward
    def forward_features(self, images: Sequence[torch.Tensor],
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """Pooled per-image features (N, D), each from the image's own tokens only."""
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            images = list(images.unbind(0))
        if len(images) == 0:
            raise ConfigError("NaViT got an empty list of images")
        tok, lengths, native = self.tokenize(images, generator)  # (T, D)
        device, D = tok.device, int(tok.shape[-1])
        path = self.attn_path(device)
        if path == "flex" and torch.jit.is_tracing():
            path = "grouped"  # FLOP counting traces: the same block-diagonal work, traceable
        lay = self.layout(lengths, path)
        self._record(lay, native)
        if path == "grouped":
            # the packs' token rows, stored sorted by image length (token-wise layers do not
            # care about row order) with the packs' padding rows last: each image's attention
            # block is then a contiguous slice, and equal-length images share one SDPA call
            perm, rank, groups = grouped_order(lengths)
            x = tok.index_select(0, index_tensor(perm, device))  # (T, D)
            x = torch.cat([x, x.new_zeros(lay.padded, D)])[None]  # (1, B*L, D)
            # FLOP counting traces one call per length: the model's work, without bucket padding
            cost = (0 if torch.jit.is_tracing() else
                    GROUP_CALL_COST if self.group_call_cost is None else self.group_call_cost)
            ctx = AttnContext("grouped", buckets=make_buckets(groups, cost, device), tail=lay.padded)
            self._stats["grouped_forwards"] += 1
            self._stats["attn_calls"] += len(ctx.buckets)
            x = self.run_blocks(x, ctx)  # (1, B*L, D)
            pooled = self.pool.grouped(self.norm(x[0]), groups)  # (N, D), sorted order
            return pooled.index_select(0, index_tensor(rank, device))  # (N, D)
        src, doc, image_slot = row_indices(lay, device)
        B, L = len(lay.rows), lay.length
        x = torch.cat([tok, tok.new_zeros(1, D)]).index_select(0, src).view(B, L, D)  # (B, L, D)
        ctx = row_context(lay, doc, "key_padding" if self.cfg.batching != "pack" else path)
        x = self.run_blocks(x, ctx)  # (B, L, D)
        x = self.norm(x)
        member = None
        if lay.slots > 1 or lay.padded:
            member = doc[:, None, :] == torch.arange(lay.slots, device=device)[None, :, None]  # (B, K, L)
        pooled = self.pool(x, member)  # (B, K, D)
        return pooled.reshape(B * lay.slots, D).index_select(0, image_slot)  # (N, D)

    def forward(self, images: Sequence[torch.Tensor],
                generator: torch.Generator | None = None) -> torch.Tensor:
        return self.head(self.forward_features(images, generator))  # (N, classes)

    def _blocks(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, ctx)
        return x

    def run_blocks(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        """The transformer blocks; with ``compile_blocks``, each block runs through one
        compiled function (``_block_step``); eager while FLOP counting traces the model."""
        if not self.cfg.compile_blocks or torch.jit.is_tracing():
            return self._blocks(x, ctx)
        if self._compiled_block is None:
            self._compiled_block = compiled(_block_step)  # compiled or an error, never eager
        step = self._compiled_block
        if x._base is not None:
            # a view (the packs' rows are one view of the gathered tokens) makes dynamo guard
            # on its base's size once the row count goes dynamic, a guard the next block's
            # input (no view) fails: a second graph for every shape.  One copy makes every
            # block's input alike, so one graph serves them all
            x = x.clone()
        for block in self.blocks:
            x = step(block, x, ctx)
        return x

    # ---------------------------------------------------------- Variant protocol
    def _record(self, lay: Layout, native: list[int]) -> None:
        s = self._stats
        s["images"] += len(lay.lengths)
        s["rows"] += len(lay.rows)
        s["real"] += lay.real
        s["padded"] += lay.padded
        s["dropped"] += sum(native) - lay.real

    FLOPS_BATCH = 32  # images per batch when counting FLOPs, so padding shows up as waste

    def flops(self) -> dict:
        """Per image, over a batch of the example distribution: useful vs wasted on padding."""
        images = self.example_inputs(self.FLOPS_BATCH, generator=torch.Generator().manual_seed(0))[0]
        out = flops_split(self, images)
        params = sum(p.numel() for p in self.parameters())
        return {"params": params, "params_m": params / 1e6, **out}

    def extra_metrics(self) -> dict[str, float]:
        """Since the last call (then reset): padding and packing figures of every forward."""
        s, self._stats = self._stats, defaultdict(int)
        if not s["images"]:
            return {}
        return {"padding_fraction": s["padded"] / (s["real"] + s["padded"]),
                "images_per_pack": s["images"] / s["rows"],
                "real_tokens": float(s["real"]), "padded_tokens": float(s["padded"]),
                "dropped_tokens": float(s["dropped"]),
                # tokens computed per real one: for the pad arm, the speedup a perfect
                # packer would reach if cost were proportional to tokens (the ideal)
                "tokens_per_real_token": (s["real"] + s["padded"]) / max(s["real"], 1),
                # the grouped path's attention calls per block (nearby lengths share one)
                **({"attn_calls_per_block": s["attn_calls"] / s["grouped_forwards"]}
                   if s["grouped_forwards"] else {})}

    def tags(self) -> dict[str, str]:
        c = self.cfg
        path = {"pack": self.attn_path(), "pad": "sdpa_key_padding", "resize": "sdpa"}[c.batching]
        return {"attn_path": path, "batching": c.batching, "packing": c.packing,
                "pos_emb": c.pos_emb, "pos_coords": c.pos_coords, "pooling": c.pooling,
                "token_drop": c.token_drop, "compile_blocks": str(c.compile_blocks).lower()}

    def example_sizes(self, n: int, generator: torch.Generator | None = None) -> list[tuple[int, int]]:
        """A NaViT-like resolution distribution: sides p-multiples up to input_size, skewed small."""
        p, top = self.cfg.patch_size, self.cfg.input_size
        lo = min(top, -(-8 // p) * p)
        return sample_sizes(n, lo, top, p, skew=2.0, max_aspect=2.0, generator=generator)

    def example_inputs(self, batch_size, device="cpu", generator=None):
        sizes = self.example_sizes(batch_size, generator)
        images = [torch.rand(self.cfg.in_channels, h, w, generator=generator).to(device)
                  for h, w in sizes]
        self._last_tokens = [self._tokens_of(h, w) for h, w in sizes]
        return (images,)

    def _tokens_of(self, h: int, w: int) -> int:
        p = self.cfg.patch_size
        if self.cfg.batching == "resize":
            return (self.cfg.input_size // p) ** 2
        return max(1, h // p) * max(1, w // p)

    def tokens_per_sample(self) -> int:
        """Mean real tokens per image of the last example batch (else of the distribution)."""
        tokens = self._last_tokens
        if not tokens:
            tokens = [self._tokens_of(h, w)
                      for h, w in self.example_sizes(1024, torch.Generator().manual_seed(0))]
        return int(round(sum(tokens) / len(tokens)))


# ------------------------------------------------------------------ compiled blocks

def _block_step(block: nn.Module, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """One transformer block, the unit ``compile_blocks`` compiles (``speed.compiled``: a
    full graph or an error).  Compiling one block and calling it for each of the ``depth``
    blocks (regional compilation) gives the graph the whole stack would, cut at the block
    boundaries: dynamo guards on the block's structure, not on which block it is (its
    weights are graph inputs), so the first block's graph serves every block, and dynamo's
    cache of graphs per code object serves every model of the process.  It traces and
    lowers one block instead of the stack: on the 2-core Xeon, NaViT-Ti (depth 12, dense
    block mask) took 16.4 s to its first training step and 2.2 s to its first forward,
    against 29.2 s and 8.4 s with the stack compiled, for a steady step 0-3% slower
    (``python scripts/compile_time.py``; docs/speed.md)."""
    return block(x, ctx)


# ------------------------------------------------------------------ FLOPs split

def flops_split(model: NaViT, images: Sequence[torch.Tensor]) -> dict:
    """Forward FLOPs of one batch, split into useful (each image run alone) and wasted on padding.

    Per image, in the harness convention (fvcore MACs, attention included).  Wasted = the
    batch's FLOPs minus the sum of every image's FLOPs alone: padding tokens in the token-wise
    layers, attention to or from them, and masked-out attention a dense mask still computes.
    """
    from harness.metrics.flops import count_flops

    total = count_flops(model, (list(images),))
    alone: dict[tuple[int, ...], float] = {}
    useful = 0.0
    for x in images:
        key = tuple(x.shape)
        if key not in alone:
            alone[key] = count_flops(model, ([x],))["gflops_fwd"]
        useful += alone[key]
    n = len(images)
    # >= 0: the MAP probe's projection is computed once per batch but counted once per image alone
    wasted = max(0.0, total["gflops_fwd"] - useful)
    return {"gflops_fwd": total["gflops_fwd"] / n, "gflops_attn_fwd": total["gflops_attn_fwd"] / n,
            "gflops_useful_fwd": useful / n, "gflops_wasted_fwd": wasted / n,
            "wasted_fraction": wasted / total["gflops_fwd"] if total["gflops_fwd"] else 0.0}


# ------------------------------------------------------------------ the zoo
# (layers, width, heads): ViT-Ti / S / B
NAVIT_SIZES = {"ti": (12, 192, 3), "s": (12, 384, 6), "b": (12, 768, 12)}


def _register_navit(size: str) -> None:
    depth, width, heads = NAVIT_SIZES[size]

    @register(f"navit-{size}", family="navit", config=NaViTConfig, depth=depth,
              hidden_size=width, num_heads=heads,
              test_overrides={"depth": 2, "hidden_size": 32, "num_heads": 2, "input_size": 16,
                              "max_seq_len": 64, "max_grid": 4, "res_range": [4, 16]})
    def make(cfg: NaViTConfig) -> NaViT:
        return NaViT(cfg)

    make.__doc__ = (f"NaViT-{size.upper()}: {depth} layers, width {width}, {heads} heads; "
                    "packs native-resolution images")


for _size in NAVIT_SIZES:
    _register_navit(_size)
