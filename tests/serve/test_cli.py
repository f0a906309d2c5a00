"""``python -m engine.serve`` startup errors, in-process: one line on stderr and exit status 2."""
from __future__ import annotations

import socket

import pytest

from engine.serve.cli import main

from ._server import build_engine


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_engine(tmp_path_factory.mktemp("serve-engine"))


def one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("engine.serve: error: "), err
    return err


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "--port"),
    (["--max-batch-tokens", "0"], "--max-batch-tokens"),
    (["--max-queue-tokens", "many"], "--max-queue-tokens"),
    (["--dtype", "int8"], "--dtype"),
    (["--api-key", "a", "--api-key-file", "f"], "not allowed with"),
    (["--log-level", "loud"], "--log-level"),
])
def test_bad_options(engine_dir, capsys, args, message):
    assert message in one_line_error(capsys, main([str(engine_dir), *args]))


def test_bad_engine_dir_device_and_key_file(engine_dir, tmp_path, capsys):
    assert "not a directory" in one_line_error(capsys, main([str(tmp_path / "missing")]))
    assert "engine_config.json" in one_line_error(capsys, main([str(tmp_path)]))
    assert "device='gpu'" in one_line_error(capsys, main([str(engine_dir), "--device", "gpu"]))
    assert "max_position_embeddings" in one_line_error(capsys, main([str(engine_dir), "--max-input-length", "5000"]))
    assert "no-such-key" in one_line_error(capsys, main([str(engine_dir), "--api-key-file", str(tmp_path / "no-such-key")]))
    empty = tmp_path / "empty-key"
    empty.write_text("\n")
    assert "holds no key" in one_line_error(capsys, main([str(engine_dir), "--api-key-file", str(empty)]))


def test_port_in_use(engine_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(capsys, main([str(engine_dir), "--port", str(port)]))
