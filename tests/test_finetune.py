import json

import pytest
import torch
from helpers import micro_config

from ajepa.cli import main
from ajepa.data import SyntheticDataset
from ajepa.eval.embed import random_encoder, read_checkpoint, strict_load
from ajepa.eval.finetune import (
    Classifier,
    FinetuneOptions,
    finetune,
    layer_decay_groups,
    regularized_key_mask,
    spec_augment,
)
from ajepa.model.vit import Attention, ViTEncoder


def test_layer_decay_scales_lr_by_depth():
    cfg = micro_config()
    model = Classifier(random_encoder(cfg).vit, 5)
    groups = layer_decay_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    depth = cfg.model.depth
    by_layer = {g["layer"]: g["lr_scale"] for g in groups}
    assert by_layer == {lid: 0.5 ** (depth + 1 - lid) for lid in range(depth + 2)}
    head = next(g for g in groups if any(p is model.head.weight for p in g["params"]))
    assert head["lr_scale"] == 1.0 and head["weight_decay"] == 0.05
    patch = next(g for g in groups if any(p is model.vit.patch_embed.proj.weight for p in g["params"]))
    assert patch["lr_scale"] == 0.5 ** (depth + 1)
    assert all(g["weight_decay"] == 0.0 for g in groups if all(p.ndim == 1 for p in g["params"]))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_regularized_mask_bars_keys_but_keeps_queries():
    torch.manual_seed(0)
    B, N, D = 2, 20, 24
    mask = regularized_key_mask(B, N, 0.1, "cpu")
    assert mask.shape == (B, 1, 1, N) and (~mask).sum(-1).flatten().tolist() == [2, 2]
    attn = Attention(D, 3).eval()
    x = torch.randn(B, N, D)
    barred = torch.nonzero(~mask[0, 0, 0]).flatten()
    y = x.clone()
    y[0, barred] += 5.0 * torch.randn(len(barred), D)  # change only the barred tokens of sample 0
    out_x, out_y = attn(x, attn_mask=mask), attn(y, attn_mask=mask)
    kept = mask[0, 0, 0]
    # No kept token draws anything from the barred ones ...
    torch.testing.assert_close(out_x[0, kept], out_y[0, kept])
    # ... while the barred tokens still attend as queries: their own outputs move.
    assert not torch.allclose(out_x[0, barred], out_y[0, barred])
    # Without the mask every output moves.
    assert not torch.allclose(attn(x)[0, kept], attn(y)[0, kept])
    with pytest.raises(ValueError, match="dense path"):
        attn(x[0], cu_seqlens=torch.tensor([0, N], dtype=torch.int32), max_seqlen=N, impl="reference", attn_mask=mask)


def test_spec_augment_zeroes_stripes():
    spec = torch.ones(4, 1, 64, 32)
    opts = FinetuneOptions(time_masks=1, time_mask_width=10, freq_masks=1, freq_mask_width=6)
    out = spec_augment(spec, opts, torch.Generator().manual_seed(0))
    assert out.shape == spec.shape and (out == 0).any() and (out == 1).any()
    for b in range(4):
        zero_cols = (out[b, 0] == 0).all(dim=1).sum()  # time frames zeroed over every mel bin
        zero_rows = (out[b, 0] == 0).all(dim=0).sum()
        assert zero_cols <= 10 and zero_rows <= 6
    none = FinetuneOptions(time_masks=0, freq_masks=0)
    assert torch.equal(spec_augment(spec, none, torch.Generator()), spec)


def test_finetune_smoke_saves_the_best_epoch(tmp_path):
    cfg = micro_config()
    ds = SyntheticDataset(28, cfg.audio, seed=1)
    vit = random_encoder(cfg).vit
    opts = FinetuneOptions(epochs=2, batch_size=8, lr=2e-3, mixup=0.4, reg_mask=0.1, val_fraction=0.25, device="cpu")
    res = finetune(cfg, vit, ds, tmp_path / "ft", opts, progress=False)
    assert len(res.history) == 2 and res.best_epoch in (1, 2)
    assert res.best_accuracy == max(r["val_accuracy"] for r in res.history)
    report = json.loads((tmp_path / "ft" / "finetune.json").read_text())
    assert report["options"]["reg_mask"] == 0.1 and report["n_val"] == 7
    state = read_checkpoint(tmp_path / "ft" / "best.pt")
    assert state["epoch"] == res.best_epoch and state["classes"] == list(ds.classes)
    model = Classifier(ViTEncoder(cfg.grid, 16, 48, 2, 3, 4.0), len(ds.classes))
    strict_load(model, state["model"], "best.pt")
    from safetensors.torch import load_file

    st = load_file(str(tmp_path / "ft" / "best.safetensors"))
    assert st.keys() == state["model"].keys() and torch.equal(st["head.weight"], state["model"]["head.weight"])
    # The encoder itself was trained, not only the head.
    assert not torch.equal(
        state["model"]["vit.blocks.0.attn.qkv.weight"], random_encoder(cfg).vit.blocks[0].attn.qkv.weight
    )


def test_finetune_cli_and_bad_options(tmp_path, capsys):
    args = [
        "finetune",
        "--random-init",
        "--preset",
        "tiny",
        "--clips",
        "14",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--val-fraction",
        "0.5",
        "--out",
        str(tmp_path / "ft"),
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert main(args + ["--reg-mask", "1.5"]) == 2
    assert "regularized masking" in capsys.readouterr().err
    assert main(args + ["--reg-mask", "0.1", "--mixup", "0.2"]) == 0
    assert "best validation accuracy" in capsys.readouterr().out
    assert (tmp_path / "ft" / "best.safetensors").is_file()


@pytest.mark.parametrize("clip_only", [False, True])
def test_classifier_pools_like_the_encoder_embeddings(clip_only):
    from ajepa.audio import waveform_to_spec
    from ajepa.eval.embed import Encoder

    cfg = micro_config(**{"model.clip_tokens_only": str(clip_only).lower()})
    sr = cfg.audio.sample_rate
    g = torch.Generator().manual_seed(0)
    waves = [0.3 * torch.randn(int(s * sr), generator=g) for s in (0.2, 0.7, 3.0)]  # 2, 5 and 16 rows of 16
    spec = torch.stack([waveform_to_spec(w, sr, cfg.audio) for w in waves]).unsqueeze(1)
    enc = random_encoder(cfg, seed=1)
    model = Classifier(enc.vit, 4, cfg).eval()
    head = model.head
    with torch.no_grad():
        torch.testing.assert_close(model(spec), head(enc.embed_spec(spec)), atol=1e-5, rtol=0)
        old = Classifier(enc.vit, 4, cfg, pooling="mean_all").eval()
        old.head = head
        plain = Encoder(micro_config(), enc.vit)  # every token a key: the behaviour before clip_tokens_only
        torch.testing.assert_close(old(spec), head(plain.embed_spec(spec, pooling="mean_all")), atol=1e-5, rtol=0)
        assert not torch.allclose(model(spec)[:2], old(spec)[:2], atol=1e-4)  # the short clips differ
        # The rows measured before SpecAugment keep the pooling of the clean clips.
        masked = spec_augment(spec, FinetuneOptions(time_masks=0, freq_masks=2, freq_mask_width=16),
                              torch.Generator().manual_seed(3))
        assert model.audio_rows(masked).tolist() != model.audio_rows(spec).tolist()
        want = model(masked, rows=model.audio_rows(spec))
        def rows_mask(rows):
            return (torch.arange(cfg.grid[0])[None] < torch.tensor(rows)[:, None]).repeat_interleave(cfg.grid[1], 1)

        keep = rows_mask([2, 5, 16])
        tokens = enc.vit.forward_dense(masked)
        if clip_only:  # keys: the clean clips' rows, at least clip_min_rows (3), as training gives them
            tokens = enc.vit.forward_dense(masked, keep=rows_mask([3, 5, 16]))
        pooled = (tokens * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
        torch.testing.assert_close(want, head(pooled), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="pooling='max'"):
        FinetuneOptions(pooling="max").validate()
