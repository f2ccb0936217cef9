"""Prepared-store loading vs. per-item decoding as the method repos do it, same data and batch size.

Builds a synthetic raw CREMA-D-layout fixture (16 kHz WAV + FLV video at 480x360, 2.5 s clips) in a
temporary folder, then in one process:

1. `prepare` throughput: the real `cremad/ogm-ge` pipeline (verify, decode, resample to 22.05 kHz,
   log-STFT, 1-fps frame, 224x224) into a store, in clips per second;
2. the per-item loader of OGM-GE's `CramedDataset`: a 1-fps JPEG per clip extracted beforehand (as
   their `video_preprocessing.py` does, not timed), then per item and per epoch: decode the WAV and
   resample to 22,050 Hz (swresample, as cheap as librosa's soxr), tile, STFT, log; open the JPEG
   with PIL, RandomResizedCrop(224) + flip + ToTensor + Normalize (torchvision);
3. the store loader the trainer uses: memory-mapped arrays, one read per batch, then the per-batch
   crop/flip/normalise transform.

Both loaders: DataLoader with the same batch size, shuffled, `--loader-workers` worker processes
(0: in the main process), timed over whole epochs, batches moved to `--device` (the GPU when there
is one), where the store's crop/flip/normalise runs as in training. Goal (DESIGN.md §6): >= 10x.

    .venv/bin/python benchmarks/loader_throughput.py [--clips 256] [--batch-size 64] [--workers 2]
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from mmbench.data import features
from mmbench.data.base import PrepareRequest
from mmbench.data.datasets.cremad import CremaD
from mmbench.data.fixtures import make_cremad_tree
from mmbench.data.manifest import load_manifest, manifests_dir
from mmbench.data.store import PreparedDataset, collate
from mmbench.data.transforms import get_transform

EMOS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


def build_fixture(root: Path, n: int) -> tuple[Path, Path]:
    """Raw CREMA-D-like clips + split lists and a manifest copy whose checksums match them."""
    stems = [f"{1001 + i % 91}_T{i:04d}_{EMOS[i % 6]}_XX" for i in range(n)]
    src = root / "CREMA-D"
    n_proc = max(1, min(os.cpu_count() or 1, 16))
    with ProcessPoolExecutor(n_proc, mp_context=mp.get_context("spawn")) as pool:  # encoding is serial per clip
        list(pool.map(_make_clips, [(src, stems[i::n_proc]) for i in range(n_proc)]))
    n_val = n_test = max(1, n // 10)
    parts = {"relearn_my_train": stems[n_val + n_test:], "relearn_val": stems[:n_val], "ogm_test": stems[n_val:n_val + n_test]}
    man = yaml.safe_load((manifests_dir() / "cremad.yaml").read_text())
    for key, rows in parts.items():
        data = "".join(f"{s},{s.split('_')[2]}\n" for s in rows).encode()
        (src / man["sources"][key]["filename"]).write_bytes(data)  # found in --source: no download
        man["sources"][key].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    table = ["stem\twav_size\twav_sha256\tflv_size\tflv_sha256"]
    for s in stems:
        w, f = src / "AudioWAV" / f"{s}.wav", src / "VideoFlash" / f"{s}.flv"
        table.append(f"{s}\t{w.stat().st_size}\t{hashlib.sha256(w.read_bytes()).hexdigest()}\t"
                     f"{f.stat().st_size}\t{hashlib.sha256(f.read_bytes()).hexdigest()}")
    mdir = root / "manifests"
    mdir.mkdir()
    (mdir / "cremad.yaml").write_text(yaml.safe_dump(man, sort_keys=False))
    (mdir / man["tables"]["media"]).write_bytes(gzip.compress(("\n".join(table) + "\n").encode()))
    return src, mdir


def _make_clips(args: tuple[Path, list[str]]) -> None:
    make_cremad_tree(args[0], args[1], seconds=2.5, fps=30000 / 1001, size=(480, 360))


def extract_jpegs(src: Path, out: Path, stems: list[str]) -> None:
    """OGM-GE's offline step: the first frame of each second as JPEG, original resolution (untimed)."""
    import av

    for s in stems:
        d = out / s
        d.mkdir(parents=True, exist_ok=True)
        with av.open(str(src / "VideoFlash" / f"{s}.flv")) as c:
            for k, frame in enumerate(c.decode(video=0)):
                if k % 29 == 0:
                    frame.to_image().save(d / f"{k:05d}.jpg", quality=95)


def load_resampled(path: Path, rate: int) -> np.ndarray:
    """Decode + resample in C (swresample), standing in for librosa.load's soxr_hq: as cheap as the
    repos' per-item path, so the comparison does not flatter the store."""
    import av

    with av.open(str(path)) as c:
        rs = av.AudioResampler(format="fltp", layout="mono", rate=rate)
        out = [f.to_ndarray()[0] for fr in c.decode(audio=0) for f in rs.resample(fr)]
        out += [f.to_ndarray()[0] for f in rs.resample(None)]
    return np.concatenate(out)


class PerItemCremad(Dataset):
    """OGM-GE's CramedDataset (train mode): everything per item, every epoch."""

    def __init__(self, src: Path, frames: Path, rows: list[tuple[str, int]], audio_params: dict) -> None:
        self.src, self.frames, self.rows, self.p = src, frames, rows, audio_params
        self.tf = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                             T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        stem, label = self.rows[i]
        y = load_resampled(self.src / "AudioWAV" / f"{stem}.wav", 22050)            # librosa.load(sr=22050)
        spec = features.ogm_stft(y, 22050, self.p)                                  # tile, clip, stft, log
        jpg = sorted((self.frames / stem).iterdir())[0]
        img = self.tf(Image.open(jpg).convert("RGB")).unsqueeze(1)                  # (3, 1, 224, 224)
        return torch.from_numpy(spec), img, label


def time_loader(loader: DataLoader, step, min_seconds: float) -> tuple[float, int]:  # noqa: ANN001
    """Samples per second over whole epochs, at least `min_seconds` (first batch excluded: warm-up)."""
    it = iter(loader)
    step(next(it))
    n, t0 = 0, time.perf_counter()
    while True:
        for b in it:
            n += step(b)
        if time.perf_counter() - t0 >= min_seconds:
            return n / (time.perf_counter() - t0), n
        it = iter(loader)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2)), help="prepare workers")
    ap.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers, both loaders")
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where batch transforms run")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    console = Console()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mmbench-loader-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        src, mdir = build_fixture(root, args.clips)
        console.print(f"[dim]fixture: {args.clips} clips in {time.perf_counter() - t:.1f} s[/dim]")
        os.environ["MMBENCH_MANIFESTS"] = str(mdir)

        t = time.perf_counter()
        res = CremaD().prepare(PrepareRequest(root / "data", "ogm-ge", source=src, workers=args.workers))
        prep_s = time.perf_counter() - t
        prep_rate = args.clips / prep_s

        ds = PreparedDataset("cremad", "ogm-ge", root / "data")
        split = ds.split("train")
        tfs = {m: get_transform(s.transform, **s.transform_args) for m, s in ds.meta.modalities.items()}
        gen = torch.Generator().manual_seed(0)
        dev = torch.device(args.device)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

        def store_step(b: dict) -> int:  # what the trainer does with a batch before the forward pass
            x = {m: tfs[m](b[m].to(dev, non_blocking=True), True, gen) for m in ("audio", "visual")}
            assert x["visual"].shape[-1] == 224
            sync()
            return int(b["label"].shape[0])

        def loader(dataset: Dataset, **kw) -> DataLoader:  # noqa: ANN003
            return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.loader_workers,
                              pin_memory=dev.type == "cuda", persistent_workers=args.loader_workers > 0, **kw)

        raw_rate, _ = time_loader(loader(split, collate_fn=collate), lambda b: int(b["label"].shape[0]), args.min_seconds)
        store_rate, store_n = time_loader(loader(split, collate_fn=collate), store_step, args.min_seconds)

        rows = [(s, ds.meta.classes.index(s.split("_")[2])) for s in (ds.root / "train" / "ids.txt").read_text().split()]
        extract_jpegs(src, root / "Image-01-FPS", [s for s, _ in rows])
        p = dict(load_manifest("cremad").protocol("ogm-ge")["audio"], dtype="float32")

        def item_step(b: list) -> int:  # noqa: ANN001
            b[0].to(dev, non_blocking=True), b[1].to(dev, non_blocking=True)
            sync()
            return int(b[2].shape[0])

        item_rate, item_n = time_loader(loader(PerItemCremad(src, root / "Image-01-FPS", rows, p)), item_step, args.min_seconds)

    figures = {
        "clips": args.clips, "batch_size": args.batch_size, "prepare_workers": args.workers,
        "loader_workers": args.loader_workers, "device": str(dev), "prepare_seconds": round(prep_s, 2),
        "prepare_clips_per_second": round(prep_rate, 1), "store_bytes": res.report.get("store_bytes"),
        "store_raw_samples_per_second": round(raw_rate, 1), "store_samples_per_second": round(store_rate, 1),
        "per_item_samples_per_second": round(item_rate, 1), "speedup": round(store_rate / item_rate, 1),
        "speedup_raw": round(raw_rate / item_rate, 1), "cpu_count": os.cpu_count(), "torch": torch.__version__,
    }
    tab = Table(title=f"loader throughput, cremad/ogm-ge (audio 1x257x188, 1 frame 224x224), batch {args.batch_size}, "
                      f"{args.loader_workers} loader workers, transforms on {dev}", title_justify="left")
    tab.add_column("measure")
    tab.add_column("value", justify="right")
    tab.add_row("prepare (verify + decode + features + store)", f"{prep_rate:.1f} clips/s with {args.workers} workers")
    tab.add_row("per-item loader (OGM-GE CramedDataset style)", f"{item_rate:.1f} samples/s ({item_n} timed)")
    tab.add_row("prepared-store loader, batches as read", f"{raw_rate:.1f} samples/s")
    tab.add_row(f"prepared-store loader + crop/flip/normalise on {dev}", f"{store_rate:.1f} samples/s ({store_n} timed)")
    tab.add_row("store (with transforms) / per-item", f"{store_rate / item_rate:.1f}x (goal >= 10x)")
    tab.add_row("store (as read) / per-item", f"{raw_rate / item_rate:.1f}x")
    console.print(tab)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    json.dump(figures, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
