"""Generated from the registry: every variant, present and future, passes the same suite."""
import pytest
import torch

from harness import registry
from harness.metrics.flops import flops_of

SPECS = registry.list_variants()
IDS = [s.name for s in SPECS]


def expected_shape(spec, cfg, batch: int) -> tuple:
    if spec.family == "dit":
        return (batch, cfg.out_channels, cfg.input_size, cfg.input_size)
    return (batch, cfg.num_classes)  # every other family here is a classifier


def build_small(spec, seed=0):
    model, cfg = registry.build(spec.name, spec.test_overrides, seed=seed)
    return model, cfg


def inputs(model, batch=2, seed=0):
    return model.example_inputs(batch, generator=torch.Generator().manual_seed(seed))


def test_registry_is_populated():
    families = {s.family for s in SPECS}
    assert {"dit", "vit"} <= families, families
    assert len(IDS) == len(set(IDS))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_forward_shape(spec):
    model, cfg = build_small(spec)
    model.eval()
    with torch.no_grad():
        out = model(*inputs(model))
    assert tuple(out.shape) == expected_shape(spec, cfg, 2)
    assert torch.isfinite(out).all()
    assert model.tokens_per_sample() > 0


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_backward_gives_finite_gradients(spec):
    model, cfg = build_small(spec)
    model.train()
    out = model(*inputs(model))
    model.bench_loss(out).backward()
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for _, g in grads), "no gradient reached the weights"
    for n, g in grads:
        if g is not None:
            assert torch.isfinite(g).all(), n


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_same_seed_same_output(spec):
    outs, states = [], []
    for _ in range(2):
        model, _ = build_small(spec, seed=7)
        model.eval()
        with torch.no_grad():
            outs.append(model(*inputs(model, seed=1)))
        states.append(model.state_dict())
    assert torch.equal(outs[0], outs[1])
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    # and the seed matters (outputs may all be zero at init: zero-initialised heads / adaLN-Zero)
    other, _ = build_small(spec, seed=8)
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in states[0].items())


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_flops_count_attention_and_nothing_is_unsupported(spec):
    model, _ = build_small(spec)
    f = flops_of(model)
    assert f["unsupported_ops"] == {}, f"fvcore cannot count {f['unsupported_ops']} for {spec.name}"
    assert f["gflops_attn_fwd"] > 0, "attention matmuls were not counted"
    assert f["gflops_fwd"] > f["gflops_attn_fwd"]
    assert f["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_benchmark_train_steps_give_every_weight_a_gradient(spec):
    """The speed benchmark's train step (``bench_loss``, backward, AdamW) runs on real values:
    zero-initialised heads and adaLN-Zero gates make the output exactly zero at the start,
    and a loss flat there would leave every gradient exactly zero for good.  After three
    steps (the warm-up a benchmark takes) every weight gets a non-zero gradient."""
    from harness.metrics.speed import make_train_step
    model, _ = build_small(spec)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = make_train_step(model, model, inputs(model), optim, torch.device("cpu"), bf16=False)
    for _ in range(3):
        step()
    flat = [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not flat, f"{spec.name}: no gradient reached {flat}"
