"""Reading and forging apeserve cache entries (common/kv/kv_block_format.md)
for the fault tests: parse a stored block, change its header, tokens or
payload, and seal it again with a correct XXH3-128 checksum, as an attacker
with write access to Redis could.

XXH3-128 comes from the system's libxxhash (the library the servers link,
so it is present wherever they build) through ctypes: Debian's python3-xxhash
is not a dependency of the project.
"""
import ctypes
import ctypes.util
import struct

MAGIC = b"APEKV\r\n\x1a"
FIXED_HEADER = 96
CHECKSUM_BYTES = 16
KEY_PREFIX = "ape:v1:kv:"
DTYPE_FLOAT16, DTYPE_FLOAT32 = 1, 2
KIND_PREFIX, KIND_CONTEXT = 1, 2
FORMAT_VERSION = 1

# offset 8: version, header_bytes; 16: fingerprint; 32: 8 x u32; 64: prefix
# key; 80: payload_bytes, reserved.
_U32_FIELDS = ("n_layers", "n_kv_heads", "head_dim", "dtype", "kind", "num_tokens", "first_position", "reserved32")


class _Hash128(ctypes.Structure):
    _fields_ = [("low64", ctypes.c_uint64), ("high64", ctypes.c_uint64)]


_lib = None


def _xxhash():
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("xxhash") or "libxxhash.so.0"
        lib = ctypes.CDLL(name)
        lib.XXH3_128bits.restype = _Hash128
        lib.XXH3_128bits.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        _lib = lib
    return _lib


def xxh3_128(data):
    """XXH3-128 of data as the format writes it: high 64 bits first, each
    big-endian (kv_block.cc's HashFromHalves)."""
    h = _xxhash().XXH3_128bits(bytes(data), len(data))
    return struct.pack(">QQ", h.high64, h.low64)


def kv_key(fingerprint, dtype, kind, prefix_ids, context_ids=()):
    """The Redis key of an entry (kv_block_format.md, Keys)."""
    b = b"apeserve-kv-key\0" + struct.pack("<I", FORMAT_VERSION) + fingerprint
    b += struct.pack("<III", dtype, kind, len(prefix_ids)) + struct.pack(f"<{len(prefix_ids)}i", *prefix_ids)
    b += struct.pack("<I", len(context_ids)) + struct.pack(f"<{len(context_ids)}i", *context_ids)
    return KEY_PREFIX + xxh3_128(b).hex()


class Block:
    """A parsed block: .version, .fingerprint (16 bytes), the u32 fields of
    _U32_FIELDS, .prefix_key (16 bytes), .reserved64, .tokens (list of int),
    .payload (bytes). seal() writes it back with every size field and the
    checksum recomputed from the content (so a forged entry passes the
    reader's structural checks)."""

    @classmethod
    def parse(cls, raw):
        if raw[:8] != MAGIC:
            raise ValueError("not a KV block (bad magic)")
        b = cls()
        b.version, header_bytes = struct.unpack_from("<II", raw, 8)
        b.fingerprint = raw[16:32]
        for name, v in zip(_U32_FIELDS, struct.unpack_from("<8I", raw, 32)):
            setattr(b, name, v)
        b.prefix_key = raw[64:80]
        payload_bytes, b.reserved64 = struct.unpack_from("<QQ", raw, 80)
        b.tokens = list(struct.unpack_from(f"<{b.num_tokens}i", raw, FIXED_HEADER))
        if header_bytes != FIXED_HEADER + 4 * b.num_tokens:
            raise ValueError("header_bytes does not match num_tokens")
        b.payload = raw[header_bytes:header_bytes + payload_bytes]
        if len(raw) != header_bytes + payload_bytes + CHECKSUM_BYTES:
            raise ValueError("size does not match the header")
        if raw[-CHECKSUM_BYTES:] != xxh3_128(raw[:-CHECKSUM_BYTES]):
            raise ValueError("checksum mismatch")
        return b

    @property
    def value_bytes(self):
        return 2 if self.dtype == DTYPE_FLOAT16 else 4

    @property
    def token_bytes(self):
        """Payload bytes of one token in one layer, K or V."""
        return self.n_kv_heads * self.head_dim * self.value_bytes

    def layer_tensors(self):
        """[(K bytes, V bytes)] per layer, each [num_tokens][heads][dim]."""
        per = self.num_tokens * self.token_bytes
        return [(self.payload[2 * per * l:2 * per * l + per], self.payload[2 * per * l + per:2 * per * (l + 1)])
                for l in range(self.n_layers)]

    def resize(self, num_tokens, pad_token=None):
        """num_tokens tokens: extra ones repeat the tokens (or pad_token) and
        the KV of the existing ones in turn, fewer truncate; every layer's K
        and V stay consistent with the new count."""
        old = self.num_tokens
        tokens = [self.tokens[i % old] if pad_token is None else pad_token for i in range(old, num_tokens)]
        self.tokens = (self.tokens + tokens)[:num_tokens]
        tb = self.token_bytes

        def grow(t):
            rows = [t[(i % old) * tb:(i % old + 1) * tb] for i in range(num_tokens)]
            return b"".join(rows)

        self.payload = b"".join(grow(k) + grow(v) for k, v in self.layer_tensors())
        self.num_tokens = num_tokens
        return self

    def seal(self, version=None):
        """The block's bytes with header_bytes, payload_bytes and the
        checksum computed from the content."""
        header_bytes = FIXED_HEADER + 4 * len(self.tokens)
        out = MAGIC + struct.pack("<II", self.version if version is None else version, header_bytes)
        out += self.fingerprint
        out += struct.pack("<8I", *(getattr(self, n) for n in _U32_FIELDS))
        out += self.prefix_key + struct.pack("<QQ", len(self.payload), self.reserved64)
        out += struct.pack(f"<{len(self.tokens)}i", *self.tokens) + self.payload
        return out + xxh3_128(out)


NAN_FLOAT16 = b"\x00\x7e"  # little-endian 0x7e00, a quiet NaN
NAN_FLOAT32 = b"\x00\x00\xc0\x7f"


def with_nan(block, count=None):
    """The block's payload with its first `count` values (all when None) of
    every layer's K and V set to NaN."""
    nan = NAN_FLOAT16 if block.dtype == DTYPE_FLOAT16 else NAN_FLOAT32
    parts = []
    for k, v in block.layer_tensors():
        for t in (k, v):
            n = len(t) // len(nan) if count is None else min(count, len(t) // len(nan))
            parts.append(nan * n + t[n * len(nan):])
    block.payload = b"".join(parts)
    return block
