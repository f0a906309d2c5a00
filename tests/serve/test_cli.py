"""``python -m engine.serve`` startup errors, in-process: one line on stderr and exit status 2."""
from __future__ import annotations

import signal
import socket

import pytest

from engine import shell
from engine.serve import cli
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
    (["--max-client-batch-size", "0"], "--max-client-batch-size"),
    (["--max-input-chars", "-5"], "--max-input-chars"),
    (["--max-request-chars", "lots"], "--max-request-chars"),
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


# -- the port before the model; error lines that name what they are about ---------------------------

@pytest.fixture
def loads(monkeypatch) -> list:
    """Each engine load main() starts (the real one runs after it is recorded)."""
    calls = []
    real = cli._load

    def spy(args):
        calls.append(args.engine_dir)
        return real(args)

    monkeypatch.setattr(cli, "_load", spy)
    return calls


def test_taken_port_is_reported_before_the_model_loads(engine_dir, capsys, loads):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(capsys, main([str(engine_dir), "--port", str(port)]))
    assert loads == [], "refused before loading the engine"


def test_socket_is_closed_when_loading_fails(engine_dir, capsys, monkeypatch):
    bound = []
    real = cli._bind

    def spy(host, port):
        bound.append(real(host, port))
        return bound[-1]

    monkeypatch.setattr(cli, "_bind", spy)
    assert "device='gpu'" in one_line_error(capsys, main([str(engine_dir), "--port", "0", "--device", "gpu"]))
    assert len(bound) == 1 and bound[0].fileno() == -1, "bound before the load, closed after its error"

    def interrupted(args):
        raise shell.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(cli, "_load", interrupted)
    assert main([str(engine_dir), "--port", "0"]) == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in capsys.readouterr().err
    assert len(bound) == 2 and bound[1].fileno() == -1


def test_error_lines_name_the_option_and_value(engine_dir, tmp_path, capsys, loads):
    missing = tmp_path / "missing-key"
    binary = tmp_path / "binary-key"
    binary.write_bytes(b"\xff\xfe\x00k\x00e\x00y\n")
    nul = tmp_path / "nul-key"
    nul.write_bytes(b"sk-\x00abc\n")
    cases = [
        (["--api-key-file", str(missing)], f"--api-key-file {missing}: No such file or directory"),
        (["--api-key-file", str(tmp_path)], f"--api-key-file {tmp_path}: Is a directory"),
        (["--api-key-file", str(binary)], f"--api-key-file {binary}: not a text file (byte 0xff at offset 0"),
        (["--api-key-file", str(nul)], f"--api-key-file {nul}: the key must be printable ASCII"),
        (["--api-key", "clé"], "--api-key: the key must be printable ASCII"),
        (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid': not an address of this machine"),
        (["--host", "a..b"], "--host 'a..b': not a valid host name"),
    ]
    for args, message in cases:
        err = one_line_error(capsys, main([str(engine_dir), "--port", "0", *args]))
        assert message in err, (args, err)
        assert "Errno" not in err and "codec" not in err, err
    assert loads == [], "every one found before loading the engine"


def test_limit_options_reach_the_app(engine_dir):
    from engine import Engine
    from engine.serve.app import create_app

    engine = Engine.from_pretrained(engine_dir, max_length=64)
    chosen = cli.parser().parse_args([str(engine_dir), "--max-client-batch-size", "16", "--max-input-chars", "1000",
                                      "--max-request-chars", "5000", "--max-queue-tokens", "4096"])
    defaults = cli.parser().parse_args([str(engine_dir)])
    limits = [create_app(engine, cli.settings(args, None), warmup=False).state.service.info()["limits"]
              for args in (chosen, defaults)]
    assert limits[0] == {"max_batch_tokens": 16384, "max_batch_size": 256, "max_queue_tokens": 4096,
                         "max_request_bytes": 1 << 20, "max_client_batch_size": 16, "max_input_chars": 1000,
                         "max_request_chars": 5000}
    assert limits[1] == {"max_batch_tokens": 16384, "max_batch_size": 256, "max_queue_tokens": 262144,
                         "max_request_bytes": 32 * 262144, "max_client_batch_size": 2048, "max_input_chars": 32 * 64,
                         "max_request_chars": 16 * 262144}
