"""Tile sizes of the Triton varlen-attention kernels: the built-in table and tuned tables.

A tile is (BLOCK_M, BLOCK_N, num_warps, num_stages) for one kernel ("fwd" | "dkdv" | "dq") at
one padded head dim (16, 32, 64, 128) and dtype. BLOCK_M is always the query tile and BLOCK_N
the key tile. The built-in table serves unless a tuned one is loaded:

- `AJEPA_ATTN_TILES=<file.json>` in the environment, read when kernels.attention is imported;
- `load_tiles(path)` or `set_tile(...)` at run time.

`python -m bench.tune_attention` writes such a file on the GPU it times. Tiles stay fixed per
(kind, head dim, dtype) rather than being autotuned at every launch: which tile a timing race
picks would otherwise change the summation order, and so the numerics, from one run to the next.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

KINDS = ("fwd", "dkdv", "dq")
BLOCK_DS = (16, 32, 64, 128)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SCHEMA = "ajepa-attention-tiles/1"
ENV_VAR = "AJEPA_ATTN_TILES"
_WARPS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Tile:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("BLOCK_M", "BLOCK_N"):
            b = getattr(self, name)
            # tl.dot needs every dim >= 16; past 256 a tile no longer fits in registers
            if not isinstance(b, int) or isinstance(b, bool) or b not in (16, 32, 64, 128, 256):
                raise ValueError(f"Tile: {name} must be a power of 2 in [16, 256], got {b!r}")
        if self.num_warps not in _WARPS:
            raise ValueError(f"Tile: num_warps must be one of {_WARPS}, got {self.num_warps!r}")
        if not isinstance(self.num_stages, int) or isinstance(self.num_stages, bool) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"Tile: num_stages must be an int in [1, 8], got {self.num_stages!r}")

    def kwargs(self) -> dict:
        return asdict(self)

    @property
    def name(self) -> str:
        return f"m{self.BLOCK_M}n{self.BLOCK_N}w{self.num_warps}s{self.num_stages}"


def _key(kind: str, block_d: int, dtype: torch.dtype) -> tuple[str, int, torch.dtype]:
    if kind not in KINDS:
        raise ValueError(f"attention tiles: kind must be one of {KINDS}, got {kind!r}")
    if block_d not in BLOCK_DS:
        raise ValueError(f"attention tiles: padded head dim must be one of {BLOCK_DS}, got {block_d!r}")
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"attention tiles: dtype must be one of {tuple(DTYPES.values())}, got {dtype!r}")
    return kind, block_d, dtype


def default_tile(kind: str, block_d: int, dtype: torch.dtype) -> Tile:
    """The built-in table. A program owns one query tile (fwd, dq) or one key tile (dkdv) and
    loops over the other, so the owned tile is the big one."""
    _key(kind, block_d, dtype)
    if dtype == torch.float32:  # fp32 tiles are twice the bytes: keep them small
        return Tile(64, 32, 4, 2)
    if block_d == 128:  # not tuned yet (A-JEPA's heads are 32 and 64 wide)
        return {"fwd": Tile(128, 64, 8, 2), "dkdv": Tile(32, 64, 8, 2), "dq": Tile(64, 32, 8, 2)}[kind]
    # Tuned by bench/tune_attention.py on an H100 (triton 3.6, bf16, base preset, batch 128:
    # bench/results/20261126-184603_nvidia-h100-80gb-hbm3_attention-tiles.json); head dim 64 from
    # the encoder's 12 x 64, 32 (and 16) from the predictor's 16 x 32. fp16 shares the bf16 tiles.
    if kind == "fwd":
        return Tile(128, 64, 8, 3) if block_d == 64 else Tile(128, 32, 4, 3)
    if kind == "dkdv":  # a short key tile keeps dk, dv and the loaded q, dO in registers (no spills)
        return Tile(16, 64, 4, 3) if block_d == 64 else Tile(16, 128, 4, 3)
    return Tile(64, 32, 4, 3)


_OVERRIDES: dict[tuple[str, int, torch.dtype], Tile] = {}
_SOURCE: list[str] = []  # files loaded, in order


def tile(kind: str, block_d: int, dtype: torch.dtype) -> Tile:
    """The tile a launch uses: a loaded override, else the built-in table."""
    key = _key(kind, block_d, dtype)
    return _OVERRIDES.get(key) or default_tile(*key)


def set_tile(kind: str, block_d: int, dtype: torch.dtype, new: Tile | None) -> None:
    """Override one table entry (None: back to the built-in entry)."""
    key = _key(kind, block_d, dtype)
    if new is None:
        _OVERRIDES.pop(key, None)
    elif not isinstance(new, Tile):
        raise ValueError(f"set_tile: expected a Tile or None, got {type(new).__name__}")
    else:
        _OVERRIDES[key] = new


@contextmanager
def override(kind: str, block_d: int, dtype: torch.dtype, new: Tile):
    """Use `new` for one entry inside the block, then restore what was there."""
    key = _key(kind, block_d, dtype)
    before = _OVERRIDES.get(key)
    set_tile(kind, block_d, dtype, new)
    try:
        yield
    finally:
        set_tile(kind, block_d, dtype, before)


def candidates(kind: str, block_d: int, dtype: torch.dtype) -> list[Tile]:
    """Tiles worth timing for one entry: the current one first, then variants around the table.
    Each fits a Hopper/Ampere SM's shared memory at num_stages <= 3 (checked by bench/aot.py)."""
    first = tile(kind, block_d, dtype)
    if dtype == torch.float32:
        rest = [Tile(64, 32, 4, 2), Tile(32, 32, 4, 2), Tile(64, 64, 4, 2), Tile(32, 64, 4, 2)]
    elif kind == "fwd":
        rest = [Tile(128, 64, 4, 3), Tile(128, 64, 8, 3), Tile(64, 64, 4, 3), Tile(128, 32, 4, 3),
                Tile(128, 128, 8, 2), Tile(64, 128, 4, 2)]
    elif kind == "dkdv":
        rest = [Tile(32, 128, 4, 3), Tile(64, 128, 8, 2), Tile(32, 64, 4, 3), Tile(64, 64, 4, 3),
                Tile(16, 128, 4, 3), Tile(16, 64, 4, 3)]
    else:
        rest = [Tile(128, 32, 4, 3), Tile(128, 64, 8, 2), Tile(64, 32, 4, 3), Tile(64, 64, 4, 3),
                Tile(128, 16, 4, 3), Tile(64, 16, 4, 3)]
    if block_d == 128:  # twice the bytes per row: shallower pipelines
        rest = [Tile(t.BLOCK_M, t.BLOCK_N, t.num_warps, min(t.num_stages, 2)) for t in rest]
    out: list[Tile] = []
    for t in [first, *rest]:
        if t not in out:
            out.append(t)
    return out


# --------------------------------------------------------------------------------- files


def _rows(entries: dict[tuple[str, int, torch.dtype], Tile]) -> list[dict]:
    return [
        {"kind": k, "block_d": d, "dtype": DTYPE_NAMES[dt], **t.kwargs()}
        for (k, d, dt), t in sorted(entries.items(), key=lambda kv: (kv[0][0], kv[0][1], DTYPE_NAMES[kv[0][2]]))
    ]


def tiles_payload(entries: dict[tuple[str, int, torch.dtype], Tile], device: str, extra: dict | None = None) -> dict:
    """The JSON a tuned table is saved as (load_tiles reads it back)."""
    return {"schema": SCHEMA, "device": device, "tiles": _rows(entries), **(extra or {})}


def parse_tiles(data: object, where: str = "tiles") -> dict[tuple[str, int, torch.dtype], Tile]:
    """Validate a tiles payload; ValueError naming the entry and field. Nothing is applied."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{where}: not an attention tile table (expected schema {SCHEMA!r})")
    rows = data.get("tiles")
    if not isinstance(rows, list):
        raise ValueError(f"{where}: 'tiles' must be a list of entries")
    out: dict[tuple[str, int, torch.dtype], Tile] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: tiles[{i}] must be an object, got {type(row).__name__}")
        want = {"kind", "block_d", "dtype", "BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
        missing, unknown = want - row.keys(), row.keys() - want
        if missing or unknown:
            raise ValueError(f"{where}: tiles[{i}] missing {sorted(missing)}, unknown {sorted(unknown)}")
        if row["dtype"] not in DTYPES:
            raise ValueError(f"{where}: tiles[{i}].dtype must be one of {sorted(DTYPES)}, got {row['dtype']!r}")
        try:
            key = _key(row["kind"], row["block_d"], DTYPES[row["dtype"]])
            t = Tile(row["BLOCK_M"], row["BLOCK_N"], row["num_warps"], row["num_stages"])
        except ValueError as e:
            raise ValueError(f"{where}: tiles[{i}]: {e}") from None
        if key in out:
            raise ValueError(f"{where}: tiles[{i}] repeats {row['kind']}/{row['block_d']}/{row['dtype']}")
        out[key] = t
    return out


def load_tiles(path: str | os.PathLike) -> int:
    """Apply a tuned table from a JSON file (all entries checked before any is applied).
    Returns the number of entries applied."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"attention tiles: cannot read {path}: {e}") from None
    entries = parse_tiles(data, where=str(path))
    _OVERRIDES.update(entries)
    _SOURCE.append(str(path))
    return len(entries)


def table_info() -> dict:
    """What the launches use now, for benchmark records: the loaded files and their entries."""
    return {"files": list(_SOURCE), "overrides": _rows(_OVERRIDES)}


def _load_from_env() -> None:
    path = os.environ.get(ENV_VAR)
    if path:
        try:
            load_tiles(path)
        except ValueError as e:
            raise ValueError(f"{ENV_VAR}={path}: {e}") from None


_load_from_env()
