#!/usr/bin/python3
"""Writes the committed seed corpora of the fuzz targets (fuzz/corpus/<target>/).

Run from fuzz/ with Debian's python3 (numpy): /usr/bin/python3 make_seeds.py.
The CLI seeds name the fixtures cli_fuzzer.cc writes into its directory.
"""
import io
import json
import struct

import numpy as np


def npy(name, a, version=None):
    b = io.BytesIO()
    np.lib.format.write_array(b, a, version=version)
    open('corpus/npy/' + name, 'wb').write(b.getvalue())


npy('f32_2x3.npy', np.arange(6, dtype='<f4').reshape(2, 3))
npy('f16_4.npy', np.arange(4, dtype='<f2'))
npy('f64_scalar.npy', np.array(1.5))
npy('bool_2x2.npy', np.array([[True, False], [False, True]]))
npy('i32_empty.npy', np.zeros((0, 3), dtype='<i4'))
npy('i64_1x1x2x1.npy', np.arange(2, dtype='<i8').reshape(1, 1, 2, 1))
npy('v2_2x2.npy', np.ones((2, 2), dtype='<f4'), version=(2, 0))


def st(name, tensors, meta=None):
    header, blobs, off = {}, b'', 0
    if meta:
        header['__metadata__'] = meta
    for n, (dt, shape, data) in tensors.items():
        header[n] = {'dtype': dt, 'shape': shape, 'data_offsets': [off, off + len(data)]}
        blobs += data
        off += len(data)
    h = json.dumps(header).encode()
    open('corpus/safetensors/' + name, 'wb').write(struct.pack('<Q', len(h)) + h + blobs)


st('f32.st', {'w': ('F32', [2, 2], np.arange(4, dtype='<f4').tobytes()),
              'b': ('F32', [2], np.ones(2, dtype='<f4').tobytes())}, {'format': 'pt'})
st('f16_bf16.st', {'h': ('F16', [3], np.arange(3, dtype='<f2').tobytes()),
                   'g': ('BF16', [2], b'\x80\x3f\x00\x40')})
st('empty.st', {})
st('zero_dim.st', {'z': ('F32', [0, 5], b'')})
st('i64.st', {'i': ('I64', [1], struct.pack('<q', 7))})


def cli(target, name, args):
    open(f'corpus/{target}/{name}', 'w').write('\n'.join(args))


qkv = ['--q', 'q.npy', '--k', 'k.npy', '--v', 'v.npy', '--out', 'o.npy']
cli('cli_attend', 'files', qkv)
cli('cli_attend', 'files_all', qkv + ['--lse', 'l.npy', '--attn-weights', 'w.npy', '--mask', 'mask.npy',
                                      '--causal', '--window', '2', '1', '--key-lengths', 'len.npy',
                                      '--kernel', 'reference'])
cli('cli_attend', 'float_mask', qkv + ['--mask', 'maskf.npy', '--scale', '0.5', '--layout', 'bshd'])
cli('cli_attend', 'zero_dims', ['--q', 'q0.npy', '--k', 'k0.npy', '--v', 'k0.npy', '--out', 'o.npy',
                                '--lse', 'l.npy'])
cli('cli_attend', 'random', ['--shape', '1,2,8,4', '--kv-heads', '1', '--seq-kv', '6', '--seed', '3',
                             '--causal-top-left', '--verbose', '--threads', '1'])
cli('cli_attend', 'same_file', qkv[:-1] + ['q.npy'])
cli('cli_mha', 'self', ['--query', 'x.npy', '--params', 'w.safetensors', '--heads', '2',
                        '--out', 'o.npy'])
cli('cli_mha', 'cross', ['--query', 'x.npy', '--key', 'kv.npy', '--value', 'kv.npy', '--params',
                         'w.safetensors', '--heads', '4', '--kv-heads', '2', '--out', 'o.npy',
                         '--attn-weights', 'a.npy', '--per-head-weights', '--key-padding-mask',
                         'kpm.npy', '--attn-mask', 'am.npy'])
cli('cli_mha', 'causal', ['--query', 'x.npy', '--params', 'w.safetensors', '--heads', '8',
                          '--causal-top-left', '--out', 'o.npy', '--threads', '1'])
cli('cli_decode', 'default', [])
cli('cli_decode', 'sliding', ['--cache', 'sliding', '--cache-window', '5', '--prompt-tokens', '9', '--generate',
                              '4', '--cache-dtype', 'i8'])
cli('cli_decode', 'sinks', ['--cache', 'sinks', '--cache-window', '4', '--sinks', '2', '--cache-dtype',
                            'f16', '--heads', '8', '--kv-heads', '1'])
cli('cli_decode', 'paged', ['--cache', 'paged', '--block-size', '3', '--prompt-tokens', '10',
                            '--cache-dtype', 'bf16', '--head-dim', '8'])
