"""The progress display of `neox-sophia preprocess`: documents/s and tokens/s as it goes, and a
bar with the time left when the number of documents is known (--num-docs)."""
from __future__ import annotations

import time
from typing import IO, Optional


class Progress:
    """Progress of a run: documents and tokens so far, documents/s and tokens/s, and with the
    number of documents known (--num-docs) a bar, the percentage and the time left. On a terminal
    one line is redrawn at most 4 times a second (a short run finishes before the first); in a log
    file a line is written every `interval` documents."""

    def __init__(self, stream: Optional[IO[str]], interval: int, total: Optional[int] = None):
        self.stream, self.interval, self.total = stream, max(1, interval), total
        self.terminal = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.next_report, self.next_draw, self.drawn = self.interval, self.start + 0.25, False

    def update(self, summary) -> None:
        if self.stream is None:
            return
        now = time.perf_counter()
        if self.terminal:
            if now < self.next_draw:
                return
            self.next_draw = now + 0.25
            print(f"\r{self.line(summary, now)}\033[K", end="", file=self.stream, flush=True)
            self.drawn = True
        elif summary.documents >= self.next_report:
            while self.next_report <= summary.documents:
                self.next_report += self.interval
            print(self.line(summary, now), file=self.stream, flush=True)

    def line(self, summary, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        docs_per_s, tokens_per_s = summary.documents / elapsed, summary.tokens / elapsed
        rates = f"{docs_per_s:,.0f} docs/s, {tokens_per_s:,.0f} tokens/s"
        if not self.total:
            return f"preprocess: {summary.documents:,} documents, {summary.tokens:,} tokens ({rates})"
        done = min(summary.documents / self.total, 1.0)
        left = (self.total - summary.documents) / docs_per_s if docs_per_s and done < 1 else 0.0
        bar = "#" * int(done * 30) + "-" * (30 - int(done * 30))
        return (f"preprocess: [{bar}] {done:4.0%} {summary.documents:,}/{self.total:,} documents, "
                f"{summary.tokens:,} tokens ({rates}, {left:,.0f} s left)")

    def close(self) -> None:
        if self.drawn:  # end the redrawn line before the summary
            print(file=self.stream, flush=True)
