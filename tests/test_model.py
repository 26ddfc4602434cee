import pytest
import torch
import torch.nn.functional as F
from helpers import micro_config

from ajepa.masks import MaskSampler
from ajepa.model import AJEPA, sincos_pos_embed


def _setup(seed=0, batch=3):
    cfg = micro_config(**{"model.sigreg_weight": 0})  # the bare JEPA loss (SIGReg: tests/test_health.py)
    torch.manual_seed(seed)
    model = AJEPA(cfg, impl="reference")
    spec = torch.randn(batch, 1, cfg.audio.target_frames, cfg.audio.num_mel_bins)
    masks = MaskSampler(cfg.masks, cfg.grid, 100, seed=seed)(3, batch)
    return cfg, model, spec, masks


def test_sincos_positions_distinct_and_time_major():
    pos = sincos_pos_embed((4, 3), 16)
    assert pos.shape == (12, 16)
    assert torch.cdist(pos, pos).add(torch.eye(12)).min() > 0  # all positions distinct
    # tokens in the same time row share the time half of the channels
    assert torch.equal(pos[3, :8], pos[5, :8]) and not torch.equal(pos[3, :8], pos[6, :8])


def test_shapes_and_loss():
    cfg, model, spec, masks = _setup()
    pred = model.predict(spec, masks)
    tgt = model.targets(spec, masks)
    assert pred.shape == tgt.shape == (masks.num_targets, cfg.model.embed_dim)
    assert not tgt.requires_grad
    # targets are layer-normed without affine: zero mean, unit variance per row
    assert torch.allclose(tgt.mean(-1), torch.zeros(len(tgt)), atol=1e-5)
    loss = model(spec, masks)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert torch.allclose(loss, F.mse_loss(pred, tgt))


def test_packed_context_encoder_matches_per_sample_dense_run():
    """No token sees another sample: each sample alone, dense over its own visible tokens, gives
    the same output as the packed batch."""
    cfg, model, spec, masks = _setup(batch=4)
    enc = model.encoder
    packed = enc.forward_packed(spec, masks.ctx_index, masks.cu_ctx, masks.max_ctx, "reference")
    N = cfg.num_patches
    cu = masks.cu_ctx.tolist()
    for b in range(4):
        idx = masks.ctx_index[cu[b]:cu[b + 1]] - b * N
        x = (enc.patch_embed(spec[b:b + 1]) + enc.pos_embed)[:, idx]  # [1, L, D]
        for blk in enc.blocks:
            x = blk(x)
        torch.testing.assert_close(packed[cu[b]:cu[b + 1]], enc.norm(x)[0], rtol=1e-5, atol=1e-5)


def test_gradients_reach_encoder_predictor_and_mask_token_not_target():
    _, model, spec, masks = _setup()
    model(spec, masks).backward()
    assert model.predictor.mask_token.grad is not None and model.predictor.mask_token.grad.abs().sum() > 0
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.target_encoder.parameters())


def test_ema_update_moves_target_towards_encoder():
    _, model, _, _ = _setup()
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(0.9)
    for t0, t1, o in zip(before, model.target_encoder.parameters(), model.encoder.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * o, rtol=1e-6, atol=1e-6)


def _block_inputs(dim=48, tokens=(5, 9, 1), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(tokens), dim, generator=gen)
    cu = torch.tensor([0, *torch.tensor(tokens).cumsum(0).tolist()], dtype=torch.int32)
    return x, cu, max(tokens)


def _block(dim=48, seed=0):
    from ajepa.model.vit import Block, init_weights

    torch.manual_seed(seed)
    blk = Block(dim, 3, 4.0)
    init_weights(blk, 1)
    with torch.no_grad():  # non-trivial norms and biases, so every parameter's role shows
        for p in blk.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return blk


def test_reference_block_is_the_plain_prenorm_block():
    """The reference path is unchanged: x + attn(ln1(x)); x + fc2(gelu(fc1(ln2(x)))), bit for bit,
    forward and every gradient, packed and dense."""
    blk = _block()
    x, cu, max_len = _block_inputs()

    def plain(x, cu_seqlens=None, max_seqlen=0):
        n1, n2, mlp = blk.norm1, blk.norm2, blk.mlp
        x = x + blk.attn(F.layer_norm(x, (48,), n1.weight, n1.bias, n1.eps), cu_seqlens, max_seqlen, "reference")
        h = F.layer_norm(x, (48,), n2.weight, n2.bias, n2.eps)
        return x + F.linear(F.gelu(F.linear(h, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)

    for args in ((cu, max_len), ()):
        inp = x if args else x[None]
        results = []
        for use_module in (True, False):
            blk.zero_grad(set_to_none=True)
            xi = inp.clone().requires_grad_(True)
            out = blk(xi, *args, impl="reference") if use_module else plain(xi, *args)
            out.square().sum().backward()
            results.append([out, xi.grad] + [p.grad for p in blk.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*results))


def test_triton_block_matches_reference(monkeypatch):
    """The Triton path of a Block (fused layer norms with the residual add, bias + GELU) computes the
    reference's function: packed (varlen attention) and dense (SDPA), forward and gradients, in fp32.
    The fused ops really run: each is counted."""
    import kernels

    calls = {"layer_norm": 0, "bias_gelu": 0}
    for op in calls:
        real = getattr(kernels, op)

        def counted(*args, _real=real, _op=op, **kwargs):
            calls[_op] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernels, op, counted)
    blk = _block()
    x, cu, max_len = _block_inputs()
    for args in ((cu, max_len), ()):
        inp = x if args else x[None]
        results = []
        for impl in ("triton", "reference"):
            blk.zero_grad(set_to_none=True)
            xi = inp.clone().requires_grad_(True)
            out = blk(xi, *args, impl=impl)
            out.square().sum().backward()
            results.append([out, xi.grad] + [p.grad for p in blk.parameters()])
        names = ["out", "dx"] + [n for n, _ in blk.named_parameters()]
        for name, a, b in zip(names, *results):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert calls == {"layer_norm": 4, "bias_gelu": 2}


def test_state_dict_keys_unchanged():
    """Checkpoints stay compatible: the fused path changes no parameter, buffer or key."""
    from ajepa.model.vit import ViTEncoder

    enc = ViTEncoder((4, 2), 16, 48, 2, 3, 4.0)
    keys = set(enc.state_dict())
    assert {"norm.weight", "norm.bias", "blocks.1.norm2.weight", "blocks.1.norm2.bias",
            "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias"} <= keys
    assert all(isinstance(m, torch.nn.LayerNorm) for n, m in enc.named_modules() if n.endswith("norm")
               or n.endswith("norm1") or n.endswith("norm2"))
    assert len(keys) == 2 + 2 + 2 * 12  # patch proj, final norm, 12 tensors a block


def test_triton_model_targets_use_the_fused_path(monkeypatch):
    """AJEPA(impl=...) hands its impl to the target encoder's dense pass too (it used to run "auto"):
    a reference model never touches the fused ops, a Triton one does."""
    import kernels

    cfg, model, spec, masks = _setup(batch=2)
    from kernels.layernorm import layer_norm_ref

    seen = []

    def recording(x, weight, bias, eps, residual=None, impl="auto"):
        seen.append(impl)
        return layer_norm_ref(x, weight, bias, eps, residual)

    monkeypatch.setattr(kernels, "layer_norm", recording)
    monkeypatch.setattr(kernels, "bias_gelu", lambda x, b, impl="auto": F.gelu(x + b))
    model.targets(spec, masks)
    assert seen == []
    model.impl = "triton"
    model.targets(spec, masks)
    assert len(seen) == 2 * cfg.model.depth + 1 and set(seen) == {"triton"}


def test_rectangular_patches_cut_time_finer():
    """model.patch_frames=8: 8-frame x 16-mel patches, twice the time rows of square 16 x 16 ones; the
    patch embedding, grid, positions and constant-patch test all follow the (frames, mel) shape."""
    from ajepa.config import ConfigError, apply_overrides, get_preset
    from ajepa.model.ajepa import signal_patches

    cfg = apply_overrides(get_preset("tiny"), ["model.patch_frames=8"])
    assert cfg.patch_shape == (8, 16) and cfg.grid == (32, 8) and cfg.num_patches == 256
    model = AJEPA(cfg, impl="reference")
    spec = torch.randn(2, 1, cfg.audio.target_frames, cfg.audio.num_mel_bins)
    spec[1, :, 100:] = 0.0  # constant from frame 100: rows 13.. of the second clip
    tokens = model.encoder.forward_dense(spec, "reference")
    assert tokens.shape == (2, 256, cfg.model.embed_dim)
    keep = signal_patches(spec, cfg.patch_shape).view(2, 32, 8)
    assert keep[0].all() and keep[1, :12].all() and not keep[1, 13:].any()
    # token t * 8 + f sees frames 8t..8t+7 and mel bins 16f..16f+15: change one patch, one token moves
    spec2 = spec.clone()
    spec2[0, 0, 8 * 5:8 * 6, 16 * 3:16 * 4] += 1.0
    moved = (model.encoder.patch_embed(spec2) - model.encoder.patch_embed(spec)).abs().sum(-1)[0]
    assert moved.nonzero().flatten().tolist() == [5 * 8 + 3]
    with pytest.raises(ConfigError, match="model.patch_frames=12"):
        apply_overrides(get_preset("tiny"), ["model.patch_frames=12"])  # 256 frames are not rows of 12
    with pytest.raises(ConfigError, match="model.patch_frames=-1"):
        apply_overrides(get_preset("tiny"), ["model.patch_frames=-1"])
