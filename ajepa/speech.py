"""A spoken-word benchmark made offline with espeak-ng and sox: an unlabelled pretraining set of
phrases and a separate labelled probe set of single words, with no word and no voice in common.

    ajepa speech --out /data/speech --seed 0
    ajepa train --data /data/speech/pretrain --out runs/speech
    ajepa probe --checkpoint runs/speech/checkpoint.pt --data /data/speech/probe

Layout: OUT/pretrain/<index>.wav (no labels) and OUT/probe/<word>/<index>.wav (label = folder),
16 kHz mono 16-bit WAV, plus OUT/speech.json listing every clip's text, voice, speed and pitch, and
OUT/probe.csv, the probe clips as a manifest with their speaker, for probes on unseen speakers:

    ajepa probe --checkpoint runs/speech/checkpoint.pt --data /data/speech/probe.csv --group-by speaker

A voice is an espeak-ng accent plus a voice variant (``en-us+m3``). The pretraining and probe
sets use disjoint variant lists, so no probe speaker was heard in pretraining; the probe words
(the ten Speech Commands keywords) never occur in a pretraining phrase. Everything is a pure
function of the seed (and of the installed espeak-ng version, which synthesizes deterministically).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029", "en-us-nyc")
PRETRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "klatt", "klatt2", "adam", "andy", "david",
                     "john", "linda", "steph", "max", "paul", "robert", "zac", "benjamin")
PROBE_VARIANTS = ("m5", "m6", "m7", "f4", "f5", "klatt3", "annie", "edward", "shelby", "travis")
PROBE_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
VOCABULARY = tuple("""
the a an this that these those my your his her our their some every many few all each other another
man woman child people friend teacher doctor farmer driver singer writer student mother father brother sister
house garden river mountain city village street window table chair kitchen school market station office forest
water bread coffee music paper letter story picture money morning evening winter summer spring autumn
dog cat horse bird fish cow sheep rabbit mouse lion tiger monkey eagle snake
red green blue yellow black white brown small large little big old young new happy quiet loud slow quick
bright dark warm cold heavy light early late simple strange famous gentle clever busy lazy
walk run read write sing play cook open close carry bring take make find keep watch listen speak answer
call visit build paint clean wash fill move help learn teach travel wonder remember forget
is was will can could would should must might
with from into over under behind beside between through across around along near toward
and but or because while when after before until since although
today tomorrow yesterday never always often sometimes again later soon here there everywhere
one two three four five six seven eight nine ten twenty hundred thousand
""".split())


@dataclass(frozen=True)
class Clip:
    """One clip to synthesize: where it goes, what is said and how."""

    path: str  # relative to the benchmark folder
    text: str
    voice: str  # espeak-ng voice: accent+variant
    speed: int  # words per minute
    pitch: int  # 0..99
    label: str | None  # the word, for probe clips


def plan(seed: int = 0, pretrain_clips: int = 1200, words_per_class: int = 42,
         words: tuple[str, ...] = PROBE_WORDS) -> list[Clip]:
    """Every clip of the benchmark, drawn from `seed`: pretraining phrases of 2-5 vocabulary words
    spoken by pretraining voices, then `words_per_class` clips of each probe word by probe voices."""
    if pretrain_clips < 0 or words_per_class < 0:
        raise ValueError("pretrain_clips and words_per_class must be >= 0")
    clash = set(words) & set(VOCABULARY)
    if clash:
        raise ValueError(f"probe words also in the pretraining vocabulary: {sorted(clash)}")
    rng = np.random.default_rng([seed, 0x5350])
    clips = []
    for i in range(pretrain_clips):
        n = int(rng.integers(2, 6))
        text = " ".join(VOCABULARY[j] for j in rng.integers(0, len(VOCABULARY), n))
        voice = f"{ACCENTS[rng.integers(len(ACCENTS))]}+{PRETRAIN_VARIANTS[rng.integers(len(PRETRAIN_VARIANTS))]}"
        clips.append(Clip(f"pretrain/{i:05d}.wav", text, voice, int(rng.integers(130, 221)),
                          int(rng.integers(20, 81)), None))
    for w in words:
        for i in range(words_per_class):
            voice = f"{ACCENTS[rng.integers(len(ACCENTS))]}+{PROBE_VARIANTS[rng.integers(len(PROBE_VARIANTS))]}"
            clips.append(Clip(f"probe/{w}/{i:03d}.wav", w, voice, int(rng.integers(110, 221)),
                              int(rng.integers(15, 86)), w))
    return clips


def missing_tools() -> list[str]:
    return [t for t in ("espeak-ng", "sox") if shutil.which(t) is None]


def synthesize(clip: Clip, root: Path, sample_rate: int = 16000) -> None:
    """espeak-ng -> 22.05 kHz WAV in a temp file -> sox (no dither: same bytes every time) -> `sample_rate`
    mono 16-bit at root/clip.path."""
    out = root / clip.path
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", clip.voice, "-s", str(clip.speed), "-p", str(clip.pitch),
                        "-w", str(raw), clip.text], check=True, capture_output=True)
        subprocess.run(["sox", "-D", str(raw), "-r", str(sample_rate), "-c", "1", "-b", "16", str(out)],
                       check=True, capture_output=True)


def write_probe_manifest(root: str | Path, clips: list[Clip]) -> Path:
    """root/probe.csv: path (relative to root), label, speaker (the espeak-ng voice variant: one timbre) and
    accent of every probe clip, in the order `plan` draws them."""
    out = Path(root) / "probe.csv"
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "speaker", "accent"])
        for c in clips:
            if c.label is not None:
                accent, _, speaker = c.voice.partition("+")
                w.writerow([c.path, c.label, speaker, accent])
    return out


def build(out: str | Path, seed: int = 0, pretrain_clips: int = 1200, words_per_class: int = 42,
          jobs: int = 2, progress: bool = True) -> list[Clip]:
    """Synthesize the benchmark under `out`; writes out/speech.json and out/probe.csv. Returns the clips."""
    missing = missing_tools()
    if missing:
        raise FileNotFoundError(f"ajepa speech needs {' and '.join(missing)}: apt-get install -y espeak-ng sox")
    root = Path(out)
    clips = plan(seed, pretrain_clips, words_per_class)
    root.mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, jobs)) as pool, tqdm(total=len(clips), desc="speech", disable=not progress) as bar:
        for _ in pool.map(lambda c: synthesize(c, root), clips):
            bar.update(1)
    meta = {"seed": seed, "pretrain_clips": pretrain_clips, "words_per_class": words_per_class,
            "clips": [asdict(c) for c in clips]}
    (root / "speech.json").write_text(json.dumps(meta, indent=1))
    write_probe_manifest(root, clips)
    return clips
