#!/usr/bin/python3
"""Writes the committed seed corpus of gguf_fuzzer (fuzz/corpus/gguf/).

Run from fuzz/ with any python3 (standard library only): python3 make_gguf_seeds.py.
Each seed is a small valid GGUF file (format: include/qkv/gguf.h) under 4 KiB.
"""
import struct

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR = {U8: '<B', I8: '<b', U16: '<H', I16: '<h', U32: '<I', I32: '<i', F32: '<f',
          BOOL: '<?', U64: '<Q', I64: '<q', F64: '<d'}
# ggml type: (values per block, bytes per block), from ggml-common.h.
GGML = {'F32': (0, 1, 4), 'F16': (1, 1, 2), 'Q4_0': (2, 32, 18), 'Q4_1': (3, 32, 20),
        'Q8_0': (8, 32, 34), 'Q2_K': (10, 256, 84), 'Q4_K': (12, 256, 144),
        'Q6_K': (14, 256, 210), 'BF16': (30, 1, 2)}


def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack('<Q', len(b)) + b


def value(t, v):
    """Encodes value v of type t (without the type tag); arrays are (element type, list)."""
    if t in SCALAR:
        return struct.pack(SCALAR[t], v)
    if t == STR:
        return gstr(v)
    et, items = v
    return struct.pack('<IQ', et, len(items)) + b''.join(value(et, x) for x in items)


def gguf(name, kvs, tensors=(), version=3, alignment=32):
    """kvs: [(key, type, value)]; tensors: [(name, ne, ggml type name)]."""
    out = b'GGUF' + struct.pack('<IQQ', version, len(tensors), len(kvs))
    for key, t, v in kvs:
        out += gstr(key) + struct.pack('<I', t) + value(t, v)
    data = b''
    for tname, ne, tt in tensors:
        code, block_values, block_bytes = GGML[tt]
        nbytes = ne[0] // block_values * block_bytes
        for n in ne[1:]:
            nbytes *= n
        data += b'\0' * (-len(data) % alignment)
        out += gstr(tname) + struct.pack('<I', len(ne)) + struct.pack(f'<{len(ne)}Q', *ne)
        out += struct.pack('<IQ', code, len(data))
        data += bytes((i * 37 + 11) & 0xFF for i in range(nbytes))
    if tensors:
        out += b'\0' * (-len(out) % alignment) + data
    assert len(out) < 4096, (name, len(out))
    open('corpus/gguf/' + name, 'wb').write(out)


llama_kvs = [
    ('general.architecture', STR, 'llama'),
    ('general.name', STR, 'tiny'),
    ('llama.block_count', U32, 1),
    ('llama.context_length', U32, 64),
    ('llama.embedding_length', U32, 32),
    ('llama.feed_forward_length', U32, 64),
    ('llama.attention.head_count', U32, 2),
    ('llama.attention.head_count_kv', U32, 1),
    ('llama.rope.freq_base', F32, 100000.0),
    ('llama.attention.layer_norm_rms_epsilon', F32, 1e-5),
    ('tokenizer.ggml.model', STR, 'gpt2'),
    ('tokenizer.ggml.pre', STR, 'smollm'),
    ('tokenizer.ggml.tokens', ARR, (STR, ['<|endoftext|>', 'a', 'b', 'ab'])),
    ('tokenizer.ggml.token_type', ARR, (I32, [3, 1, 1, 1])),
    ('tokenizer.ggml.merges', ARR, (STR, ['a b'])),
    ('tokenizer.ggml.bos_token_id', U32, 0),
    ('tokenizer.ggml.add_bos_token', BOOL, False),
]
gguf('tiny_llama.gguf', llama_kvs,
     [('token_embd.weight', [32, 4], 'Q8_0'), ('blk.0.attn_q.weight', [32, 2], 'Q4_1'),
      ('blk.0.attn_norm.weight', [32], 'F32'), ('output_norm.weight', [32], 'F16')])
gguf('v2_f16.gguf', [('general.architecture', STR, 'llama'), ('general.file_type', U32, 1)],
     [('w', [4, 3], 'F16'), ('b', [3], 'BF16')], version=2)
gguf('align8_all_types.gguf',
     [('general.alignment', U32, 8), ('u8', U8, 255), ('i8', I8, -1), ('u16', U16, 65535),
      ('i16', I16, -2), ('u32', U32, 7), ('i32', I32, -7), ('f32', F32, 0.5), ('bool', BOOL, True),
      ('str', STR, 'x'), ('u64', U64, 2**64 - 1), ('i64', I64, -2**63), ('f64', F64, 1.25),
      ('f64s', ARR, (F64, [1.0, -2.0])), ('bools', ARR, (BOOL, [True, False])),
      ('nested', ARR, (ARR, [(I16, [1, 2]), (STR, ['y', ''])])), ('empty', ARR, (U8, []))],
     [('a', [3], 'F32'), ('b', [5], 'F16')], alignment=8)
gguf('metadata_only.gguf', [('general.architecture', STR, 'llama'),
                            ('tokenizer.chat_template', STR, '{% for m in messages %}{{ m }}{% endfor %}')])
gguf('kquants.gguf', [('general.alignment', U32, 64)],
     [('q4k', [256], 'Q4_K'), ('q6k', [256, 1], 'Q6_K'), ('q2k', [256], 'Q2_K'),
      ('q40', [32, 2], 'Q4_0')], alignment=64)
