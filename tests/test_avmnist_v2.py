"""AV-MNIST protocol v2: short recordings are padded with kaldi's log floor (silence), not with
zero log energy (louder than speech after the AudioSet normalisation); `default` stays as it was."""
from __future__ import annotations

import numpy as np

from mmbench.data.datasets.avmnist import AVMnist
from mmbench.data.features import audio_from_waveform
from mmbench.data.manifest import load_manifest


def test_v2_pads_with_the_log_floor_and_default_is_unchanged() -> None:
    man = load_manifest("avmnist")
    old, new = man.protocol("default")["audio"], man.protocol("v2")["audio"]
    assert "pad" not in old and new["pad"] == "floor"
    assert {k: v for k, v in new.items() if k != "pad"} == old  # nothing else differs
    assert man.protocol("tiny-v2")["split"] == "fsdd-tiny" and man.protocol("tiny-v2")["audio"]["pad"] == "floor"
    assert AVMnist.default_protocol == "v2" and {"default", "tiny", "v2", "tiny-v2"} <= set(man.descriptions())

    rng = np.random.default_rng(0)
    wave = (0.1 * rng.standard_normal(2400)).astype(np.float32)  # 0.3 s at 8 kHz: ~28 frames of 100
    a_old, a_new = audio_from_waveform(wave, 8000, old)[0], audio_from_waveform(wave, 8000, new)[0]
    assert a_old.shape == a_new.shape == (40, 100)
    frames = 1 + (2400 - 200) // 80  # kaldi: 25 ms windows every 10 ms
    np.testing.assert_array_equal(a_old[:, :frames], a_new[:, :frames])  # the speech is untouched
    zero = (0.0 + 4.503877) / (2 * 5.141276)
    floor = (np.log(np.finfo(np.float32).eps) + 4.503877) / (2 * 5.141276)
    np.testing.assert_allclose(a_old[:, frames:], zero, atol=1e-6)  # brighter than the mean speech frame
    np.testing.assert_allclose(a_new[:, frames:], floor, atol=1e-5)  # the value fbank gives silence
    assert a_new[:, frames:].max() <= a_new[:, :frames].min() + 1e-6  # nothing in the recording is quieter
