import pytest
import torch

from harness import registry
from variants.dit import DiT, modulate

SMALL = {"depth": 2, "input_size": 16, "num_classes": 10, "hidden_size": 64, "num_heads": 4}
ARMS = ["in_context", "cross_attention", "adaln", "adaln_zero"]


def small(conditioning="adaln_zero", **kw):
    model, cfg = registry.build("dit-s/4", {**SMALL, "conditioning": conditioning, **kw}, seed=0)
    return model.eval(), cfg


def test_param_counts_match_the_paper():
    # DiT paper Table 1 / released checkpoints: S 33M, B 130M, L 458M, XL 675M (patch 2)
    expected = {"dit-s/2": 33, "dit-b/2": 130, "dit-l/2": 458, "dit-xl/2": 675}
    for name, m in expected.items():
        with torch.device("meta"):
            model, _ = registry.build(name)
        assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(m, abs=0.5), name


def test_adaln_zero_blocks_are_identity_at_init():
    model, cfg = small("adaln_zero")
    x = torch.randn(3, model.num_patches, cfg.hidden_size)
    c = torch.randn(3, cfg.hidden_size)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)
    # and the zero-initialised final layer makes the whole model output zeros
    out = model(*model.example_inputs(3))
    assert torch.equal(out, torch.zeros_like(out))


def test_other_arms_are_not_identity_at_init():
    for arm in ("in_context", "cross_attention", "adaln"):
        model, cfg = small(arm)
        x = torch.randn(2, model.num_patches, cfg.hidden_size)
        c = torch.randn(2, cfg.hidden_size)
        ctx = torch.randn(2, 2, cfg.hidden_size)
        assert not torch.allclose(model.blocks[0](x, c, ctx), x), arm


def test_in_context_appends_two_tokens_and_drops_them():
    model, cfg = small("in_context")
    seen = []
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = model(*model.example_inputs(2))
    assert seen[0][1] == model.num_patches + 2
    assert out.shape == (2, cfg.out_channels, 16, 16)
    assert model.tokens_per_sample() == model.num_patches + 2
    assert not hasattr(model.blocks[0], "adaLN_modulation")  # no adaLN anywhere
    assert all(n.elementwise_affine for n in (model.blocks[0].norm1, model.blocks[0].norm2))


def test_cross_attention_attends_to_exactly_two_tokens():
    model, cfg = small("cross_attention")
    seen = {}

    def hook(mod, args):
        seen["context"] = args[1].shape
    model.blocks[0].cross_attn.register_forward_pre_hook(hook)
    x, t, y = model.example_inputs(3)
    model(x, t, y)
    assert seen["context"] == (3, 2, cfg.hidden_size)
    # the two tokens are t_emb and y_emb, kept apart (not summed)
    _, t_emb, y_emb = model.embed(x, t, y)
    ctx = torch.stack([t_emb, y_emb], 1)
    k = model.blocks[0].cross_attn.kv(ctx)
    assert k.shape == (3, 2, 2 * cfg.hidden_size)


def test_adaln_has_four_d_modulation_and_no_gates():
    model, cfg = small("adaln")
    lin = model.blocks[0].adaLN_modulation[-1]
    assert lin.out_features == 4 * cfg.hidden_size
    assert not model.blocks[0].norm1.elementwise_affine
    model0, _ = small("adaln_zero")
    assert model0.blocks[0].adaLN_modulation[-1].out_features == 6 * cfg.hidden_size


def test_null_label_is_used_when_dropped():
    model, cfg = small("adaln", class_dropout_prob=0.1)
    emb = model.y_embedder
    assert emb.embedding_table.num_embeddings == cfg.num_classes + 1
    y = torch.tensor([1, 2, 3, 4])
    dropped = emb.token_drop(y, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert dropped.tolist() == [cfg.num_classes, 2, cfg.num_classes, 4]
    out = emb(y, force_drop_ids=torch.tensor([1, 1, 1, 1]))
    assert torch.equal(out, emb.embedding_table.weight[cfg.num_classes].expand(4, -1))
    # in training, labels are dropped at rate class_dropout_prob
    emb.train()
    torch.manual_seed(0)
    n = 20000
    frac = (emb.token_drop(torch.zeros(n, dtype=torch.long)) == cfg.num_classes).float().mean()
    assert abs(frac - 0.1) < 0.01


def test_learn_sigma_doubles_output_channels():
    model, cfg = small("adaln_zero", learn_sigma=True, in_channels=3)
    assert model(*model.example_inputs(1)).shape == (1, 6, 16, 16)
    model, cfg = small("adaln_zero", learn_sigma=False, in_channels=3)
    assert model(*model.example_inputs(1)).shape == (1, 3, 16, 16)


def test_any_input_size_and_channels():
    model, cfg = small("cross_attention", input_size=24, in_channels=2, learn_sigma=False)
    assert model(*model.example_inputs(2)).shape == (2, 2, 24, 24)


def test_modulate():
    x = torch.ones(2, 3, 4)
    out = modulate(x, shift=torch.full((2, 4), 1.0), scale=torch.full((2, 4), 2.0))
    assert torch.equal(out, torch.full((2, 3, 4), 4.0))


def test_cfg_forward_halves_match_forced_drops():
    model, cfg = small("adaln")
    for p in model.parameters():  # non-trivial weights
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = model.example_inputs(2)
    guided = model.forward_with_cfg(x, t, y, cfg_scale=1.0)
    cond = model(x, t, y, force_drop_ids=torch.zeros(2, dtype=torch.long))
    assert torch.allclose(guided, cond, atol=1e-5)
