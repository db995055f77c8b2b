"""Reading and writing GGUF v3 files in Python (metadata of any type;
tensors F32/F16 for writing, any type's bytes for reading), for the recipe's
tools and the tests' model makers. Layout: common/engine/gguf.h (v3,
little-endian, 32-byte alignment).
"""
import struct

import numpy as np

GGUF_MAGIC, ALIGN = b"GGUF", 32
T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64 = 4, 5, 6, 7, 8, 9, 10
SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
GGML_F32, GGML_F16 = 0, 1


def read_gguf(path):
    """({key: (type, value, element type or None)}, [(name, dims, ggml type)]); tensor data is not read."""
    with open(path, "rb") as f:
        b = f.read()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, b, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return b[pos - n:pos].decode("utf-8")

    def value(t):
        if t == T_STR:
            return string()
        if t == T_ARR:
            et, n = take("I"), take("Q")
            return [value(et) for _ in range(n)]
        return take(SCALAR[t])

    if b[:4] != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file")
    pos = 4
    _version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    kv = {}
    for _ in range(n_kv):
        key, t = string(), take("I")
        elem = struct.unpack_from("<I", b, pos)[0] if t == T_ARR else None
        kv[key] = (t, value(t), elem)
    tensors = []
    for _ in range(n_tensors):
        name, nd = string(), take("I")
        dims = [take("Q") for _ in range(nd)]
        tensors.append((name, dims, take("I")))
        take("Q")  # offset
    return kv, tensors


def encode_string(s):
    """A GGUF string: u64 length, UTF-8 bytes."""
    e = s.encode("utf-8")
    return struct.pack("<Q", len(e)) + e


def encode_value(t, v, elem=None):
    """A metadata value of GGUF type t (arrays: of type elem)."""
    if t == T_STR:
        return encode_string(v)
    if t == T_ARR:
        return struct.pack("<IQ", elem, len(v)) + b"".join(encode_value(elem, x) for x in v)
    return struct.pack("<" + SCALAR[t], v)


def encode_kv(kv):
    """The metadata section: {key: (type, value, element type)} as key, type, value records."""
    return b"".join(encode_string(k) + struct.pack("<I", t) + encode_value(t, v, e) for k, (t, v, e) in kv.items())


def write_gguf(path, kv, tensors):
    """kv: {key: (type, value, element type)}; tensors: [(name, float32 array [rows, cols] or [n], ggml type)]."""
    string = encode_string

    blobs, infos, offset = [], [], 0
    for name, arr, gtype in tensors:
        data = arr.astype(np.float16 if gtype == GGML_F16 else np.float32).tobytes()
        dims = list(reversed(arr.shape))  # dims[0] is the row length
        infos.append(string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", gtype, offset))
        pad = -len(data) % ALIGN
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    head = GGUF_MAGIC + struct.pack("<IQQ", 3, len(tensors), len(kv))
    head += encode_kv(kv)
    head += b"".join(infos)
    with open(path, "wb") as f:
        f.write(head + b"\0" * (-len(head) % ALIGN))
        for blob in blobs:
            f.write(blob)


def read_tensor_bytes(path):
    """{name: (dims, ggml type, bytes)}: every tensor's stored bytes (dims[0] is the row length)."""
    _, tensors = read_gguf(path)
    with open(path, "rb") as f:
        b = f.read()
    # read_gguf stops at the tensor infos; the data starts at the next
    # ALIGN boundary after them, each tensor at its recorded offset.
    pos, offsets = _tensor_info_end(b)
    start = pos + (-pos % ALIGN)
    out = {}
    for (name, dims, gtype), off in zip(tensors, offsets):
        n = int(np.prod(dims))
        size = {GGML_F32: 4 * n, GGML_F16: 2 * n}.get(gtype)
        if size is None:
            raise ValueError(f"{path}: tensor {name} has type {gtype}; only F32/F16 are read")
        out[name] = (dims, gtype, b[start + off:start + off + size])
    return out


def read_f32_tensors(path):
    """{name: float32 array shaped [rows, cols] or [n]} for an F32/F16 file."""
    out = {}
    for name, (dims, gtype, data) in read_tensor_bytes(path).items():
        arr = np.frombuffer(data, dtype=np.float32 if gtype == GGML_F32 else np.float16).astype(np.float32)
        out[name] = arr.reshape(list(reversed(dims)))
    return out


def _tensor_info_end(b):
    """(position after the tensor infos, [tensor data offsets])."""
    pos = 4

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, b, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def skip_value(t):
        nonlocal pos
        if t == T_STR:
            n = take("Q")
            pos += n
        elif t == T_ARR:
            et, n = take("I"), take("Q")
            for _ in range(n):
                skip_value(et)
        else:
            pos += struct.calcsize("<" + SCALAR[t])

    _version, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    for _ in range(n_kv):
        n = take("Q")  # (not `pos += take(...)`: that adds to pos as it was before the read)
        pos += n
        skip_value(take("I"))
    offsets = []
    for _ in range(n_tensors):
        n = take("Q")
        pos += n
        nd = take("I")
        pos += 8 * nd + 4
        offsets.append(take("Q"))
    return pos, offsets
