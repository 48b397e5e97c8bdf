import logging

import clfast.engine.progress as progress_module
from clfast.engine.progress import get_logger, log_to_file, progress, progress_enabled


def test_progress_off_is_a_passthrough(monkeypatch):
    monkeypatch.delenv("CLFAST_PROGRESS", raising=False)
    bar = progress(range(3), enabled=False, desc="x")
    assert list(bar) == [0, 1, 2] and len(bar) == 3
    bar.set_postfix(loss=1.0)
    bar.update(2)
    bar.close()
    monkeypatch.setenv("CLFAST_PROGRESS", "0")
    assert not progress_enabled(True)
    monkeypatch.setenv("CLFAST_PROGRESS", "1")
    assert progress_enabled(True) and not progress_enabled(False)
    monkeypatch.setenv("RANK", "1")
    assert not progress_enabled(True)


def test_progress_on_draws_to_stderr(monkeypatch, capsys):
    monkeypatch.setenv("CLFAST_PROGRESS", "1")
    monkeypatch.delenv("RANK", raising=False)
    assert list(progress(iter([1, 2]), total=2, desc="demo")) == [1, 2]
    captured = capsys.readouterr()
    assert captured.out == "" and "demo" in captured.err


def test_logger_configured_once_and_file_handler(tmp_path):
    log = get_logger("clfast")
    n = len(log.handlers)
    assert get_logger("clfast") is log and len(log.handlers) == n
    child = get_logger("clfast.engine")
    assert child.parent is log and not child.handlers
    terminal = [h for h in log.handlers if getattr(h, progress_module._HANDLER_FLAG, False)]   # clfast's own
    try:
        get_logger(quiet=True)
        assert [h.level for h in terminal] == [logging.WARNING]
        get_logger()  # None leaves the level alone
        assert [h.level for h in terminal] == [logging.WARNING]
        h = log_to_file(log, tmp_path / "logs" / "train.log")
        assert log_to_file(log, tmp_path / "logs" / "train.log") is h
        child.info("quiet %d", 1)          # a quiet terminal, but the file gets the line
        h.flush()
        assert "clfast.engine: quiet 1" in (tmp_path / "logs" / "train.log").read_text()
        get_logger(quiet=False)
        assert [h.level for h in terminal] == [logging.INFO]
        child.info("hello %d", 3)
        h.flush()
        assert "clfast.engine: hello 3" in (tmp_path / "logs" / "train.log").read_text()
    finally:
        for handler in list(log.handlers):
            if isinstance(handler, logging.FileHandler):
                log.removeHandler(handler)
                handler.close()
