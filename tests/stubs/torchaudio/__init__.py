"""An import-only stand-in for torchaudio, for the SpeechBrain tests (tests/speechbrain_system.py).

SpeechBrain imports torchaudio at import time (``speechbrain.utils.torch_audio_backend``), but
torchaudio cannot be installed beside torch 2.13.0: its only wheel pins another torch and its
native library does not load. No code path under test reads audio, so this module only has to
import. Any attribute use other than SpeechBrain's version check fails loudly, so a test that
starts to depend on real torchaudio breaks instead of passing on a fake.
"""

__version__ = "2.9.0"  # SpeechBrain skips its backend check from 2.9 on (audio moved to torchcodec)


def __getattr__(name: str):
    raise AttributeError(f"torchaudio.{name}: this is the tests' import-only stand-in (tests/stubs/torchaudio)")
