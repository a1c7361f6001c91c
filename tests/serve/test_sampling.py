"""Token choice and incremental text: greedy, top-p, seeds, stop strings and held-back text."""

from __future__ import annotations

import torch

from deltatune.serve.sampling import SamplingParams, TextStream, choose_tokens, sample


class CharTokenizer:
    """Token i is chr(i); 0xFFFD stands for an incomplete multi-byte character."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def stream_all(stream: TextStream, text: str) -> list[str]:
    pieces = []
    for ch in text:
        pieces.append(stream.add(ord(ch)))
        if stream.stopped:
            break
    return pieces + [stream.finish()]


def test_greedy_rows_take_the_argmax_and_sampled_rows_their_own_generator():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    greedy = SamplingParams(max_tokens=1, temperature=0.0)
    hot = SamplingParams(max_tokens=1, temperature=1.0, seed=3)
    assert choose_tokens(logits, [greedy, greedy], [None, None]) == [1, 0]
    draws = {choose_tokens(logits, [greedy, hot], [None, hot.generator()])[1] for _ in range(5)}
    assert len(draws) == 1, "the same seed gives the same draw"


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    generator = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, 0.8, generator) for _ in range(200)}
    assert draws == {0, 1}
    assert {sample(logits, 1.0, 0.5, generator) for _ in range(50)} == {0}


def test_stop_string_cuts_the_text_and_nothing_past_it_is_shown():
    stream = TextStream(CharTokenizer(), stop=("END",))
    pieces = stream_all(stream, "hello ENDING")
    assert "".join(pieces) == "hello " and stream.stopped
    assert all("E" not in p for p in pieces)


def test_a_partial_stop_string_is_held_back_then_released():
    stream = TextStream(CharTokenizer(), stop=("STOP",))
    assert stream.add(ord("a")) == "a"
    assert stream.add(ord("S")) == "" and stream.add(ord("T")) == ""
    assert stream.add(ord("x")) == "STx"
    assert stream.finish() == "" and not stream.stopped


def test_incomplete_characters_wait_for_the_next_token():
    stream = TextStream(CharTokenizer())
    assert stream.add(ord("a")) == "a"
    assert stream.add(0xFFFD) == ""
    assert stream.finish() == "\ufffd"


def test_earliest_of_several_stops_wins():
    stream = TextStream(CharTokenizer(), stop=("zz", "b"))
    assert "".join(stream_all(stream, "aabzz")) == "aa"
