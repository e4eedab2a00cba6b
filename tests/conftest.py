import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a model hub
warnings.filterwarnings("ignore")


import pytest  # noqa: E402


@pytest.fixture
def small_tuning(monkeypatch: pytest.MonkeyPatch) -> None:
    """The end-to-end tuning recipe at a tenth of its samples and one epoch: what these tests check (the tuned
    values reach the artifact, validate finds them again) does not depend on how long it tunes."""
    import mlexport.quantize.tune as tune

    small = {
        **tune.TUNE_DEFAULT,
        "epochs": 1,
        "extra_generated": {**tune.TUNE_DEFAULT["extra_generated"], "sequences": 16},
        "chat_generated": {**tune.TUNE_DEFAULT["chat_generated"], "sequences": 8},
    }
    monkeypatch.setattr(tune, "TUNE_DEFAULT", small)
