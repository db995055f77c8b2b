"""Writes a GGUF v3 file (architecture "llama", F32 tensors, tokenizer inside).
Follows the GGUF spec; tensor names and metadata keys as llama.cpp uses them."""
import mmap
import struct

import numpy as np

ALIGN = 32
T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR = 4, 5, 6, 7, 8, 9


def read_string_kvs(path):
    """The string-valued metadata of a GGUF file (other values skipped)."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f:  # mapped: only the metadata pages are read
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    magic, version, _, n_kv = struct.unpack_from("<IIQQ", data, 0)
    if magic != 0x46554747 or version < 2:
        raise ValueError(f"{path}: not a GGUF v2/v3 file")
    pos, out = 24, {}

    def string(pos):
        (n,) = struct.unpack_from("<Q", data, pos)
        return data[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n

    def skip(vtype, pos):
        if vtype == T_STR:
            return string(pos)[1]
        if vtype == T_ARR:
            etype, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(n):
                pos = skip(etype, pos)
            return pos
        return pos + sizes[vtype]

    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype == T_STR:
            out[key], pos = string(pos)
        else:
            pos = skip(vtype, pos)
    return out


def _str(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv(key, vtype, value):
    out = _str(key) + struct.pack("<I", vtype)
    if vtype == T_U32:
        out += struct.pack("<I", value)
    elif vtype == T_I32:
        out += struct.pack("<i", value)
    elif vtype == T_F32:
        out += struct.pack("<f", value)
    elif vtype == T_BOOL:
        out += struct.pack("<B", 1 if value else 0)
    elif vtype == T_STR:
        out += _str(value)
    else:
        etype, items = value
        out += struct.pack("<IQ", etype, len(items))
        for it in items:
            out += _str(it) if etype == T_STR else struct.pack({T_F32: "<f", T_I32: "<i"}[etype], it)
    return out


def write_gguf(path, cfg, tensors, vocab, name, extra=()):
    """cfg: dim, hidden, n_layers, n_heads, n_kv_heads, context_length;
    tensors: list of (gguf name, float32 numpy array [rows, cols] or [n]);
    extra: (key, string) metadata, e.g. the corpus the model was trained on."""
    kvs = [
        _kv("general.architecture", T_STR, "llama"),
        _kv("general.name", T_STR, name),
        _kv("general.alignment", T_U32, ALIGN),
        _kv("llama.context_length", T_U32, cfg["context_length"]),
        _kv("llama.embedding_length", T_U32, cfg["dim"]),
        _kv("llama.block_count", T_U32, cfg["n_layers"]),
        _kv("llama.feed_forward_length", T_U32, cfg["hidden"]),
        _kv("llama.attention.head_count", T_U32, cfg["n_heads"]),
        _kv("llama.attention.head_count_kv", T_U32, cfg["n_kv_heads"]),
        _kv("llama.rope.dimension_count", T_U32, cfg["dim"] // cfg["n_heads"]),
        _kv("llama.rope.freq_base", T_F32, 10000.0),
        _kv("llama.attention.layer_norm_rms_epsilon", T_F32, 1e-5),
        _kv("tokenizer.ggml.model", T_STR, "llama"),
        _kv("tokenizer.ggml.tokens", T_ARR, (T_STR, vocab.pieces)),
        _kv("tokenizer.ggml.scores", T_ARR, (T_F32, vocab.scores)),
        _kv("tokenizer.ggml.token_type", T_ARR, (T_I32, vocab.types)),
        _kv("tokenizer.ggml.bos_token_id", T_U32, vocab.bos),
        _kv("tokenizer.ggml.eos_token_id", T_U32, vocab.eos),
        _kv("tokenizer.ggml.add_bos_token", T_BOOL, True),
        _kv("tokenizer.ggml.add_space_prefix", T_BOOL, True),
    ] + [_kv(k, T_STR, v) for k, v in extra]
    header = struct.pack("<IIQQ", 0x46554747, 3, len(tensors), len(kvs)) + b"".join(kvs)
    infos, blobs, offset = b"", [], 0
    for tname, arr in tensors:
        arr = np.ascontiguousarray(arr, dtype="<f4")
        dims = list(reversed(arr.shape))  # dims[0] is the row length
        infos += _str(tname) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", 0, offset)  # type F32
        data = arr.tobytes()
        pad = (-len(data)) % ALIGN
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    out = header + infos
    out += b"\0" * ((-len(out)) % ALIGN)
    with open(path, "wb") as f:
        f.write(out)
        for b in blobs:
            f.write(b)
