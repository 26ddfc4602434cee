"""pytest plumbing for the kernel benchmark suites (run with `pytest bench/`; not part of `pytest`).

Every measured case becomes a Record; the run's JSON (device, versions, commit, floors, results,
skips) is rewritten after each case, so a suite killed by a timeout still leaves what it measured.
The Markdown table is printed at the very end.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from bench import cases, common


def pytest_addoption(parser):
    group = parser.getgroup("ajepa-bench")
    group.addoption(
        "--bench-out", default=None, help="folder for the run's JSON (default: $OUT if set, else bench/results/)"
    )
    group.addoption("--bench-no-json", action="store_true", help="print the table but write no JSON file")


class BenchSession:
    """Collects the run's records and skips; measures the floors once, on first use."""

    def __init__(self, config):
        self.config = config
        self.device = common.bench_device()
        self.scale = cases.bench_scale(self.device)
        self.records: list[common.Record] = []
        self.skipped: list[dict] = []
        self.suites: list[str] = []
        self.created = datetime.now(timezone.utc)
        self._floors: common.Floors | None = None
        self._device_info = common.device_info(self.device)
        out = config.getoption("--bench-out")
        self.out_dir = Path(out) if out else common.out_dir()
        self.write = not config.getoption("--bench-no-json")
        self.path: Path | None = None

    @property
    def floors(self) -> common.Floors:
        if self._floors is None:
            self._floors = common.measure_floors(self.device)
        return self._floors

    @property
    def kind(self) -> str:
        return "kernels-" + "-".join(self.suites) if self.suites else "kernels"

    def payload(self) -> dict:
        config = {
            "preset": self.scale.preset,
            "batch_size": self.scale.batch_size,
            "mask_modes": list(self.scale.modes),
            "rep_ms": self.scale.rep_ms,
            "warmup_ms": self.scale.warmup_ms,
        }
        return common.build_payload(
            self.kind, self.records, self._floors, self._device_info, self.skipped, config=config, created=self.created
        )

    def save(self) -> None:
        if not self.write or not (self.records or self.skipped):
            return
        if self.path is None:
            self.path = common.result_path(self.kind, self._device_info["name"], self.created, self.out_dir)
        common.write_json(self.payload(), self.path)

    def add(self, record: common.Record) -> None:
        self.records.append(record)
        self.save()


def pytest_configure(config):
    config._ajepa_bench = BenchSession(config)


def pytest_collection_modifyitems(session, config, items):
    names = []
    for item in items:
        stem = Path(str(item.fspath)).stem
        if stem.startswith("test_") and stem[5:] not in names:
            names.append(stem[5:])
    config._ajepa_bench.suites = names


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        bs = _SESSION.get("bench")
        if bs is not None:
            bs.skipped.append({"test": report.nodeid, "reason": reason})
            bs.save()


_SESSION: dict = {}


@pytest.fixture(scope="session", autouse=True)
def bench_session(request) -> BenchSession:
    bs = request.config._ajepa_bench
    _SESSION["bench"] = bs
    return bs


def pytest_unconfigure(config):
    bs = getattr(config, "_ajepa_bench", None)
    _SESSION.pop("bench", None)
    if bs is None or not (bs.records or bs.skipped):
        return
    bs.save()
    text = common.markdown_report(bs.payload())  # the table comes last
    if bs.path is not None:
        text = f"JSON: {bs.path}\n\n" + text
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line("")
        for line in text.splitlines():
            tr.write_line(line)
    else:  # pragma: no cover
        print(text)


@pytest.fixture
def device(bench_session) -> torch.device:
    return bench_session.device


@pytest.fixture
def scale(bench_session) -> cases.Scale:
    return bench_session.scale


@pytest.fixture
def measure(request, bench_session):
    """measure(suite, case, op, impl, fn, bytes_moved=, flops=, grad_to_none=, **extra) -> Record.

    The recorded time is common.time_ms (do_bench median on CUDA). pytest-benchmark also gets a few
    synchronized host-timed rounds of the same call for its own table and --benchmark-json.
    """
    dev = bench_session.device
    scale = bench_session.scale

    def run(suite, case, op, impl, fn, *, bytes_moved=None, flops=None, grad_to_none=None, **extra):
        floors = bench_session.floors  # measured before the first case, in the same run
        ms = common.time_ms(fn, dev, warmup_ms=scale.warmup_ms, rep_ms=scale.rep_ms, grad_to_none=grad_to_none)
        if dev.type == "cuda":
            # timed twice, the second pass recorded: on an H100 the run's first case (right after the
            # floors' matmuls) took 0.305 ms where the tile tuner had timed the same kernel and shape
            # near 0.12 ms; first_pass_ms keeps the first median, so the spread stays visible
            extra["first_pass_ms"] = ms
            ms = common.time_ms(fn, dev, warmup_ms=scale.warmup_ms, rep_ms=scale.rep_ms, grad_to_none=grad_to_none)
            extra["host_us_per_call"] = common.host_us_per_call(fn, dev, grad_to_none)
        rec = common.make_record(suite, case, op, impl, ms, floors, bytes_moved=bytes_moved, flops=flops, **extra)
        # requested here, not up front: a case that skips never touches the benchmark fixture
        benchmark = request.getfixturevalue("benchmark") if _has_benchmark_plugin(request.config) else None
        if benchmark is not None:

            def synced():
                for t in grad_to_none or ():
                    t.grad = None
                fn()
                common.synchronize(dev)

            benchmark.group = f"{suite} | {case} | {op}"
            benchmark.extra_info.update(
                median_ms_events=ms, pct_of_floor=rec.pct_of_floor, gbps=rec.gbps, tflops=rec.tflops, impl=impl
            )
            benchmark.pedantic(synced, rounds=10 if dev.type == "cuda" else 2, warmup_rounds=1, iterations=1)
        bench_session.add(rec)
        return rec

    return run


def _has_benchmark_plugin(config) -> bool:
    return config.pluginmanager.hasplugin("benchmark") and os.environ.get("AJEPA_BENCH_NO_PYTEST_BENCHMARK") != "1"
