"""Reed-Solomon forward error correction for protocol version 3 frames (stdlib only).

The code is the common one (Python's ``reedsolo`` defaults, most C libraries):
GF(2^8) with the primitive polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11D), generator
element 2, first consecutive root 2^0 (fcr = 0). A block of m data bytes carries
``parity_size(m)`` parity bytes (two for every started 64 data bytes, so at most 8
for the largest block of 247: the block corrects up to 4 damaged bytes).

A version 3 frame (docs/serial-protocol.md, section 6c) is the version 2 frame
bytes D (header, payload, CRC) cut into blocks of at most 247 bytes, followed by
the parity of each block in turn: ``D || P(block 1) || P(block 2) ...``. The data
stays where a version 2 receiver looks for it; parity is only read when the CRC
fails.
"""

from __future__ import annotations

BLOCK_DATA = 247  # data bytes of a full block (255 - 8 parity)
PRIMITIVE = 0x11D

_EXP = bytearray(512)
_LOG = [0] * 256
_x = 1
for _i in range(255):
    _EXP[_i] = _x
    _LOG[_x] = _i
    _x <<= 1
    if _x & 0x100:
        _x ^= PRIMITIVE
for _i in range(255, 512):
    _EXP[_i] = _EXP[_i - 255]
del _x, _i


class Uncorrectable(ValueError):
    """More damage in a block than its parity can correct."""


def _mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def _div(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError("division by zero in GF(256)")
    if a == 0:
        return 0
    return _EXP[(_LOG[a] + 255 - _LOG[b]) % 255]


def _poly_eval(poly: list[int] | bytes, x: int) -> int:
    """Horner; ``poly`` highest degree first."""
    y = poly[0]
    for coef in poly[1:]:
        y = _mul(y, x) ^ coef
    return y


def _poly_mul(p: list[int], q: list[int]) -> list[int]:
    out = [0] * (len(p) + len(q) - 1)
    for i, a in enumerate(p):
        if a:
            for j, b in enumerate(q):
                out[i + j] ^= _mul(a, b)
    return out


def parity_size(data_len: int) -> int:
    """Parity bytes of a block of ``data_len`` (1..247) data bytes."""
    return 2 * -(-data_len // 64)


def _generator(nsym: int) -> list[int]:
    g = [1]
    for i in range(nsym):
        g = _poly_mul(g, [1, _EXP[i]])
    return g


# Per parity size: for each feedback byte f, f x (generator without its leading 1)
# as one integer, so that encoding costs a few integer operations per byte.
_FEEDBACK: dict[int, list[int]] = {}
for _n in (2, 4, 6, 8):
    _g = _generator(_n)[1:]
    _FEEDBACK[_n] = [int.from_bytes(bytes(_mul(f, c) for c in _g), "big") for f in range(256)]
del _n, _g


def block_parity(data: bytes | bytearray | memoryview) -> bytes:
    """The parity of one block (the remainder of data(x) * x^n divided by the generator)."""
    nsym = parity_size(len(data))
    table = _FEEDBACK[nsym]
    shift = 8 * (nsym - 1)
    mask = (1 << (8 * nsym)) - 1
    rem = 0
    for byte in data:
        rem = ((rem << 8) & mask) ^ table[(rem >> shift) ^ byte]
    return rem.to_bytes(nsym, "big")


def protected_size(data_len: int) -> int:
    """Bytes of ``data_len`` bytes of data with their parity."""
    full, rest = divmod(data_len, BLOCK_DATA)
    size = full * (BLOCK_DATA + 8)
    return size + (rest + parity_size(rest) if rest else 0)


def data_size(protected_len: int) -> int | None:
    """How many of ``protected_len`` bytes are data; None if no data length gives it."""
    full, rest = divmod(protected_len, BLOCK_DATA + 8)
    guess = full * BLOCK_DATA + max(rest - 2, 0)
    for data_len in range(max(guess - 8, 1), guess + 1):
        if protected_size(data_len) == protected_len:
            return data_len
    return None


def protect(data: bytes) -> bytes:
    """``data`` followed by the parity of each of its blocks."""
    parity = b"".join(
        block_parity(data[start : start + BLOCK_DATA]) for start in range(0, len(data), BLOCK_DATA)
    )
    return data + parity


def recover(protected: bytes) -> bytes:
    """The data of a protected sequence, corrected; Uncorrectable when a block cannot be."""
    data_len = data_size(len(protected))
    if data_len is None:
        raise Uncorrectable(f"{len(protected)} bytes are no data length with its parity")
    data = bytearray(protected[:data_len])
    at = data_len
    for start in range(0, data_len, BLOCK_DATA):
        block = data[start : start + BLOCK_DATA]
        nsym = parity_size(len(block))
        parity = protected[at : at + nsym]
        at += nsym
        if block_parity(block) != parity:
            data[start : start + len(block)] = correct_block(bytes(block) + parity, nsym)
    return bytes(data)


def correct_block(codeword: bytes, nsym: int) -> bytes:
    """The data of one damaged codeword (data then ``nsym`` parity bytes), corrected:
    syndromes, Berlekamp-Massey, Chien search, Forney."""
    n = len(codeword)
    synd = [_poly_eval(codeword, _EXP[i]) for i in range(nsym)]
    if not any(synd):
        return codeword[: n - nsym]
    # Berlekamp-Massey: the error locator, lowest degree first.
    loc, prev = [1], [1]
    for k in range(nsym):
        delta = synd[k]
        for j in range(1, min(len(loc), k + 1)):
            delta ^= _mul(loc[j], synd[k - j])
        prev = [0, *prev]
        if delta:
            if len(prev) > len(loc):
                scaled = [_mul(c, delta) for c in prev]
                prev = [_div(c, delta) for c in loc]
                loc = scaled
            loc = [
                (loc[i] if i < len(loc) else 0) ^ _mul(delta, prev[i] if i < len(prev) else 0)
                for i in range(max(len(loc), len(prev)))
            ]
    while len(loc) > 1 and loc[-1] == 0:
        loc.pop()
    errors = len(loc) - 1
    if errors * 2 > nsym:
        raise Uncorrectable(f"more than {nsym // 2} damaged bytes in a block")
    # Chien search: position p (from the end, 0 = last byte) is in error when
    # loc(2^-p) = 0.
    positions = []
    loc_high = loc[::-1]
    for p in range(n):
        if _poly_eval(loc_high, _EXP[(255 - p) % 255]) == 0:
            positions.append(p)
    if len(positions) != errors:
        raise Uncorrectable("the damage does not fit this block's parity")
    # Forney: the error evaluator omega = (S(x) * loc(x)) mod x^nsym, lowest first.
    omega = [0] * nsym
    for i, s in enumerate(synd):
        if s:
            for j, c in enumerate(loc):
                if i + j < nsym:
                    omega[i + j] ^= _mul(s, c)
    fixed = bytearray(codeword)
    for p in positions:
        x_inv = _EXP[(255 - p) % 255]
        num = 0
        for i in range(len(omega) - 1, -1, -1):
            num = _mul(num, x_inv) ^ omega[i]
        # loc'(x): in GF(2^8) the formal derivative keeps the odd terms, as
        # loc[i] x^(i-1) for odd i.
        den = 0
        xp = 1
        x2 = _mul(x_inv, x_inv)
        for i in range(1, len(loc), 2):
            den ^= _mul(loc[i], xp)
            xp = _mul(xp, x2)
        if den == 0:
            raise Uncorrectable("the damage does not fit this block's parity")
        # fcr = 0: magnitude = X * omega(X^-1) / loc'(X^-1), with X = 2^p.
        magnitude = _mul(_EXP[p % 255], _div(num, den))
        fixed[n - 1 - p] ^= magnitude
    if any(_poly_eval(bytes(fixed), _EXP[i]) for i in range(nsym)):
        raise Uncorrectable("the damage does not fit this block's parity")
    return bytes(fixed[: n - nsym])
