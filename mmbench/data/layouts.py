"""What `prepare DATASET --source DIR` accepts, per dataset: one place for `prepare --help`, the
README and the tests (no heavy imports, so `--help` stays instant)."""
from __future__ import annotations

SOURCE_LAYOUTS: dict[str, str] = {
    "avmnist": "any folder holding FSDD's recordings/ ({digit}_{speaker}_{index}.wav) and MNIST's "
               "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (.gz or not), each up to 3 folders down",
    "cremad": "a folder with AudioWAV/ (<stem>.wav) and VideoFlash/ (<stem>.flv) of the official repository, "
              "in it or one level below (git lfs checkout or a copy)",
    "ks": "a Kinetics-400 folder in CVDF layout: <youtube_id>_<start:06d>_<end:06d>.mp4, with or without "
          "class sub-folders",
    "ave": "AVE_Dataset.zip itself, or its extracted folder (AVE/<video_id>.mp4 and the annotation files)",
}
SPLIT_LISTS = ("split lists and other pinned small files are looked for in --source first (up to two folders "
               "down, under any name: matched by size and SHA-256), then downloaded")
