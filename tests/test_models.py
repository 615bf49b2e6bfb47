"""The model store: names, cache, downloads (from a local server), import, safe and strict loading."""

from __future__ import annotations

import json

import functools
import http.server
import os
import pickle
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import randomize, tiny_architecture
from itk_gradicon.cli import main
from itk_gradicon.errors import ModelError, ModelNotAvailableError
from itk_gradicon.models import (PUBLISHED, cache_dir, cached_path, download, ensure_published, import_model,
                                 list_models, load_model, load_weight_file, save_model_file)
from itk_gradicon.network import build_network


@pytest.fixture
def tiny_state_file(tmp_path) -> Path:
    torch.manual_seed(0)
    net = randomize(build_network(tiny_architecture(3)), seed=0)
    path = tmp_path / "tiny_state.trch"
    torch.save(net.state_dict(), path)
    return path


class _Server:
    """A local HTTP server over a folder; ``truncate`` announces more bytes than it sends."""

    def __init__(self, folder: Path, truncate: bool = False) -> None:
        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def copyfile(self, source, outputfile):
                if truncate:
                    outputfile.write(source.read(1000))
                    return
                shutil.copyfileobj(source, outputfile)

        handler = functools.partial(Handler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_cache_location_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ITK_GRADICON_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ITK_GRADICON_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "itk_gradicon"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "itk_gradicon"


def test_offline_download_fails_fast_with_instructions(monkeypatch):
    # a closed local port: the connection is refused at once, as on a machine without access
    monkeypatch.setenv("ITK_GRADICON_MIRROR", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError) as err:
        load_model("unigradicon")
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert PUBLISHED["unigradicon"].url in message
    assert str(cached_path("unigradicon")) in message
    assert "gradicon models import unigradicon FILE" in message
    assert "offline, the bundled brain MRI model works at once: --model gradicon-synthbrain-96" in message
    assert not cached_path("unigradicon").exists()
    assert [p.name for p in cache_dir().iterdir()] == []  # nothing left behind, not even a staging folder


def test_offline_cli_is_one_line_and_nonzero(monkeypatch, tmp_path):
    monkeypatch.setenv("ITK_GRADICON_MIRROR", "http://127.0.0.1:9")
    result = CliRunner().invoke(main, ["models", "download", "multigradicon", "-q"])
    assert result.exit_code == 2
    assert result.output.startswith("Error: model 'multigradicon' is not in the cache")
    assert "Traceback" not in result.output


def test_download_from_local_server_is_atomic(tmp_path, tiny_state_file):
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(tiny_state_file, served / "weights.trch")
    destination = tmp_path / "dl" / "weights.trch"
    with _Server(served) as server:
        digest = download(server.url + "/weights.trch", destination)
    assert destination.read_bytes() == tiny_state_file.read_bytes()
    assert len(digest) == 64
    with _Server(served, truncate=True) as server:
        with pytest.raises(ModelNotAvailableError, match="stopped after"):
            download(server.url + "/weights.trch", tmp_path / "dl2" / "weights.trch")
    assert list((tmp_path / "dl2").iterdir()) == []


def test_downloaded_file_that_is_not_the_model_is_discarded(monkeypatch, tmp_path, tiny_state_file):
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(tiny_state_file, served / "unigradicon.trch")  # wrong architecture for this name
    with _Server(served) as server:
        monkeypatch.setenv("ITK_GRADICON_MIRROR", server.url)
        with pytest.raises(ModelError, match="not valid unigradicon weights"):
            ensure_published("unigradicon")
    assert not cached_path("unigradicon").exists()


@pytest.mark.slow
def test_published_name_downloads_from_mirror_then_loads(monkeypatch, tmp_path, published_random_trch):
    served = tmp_path / "served"
    served.mkdir()
    for name in ("unigradicon", "multigradicon"):
        shutil.copyfile(published_random_trch, served / f"{name}.trch")
    with _Server(served) as server:
        monkeypatch.setenv("ITK_GRADICON_MIRROR", server.url)
        model = load_model("unigradicon")
    assert model.name == "unigradicon" and model.refinement == PUBLISHED["unigradicon"].refinement  # field IO
    assert cached_path("unigradicon").stat().st_size == published_random_trch.stat().st_size
    rows = {r["name"]: r for r in list_models()}
    assert rows["unigradicon"]["present"] and rows["unigradicon"]["sha256"] == model.sha256
    assert not rows["multigradicon"]["present"]
    # a file:// mirror works too
    monkeypatch.setenv("ITK_GRADICON_MIRROR", served.as_uri())
    assert load_model("multigradicon").architecture == model.architecture
    # and a second load uses the cache without any mirror
    monkeypatch.setenv("ITK_GRADICON_MIRROR", (tmp_path / "nowhere").as_uri())
    assert load_model("unigradicon").sha256 == model.sha256


@pytest.mark.slow
def test_import_then_list(published_random_trch):
    result = CliRunner().invoke(main, ["models", "import", "multigradicon", str(published_random_trch)])
    assert result.exit_code == 0, result.output
    listing = CliRunner().invoke(main, ["models", "list", "--json"])
    assert listing.exit_code == 0
    assert '"present": true' in listing.output
    assert cached_path("multigradicon").read_bytes()[:64] == published_random_trch.read_bytes()[:64]


def test_import_refuses_wrong_weights(tiny_state_file):
    with pytest.raises(ModelError):
        import_model("unigradicon", tiny_state_file)
    assert not cached_path("unigradicon").exists()
    result = CliRunner().invoke(main, ["models", "import", "nosuchmodel", str(tiny_state_file)])
    assert result.exit_code == 2 and "known: unigradicon, multigradicon" in result.output


def test_state_dict_file_architecture_is_recognised(tiny_state_file):
    model = load_weight_file(tiny_state_file, input_shape=(24, 24, 24))
    assert model.architecture == tiny_architecture(3)


def test_model_file_round_trip(tmp_path):
    arch = tiny_architecture(2)
    torch.manual_seed(1)
    net = randomize(build_network(arch).eval(), seed=1)
    path = save_model_file(tmp_path / "m.pt", net, arch, name="toy",
                           preprocessing={"ct_window": [-500, 500]}, provenance={"steps": 3})
    model = load_model(str(path))
    assert model.name == "toy" and model.architecture == arch
    assert model.preprocessing == {"ct_window": [-500, 500]} and model.provenance["steps"] == 3
    a, b = torch.rand(1, 1, 24, 24), torch.rand(1, 1, 24, 24)
    with torch.no_grad():
        assert torch.equal(net(a, b).on_grid((24, 24)), model.network(a, b).on_grid((24, 24)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no staging folder left


def test_corrupted_and_truncated_files(tmp_path, tiny_state_file):
    garbage = tmp_path / "garbage.trch"
    garbage.write_bytes(os.urandom(5000))
    truncated = tmp_path / "truncated.trch"
    data = tiny_state_file.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.trch"
    empty.write_bytes(b"")
    for path in (garbage, truncated, empty):
        with pytest.raises(ModelError, match="not a"):
            load_model(str(path))


class _Payload:
    """Unpickling this would create a file: proof that loading runs no code."""

    marker = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "code-was-run"
    payload = _Payload()
    payload.marker = str(marker)
    for name, content in (("torch_save.pt", {"weights": payload}), ):
        path = tmp_path / name
        torch.save(content, path)
        with pytest.raises(ModelError, match="refused without running"):
            load_model(str(path))
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(payload))
    with pytest.raises(ModelError):
        load_model(str(raw))
    assert not marker.exists()
    result = CliRunner().invoke(main, ["models", "info", str(tmp_path / "torch_save.pt")])
    assert result.exit_code == 2 and "Traceback" not in result.output and not marker.exists()


def test_wrong_architecture_is_refused_strictly(tmp_path):
    torch.manual_seed(2)
    state = build_network(tiny_architecture(3)).state_dict()
    missing = dict(state)
    missing.pop(next(iter(missing)))
    (tmp_path / "missing.trch").write_bytes(b"")
    torch.save(missing, tmp_path / "missing.trch")
    with pytest.raises(ModelError):
        load_model(str(tmp_path / "missing.trch"))
    reshaped = dict(state)
    key = next(k for k in reshaped if k.endswith("lastConv.weight"))
    reshaped[key] = torch.zeros(5, *reshaped[key].shape[1:])
    torch.save(reshaped, tmp_path / "reshaped.trch")
    with pytest.raises(ModelError):
        load_model(str(tmp_path / "reshaped.trch"))
    # our model file claiming one architecture while holding another
    arch = tiny_architecture(3)
    other = build_network(tiny_architecture(2))
    path = save_model_file(tmp_path / "lying.pt", other, arch, name="lying")
    with pytest.raises(ModelError, match="does not match the architecture"):
        load_model(str(path))
    # published name with a tiny file in the cache: refused, not silently partially loaded
    cached_path("unigradicon").parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, cached_path("unigradicon"))
    with pytest.raises(ModelError, match="tensors missing|unexpected|wrong shape"):
        load_model("unigradicon")


def test_unknown_names_and_missing_files():
    with pytest.raises(ModelError, match="unknown model 'unigradicn'.*unigradicon, multigradicon"):
        load_model("unigradicn")
    with pytest.raises(ModelError, match="does not exist"):
        load_model("/nonexistent/model.pt")


def test_models_info_cli(tiny_model_file):
    result = CliRunner().invoke(main, ["models", "info", str(tiny_model_file)])
    assert result.exit_code == 0, result.output
    assert '"levels": 2' in result.output and '"name": "tiny3d"' in result.output
    record = json.loads(result.output)
    assert record["refinement"]["iterations"] == 0 and record["domain"]["extent_mm"] is None
