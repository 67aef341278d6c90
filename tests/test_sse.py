"""Server-sent events split as they arrive: whole events at once, a partial one held."""

from __future__ import annotations

from proxy.upstream.sse import EventSplitter, data_of

CHUNK = b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
PING = b": ping - 2026-11-22 00:00:00\r\n\r\n"
DONE = b"data: [DONE]\r\n\r\n"


def test_events_split_anywhere_come_out_whole_and_byte_exact() -> None:
    whole = CHUNK + PING + CHUNK + DONE
    for size in (1, 3, 7, 64, len(whole)):
        splitter = EventSplitter()
        events = []
        for start in range(0, len(whole), size):
            events += splitter.feed(whole[start : start + size])
        assert events == [CHUNK, PING, CHUNK, DONE], size
        assert splitter.pending == b""


def test_complete_events_pass_at_once_and_only_a_partial_one_waits() -> None:
    splitter = EventSplitter()
    assert splitter.feed(CHUNK) == [CHUNK]
    assert splitter.feed(CHUNK[:10]) == []
    assert splitter.feed(CHUNK[10:] + PING[:5]) == [CHUNK]
    assert splitter.feed(PING[5:]) == [PING]


def test_data_of_joins_data_lines_and_comments_have_none() -> None:
    assert data_of(CHUNK) == b'{"choices": [{"delta": {"content": "Hi"}}]}'
    assert data_of(b"event: x\ndata:a\ndata: b\n\n") == b"a\nb"
    assert data_of(PING) is None
    assert data_of(DONE) == b"[DONE]"
