"""Incremental detokenization and stop strings (no model needed)."""

from hypothesis import given
from hypothesis import strategies as st

from services.forge.streaming import IncrementalDecoder, StopText


class ByteTokenizer:
    """Every token is one byte of UTF-8: multi-byte characters span several tokens, as in byte-level BPE."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@given(st.text(max_size=60), st.integers(1, 4))
def test_incremental_decode_equals_full_decode_and_never_emits_half_characters(text, step):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(ids[i : i + step]) for i in range(0, len(ids), step)]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


def test_incremental_decode_holds_a_split_character():
    tok = ByteTokenizer()
    decoder = IncrementalDecoder(tok)
    snake = "🐍".encode()
    assert decoder.push([*b"a", snake[0]]) == ""  # 'a' + half a snake: wait for the rest
    assert decoder.push(snake[1:3]) == ""
    assert decoder.push(snake[3:]) == "a🐍"


def test_stop_string_cuts_and_is_never_streamed():
    stop = StopText(["\nObservation:"])
    out = [stop.feed(p) for p in ["Thought: look", "\n", "Obs", "ervation: x", "more"]]
    assert "".join(out) == "Thought: look"
    assert stop.text == "Thought: look"
    assert stop.stopped
    assert out[1] == ""  # the newline was held: it might have started the stop string


def test_a_held_tail_that_was_not_a_stop_is_released():
    stop = StopText(["END"])
    assert stop.feed("the EN") == "the "
    assert stop.feed("D") == ""
    assert stop.stopped and stop.text == "the "
    other = StopText(["END"])
    assert other.feed("the EN") == "the "
    assert other.feed("try") == "ENtry"
    assert other.feed("E") == ""
    assert other.finish() == "E"
    assert other.text == "the ENtryE" and not other.stopped


def test_earliest_of_several_stops_wins():
    stop = StopText(["</s>", "\n\n"])
    assert stop.feed("ab\n\ncd</s>") == "ab"
    assert stop.text == "ab"


@given(st.lists(st.text(alphabet="abXY\n", max_size=6), max_size=12), st.sampled_from(["XY", "\n\n", "aXb"]))
def test_streamed_text_is_the_prefix_before_the_first_stop(pieces, stop_string):
    stop = StopText([stop_string])
    streamed = "".join(stop.feed(p) for p in pieces) + stop.finish()
    full = "".join(pieces)
    cut = full.find(stop_string)
    expected = full if cut < 0 else full[:cut]
    assert streamed == expected == stop.text
    assert stop.stopped == (cut >= 0)


def test_no_stops_streams_everything_immediately():
    stop = StopText([])
    assert stop.feed("abc") == "abc"
    assert stop.finish() == ""
