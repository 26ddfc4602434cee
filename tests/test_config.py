import pytest

from ajepa.config import ConfigError, apply_overrides, get_preset, load_config, save_config


def test_presets():
    base = get_preset("base")
    m = base.model
    assert (m.embed_dim, m.depth, m.num_heads, m.pred_dim, m.pred_depth) == (768, 12, 12, 512, 16)
    assert base.grid == (64, 8) and base.num_patches == 512
    tiny = get_preset("tiny")
    assert tiny.grid == (16, 8) and tiny.model.embed_dim == 192
    assert get_preset("small").model.embed_dim == 384
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("huge")


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(get_preset("tiny"), ["masks.mode=tf", "optim.betas=[0.8, 0.95]", "data.path=/x"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_overrides_are_typed():
    overrides = ["train.steps=7", "optim.lr=1e-3", "train.amp=false", "masks.target_scale=0.1,0.12"]
    cfg = apply_overrides(get_preset("tiny"), overrides)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 1e-3 and cfg.train.amp is False
    assert cfg.masks.target_scale == (0.1, 0.12)


@pytest.mark.parametrize("override,match", [
    ("train.stepz=3", "unknown config key train.stepz"),
    ("trian.steps=3", "unknown config section"),
    ("train.steps=many", "train.steps: expected an integer"),
    ("train.amp=maybe", "expected a boolean"),
    ("masks.target_scale=0.2,1.5", "masks.target_scale"),
    ("masks.min_keep=120", "min_keep"),
    ("masks.mode=random", "masks.mode"),
    ("train.impl=cuda", "train.impl"),
    ("model.num_heads=5", "divisible"),
    ("steps=3", "section.key=value"),
    ("masks.tf_scale=0,0.05", "masks.tf_scale"),
    ("masks.tf_time_share=1.5", "masks.tf_time_share"),
    ("masks.context_scale=0.5,1.2", "masks.context_scale"),
    ("masks.num_targets=40", "min_keep"),
    ("train.keep_last=-1", "train.keep_last"),
    ("train.max_bad_steps=0", "max_bad_steps"),
    ("train.parallel=zero3", "train.parallel"),
    ("data.strict=perhaps", "data.strict: expected a boolean"),
    ("train.batch_size=2.5", "train.batch_size: expected an integer"),
])
def test_bad_config_rejected_before_any_work(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(get_preset("tiny"), [override])


def test_cli_rejects_a_bad_config_before_any_work(tmp_path, capsys):
    from ajepa.cli import main

    (tmp_path / "c.yaml").write_text("masks:\n  target_scale: [0.9, 0.95]\n  min_keep: 10\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "c.yaml"), "--out", str(out)]) == 2
    assert "min_keep" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--keep-last", "-2"]) == 2
    assert "train.keep_last" in capsys.readouterr().err
    assert not out.exists()  # nothing was written
