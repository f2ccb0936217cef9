"""Decoding (PyAV) and the protocols' features: parity with the published recipes, exact frame times."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torchaudio

from mmbench.data import features
from mmbench.data.fixtures import frame_level, tone, write_video, write_wav
from mmbench.data.manifest import load_manifest
from mmbench.data.media import MediaError, decode_audio, one_fps_frames
from mmbench.data.transforms import frames as frames_transform


@pytest.fixture(scope="module")
def ogm_params():
    p = copy.deepcopy(load_manifest("cremad").protocol("ogm-ge")["audio"])
    p["dtype"] = "float32"
    return p


def librosa_style_reference(y: np.ndarray, sr: int, pad_mode: str = "constant") -> np.ndarray:
    """OGM-GE's CramedDataset audio, written out with numpy as librosa computes it.

    librosa.load(sr=22050) of a clip already at 22,050 Hz returns the samples unchanged; then
    np.tile(x, 3)[:3*sr], clip to [-1, 1], librosa.stft(n_fft=512, hop_length=353): periodic Hann
    window of n_fft, centred frames with n_fft//2 padding (pad_mode 'constant' = zeros since
    librosa 0.9; 'reflect' before), rfft per frame; then log(|S| + 1e-7).
    """
    n_fft, hop = 512, 353
    y = np.clip(np.tile(y, 3)[: 3 * sr], -1, 1).astype(np.float64)
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    yp = np.pad(y, n_fft // 2, mode=pad_mode)
    n = 1 + (len(yp) - n_fft) // hop
    fr = np.stack([yp[i * hop: i * hop + n_fft] for i in range(n)], axis=1)
    return np.log(np.abs(np.fft.rfft(fr * win[:, None], axis=0)) + 1e-7)


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_ogm_spectrogram_matches_librosa_style_reference(tmp_path, ogm_params, pad_mode):
    wav = write_wav(tmp_path / "clip.wav", seconds=1.3, rate=22050, freq=523.0)
    p = dict(ogm_params, pad_mode=pad_mode)
    got = features.audio_from_file(wav, p)
    assert got.shape == (1, 257, 188) and got.dtype == np.float32
    a = decode_audio(wav)
    ref = librosa_style_reference(a.samples.astype(np.float64), 22050, pad_mode)
    assert ref.shape == (257, 188)
    np.testing.assert_allclose(got[0], ref, atol=2e-3, rtol=1e-4)
    # half-precision storage (the protocol's dtype) stays within its own rounding
    stored = features.audio_from_file(wav, dict(p, dtype="float16"))
    assert stored.dtype == np.float16
    assert np.abs(stored.astype(np.float32) - got).max() < 0.01


def test_wav_decodes_exactly_as_int16_over_32768(tmp_path):
    x = tone(0.5, 16000)
    wav = write_wav(tmp_path / "a.wav", samples=x, rate=16000)
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype(np.int16)
    a = decode_audio(wav)
    assert a.rate == 16000 and a.samples.dtype == np.float32
    np.testing.assert_array_equal(a.samples, pcm.astype(np.float32) / 32768)


def test_resample_16k_to_22050_keeps_pitch_and_length():
    x = tone(1.0, 16000, freq=1000.0, amp=0.5)
    y = features.resample(x, 16000, 22050)
    assert len(y) == 22050
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert abs(np.argmax(spec) * 22050 / len(y) - 1000.0) < 2.0
    assert features.resample(x, 16000, 16000) is x


def test_fbank_follows_process_audio_recipe():
    p = load_manifest("cremad").protocol("fbank")["audio"]
    x = tone(2.0, 16000, freq=700.0)
    got = features.kaldi_fbank(x, 16000, p)
    w = torch.from_numpy(x)[None]
    w = w - w.mean()
    ref = torchaudio.compliance.kaldi.fbank(w, htk_compat=True, sample_frequency=16000, use_energy=False,
                                            window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    ref = torch.nn.ZeroPad2d((0, 0, 0, 1024 - ref.shape[0]))(ref)
    ref = (ref - (-4.503877)) / (5.141276 * 2)
    assert got.shape == (1, 128, 1024)
    np.testing.assert_allclose(got[0], ref.T.numpy(), atol=1e-5)
    long = features.kaldi_fbank(tone(12.0, 16000), 16000, p)  # cut, not padded
    assert long.shape == (1, 128, 1024)


def test_pick_frames_rules():
    assert features.pick_frames(10, 3, "segment-start") == [0, 3, 6]       # OGM-GE KS/AVE: frames 1, 4, 7
    assert features.pick_frames(3, 1, "segment-middle") == [1]
    assert features.pick_frames(4, 2, "segment-middle") == [1, 3]
    assert features.pick_frames(2, 3, "segment-start") == [0, 1, 1]        # short clip repeats its last frame


@pytest.mark.parametrize("ext", ["flv", "mp4"])
def test_frames_are_those_shown_at_whole_seconds(tmp_path, ext):
    # 29.97 fps: the frame shown at t = 1 s is frame 29 (0.968 s), at t = 2 s frame 59
    clip = write_video(tmp_path / f"c.{ext}", seconds=2.3, fps=30000 / 1001, size=(64, 48))
    every = lambda n: list(range(n))  # noqa: E731
    seq = one_fps_frames(clip, every, size=32)
    assert seq.shape == (3, 3, 32, 32) and seq.dtype == np.uint8
    levels = [int(round(f.mean())) for f in seq]
    assert levels == pytest.approx([frame_level(0), frame_level(29), frame_level(59)], abs=3)
    seek = one_fps_frames(clip, every, size=32, seek_over=0.5)  # the seeking path picks the same frames
    assert np.abs(seek.astype(int) - seq.astype(int)).max() <= 2


def test_ten_second_clip_uses_seeks_and_the_ogm_rule(tmp_path):
    clip = write_video(tmp_path / "k.mp4", seconds=10.0, fps=5, size=(32, 24), audio_rate=16000)
    p = {"frames": 3, "rule": "segment-start", "size": 16, "seek_over_seconds": 4.0}
    got = features.frames_from_file(clip, p)
    assert got.shape == (3, 3, 16, 16)
    assert [int(round(f.mean())) for f in got] == pytest.approx([frame_level(0), frame_level(15), frame_level(30)], abs=3)


def test_broken_media_are_reported_with_a_reason(tmp_path, ogm_params):
    junk = tmp_path / "junk.flv"
    junk.write_bytes(b"FLV\x01" + bytes(200))
    with pytest.raises(MediaError, match="undecodable|no video|no audio"):
        one_fps_frames(junk, lambda n: [0])
    silent = write_video(tmp_path / "silent.mp4", 1.0, 10, audio_rate=None)
    with pytest.raises(MediaError, match="no audio track"):
        decode_audio(silent)
    full = write_video(tmp_path / "full.mp4", 2.0, 10)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(MediaError):
        decode_audio(cut)
    wav = write_wav(tmp_path / "w.wav", 2.0, 16000)
    short = tmp_path / "trunc.wav"
    short.write_bytes(wav.read_bytes()[: 44 + 16000])  # header still says 2 s; 0.5 s of data left
    with pytest.raises(MediaError, match="truncated"):
        features.audio_from_file(short, ogm_params)
    tiny = write_wav(tmp_path / "tiny.wav", 0.2, 16000)
    with pytest.raises(MediaError, match="too short"):
        features.audio_from_file(tiny, ogm_params)
    with pytest.raises(MediaError, match="file missing"):
        decode_audio(tmp_path / "absent.wav")


def test_stored_size_frames_are_only_normalised_and_augment_can_be_off():
    x = torch.randint(0, 256, (4, 2, 3, 224, 224), dtype=torch.uint8)
    out = frames_transform(x, train=False, size=224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 1, 3, 1, 1)
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std)
    g = torch.Generator().manual_seed(0)
    train = frames_transform(x, train=True, gen=g, size=224)
    assert train.shape == out.shape and not torch.allclose(train, out)  # crops and flips happen
    digits = torch.randint(0, 256, (4, 1, 1, 28, 28), dtype=torch.uint8)
    a = frames_transform(digits, True, g, size=28, mean=[0.1307], std=[0.3081], augment=False)
    torch.testing.assert_close(a, (digits.float() / 255 - 0.1307) / 0.3081)


def test_train_crop_is_torchvisions_resized_crop_of_the_stored_frame():
    """On a CPU: crop + bilinear resize of the uint8 frame, as torchvision's resized_crop (and flip)."""
    import torchvision.transforms.functional as TF

    from mmbench.data import transforms

    x = torch.randint(0, 256, (1, 1, 3, 224, 224), dtype=torch.uint8)
    box = torch.tensor([[20.0, 10.0, 140.0, 160.0]])  # x0, y0, x1, y1: a 120 x 150 crop
    orig = transforms._random_resized_boxes
    try:
        transforms._random_resized_boxes = lambda *a, **k: box
        got = frames_transform(x, True, torch.Generator().manual_seed(1), size=224)
        flipped = bool(torch.rand(1, generator=torch.Generator().manual_seed(1)) < 0.5)
    finally:
        transforms._random_resized_boxes = orig
    ref = TF.resized_crop(x[:, 0], 10, 20, 150, 120, [224, 224], antialias=False).float() / 255
    ref = (ref - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    diff = (got[:, 0] - (ref.flip(-1) if flipped else ref)).abs()
    assert diff.max() <= 1.01 / 255 / 0.224  # at most one grey level apart (fixed-point vs float rounding)
    assert diff.mean() < 0.005
