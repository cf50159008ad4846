"""NaViT: packing is exact (each image as if alone), packs are tight, dropping keeps the
intended counts, fractional positions transfer, FLOPs count attention and padding."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import registry
from harness.data.varres import sample_sizes
from harness.errors import ConfigError
from harness.metrics.flops import count_flops, flops_of
from variants.navit import (CPU_PACK_ATTENTION, MAX_DROP_RATE, NaViT, drop_rates, drop_tokens,
                            flops_split, keep_count, pack_first_fit, pack_next_fit,
                            sample_resolution)

from .conftest import needs_compile

SMALL = {"depth": 2, "hidden_size": 32, "num_heads": 2, "patch_size": 4, "input_size": 32,
         "max_seq_len": 128, "max_grid": 8, "res_range": (8, 32)}


def build(**overrides) -> NaViT:
    model, _ = registry.build("navit-ti", {**SMALL, **overrides}, seed=0)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # the zero-init head would hide differences
    return model


def images(n: int, seed: int = 0, model: NaViT | None = None) -> list[torch.Tensor]:
    model = model or build()
    (imgs,) = model.example_inputs(n, generator=torch.Generator().manual_seed(seed))
    return imgs


def lengths_of(sizes, p=4):
    return [(h // p) * (w // p) for h, w in sizes]


# ------------------------------------------------------------ exactness of packing

@pytest.mark.parametrize("batching,impl,pooling", [
    ("pack", "grouped", "attention"), ("pack", "grouped", "mean"), ("pack", "loop", "attention"),
    ("pack", "dense_mask", "mean"), ("pad", "auto", "attention"), ("pad", "auto", "mean"),
])
def test_each_image_in_a_batch_equals_the_image_alone(batching, impl, pooling):
    model = build(batching=batching, attn_impl=impl, pooling=pooling).eval()
    imgs = images(12, model=model)
    with torch.no_grad():
        feats, logits = model.forward_features(imgs), model(imgs)
        model.extra_metrics()
        model(imgs)
        assert model.extra_metrics()["padded_tokens"] > 0  # the batch really has padding
        for i, x in enumerate(imgs):
            torch.testing.assert_close(model.forward_features([x])[0], feats[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(model([x])[0], logits[i], atol=1e-5, rtol=0)


def test_flex_attention_path_matches_alone_cpu_inference():
    model = build(attn_impl="flex").eval()  # eager FlexAttention on CPU (inference only)
    imgs = images(3, model=model)
    with torch.no_grad():
        feats = model.forward_features(imgs)
        for i, x in enumerate(imgs):
            torch.testing.assert_close(model.forward_features([x])[0], feats[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("lengths,max_len,block", [
    ([300, 17, 64, 128, 1, 900, 33, 250, 700, 12, 5, 1024, 128, 60], 1024, 128),  # a full row too
    ([300, 17, 64, 128, 1, 900, 33, 250, 700, 12, 5, 1000, 128, 60], 1000, 128),  # L not whole blocks
    ([64] * 8 + [3, 190, 45], 256, 64),
    ([1, 2, 3], 8, 128),                                                       # one block, L < block
])
def test_host_built_flex_block_mask_equals_create_block_mask(lengths, max_len, block):
    """The BlockMask built on the host from the layout is create_block_mask's, tensor for
    tensor (tails of the index lists included), and costs one copy, not a kernel per step of
    evaluating the mask over B x L x L pairs."""
    from harness.metrics.speed import DispatchCount
    from variants.navit import (Layout, create_flex_block_mask, flex_block_mask, pack_first_fit,
                                row_indices)
    rows = pack_first_fit(lengths, max_len)
    lay = Layout(rows, lengths, max_len)
    _, doc, _ = row_indices(lay, torch.device("cpu"))
    with DispatchCount() as ops:
        ours = flex_block_mask(lay, doc, block)
    assert ops.kernels <= 2, ops.names  # the int32 buffer's copy (on CPU: none)
    ref = create_flex_block_mask(doc, block)  # torch's create_block_mask over all B x L x L pairs
    assert ours.seq_lengths == ref.seq_lengths and tuple(ours.BLOCK_SIZE) == tuple(ref.BLOCK_SIZE)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        a, b = getattr(ours, name), getattr(ref, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    # and FlexAttention gives the same output with either (eager, CPU inference)
    from torch.nn.attention.flex_attention import flex_attention
    q, k, v = torch.randn(3, len(rows), 2, max_len, 16).unbind(0)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=ours),
                               flex_attention(q, k, v, block_mask=ref), atol=0, rtol=0)


def test_attention_paths_agree_and_cpu_default_is_recorded():
    imgs = images(10)
    outs = {}
    for impl in ("grouped", "loop", "dense_mask"):
        model = build(attn_impl=impl).eval()
        with torch.no_grad():
            outs[impl] = model(imgs)
        assert model.tags()["attn_path"] == impl
    torch.testing.assert_close(outs["loop"], outs["grouped"], atol=1e-5, rtol=0)
    torch.testing.assert_close(outs["dense_mask"], outs["grouped"], atol=1e-5, rtol=0)
    assert build().tags()["attn_path"] == CPU_PACK_ATTENTION
    assert build(batching="pad").tags()["attn_path"] == "sdpa_key_padding"


def test_bucket_runs_merges_only_when_padding_costs_less_than_a_call():
    from variants.navit import bucket_runs
    runs = [(4, 3), (6, 1), (9, 2), (64, 1), (70, 1)]
    assert bucket_runs(runs, 0) == [[r] for r in runs]  # no call cost: one call per length
    # 3 images padded 4 -> 6: 3 * (36 - 16) = 60 < 100; then 4 images 6 -> 9: 4 * 45 = 180 >= 100
    assert bucket_runs(runs, 100) == [[(4, 3), (6, 1)], [(9, 2)], [(64, 1)], [(70, 1)]]
    # 1 * (70^2 - 64^2) = 804 < 1000: the two large images share a call too
    assert bucket_runs(runs, 1000) == [[(4, 3), (6, 1), (9, 2)], [(64, 1), (70, 1)]]
    assert sum(bucket_runs(runs, 1e9), []) == runs  # order and runs kept, one bucket
    assert bucket_runs([], 100) == []


@pytest.mark.parametrize("cost", [0, 4096, 1e9])
def test_bucketed_grouped_attention_is_exact_forward_and_backward(monkeypatch, cost):
    """Merged buckets (key mask, gather / scatter) give the one-call-per-length result and
    the same gradients; cost 1e9 puts every image into one padded call."""
    import variants.navit as navit
    imgs = images(16)
    model = build(attn_impl="grouped").train()
    grads, outs = {}, {}
    for c in (0, cost):
        monkeypatch.setattr(navit, "GROUP_CALL_COST", c)
        model.zero_grad()
        out = model(imgs)
        out.square().sum().backward()
        outs[c] = out.detach()
        grads[c] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(outs[cost], outs[0], atol=1e-5, rtol=0)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[cost][n], g, atol=1e-4, rtol=1e-4, msg=n)
    # the trace for FLOP counting ignores buckets (their padded attention is not the
    # model's work): the same count at any cost
    monkeypatch.setattr(navit, "GROUP_CALL_COST", cost)
    with_cost = count_flops(model, (imgs,))
    monkeypatch.setattr(navit, "GROUP_CALL_COST", 0)
    assert count_flops(model, (imgs,))["gflops_attn_fwd"] == with_cost["gflops_attn_fwd"] > 0


def test_gradients_flow_through_the_packed_path():
    model = build().train()
    imgs = images(6, model=model)
    loss = F.cross_entropy(model(imgs), torch.arange(6) % 10)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.pos_embed.pos_x.grad.abs().sum() > 0


# ------------------------------------------------------------------ packing

def test_pack_functions_small_example_and_limits():
    assert pack_first_fit([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
    assert pack_next_fit([5, 4, 3, 2, 6], 8) == [[0], [1, 2], [3, 4]]
    with pytest.raises(ConfigError, match="max_seq_len"):
        pack_first_fit([3, 9], 8)


@pytest.mark.parametrize("pack", [pack_first_fit, pack_next_fit])
def test_every_image_packed_exactly_once_and_no_pack_too_long(pack):
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 200, (500,), generator=g).tolist()
    packs = pack(lengths, 256)
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in p) <= 256 for p in packs)
    assert all(p == sorted(p) for p in packs)  # arrival order kept within a pack


def test_first_fit_padding_at_most_2_percent_and_beats_next_fit():
    sizes = sample_sizes(2000, 8, 64, 8, skew=2.0, max_aspect=2.0,
                         generator=torch.Generator().manual_seed(0))
    lengths = lengths_of(sizes)

    def padding(packs, max_len=1024):
        return 1 - sum(lengths) / (len(packs) * max_len)

    ff, nf = padding(pack_first_fit(lengths, 1024)), padding(pack_next_fit(lengths, 1024))
    assert ff <= 0.02, ff
    assert nf > ff


def test_model_packs_and_reports_padding_metrics():
    model = build(max_seq_len=128).eval()
    imgs = images(16, model=model)
    with torch.no_grad():
        model(imgs)
    m = model.extra_metrics()
    lengths = [(x.shape[1] // 4) * (x.shape[2] // 4) for x in imgs]
    packs = pack_first_fit(lengths, 128)
    assert m["real_tokens"] == sum(lengths)
    assert m["images_per_pack"] == pytest.approx(16 / len(packs))
    total = m["real_tokens"] + m["padded_tokens"]
    assert m["padding_fraction"] == pytest.approx(m["padded_tokens"] / total)
    assert model.extra_metrics() == {}  # reset by the call

    pad = build(batching="pad").eval()
    with torch.no_grad():
        pad(imgs)
    m = pad.extra_metrics()
    assert m["padding_fraction"] == pytest.approx(1 - sum(lengths) / (16 * max(lengths)))
    assert m["images_per_pack"] == 1.0

    resize = build(batching="resize").eval()
    with torch.no_grad():
        resize(imgs)
    m = resize.extra_metrics()
    assert m["padded_tokens"] == 0 and m["real_tokens"] == 16 * (32 // 4) ** 2


# ------------------------------------------------------------------ token dropping

@pytest.mark.parametrize("n", [1, 7, 64])
@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 0.99])
def test_drop_tokens_keeps_exact_count_in_order(n, rate):
    kept = drop_tokens(torch.arange(n), rate, torch.Generator().manual_seed(n))
    assert kept.numel() == max(1, round((1 - rate) * n + 1e-9)) == keep_count(n, rate)
    assert torch.equal(kept, kept.sort().values) and kept.unique().numel() == kept.numel()


@pytest.mark.parametrize("kind", ["constant", "beta", "resolution"])
def test_model_drops_intended_count_per_image_in_training_only(kind):
    model = build(token_drop=kind, drop_rate=0.5)
    imgs = images(10, model=model)
    native = [(x.shape[1] // 4) * (x.shape[2] // 4) for x in imgs]
    rates = drop_rates(kind, native, model.cfg, torch.Generator().manual_seed(7))
    model.train()
    _, lengths, _ = model.tokenize(imgs, torch.Generator().manual_seed(7))
    assert lengths == [keep_count(n, r) for n, r in zip(native, rates)]
    assert sum(lengths) < sum(native)
    if kind == "constant":
        assert set(rates) == {0.5}
    elif kind == "beta":
        assert len(set(rates)) == len(rates) and all(0 <= r < 1 for r in rates)
        many = drop_rates(kind, [10] * 4000, model.cfg, torch.Generator().manual_seed(0))
        assert sum(many) / len(many) == pytest.approx(0.5, abs=0.02)  # mean drop_rate
    else:  # rises with resolution, mean drop_rate (before the cap)
        mean = sum(native) / len(native)
        assert rates == [min(MAX_DROP_RATE, 0.5 * n / mean) for n in native]
        big, small = max(range(10), key=native.__getitem__), min(range(10), key=native.__getitem__)
        assert rates[big] > rates[small]
    model.eval()
    _, lengths, _ = model.tokenize(imgs, torch.Generator().manual_seed(7))
    assert lengths == native


def test_dropped_tokens_are_reported():
    model = build(token_drop="constant", drop_rate=0.25).train()
    imgs = images(8, model=model)
    model(imgs, generator=torch.Generator().manual_seed(0))
    native = [(x.shape[1] // 4) * (x.shape[2] // 4) for x in imgs]
    m = model.extra_metrics()
    assert m["real_tokens"] == sum(keep_count(n, 0.25) for n in native)
    assert m["dropped_tokens"] == sum(native) - m["real_tokens"]


def test_resolution_sampling_keeps_aspect_and_patch_multiples():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        h, w = sample_resolution(40, 20, (32, 64), 4, g)
        assert h % 4 == 0 and w % 4 == 0 and 4 <= w <= h
        assert abs(h / w - 2.0) < 0.5
    model = build(res_sampling="random", pos_coords="fractional").train()
    _, lengths, _ = model.tokenize([torch.rand(1, 16, 16)] * 4, torch.Generator().manual_seed(1))
    assert len(set(lengths)) > 1  # resampled sizes differ


# ------------------------------------------------------------------ tokenizing

def per_image_tokens(model: NaViT, imgs: list[torch.Tensor]) -> torch.Tensor:
    """The tokenizer written out image by image: each (C, H, W) image cut into p x p
    patches, row-major, features in (channel, row, column) order, plus its positions."""
    p, patches, ys, xs = model.cfg.patch_size, [], [], []
    for x in model.preprocess(imgs):
        C, H, W = x.shape
        gh, gw = H // p, W // p
        patches.append(x.reshape(C, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, C * p * p))
        y, xx = model.coords(gh, gw, x.device)
        ys.append(y)
        xs.append(xx)
    return model.patch_embed(torch.cat(patches)) + model.pos_embed(torch.cat(ys), torch.cat(xs))


@pytest.mark.parametrize("channels,coords", [(1, "absolute"), (3, "absolute"), (3, "fractional")])
def test_batched_tokenizer_equals_the_per_image_one(channels, coords):
    """One gather over the batch's pixels gives exactly the per-image patches, also for
    images cropped to whole patches (sides not multiples of p) and for 3 channels."""
    model = build(in_channels=channels, pos_coords=coords).eval()
    g = torch.Generator().manual_seed(3)
    sizes = [(8, 8), (32, 12), (13, 30), (4, 4), (16, 28), (31, 5)]
    imgs = [torch.rand(channels, h, w, generator=g) for h, w in sizes]
    with torch.no_grad():
        tok, lengths, native = model.tokenize(imgs)
        ref = per_image_tokens(model, imgs)
    assert lengths == native == [(h // 4) * (w // 4) for h, w in sizes]
    assert torch.equal(tok, ref)


def test_tokenizer_launches_a_fixed_number_of_ops_however_many_images():
    """The per-image work is one view each; every op that runs a kernel is per batch, so a
    GPU step is not bound by launches that grow with the batch (the H200 profile in
    docs/speed.md: a packed step spent longer launching than computing)."""
    from harness.metrics.speed import DispatchCount
    model = build().eval()
    counts = {}
    for n in (4, 32):
        imgs = images(n, model=model)
        with torch.no_grad(), DispatchCount() as ops:
            model.tokenize(imgs)
        counts[n] = ops.kernels
        assert ops.names["view"] <= n + 8
    assert counts[4] == counts[32]


@needs_compile
def test_compiled_blocks_match_eager_and_compile_without_graph_breaks():
    """compile_blocks: the same logits and gradients as eager blocks, from one graph with no
    break in it, which serves all three blocks (one block is compiled and called for each;
    dynamo does not recompile per block); FLOP counting traces the eager blocks and counts
    the same."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager = build(attn_impl="dense_mask", depth=3)
    comp = build(attn_impl="dense_mask", depth=3, compile_blocks=True)
    imgs = images(6, model=eager)
    a, b = eager(imgs), comp(imgs)
    F.cross_entropy(a, torch.arange(6)).backward()
    F.cross_entropy(b, torch.arange(6)).backward()
    assert torch.allclose(a, b, atol=1e-5)
    for p, q in zip(eager.parameters(), comp.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert comp.tags()["compile_blocks"] == "true" and eager.tags()["compile_blocks"] == "false"
    assert count_flops(comp, (imgs,))["gflops_fwd"] == count_flops(eager, (imgs,))["gflops_fwd"] > 0


@needs_compile
@pytest.mark.parametrize("impl", ["dense_mask", "flex"])
def test_compiled_blocks_recompile_per_shape_not_per_block(impl, graphs_only):
    """Batches with other numbers of packs: the first shape's graph, one for a single pack
    (dynamo specialises size 1), then one dynamic graph for every other count, each serving
    every block.  The packs' rows enter the blocks as a view of the gathered tokens; without
    run_blocks' copy, dynamo's dynamic graph guards on the view's base, which the second
    block's input lacks, and every shape compiled twice (5 graphs here).  Dense block mask
    in training; FlexAttention, the GPU's path, in inference (no CPU backward)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = build(attn_impl=impl, depth=2, compile_blocks=True)
    model.train(impl != "flex")
    rows = []
    for n in (12, 5, 20, 9, 40):
        before = model._stats["rows"]
        with torch.set_grad_enabled(model.training):
            out = model(images(n, model=model))
        if model.training:
            F.cross_entropy(out, torch.arange(n) % 10).backward()
        rows.append(model._stats["rows"] - before)
    assert rows == [2, 1, 3, 2, 5]  # the pack counts the graphs assume
    assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"]


@needs_compile
def test_compiled_flex_blocks_are_one_graph_with_the_host_built_block_mask():
    """The GPU's packed path (FlexAttention under compiled blocks, the BlockMask built on the
    host) traces as one full graph, which serves both blocks, and gives eager
    FlexAttention's logits; CPU inference only (FlexAttention has no CPU backward)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    eager = build(attn_impl="flex", depth=2).eval()
    comp = build(attn_impl="flex", depth=2, compile_blocks=True).eval()
    imgs = images(12, model=eager)
    with torch.no_grad():
        a = eager(imgs)  # (torch's eager FlexAttention compiles a graph of its own)
        counters.clear()
        b = comp(imgs)
    assert torch.allclose(a, b, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


# ------------------------------------------------------------------ positions

def test_fractional_positions_accept_unseen_resolutions_absolute_refuse():
    frac = build(pos_coords="fractional", max_seq_len=512).train()
    opt = torch.optim.AdamW(frac.parameters(), lr=1e-3)
    for _ in range(2):  # train on small images only (at most 8x8 patches)
        opt.zero_grad()
        F.cross_entropy(frac(images(6, model=frac)), torch.arange(6)).backward()
        opt.step()
    big = torch.rand(1, 96, 80)  # 24 x 20 patches: beyond any training image and max_grid=8
    frac.eval()
    with torch.no_grad():
        out = frac([big])
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    y, x = frac.coords(24, 20, torch.device("cpu"))
    assert int(y.max()) == 7 and int(x.max()) == 7 and int(y.min()) == 0
    assert torch.all(y[20:] >= y[:-20])  # rows map monotonically onto slots

    absolute = build(pos_coords="absolute").eval()
    with pytest.raises(ConfigError, match="max_grid=8"):
        absolute([big])


@pytest.mark.parametrize("kind", ["additive", "stacked", "multiplicative"])
def test_factorised_embedding_kinds_give_distinct_positions(kind):
    model = build(pos_emb=kind)
    y, x = model.coords(4, 4, torch.device("cpu"))
    with torch.no_grad():
        pe = model.pos_embed(y, x)  # (16, D)
    assert pe.shape == (16, 32)
    assert torch.cdist(pe, pe).add(torch.eye(16)).min() > 0  # no two positions coincide


def test_config_refuses_impossible_combinations():
    with pytest.raises(ConfigError, match="max_grid"):
        registry.build("navit-ti", {**SMALL, "max_grid": 4})  # 32 px / 4 = 8 patches per side
    with pytest.raises(ConfigError, match="max_seq_len"):
        registry.build("navit-ti", {**SMALL, "max_seq_len": 32})
    with pytest.raises(ConfigError, match="drop_rate"):
        registry.build("navit-ti", {**SMALL, "drop_rate": 0.5})  # with token_drop none


# ------------------------------------------------------------------ FLOPs

@pytest.mark.parametrize("batching", ["pack", "pad"])
def test_flops_count_attention_exactly_and_nothing_unsupported(batching):
    model = build(batching=batching, pooling="attention")
    r = flops_of(model, batch_size=6)
    assert r["unsupported_ops"] == {}
    imgs = images(6, seed=0, model=model)  # what flops_of drew (same generator seed)
    n = [(x.shape[1] // 4) * (x.shape[2] // 4) for x in imgs]
    d, depth = 32, 2
    if batching == "pack":  # block-diagonal: each image with itself, plus the pooling probe
        macs = sum(depth * k * k * 2 * d + k * 2 * d for k in n)
    else:  # every image padded to the longest
        L = max(n)
        macs = len(n) * (depth * L * L * 2 * d + L * 2 * d)
    assert r["gflops_attn_fwd"] * 6 * 1e9 == pytest.approx(macs)


def test_flops_split_charges_padding():
    imgs = images(6)
    pack = flops_split(build(), imgs)
    pad = flops_split(build(batching="pad"), imgs)
    assert pack["gflops_useful_fwd"] == pytest.approx(pad["gflops_useful_fwd"], rel=1e-6)
    assert pad["wasted_fraction"] > pack["wasted_fraction"] > 0
    assert pad["gflops_fwd"] > pack["gflops_fwd"]
