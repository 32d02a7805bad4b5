"""Reed-Solomon parity of protocol version 3 (firmware_hooks/fec.py), checked against
``reedsolo``, an implementation nobody here wrote, with the parameters the spec names
(GF(2^8), polynomial 0x11D, generator 2, first root 2^0)."""

from __future__ import annotations

import random

import pytest
import reedsolo
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_hooks import fec


@pytest.mark.parametrize("size", [1, 2, 17, 63, 64, 65, 128, 129, 200, 246, 247])
def test_the_parity_is_reedsolos_for_the_same_parameters(size: int) -> None:
    rng = random.Random(size)
    codec = reedsolo.RSCodec(fec.parity_size(size), nsize=255, fcr=0, prim=0x11D, generator=2)
    for _ in range(20):
        data = bytes(rng.randrange(256) for _ in range(size))
        assert fec.block_parity(data) == bytes(codec.encode(data)[size:])


def test_parity_is_two_bytes_per_started_64_data_bytes() -> None:
    assert [fec.parity_size(n) for n in (1, 64, 65, 128, 129, 247)] == [2, 2, 4, 4, 6, 8]


@given(st.integers(min_value=1, max_value=4000))
def test_the_data_length_is_found_again_from_the_protected_length(n: int) -> None:
    assert fec.data_size(fec.protected_size(n)) == n


def test_a_length_no_data_length_gives_is_none() -> None:
    # 247 data bytes take 255; 248 take 255 + 1 + 2: nothing takes 256 or 257.
    assert fec.protected_size(247) == 255 and fec.protected_size(248) == 258
    assert fec.data_size(256) is None and fec.data_size(257) is None


@settings(max_examples=300)
@given(st.data())
def test_up_to_half_the_parity_in_damaged_bytes_is_corrected_in_every_block(
    data: st.DataObject,
) -> None:
    payload = data.draw(st.binary(min_size=1, max_size=1100))
    protected = bytearray(fec.protect(payload))
    # Damage each block up to its capacity, in data or parity bytes.
    at_parity = len(payload)
    for start in range(0, len(payload), fec.BLOCK_DATA):
        block = len(payload[start : start + fec.BLOCK_DATA])
        nsym = fec.parity_size(block)
        positions = [*range(start, start + block), *range(at_parity, at_parity + nsym)]
        for pos in data.draw(st.lists(st.sampled_from(positions), max_size=nsym // 2, unique=True)):
            protected[pos] ^= data.draw(st.integers(min_value=1, max_value=255))
        at_parity += nsym
    assert fec.recover(bytes(protected)) == payload


def test_damage_beyond_the_parity_is_uncorrectable_or_another_codeword_never_a_crash() -> None:
    rng = random.Random(7)
    outcomes = {"uncorrectable": 0, "other": 0}
    for _ in range(500):
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 248)))
        word = bytearray(payload + fec.block_parity(payload))
        nsym = fec.parity_size(len(payload))
        for pos in rng.sample(range(len(word)), min(len(word), nsym // 2 + 1 + rng.randrange(4))):
            word[pos] ^= rng.randrange(1, 256)
        try:
            got = fec.correct_block(bytes(word), nsym)
        except fec.Uncorrectable:
            outcomes["uncorrectable"] += 1
            continue
        # A decoder may land on another codeword: the frame's CRC catches that.
        assert len(got) == len(payload)
        outcomes["other"] += got != payload
    assert outcomes["uncorrectable"] > 400


def test_reedsolo_corrects_what_we_protect_and_we_correct_what_it_protects() -> None:
    rng = random.Random(3)
    data = bytes(rng.randrange(256) for _ in range(200))
    nsym = fec.parity_size(len(data))
    codec = reedsolo.RSCodec(nsym)
    ours = bytearray(data + fec.block_parity(data))
    theirs = bytearray(codec.encode(data))
    for word in (ours, theirs):
        for pos in (0, 99, 205):
            word[pos] ^= 0x5A
    assert bytes(codec.decode(bytes(ours))[0]) == data
    assert fec.correct_block(bytes(theirs), nsym) == data


@settings(max_examples=500)
@given(st.binary(min_size=0, max_size=1100))
def test_any_bytes_are_recovered_or_uncorrectable_nothing_else(junk: bytes) -> None:
    try:
        data = fec.recover(junk)
    except fec.Uncorrectable:
        return
    # What it returns is a codeword within each block's capacity of what came.
    fixed = fec.protect(data)
    assert len(fixed) == len(junk)
    at_parity = len(data)
    for start in range(0, len(data), fec.BLOCK_DATA):
        size = len(data[start : start + fec.BLOCK_DATA])
        nsym = fec.parity_size(size)
        spans = [(start, start + size), (at_parity, at_parity + nsym)]
        changed = sum(fixed[i] != junk[i] for a, b in spans for i in range(a, b))
        assert changed <= nsym // 2
        at_parity += nsym
