"""The varlen-attention tile table: built-in entries, overrides, tuned-table files, the tuner.

Launch-level checks run the Triton kernels through the interpreter with the GPU tile path
switched on (fused.interpreting patched to False), so the tile a table names is the tile used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEVICE

from kernels.attention import fused, tiles
from kernels.attention.reference import varlen_attention_ref

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is part of the source tree, not of the installed package
    sys.path.insert(0, str(ROOT))
from bench.tune_attention import tune_entry  # noqa: E402

ALL_KEYS = [(k, d, dt) for k in tiles.KINDS for d in tiles.BLOCK_DS for dt in tiles.DTYPES.values()]


@pytest.fixture(autouse=True)
def clean_overrides():
    saved = dict(tiles._OVERRIDES), list(tiles._SOURCE)
    tiles._OVERRIDES.clear()
    yield
    tiles._OVERRIDES.clear()
    tiles._OVERRIDES.update(saved[0])
    tiles._SOURCE[:] = saved[1]


@pytest.fixture
def gpu_tiles(monkeypatch):
    """Launches take their tiles from the table, as on a GPU (on the CPU the interpreter runs them)."""
    monkeypatch.setattr(fused, "interpreting", lambda: False)


def test_every_entry_has_a_valid_default_and_candidates():
    for key in ALL_KEYS:
        t = tiles.tile(*key)
        assert isinstance(t, tiles.Tile) and t == tiles.default_tile(*key)
        cands = tiles.candidates(*key)
        assert cands[0] == t, key
        assert len(set(cands)) == len(cands) >= 4, key
        if key[1] == 128:
            assert all(c.num_stages <= 2 for c in cands), key


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(BLOCK_M=48, BLOCK_N=32, num_warps=4, num_stages=2), "BLOCK_M"),
        (dict(BLOCK_M=64, BLOCK_N=8, num_warps=4, num_stages=2), "BLOCK_N"),
        (dict(BLOCK_M=64, BLOCK_N=32, num_warps=3, num_stages=2), "num_warps"),
        (dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=0), "num_stages"),
        (dict(BLOCK_M=True, BLOCK_N=32, num_warps=4, num_stages=2), "BLOCK_M"),
    ],
)
def test_tile_rejects_bad_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiles.Tile(**kwargs)


@pytest.mark.parametrize("key,match", [(("bwd", 64, torch.float16), "kind"), (("fwd", 48, torch.float16), "head dim"),
                                        (("fwd", 64, torch.float64), "dtype")])
def test_unknown_entries_are_rejected(key, match):
    with pytest.raises(ValueError, match=match):
        tiles.tile(*key)


def test_set_tile_and_override_restore():
    key = ("dq", 32, torch.bfloat16)
    a, b = tiles.Tile(64, 16, 4, 3), tiles.Tile(32, 32, 2, 2)
    tiles.set_tile(*key, a)
    assert tiles.tile(*key) == a
    with tiles.override(*key, b):
        assert tiles.tile(*key) == b
        assert tiles.tile("dq", 64, torch.bfloat16) == tiles.default_tile("dq", 64, torch.bfloat16)
    assert tiles.tile(*key) == a
    tiles.set_tile(*key, None)
    assert tiles.tile(*key) == tiles.default_tile(*key)
    with pytest.raises(ValueError, match="Tile or None"):
        tiles.set_tile(*key, {"BLOCK_M": 64})


def _write(tmp_path: Path, payload) -> Path:
    path = tmp_path / "tiles.json"
    path.write_text(json.dumps(payload))
    return path


def test_load_tiles_round_trip(tmp_path):
    entries = {
        ("fwd", 64, torch.bfloat16): tiles.Tile(64, 64, 4, 3),
        ("dkdv", 32, torch.float16): tiles.Tile(16, 64, 4, 2),
    }
    path = _write(tmp_path, tiles.tiles_payload(entries, "GPU X", extra={"timings": {"a": 1.0}}))
    assert tiles.load_tiles(path) == 2
    for key, t in entries.items():
        assert tiles.tile(*key) == t
    assert tiles.tile("dq", 64, torch.bfloat16) == tiles.default_tile("dq", 64, torch.bfloat16)
    info = tiles.table_info()
    assert info["files"][-1] == str(path) and len(info["overrides"]) == 2


def _good_row(**change):
    row = {"kind": "fwd", "block_d": 64, "dtype": "bf16", "BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    row.update(change)
    return row


@pytest.mark.parametrize(
    "payload,match",
    [
        ({"schema": "other", "tiles": []}, "schema"),
        ({"schema": tiles.SCHEMA, "tiles": {}}, "list"),
        ({"schema": tiles.SCHEMA, "tiles": [_good_row(), _good_row(BLOCK_M=96)]}, r"tiles\[1\].*BLOCK_M"),
        ({"schema": tiles.SCHEMA, "tiles": [_good_row(dtype="fp8")]}, r"tiles\[0\]\.dtype"),
        ({"schema": tiles.SCHEMA, "tiles": [_good_row(kind="bwd")]}, r"tiles\[0\].*kind"),
        ({"schema": tiles.SCHEMA, "tiles": [_good_row(), _good_row()]}, "repeats fwd/64/bf16"),
        ({"schema": tiles.SCHEMA, "tiles": [{k: v for k, v in _good_row().items() if k != "num_warps"}]}, "missing"),
        ({"schema": tiles.SCHEMA, "tiles": [_good_row(extra=1)]}, "unknown"),
    ],
)
def test_load_tiles_rejects_bad_files_and_applies_nothing(tmp_path, payload, match):
    path = _write(tmp_path, payload)
    with pytest.raises(ValueError, match=match) as e:
        tiles.load_tiles(path)
    assert str(path) in str(e.value)
    assert tiles._OVERRIDES == {}  # a good first entry was not applied either


def test_load_tiles_unreadable_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        tiles.load_tiles(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        tiles.load_tiles(bad)


def _import_with_env(path: Path) -> subprocess.CompletedProcess:
    code = ("import torch; from kernels.attention import tiles; "
            "print(tiles.tile('fwd', 64, torch.bfloat16).name)")
    env = {**os.environ, tiles.ENV_VAR: str(path), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_env_var_loads_a_table_at_import(tmp_path):
    good = _write(tmp_path, {"schema": tiles.SCHEMA, "tiles": [_good_row(BLOCK_M=32, BLOCK_N=16)]})
    r = _import_with_env(good)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "m32n16w4s3"
    bad = tmp_path / "nope.json"
    r = _import_with_env(bad)
    assert r.returncode != 0
    assert f"{tiles.ENV_VAR}={bad}" in r.stderr and "cannot read" in r.stderr


class _Spy:
    """Stands in for a @triton.jit kernel: records each launch's kwargs, then launches the real one."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((grid, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _qkv(lens, heads, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lens)
    q, k, v, do = (torch.randn(T, heads, head_dim, generator=gen).to(DEVICE) for _ in range(4))
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return q, k, v, do, cu


def test_launches_use_the_overridden_tile(monkeypatch, gpu_tiles):
    calls = []
    monkeypatch.setattr(fused, "_varlen_attn_fwd_kernel", _Spy(fused._varlen_attn_fwd_kernel, calls))
    lens = [5, 0, 40]
    q, k, v, _, cu = _qkv(lens, 2, 16)
    new = tiles.Tile(16, 32, 2, 1)
    assert new != tiles.tile("fwd", 16, torch.float32)
    with tiles.override("fwd", 16, torch.float32, new):
        o, _ = fused.varlen_attn_fwd(q, k, v, cu, 40, 0.25)
    grid, kw = calls[-1]
    assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]) == (16, 32, 2, 1)
    assert grid == (3, 2, 3)  # cdiv(40, 16) query blocks
    want = varlen_attention_ref(q.double(), k.double(), v.double(), cu, 40, scale=0.25)
    assert float((o.double() - want).abs().max()) < 1e-5  # fp32 dots are IEEE ("ieee" precision)


def test_tune_entry_picks_the_fastest_working_tile(gpu_tiles):
    key = ("dq", 16, torch.float32)
    cands = tiles.candidates(*key)
    assert len(cands) >= 4
    fake_ms = {c.name: 1.0 + i for i, c in enumerate(cands)}
    fastest, broken = cands[2], cands[3]
    fake_ms[fastest.name] = 0.25
    fake_ms[broken.name] = 0.1  # would win, but cannot launch

    def timer(fn):
        fn()
        name = tiles.tile(*key).name
        if name == broken.name:
            raise RuntimeError("OutOfResources: shared memory")
        return fake_ms[name]

    q, k, v, do, cu = _qkv([9, 1, 0, 30], 2, 16, seed=1)
    inputs = [dict(q=q, k=k, v=v, do=do, cu=cu, max_len=30, scale=0.25, label="case")]
    row = tune_entry(*key, inputs, timer, tol=1e-4)
    assert row["best"] == fastest.name and row["was"] == cands[0].name
    assert tiles.tile(*key) == fastest  # applied for what follows
    assert set(row["ms"]) == {c.name for c in cands} - {broken.name}
    assert "OutOfResources" in row["errors"][broken.name]
    assert row["speedup_vs_was"] == pytest.approx(fake_ms[cands[0].name] / 0.25)


def test_tune_entry_rejects_a_tile_with_wrong_output(monkeypatch, gpu_tiles):
    key = ("fwd", 16, torch.float32)
    cands = tiles.candidates(*key)
    bad = cands[1]
    real = fused._varlen_attn_fwd_kernel

    class Corrupting(_Spy):
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                real[grid](*args, **kwargs)
                if kwargs["BLOCK_M"] == bad.BLOCK_M and kwargs["BLOCK_N"] == bad.BLOCK_N \
                        and kwargs["num_warps"] == bad.num_warps:
                    args[3].mul_(1.5)  # O: a tile whose output is wrong must not be picked

            return launch

    monkeypatch.setattr(fused, "_varlen_attn_fwd_kernel", Corrupting(real, []))
    q, k, v, do, cu = _qkv([12, 20], 1, 16, seed=2)
    inputs = [dict(q=q, k=k, v=v, do=do, cu=cu, max_len=20, scale=0.25, label="case")]
    row = tune_entry(*key, inputs, lambda fn: 0.5 if tiles.tile(*key) == bad else 1.0, tol=1e-4)
    assert bad.name in row["errors"] and "relative error" in row["errors"][bad.name]
    assert row["best"] != bad.name
