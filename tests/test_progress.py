"""The sweep's progress: a redrawn line with cells done / total, the current cell and time left on a terminal;
plain log lines otherwise."""
import io

from harness.progress import Progress


class Tty(io.StringIO):
    def isatty(self):
        return True


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_terminal_gets_a_redrawn_line_with_eta():
    stream, clock, logged = Tty(), Clock(), []
    p = Progress(4, logged.append, stream=stream, clock=clock)
    p.start("flux1/fp8")
    clock.t = 30.0
    p.done()
    p.start("flux1/nvfp4")
    text = stream.getvalue()
    assert logged == []  # nothing goes to the log on a terminal
    assert "\r\x1b[2K" in text and "flux1/fp8 done in 30.0s\n" in text
    assert text.endswith("[######..................] 1/4 cells, left ~1:30 | flux1/nvfp4")


def test_pipe_gets_plain_log_lines():
    stream, clock, logged = io.StringIO(), Clock(), []
    p = Progress(2, logged.append, stream=stream, clock=clock)
    p.start("a")
    clock.t = 10.0
    p.done()
    p.start("b")
    clock.t = 25.0
    p.done()
    assert stream.getvalue() == ""
    assert logged == ["cell 1/2 a (left ?)", "  done in 10.0s (1/2, left ~0:10)",
                      "cell 2/2 b (left ~0:10)", "  done in 15.0s (2/2, left ~0:00)"]
    assert "\r" not in "".join(logged)
