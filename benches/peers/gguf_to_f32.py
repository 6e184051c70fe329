#!/usr/bin/env python3
"""Writes an F32 copy of a GGUF file (every quantized tensor dequantized, metadata kept),
so that llama.cpp can be measured on the same weights in float32 as this crate's f32 path.

usage: python3 benches/peers/gguf_to_f32.py IN.gguf OUT.gguf
needs: gguf, numpy (pip); never run by CI or the tests.
"""
import sys

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize

src, dst = sys.argv[1], sys.argv[2]
reader = GGUFReader(src)
arch = reader.fields["general.architecture"]
writer = GGUFWriter(dst, bytes(arch.parts[arch.data[0]]).decode())

for name, field in reader.fields.items():
    if name.startswith("GGUF.") or name == "general.architecture":
        continue
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        item = field.types[1]
        if item == GGUFValueType.STRING:
            value = [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
        else:
            value = [field.parts[i].tolist()[0] for i in field.data]
        writer.add_key_value(name, value, kind, sub_type=item)
    elif kind == GGUFValueType.STRING:
        writer.add_key_value(name, bytes(field.parts[field.data[0]]).decode(), kind)
    else:
        writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], kind)

for t in reader.tensors:
    values = dequantize(t.data, t.tensor_type).astype(np.float32)
    # GGUF lists dimensions fastest first; numpy wants them slowest first.
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    writer.add_tensor(t.name, values.reshape(shape), raw_dtype=GGMLQuantizationType.F32)

writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
print(f"{dst}: {len(reader.tensors)} tensors in F32")
