"""CPU tests of the benchmark code in bench/: FLOP and byte counts, floors math, records and
speedups, the JSON writer (device, versions, commit), the Markdown tables, the merge tool, the
step bench on the reference path (also through `ajepa bench`), and the kernel suites' skip
reasons on a machine without a GPU. The GPU paths themselves are not exercised here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is part of the source tree, not of the installed package
    sys.path.insert(0, str(ROOT))

from bench import common, report  # noqa: E402
from bench import step as step_bench  # noqa: E402

MICRO = [
    "model.embed_dim=48",
    "model.depth=2",
    "model.num_heads=3",
    "model.pred_dim=48",
    "model.pred_depth=1",
    "model.pred_heads=3",
]
NAME_RE = re.compile(r"^\d{8}-\d{6}_[a-z0-9-]+_[a-z0-9-]+\.json$")


# ---------------------------------------------------------------------------- counts and floors


def test_attention_flops_follow_the_flash_attention_convention():
    fwd = 4 * (2**2 + 3**2) * 2 * 8  # 4 * sum(s^2) * H * d
    assert common.attention_flops([2, 3], heads=2, head_dim=8) == fwd
    assert common.attention_flops([2, 3], 2, 8, "bwd") == 2.5 * fwd
    assert common.attention_flops([2, 3], 2, 8, "fwd+bwd") == 3.5 * fwd
    assert common.attention_flops([0, 0], 2, 8) == 0
    with pytest.raises(ValueError, match="op"):
        common.attention_flops([2], 1, 8, "backward")


def test_byte_counts():
    # fwd: T rows read + written, int64 index, pos once
    assert common.gather_bytes(10, 4, 2, rows=40, n_pos=8, op="fwd") == 2 * 10 * 4 * 2 + 8 * 10 + 8 * 4 * 2
    # bwd: gradient rows read, index read, dense grad_x and grad_pos written
    assert common.gather_bytes(10, 4, 2, rows=40, n_pos=None, op="bwd") == 10 * 4 * 2 + 80 + 40 * 4 * 2
    with pytest.raises(ValueError):
        common.gather_bytes(1, 1, 1, 1, None, "fwd+bwd")
    t = [torch.zeros(3, 4), torch.zeros(5)]
    assert common.ema_bytes(t, [x.clone() for x in t]) == 12 * 17  # read t, read o, write t (fp32)
    assert common.ema_bytes(t, [x.bfloat16() for x in t]) == 10 * 17
    assert common.attention_bytes(10, 2, 8, 2, "fwd") == 4 * 10 * 2 * 8 * 2 + 10 * 2 * 4
    assert common.attention_bytes(10, 2, 8, 2, "fwd+bwd") == 12 * 10 * 2 * 8 * 2 + 2 * 10 * 2 * 4


def test_floor_is_the_larger_of_bytes_and_flops():
    f = common.Floors(
        copy_gbps=1000.0, matmul_tflops=100.0, matmul_dtype="bfloat16", copy_bytes=1, matmul_n=1, device="cuda"
    )
    assert f.floor_ms(bytes_moved=1e9) == pytest.approx(1.0)  # 1 GB at 1000 GB/s
    assert f.floor_ms(flops=1e12) == pytest.approx(10.0)  # 1 TFLOP at 100 TFLOP/s
    assert f.floor_ms(bytes_moved=1e9, flops=1e12) == pytest.approx(10.0)
    assert f.floor_ms() is None
    rec = common.make_record("gather", "c", "fwd", "triton", 2.0, f, bytes_moved=1e9)
    assert rec.gbps == pytest.approx(500.0)
    assert rec.floor_ms == pytest.approx(1.0)
    assert rec.pct_of_floor == pytest.approx(50.0)
    rec = common.make_record("attention", "c", "fwd", "xformers", 20.0, f, flops=1e12, bytes_moved=1e6, extra_key=1)
    assert rec.tflops == pytest.approx(50.0)
    assert rec.pct_of_floor == pytest.approx(50.0)
    assert rec.extra == {"extra_key": 1}


def test_speedups_are_peer_time_over_fused_time_within_a_case():
    recs = [
        common.make_record("ema", "set", "update", "triton", 1.0, None),
        common.make_record("ema", "set", "update", "ijepa_loop", 12.0, None),
        common.make_record("ema", "set", "update", "foreach_lerp", 1.5, None),
        common.make_record("ema", "other", "update", "foreach_lerp", 3.0, None),  # no fused result in this case
    ]
    common.add_speedups(recs)
    assert [r.speedup_of_fused for r in recs] == [1.0, 12.0, 1.5, None]
    assert recs[0].vs_peers == {"ijepa_loop": 12.0, "foreach_lerp": 1.5}
    assert recs[1].vs_peers == {} and recs[3].vs_peers == {}


def test_rotation_count_and_cycle():
    assert common.rotation_count(10 * 2**20, 50 * 2**20) == 16  # 20 sets needed, capped at max_sets
    assert common.rotation_count(100 * 2**20, 50 * 2**20) == 2
    assert common.rotation_count(10 * 2**30, 50 * 2**20) == 1
    assert common.rotation_count(0, 50 * 2**20) == 1
    calls = []
    cyc = common.Cycle([lambda: calls.append(0), lambda: calls.append(1)])
    for _ in range(5):
        cyc()
    assert calls == [0, 1, 0, 1, 0]
    with pytest.raises(ValueError):
        common.Cycle([])


def test_cpu_timing_and_floors_are_positive():
    x = torch.randn(256, 256)
    ms = common.time_ms(lambda: x @ x, torch.device("cpu"), rep_ms=5)
    assert 0 < ms < 5000
    g = torch.randn(8, requires_grad=True)
    g.grad = torch.ones(8)
    common.time_ms(lambda: None, torch.device("cpu"), rep_ms=1, grad_to_none=[g])
    assert g.grad is None
    f = common.measure_floors(torch.device("cpu"), copy_mib=4, matmul_n=64)
    assert f.copy_gbps > 0 and f.matmul_tflops > 0
    assert f.copy_bytes == 2 * 4 * 2**20 and f.matmul_dtype == "float32" and f.device == "cpu"


def test_document_block_mask_matches_create_block_mask_and_the_reference():
    """The FlexAttention peer's block mask, built from the packed layout, equals create_block_mask's
    (which the GPU shapes cannot afford), and flex attention with it computes varlen attention."""
    flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
    import warnings

    import kernels
    from bench.cases import document_block_mask

    torch.manual_seed(0)
    for lens in ([5, 300, 1, 129, 128, 256, 40], [700], [1] * 150, [128, 128, 128]):
        T = sum(lens)
        cu = torch.tensor([0, *lens]).cumsum(0)
        doc = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))

        def document(b, h, q_idx, kv_idx, doc=doc):
            return doc[q_idx] == doc[kv_idx]

        want = flex_mod.create_block_mask(document, None, None, T, T, device="cpu")
        got = document_block_mask(doc, cu, document)
        assert torch.equal(got.to_dense(), want.to_dense())
        assert torch.equal(got.kv_num_blocks, want.kv_num_blocks)
        assert torch.equal(got.full_kv_num_blocks, want.full_kv_num_blocks)
    q, k, v = (torch.randn(T, 2, 16) for _ in range(3))

    def layout(x):
        return x.transpose(0, 1).unsqueeze(0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on the CPU warns that it is unfused
        out = flex_mod.flex_attention(layout(q), layout(k), layout(v), block_mask=got)[0].transpose(0, 1)
    ref = kernels.varlen_attention(q, k, v, cu.int(), max(lens), impl="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- JSON and tables


def _payload(kind="kernels-ema", device=None):
    f = common.Floors(3000.0, 800.0, "bfloat16", 2 * 2**30, 8192, "cuda")
    recs = [
        common.make_record("ema", "base set", "update", "triton", 0.5, f, bytes_moved=1.6e9),
        common.make_record("ema", "base set", "update", "ijepa_loop", 6.0, f, bytes_moved=1.6e9),
        common.make_record(
            "step",
            "base B=128 bf16",
            "train-step",
            "triton",
            100.0,
            f,
            flops=3e13,
            preset="base",
            batch_size=128,
            samples_per_s=1280.0,
            tokens_per_s=655360.0,
            peak_mem_gib=40.0,
            mfu_pct=37.5,
        ),
    ]
    dev = device or {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}
    return common.build_payload(kind, recs, f, dev, [{"test": "x::y[flex]", "reason": "flex needs a CUDA GPU"}])


def test_json_writer_records_device_versions_and_commit(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert common.out_dir() == tmp_path / "out"
    monkeypatch.delenv("OUT")
    assert common.out_dir() == common.RESULTS_DIR
    info = common.device_info(torch.device("cpu"))
    payload = common.build_payload(
        "kernels", [common.make_record("ema", "c", "update", "reference", 1.0, None)], None, info
    )
    path = common.write_json(payload, common.result_path("kernels", info["name"], directory=tmp_path))
    assert path.parent == tmp_path and NAME_RE.match(path.name), path.name
    data = json.loads(path.read_text())
    assert data["schema"] == common.SCHEMA and data["kind"] == "kernels"
    assert data["device"]["type"] == "cpu" and data["device"]["name"]
    for key in ("python", "torch", "triton", "xformers"):
        assert key in data["versions"]
    assert data["versions"]["torch"] == torch.__version__
    assert re.fullmatch(r"[0-9a-f]{64}", data["git"]["source_sha256"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert data["git"]["commit"] == head.stdout.strip() and data["git"]["commit_source"] == "git"
    assert data["results"][0]["impl"] == "reference" and data["conventions"]["attention_flops"]
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_git_info_without_git_uses_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AJEPA_COMMIT", "0123abc")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path
    info = common.git_info(tmp_path)
    assert info["commit"] == "0123abc" and info["commit_source"] == "AJEPA_COMMIT"
    assert info["dirty"] is None


def test_explicit_commit_wins_over_git(monkeypatch):
    """A tree copied to another machine can carry a stale .git: the sender's AJEPA_COMMIT wins."""
    monkeypatch.setenv("AJEPA_COMMIT", "feedbeef")
    info = common.git_info.__wrapped__(ROOT)  # uncached: ROOT is a git checkout here
    assert info["commit"] == "feedbeef" and info["commit_source"] == "AJEPA_COMMIT"
    assert info["source_sha256"] == common.source_hash(ROOT)


def test_kernel_table_flags_host_bound_results():
    f = common.Floors(3000.0, 800.0, "bfloat16", 2 * 2**30, 8192, "cuda")
    def rec(impl, ms, **extra):
        return common.make_record("ema", "set", "update", impl, ms, f, bytes_moved=1.6e9, **extra)

    launch_bound = rec("triton", 1.2, host_us_per_call=1100.0)
    gpu_bound = rec("foreach_lerp", 0.62, host_us_per_call=260.0)
    no_host = rec("ijepa_loop", 12.0)
    assert common.host_bound(launch_bound) and not common.host_bound(gpu_bound) and not common.host_bound(no_host)
    rows = common.kernel_table([launch_bound, gpu_bound, no_host]).splitlines()
    assert rows[0].endswith("| host us/call |")
    assert rows[2].endswith("| 1100 (host-bound) |") and rows[3].endswith("| 260 |") and rows[4].endswith("| - |")


def test_result_names_are_safe():
    assert common.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.slug("AMD EPYC 7B13 64-Core Processor") == "amd-epyc-7b13-64-core-processor"
    assert common.slug("///") == "unknown"


def test_markdown_report_ends_with_the_tables():
    text = common.markdown_report(_payload())
    assert "NVIDIA H100 80GB HBM3" in text and "copy 3000 GB/s" in text and "800 TFLOP/s" in text
    assert "| ema | base set | update | ijepa_loop | 6 | 267 | - | 8.9 | 12.00 |" in text
    assert "| base | triton | 128 | 100 | 1280.0 | 655360 | 40.00 | 300.00 | 37.5 | 1.00 |" in text
    assert "- x::y[flex]: flex needs a CUDA GPU" in text
    assert "| ema | base set | update | 0.5 | 106.7 | ijepa_loop 12.00x |" in text  # the summary comes last
    assert "| step | base B=128 bf16 | train-step | 100 | 37.5 | - |" in text
    assert text.rstrip().splitlines()[-1] == "| ViT-B step MFU | >= 45% | 37.5% | NO |"  # the targets come last
    assert "(no results)" in common.markdown_report(common.build_payload("k", [], None, {"name": "cpu"}))


def test_targets_are_checked_against_measurements_only():
    f = common.Floors(1000.0, 500.0, "bfloat16", 1, 1, "cuda")
    mk = common.make_record
    recs = [
        mk("gather", "enc", "fwd", "triton", 1.0, f, bytes_moved=0.9e9),  # floor 0.9 ms
        mk("gather", "enc", "bwd", "triton", 2.0, f, bytes_moved=1.5e9),  # floor 1.5 ms -> 80% together
        mk("gather", "tgt-ln", "fwd", "triton", 1.0, f, bytes_moved=1e9),  # no bwd: no gather target
        mk("ema", "set", "update", "triton", 1.0, f, bytes_moved=0.9e9),
        mk("ema", "set", "update", "ijepa_loop", 11.0, f, bytes_moved=0.9e9),
        mk("ema", "set", "update", "foreach_lerp", 1.1, f, bytes_moved=0.9e9),
        mk("step", "base", "train-step", "reference", 300.0, f, flops=1e14, preset="base", samples_per_s=100.0),
        mk(
            "step",
            "base",
            "train-step",
            "triton",
            200.0,
            f,
            flops=1e14,
            preset="base",
            samples_per_s=160.0,
            mfu_pct=100.0,
        ),
    ]
    got = {t["target"]: (t["measured"], t["met"]) for t in common.evaluate_targets(recs)}
    assert got == {
        "masked_gather fwd+bwd, enc": ("80.0%", False),
        "ema_update, set": ("90.0%", True),
        "ema_update vs ijepa_loop": ("11.00x", True),
        "ema_update vs foreach_lerp": ("1.10x", False),
        "ViT-B step samples/s vs reference": ("1.60x", True),
        "ViT-B step MFU": ("100.0%", True),
    }
    assert common.evaluate_targets([r for r in recs if r.impl != "triton"]) == []  # nothing measured, nothing claimed
    table = common.targets_table(recs)
    assert "| ema_update vs foreach_lerp | >= 1.2x faster | 1.10x | NO |" in table


def test_merge_and_report_tool(tmp_path, capsys):
    a = common.write_json(_payload("kernels-ema"), tmp_path / "a.json")
    b = common.write_json(_payload("step"), tmp_path / "b.json")
    (tmp_path / "junk.json").write_text('{"not": "ours"}')
    assert report.main([str(a), str(b), str(tmp_path / "junk.json"), "--write", str(tmp_path / "m")]) == 0
    merged_files = list((tmp_path / "m").glob("*_all.json"))
    assert len(merged_files) == 1 and NAME_RE.match(merged_files[0].name)
    merged = json.loads(merged_files[0].read_text())
    assert merged["kind"] == "all" and len(merged["results"]) == 6 and len(merged["parts"]) == 2
    assert all(r["extra"]["floors"]["copy_gbps"] == 3000.0 for r in merged["results"])
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("| ViT-B step MFU |")
    # an earlier merged file is ignored, and devices must match
    assert report.main([str(a), str(merged_files[0])]) == 0
    other = _payload("step", device={"type": "cuda", "name": "NVIDIA H200"})
    with pytest.raises(ValueError, match="different devices"):
        common.merge_payloads([_payload(), other])
    assert report.main([str(tmp_path / "junk.json")]) == 1
    pytest.importorskip("matplotlib")
    assert report.main([str(a), "--plot", str(tmp_path / "speedups.png")]) == 0
    assert (tmp_path / "speedups.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------- step bench


def test_model_flops_match_torch_flop_counter():
    """The step bench's forward matmul FLOP counts against torch's FlopCounterMode on the reference
    model (math SDPA backend, so attention is two counted matmuls; the packed reference pads each
    sequence to the longest, and that padding is taken off)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ajepa.config import apply_overrides, get_preset
    from ajepa.masks import MaskSampler
    from ajepa.model import AJEPA

    cfg = apply_overrides(get_preset("tiny"), MICRO)
    masks = MaskSampler(cfg.masks, cfg.grid, cfg.train.steps, 0)(0, 3)
    model = AJEPA(cfg, impl="reference")
    spec = torch.randn(3, 1, cfg.audio.target_frames, cfg.audio.num_mel_bins)
    counts = step_bench.model_flops(cfg, masks)

    def padding(cu, max_len, dim, depth):
        lens = step_bench._lengths(cu)
        return 4 * depth * dim * (len(lens) * max_len**2 - sum(s * s for s in lens))

    m = cfg.model
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as fc:  # dense: all N tokens, no padding
            model.target_encoder.forward_dense(spec)
        assert fc.get_total_flops() == counts["target_fwd"]
        with FlopCounterMode(display=False) as fc:
            ctx = model.encoder.forward_packed(spec, masks.ctx_index, masks.cu_ctx, masks.max_ctx, "reference")
        pad = padding(masks.cu_ctx, masks.max_ctx, m.embed_dim, m.depth)
        assert fc.get_total_flops() - pad == counts["encoder_fwd"]
        with FlopCounterMode(display=False) as fc:
            model.predictor(ctx, masks, "reference")
        pad = padding(masks.cu_pred, masks.max_pred, m.pred_dim, m.pred_depth)
        assert fc.get_total_flops() - pad == counts["predictor_fwd"]
    assert counts["train_step"] > 3 * (counts["encoder_fwd"] + counts["predictor_fwd"]) - counts["target_fwd"]
    assert counts["ctx_tokens"] == masks.ctx_index.numel() and counts["tgt_tokens"] == masks.num_targets


def _check_step_json(folder: Path) -> dict:
    files = list(folder.glob("*_step.json"))
    assert len(files) == 1 and NAME_RE.match(files[0].name)
    data = json.loads(files[0].read_text())
    (rec,) = data["results"]
    assert rec["suite"] == "step" and rec["impl"] == "reference" and rec["extra"]["batch_size"] == 2
    assert rec["extra"]["samples_per_s"] > 0 and rec["extra"]["tokens_per_s"] == pytest.approx(
        rec["extra"]["samples_per_s"] * 128
    )
    assert rec["flops"] > 0 and rec["extra"]["mfu_pct"] > 0 and rec["extra"]["final_loss"] is not None
    assert data["device"]["type"] == "cpu" and data["floors"]["matmul_dtype"] == "float32"
    assert data["versions"]["torch"] == torch.__version__
    (skip,) = data["skipped"]
    assert skip["test"] == "step tiny/triton" and "needs a CUDA GPU" in skip["reason"]
    return data


STEP_ARGS = [
    "--preset",
    "tiny",
    "--impl",
    "reference",
    "triton",
    "--batch-size",
    "2",
    "--steps",
    "2",
    "--distinct",
    "1",
    "--device",
    "cpu",
    "--no-progress",
] + [a for o in MICRO for a in ("--set", o)]


def test_step_bench_runs_the_reference_path_on_cpu(tmp_path, capsys):
    assert step_bench.main(STEP_ARGS + ["--out", str(tmp_path)]) == 0
    _check_step_json(tmp_path)
    out = capsys.readouterr().out
    assert "samples/s" in out and "skipped: the Triton path needs a CUDA GPU" in out
    assert out.rstrip().splitlines()[-1].startswith("| tiny | reference | 2 |")  # the table comes last


def test_ajepa_bench_command(capsys):
    """`ajepa bench` runs bench/step.py (tested above) in a child process with every option passed
    through: its help is the step bench's, and a bad value ends in the step bench's one-line error."""
    from ajepa.cli import build_parser, main

    assert "bench" in build_parser()._subparsers._group_actions[0].choices
    assert main(["bench", "--device", "cpu", "--steps", "0", "--no-json"]) == 2


def test_ajepa_bench_help_and_errors_come_from_bench_step():
    root = Path(__file__).resolve().parents[1]
    run = [sys.executable, "-m", "ajepa.cli", "bench"]
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "--profile-steps" in out.stdout and "--distinct" in out.stdout
    out = subprocess.run([*run, "--device", "cpu", "--steps", "0", "--no-json"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 2 and "--steps" in out.stderr and "Traceback" not in out.stderr


def test_e2e_windows_are_time_weighted():
    """Two timed windows of 10 steps x 4 samples at 40 and 10 samples/s last 1 s and 4 s: 80 samples in
    5 s, and the data wait is the time-weighted mean (0.1 * 1 + 0.6 * 4) / 5. The warm-up window is left out."""
    from bench.e2e import _windows

    rows = [{"step": 10, "samples_per_s": 1.0, "data_wait": 0.9},
            {"step": 20, "samples_per_s": 40.0, "data_wait": 0.1, "loader_clips_per_s": 100.0},
            {"step": 30, "samples_per_s": 10.0, "data_wait": 0.6, "loader_clips_per_s": 50.0}]
    got = _windows(rows, warmup=10, log_every=10, batch=4)
    assert got["samples_per_s"] == pytest.approx(16.0) and got["data_wait"] == pytest.approx(0.5)
    assert got["loader_clips_per_s"] == pytest.approx(60.0) and got["windows"] == 2
    with pytest.raises(ValueError, match="--steps"):
        _windows(rows, warmup=30, log_every=10, batch=4)


def test_ajepa_bench_data_runs_the_end_to_end_bench_on_cpu(tmp_path):
    """`ajepa bench --data AUDIO`: the real training loop from files, the synthetic-input step and the
    loader paths (files, shards written from the same clips, batched fbank), in one JSON."""
    from ajepa.config import get_preset
    from ajepa.data import write_synth_corpus

    write_synth_corpus(tmp_path / "audio", 12, get_preset("tiny").audio, progress=False)
    root = Path(__file__).resolve().parents[1]
    sets = [a for m in MICRO for a in ("--set", m)]
    cmd = [sys.executable, "-m", "ajepa.cli", "bench", "--data", str(tmp_path / "audio"), "--preset", "tiny",
           "--device", "cpu", "--batch-size", "4", "--steps", "3", "--warmup", "1", "--loader-clips", "6",
           "--workers", "0", "--no-progress", "--out", str(tmp_path / "res"), *sets]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(root)))
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = (tmp_path / "res").glob("*_e2e.json")
    res = json.loads(path.read_text())
    assert res["kind"] == "e2e" and res["end_to_end"]["windows"] == 1 and res["end_to_end"]["samples_per_s"] > 0
    assert 0 <= res["end_to_end"]["data_wait"] <= 1 and res["end_to_end"]["loader_clips_per_s"] > 0
    assert res["e2e_over_synthetic"] == pytest.approx(
        res["end_to_end"]["samples_per_s"] / res["synthetic"]["samples_per_s"])
    assert set(res["loader_clips_per_s_per_core"]) >= {"files + CPU fbank", "shards + CPU fbank",
                                                        "shards, loader only (fbank on the device)"}
    assert all(v > 0 for v in res["loader_clips_per_s_per_core"].values())
    assert res["targets"]["measured_on_gpu"] is False and "end to end / synthetic" in out.stdout
    bad = subprocess.run([*cmd[:5], str(tmp_path / "missing")], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(root)))
    assert bad.returncode == 2 and "no such file" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "kernel,category",
    [
        ("_varlen_attn_bwd_dkdv_kernel", "ajepa attention (Triton)"),
        ("_masked_gather_bwd_kernel", "ajepa gather / layer norm (Triton)"),
        ("_ema_update_kernel", "ajepa EMA (Triton)"),
        ("_layer_norm_bwd_kernel", "ajepa block layer norm / bias-GELU (Triton)"),
        ("_bias_gelu_fwd_kernel", "ajepa block layer norm / bias-GELU (Triton)"),
        ("_gather_layer_norm_fwd_kernel", "ajepa gather / layer norm (Triton)"),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "torch attention (SDPA)"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("void at::native::vectorized_layer_norm_kernel<c10::BFloat16, float>", "norm / softmax / reductions"),
        ("void at::native::vectorized_elementwise_kernel<4, GeluCUDAKernelImpl>", "elementwise, copies, other"),
    ],
)
def test_profile_categories(kernel, category):
    assert step_bench._category(kernel) == category


def test_step_bench_rejects_negative_profile_steps(capsys):
    assert step_bench.main(["--device", "cpu", "--profile-steps", "-1", "--no-json"]) == 2
    assert "--profile-steps" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter route")
def test_step_bench_triton_wiring_through_the_interpreter(tmp_path, monkeypatch):
    """AJEPA_BENCH_INTERPRET=1 runs the fused path's step on the CPU through the Triton interpreter:
    the bench's wiring of the Triton model is exercised without a GPU (the time means nothing)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("AJEPA_BENCH_INTERPRET", "1")
    args = [
        "--preset",
        "tiny",
        "--impl",
        "triton",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--distinct",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert step_bench.main(args + [a for o in MICRO for a in ("--set", o)]) == 0
    (path,) = tmp_path.glob("*_step.json")
    (rec,) = json.loads(path.read_text())["results"]
    assert rec["impl"] == "triton" and rec["extra"]["final_loss"] is not None and rec["speedup_of_fused"] == 1.0


# ---------------------------------------------------------------------------- kernel suites on the CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the suites skip without a GPU")
def test_kernel_suites_skip_gpu_cases_with_reasons(tmp_path):
    """`pytest bench/` on a CPU: the torch peers run (tiny shapes), every GPU-only case skips with its
    reason, the JSON holds both, and the table is printed last."""
    env = dict(os.environ, AJEPA_BENCH_BATCH="2", AJEPA_BENCH_MASKS="tf", AJEPA_BENCH_REP_MS="2")
    for key in ("OUT", "AJEPA_BENCH_INTERPRET", "AJEPA_BENCH_PRESET"):
        env.pop(key, None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "bench/test_ema.py",
            "bench/test_attention.py",
            "--bench-out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("*_kernels-ema-attention.json")
    data = json.loads(path.read_text())
    ran = {(r["suite"], r["impl"]) for r in data["results"]}
    assert {
        ("ema", "reference"),
        ("ema", "ijepa_loop"),
        ("ema", "foreach_lerp"),
        ("ema", "foreach_mul_add"),
        ("attention", "reference"),
        ("attention", "sdpa_padded"),
    } <= ran
    reasons = {s["test"].split("::")[-1]: s["reason"] for s in data["skipped"]}
    assert "needs a CUDA GPU" in reasons["test_ema_update[triton]"]
    for impl in ("triton", "xformers", "torch_varlen"):
        assert "needs a CUDA GPU" in reasons[f"test_varlen_attention[enc-tf-{impl}-fwd]"]
    assert "needs a CUDA GPU" in reasons["test_varlen_attention_flex[pred-tf-fwd+bwd]"]
    assert all(r["floor_ms"] and r["median_ms"] > 0 for r in data["results"])
    assert proc.stdout.rstrip().splitlines()[-1].startswith("| attention |")


# ---------------------------------------------------------------------------- ahead-of-time compile


def _aot(*args: str) -> subprocess.CompletedProcess:
    # a fresh process without TRITON_INTERPRET: interpreted kernels cannot be compiled
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "bench.aot", "--arch", "90", "--dtypes", "fp16", "--block-ds", "64",
                           "--table-only", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args,flag", [(["--dtypes", "bf17"], "--dtypes"), (["--dtypes", ","], "--dtypes"),
                                       (["--block-ds", "48"], "--block-ds"), (["--block-ds", "x"], "--block-ds")])
def test_aot_rejects_bad_lists_in_one_line(args, flag, capsys):
    from bench import aot

    with pytest.raises(SystemExit) as e:
        aot.main(args)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m bench.aot: error: " + flag)


def test_aot_compiles_the_table_kernels_for_sm90(tmp_path):
    """Every kernel the built-in tables launch compiles for an H100 with the installed Triton and
    fits its shared memory: the check bench/aot.py runs before a GPU lease, here on one dtype."""
    from bench import aot

    out = tmp_path / "aot.json"
    r = _aot("--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    results = json.loads(out.read_text())["results"]
    kernels = {x["kernel"] for x in results}
    assert {"attn_fwd", "attn_dkdv", "attn_dq", "attn_fwd_worklist", "attn_dkdv_worklist", "attn_dq_worklist",
            "attn_bwd_preprocess", "masked_gather_fwd", "masked_gather_bwd",
            "gather_layer_norm_fwd", "ema_update", "layer_norm_fwd", "layer_norm_bwd", "bias_gelu_fwd",
            "bias_gelu_bwd"} <= kernels
    assert all(x["ok"] and x["in_table"] for x in results)
    attn = [x for x in results if x["kernel"] in ("attn_fwd", "attn_dkdv", "attn_dq")]
    assert len(attn) == 3 and all(0 < x["shared_bytes"] <= aot.SMEM_LIMIT[90] for x in attn)


def test_aot_fails_on_a_tile_that_does_not_fit():
    r = _aot("--smem-limit", "1024")  # no attention tile fits in 1 KiB
    assert r.returncode == 1
    assert "TABLE FAIL attn_fwd" in r.stdout and "shared memory" in r.stdout


def test_aot_refuses_the_interpreter(monkeypatch, capsys):
    from bench import aot

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert aot.main(["--table-only"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_loader_bench_reports_every_path(tmp_path, capsys):
    from bench import loader

    assert loader.main(["--clips", "4", "--seconds", "1", "--batch", "2", "--preset", "tiny", "--out",
                        str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*_loader.json")
    payload = json.loads(path.read_text())
    rates = payload["clips_per_s_per_core"]
    assert len(rates) == 4 and all(v > 0 for v in rates.values())
    assert payload["speedup_vs_files"]["files + CPU fbank"] == 1.0
    assert "| shards, loader only (fbank on the device) |" in capsys.readouterr().out
    assert loader.main(["--clips", "0"]) == 2


def test_host_bench_stubs_every_launch_and_restores_them(tmp_path, monkeypatch, capsys):
    """bench.host times the eager paths with every Triton launch stubbed out: inside, a kernel writes
    nothing (the poisoned output stays NaN); afterwards the kernels run again. Its JSON and table list
    every op, direct and through the custom op."""
    from bench import host
    from kernels import masked_gather

    x = torch.randn(2, 5, 24)
    index = torch.tensor([0, 3, 3, 9])
    with host.stubbed_launches():
        assert torch.isnan(masked_gather(x, index, impl="triton")).all()
    assert torch.equal(masked_gather(x, index, impl="triton"), masked_gather(x, index, impl="reference"))

    monkeypatch.setenv("OUT", str(tmp_path))
    assert host.main(["--preset", "tiny", "--batch", "2", "--calls", "1"]) == 0
    (path,) = tmp_path.glob("*_host.json")
    rows = json.loads(path.read_text())["rows"]
    ops = [r["op"] for r in rows]
    assert len(ops) == 13 and {"masked_gather fwd+bwd, plan from pack_masks", "varlen_attention fwd+bwd",
                               "varlen_attention fwd+bwd, work-list grid", "layer_norm + residual fwd+bwd",
                               "bias_gelu fwd+bwd"} <= set(ops)
    from kernels.attention import fused
    assert fused.WORK_LIST_MAX_SEQUENCES == 0  # the opt-in grid was switched back off
    assert all(r["host_us_direct"] > 0 for r in rows)
    assert sum(r["host_us_custom_op"] is None for r in rows) == 2  # the EMA ops have no eager twin
    assert "| varlen_attention fwd+bwd |" in capsys.readouterr().out


def test_host_bench_rejects_bad_arguments(capsys):
    from bench import host

    for argv in (["--batch", "0"], ["--preset", "huge"]):
        with pytest.raises(SystemExit) as e:
            host.main(argv + ["--no-json"])
        assert e.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("python -m bench.host: error:") and ("--batch" in last or "huge" in last)


def test_the_profiled_batch_is_the_one_that_sets_the_median():
    """The step profile runs the batch whose timed step is the median, and reports that batch's own
    median time: profiling batch 0 (multiblock, the fastest) against the median of all batches once made
    the GPU look idle 46 ms a step."""
    a, b, c = ("a",), ("b",), ("c",)
    used = [a, b, c, a, b, c, a, b, c]
    times = [314.0, 368.6, 367.3, 320.0, 370.4, 366.9, 318.6, 368.2, 372.8]
    batch, ms = step_bench.profiled_batch(used, times)
    assert batch is c and ms == 367.3  # median of all nine is c's 367.3; c's own steps: 367.3, 366.9, 372.8
    batch, ms = step_bench.profiled_batch([a, b], [10.0, 30.0])
    assert batch is b and ms == 30.0


def test_grid_counts_live_and_dead_programs():
    from bench import grid

    # blocks of 16 over lengths 5, 0, 33 with max_seqlen 33: 1 + 0 + 3 live of 3 x 3
    assert grid.grid_use([5, 0, 33], 33, 16) == (4, 9)
    rows = grid.measure("tiny", 4)
    kinds = {(m, s, k) for m in ("multiblock", "tf") for s in ("context encoder", "predictor")
             for k in ("fwd", "dq", "dkdv")}
    assert {(r["masks"], r["sequences"], r["kernel"]) for r in rows} == kinds
    for r in rows:
        assert 0 < r["live"] <= r["grid"] and r["grid"] == r["n_seq"] * -(-r["max_seqlen"] // r["block"])
