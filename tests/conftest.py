import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The real CIRR annotations (MIT licence, the CIRR authors' release) so CI has them.
CIRR_ROOT = ROOT / "tests" / "data" / "cirr"


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A 60-video synthetic corpus with mined splits (built once per test session)."""
    from configs.schema import MiningConfig, SynthConfig
    from data.corpus import build_synthetic

    out = tmp_path_factory.mktemp("corpus")
    summary = build_synthetic(
        out,
        SynthConfig(videos=60, family_size=5, frames=12, size=32, workers=1, seed=7),
        MiningConfig(val_fraction=0.2, test_fraction=0.2, seed=7),
    )
    return out, summary
