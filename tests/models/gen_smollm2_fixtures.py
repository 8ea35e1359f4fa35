#!/usr/bin/env python3
"""Writes the SmolLM2-135M-Instruct (GGUF, Q4_1) reference fixtures of issue 15 into
tests/testdata/smollm2/.

Run from the repository root with the PyTorch virtualenv, offline, on the local model:

    /root/venv-torch/bin/python tests/models/gen_smollm2_fixtures.py

(optional: --model-dir models/smollm2 --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out DIR).
The script sets HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE itself.

The reference is Hugging Face transformers reading the same GGUF file: the legacy GGUF loader
(transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint) dequantises every tensor to
float32 with gguf-py's numpy dequantiser and un-permutes the Q/K rows (LlamaTensorProcessor);
the model runs in float32 with eager attention on the CPU. See README.md in the output
directory for the file formats. Library versions of each run go to meta.json.

Besides writing the fixtures, the script checks (and records in meta.json):
  * its own numpy decoding of the Q4_1 / Q8_0 blocks read straight from the file bytes equals
    gguf-py's dequantisation and the weights HF loaded;
  * the exact Q/K row mapping between the GGUF tensors and HF's q_proj / k_proj;
  * the HF tokenizer adds no BOS, and its ids equal apply_chat_template(tokenize=True) for the
    chat prompts and the original SmolLM2 pre-tokenisation (digits split one by one);
  * greedy decoding with its own KV-cache loop agrees with model.generate(do_sample=False) and
    with an uncached forward pass over prompt + continuation.

Deterministic: fixed inputs, no sampling, torch.use_deterministic_algorithms(True),
a fixed thread count.
"""

import argparse
import hashlib
import json
import os
import platform
import struct
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_MODEL_DIR = os.path.join(REPO_ROOT, "models", "smollm2")
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "testdata", "smollm2")

VOCAB_SUBSET_SEED = 15  # issue number
VOCAB_SUBSET_SIZE = 256
TOP_K = 8
NEW_TOKENS = 48
GAP_THRESHOLD = 1e-3
NUM_THREADS = 2

N_HEAD = 9
N_HEAD_KV = 3
HEAD_DIM = 64


# --------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------

LONG_TEXT = (
    "The history of computing is often told as a sequence of machines, but it is just as much "
    "a history of ideas about how to describe a calculation. In the nineteenth century Charles "
    "Babbage designed the Analytical Engine, a mechanical computer that was never completed, and "
    "Ada Lovelace wrote what many consider the first published program for it: a method for "
    "computing Bernoulli numbers. A century later, Alan Turing described an abstract machine that "
    "reads and writes symbols on an infinite tape, and showed that a single universal machine "
    "could imitate any other. During the Second World War, engineers in Britain and the United "
    "States built electronic machines such as Colossus and ENIAC to break codes and to compute "
    "artillery tables. These early computers were programmed by rewiring panels or setting "
    "switches, which was slow and error prone. The stored-program design, in which instructions "
    "live in the same memory as data, changed that and made software a thing that could be "
    "written, copied and improved. Assembly languages came first, followed by FORTRAN for "
    "scientists, COBOL for business and LISP for researchers in artificial intelligence. Over the "
    "following decades transistors replaced vacuum tubes, integrated circuits replaced discrete "
    "transistors, and the microprocessor put an entire central processing unit on a single chip. "
    "Personal computers brought programming into homes and schools, and networks eventually "
    "connected them into the internet we use today. Each step made computers smaller, cheaper "
    "and faster, but the central question stayed the same: how do we tell a machine precisely "
    "what we want it to do?"
)

CODE_TEXT = (
    "def fibonacci(n: int) -> list[int]:\n"
    "    \"\"\"Return the first n Fibonacci numbers.\"\"\"\n"
    "    if n <= 0:\n"
    "        return []\n"
    "    seq = [0, 1]\n"
    "    while len(seq) < n:\n"
    "        seq.append(seq[-1] + seq[-2])\n"
    "    return seq[:n]\n"
    "\n"
    "\n"
    "def is_prime(k):\n"
    "    if k < 2:\n"
    "        return False\n"
    "    for d in range(2, int(k ** 0.5) + 1):\n"
    "        if k % d == 0:\n"
    "            return False\n"
    "    return True\n"
    "\n"
    "\n"
    "if __name__ == \"__main__\":\n"
    "    primes = [x for x in fibonacci(20) if is_prime(x)]\n"
    "    print("
)

NUMBERS_TEXT = (
    "Invoice #20473, dated 2024-03-15: 12 widgets at $4.99 each = $59.88; 7 gadgets at "
    "$129.50 each = $906.50; shipping $15.00; tax 8.25% = $80.92. Total due: $1,062.30. "
    "Pi is approximately 3.14159265358979, e is 2.718281828, and 2^10 = 1024. The sequence "
    "1, 1, 2, 3, 5, 8, 13, 21, 34, 55 continues with"
)

GERMAN_TEXT = (
    "Die Straßenbahn fährt jeden Morgen um halb acht über die alte Brücke. Im Frühling "
    "blühen die Bäume am Ufer, und die Kinder spielen auf den Wiesen, während ihre Großeltern "
    "auf den Bänken sitzen und Zeitung lesen. Nächste Woche beginnt"
)

CHINESE_TEXT = "人工智能是计算机科学的一个分支，它试图理解智能的本质，并生产出一种新的"

SHORT_TEXT = "The capital of France is"

# (The first draft ended "... there lived an old clockmaker who"; its greedy continuation had a
# top-1/top-2 gap of 1e-4 at step 1, useless as a token-for-token fixture, hence this wording.)
MEDIUM_TEXT = (
    "Once upon a time, in a small village at the edge of a great forest, there lived a young "
    "girl who loved to"
)


def prompt_specs():
    """(name, kind, text or chat messages), in the order of the fixture files."""
    return [
        ("short", "text", SHORT_TEXT),
        ("chat_simple", "chat", [{"role": "user", "content": "What is the capital of France?"}]),
        ("story", "text", MEDIUM_TEXT),
        ("numbers", "text", NUMBERS_TEXT),
        ("german", "text", GERMAN_TEXT),
        ("chinese", "text", CHINESE_TEXT),
        ("code", "text", CODE_TEXT),
        (
            "chat_multiturn",
            "chat",
            [
                {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
                {"role": "user", "content": "Name a primary colour."},
                {"role": "assistant", "content": "Red is a primary colour."},
                {"role": "user", "content": "Give me two more, and explain why they are called primary."},
            ],
        ),
        ("long", "text", LONG_TEXT),
    ]


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_gguf_raw(path):
    """Independent minimal GGUF v3 reader: metadata (scalars; arrays as counts) and tensor infos.

    Returns (version, metadata, tensors) where tensors maps name -> (ne tuple, ggml type,
    absolute byte offset of the data in the file).
    """
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:
        def rd(fmt):
            size = struct.calcsize("<" + fmt)
            return struct.unpack("<" + fmt, f.read(size))

        def rstr():
            (n,) = rd("Q")
            return f.read(n).decode("utf-8", "replace")

        def rval(t, keep_array):
            if t == 8:
                return rstr()
            if t == 9:
                at, n = rd("IQ")
                items = [rval(at, False) for _ in range(n)]
                return items if keep_array else {"array_len": n}
            return rd(scalar[t])[0]

        magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError("not a GGUF file")
        (version,) = rd("I")
        n_tensors, n_kv = rd("QQ")
        meta = {}
        for _ in range(n_kv):
            key = rstr()
            (t,) = rd("I")
            meta[key] = rval(t, False)
            if t == 6:  # keep the exact float32 value
                meta[key] = float(np.float32(meta[key]))
        infos = []
        for _ in range(n_tensors):
            name = rstr()
            (nd,) = rd("I")
            ne = rd("Q" * nd)
            ttype, off = rd("IQ")
            infos.append((name, tuple(int(x) for x in ne), int(ttype), int(off)))
        align = int(meta.get("general.alignment", 32))
        base = (f.tell() + align - 1) // align * align
    tensors = {name: (ne, ttype, base + off) for name, ne, ttype, off in infos}
    return version, meta, tensors


GGML_TYPE_NAMES = {0: "F32", 1: "F16", 3: "Q4_1", 8: "Q8_0"}


def decode_q4_1(raw, rows, cols):
    """Block: f16 d, f16 m, 16 bytes qs; x[j] = (qs[j] & 15)*d + m, x[j+16] = (qs[j] >> 4)*d + m."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 20)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 4:20]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (q * d + m).reshape(rows, cols)


def decode_q8_0(raw, rows, cols):
    """Block: f16 d, int8 qs[32]; x[j] = qs[j]*d."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 34)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 2:34].copy().view(np.int8).astype(np.float32)
    return (qs * d).reshape(rows, cols)


def read_tensor_bytes(path, offset, nbytes):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(nbytes)


def json_dump(obj, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    ap.add_argument("--gguf", default=DEFAULT_GGUF)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    import torch
    import transformers
    import tokenizers
    import gguf
    from gguf import GGUFReader
    from gguf import dequantize as gguf_dequantize
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)

    gguf_path = os.path.join(args.model_dir, args.gguf)
    os.makedirs(args.out, exist_ok=True)
    meta = {}
    meta["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "numpy": np.__version__,
        "accelerate": _dist_version("accelerate"),
        "jinja2": _dist_version("jinja2"),
    }
    meta["gguf_file"] = {"name": args.gguf, "size": os.path.getsize(gguf_path), "sha256": sha256_of(gguf_path)}
    print("gguf sha256", meta["gguf_file"]["sha256"], flush=True)

    # ---------------- GGUF metadata, read independently ----------------
    version, gmeta, gtensors = read_gguf_raw(gguf_path)
    keys = [
        "general.architecture", "llama.block_count", "llama.context_length", "llama.embedding_length",
        "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
        "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size",
        "llama.rope.dimension_count", "general.file_type", "general.quantization_version",
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
    ]
    meta["gguf_version"] = version
    meta["gguf_metadata"] = {k: gmeta.get(k) for k in keys}
    meta["gguf_metadata"]["has_output.weight"] = "output.weight" in gtensors
    block0 = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = [f"blk.0.{n}.weight" for n in block0] + ["output_norm.weight", "token_embd.weight"]
    meta["gguf_tensors_example"] = {
        n: {"ne": list(gtensors[n][0]), "type": GGML_TYPE_NAMES.get(gtensors[n][1], gtensors[n][1])} for n in names
    }
    type_counts = {}
    for _, (ne, t, _) in gtensors.items():
        tn = GGML_TYPE_NAMES.get(t, str(t))
        type_counts[tn] = type_counts.get(tn, 0) + 1
    meta["gguf_tensor_type_counts"] = type_counts
    meta["gguf_tensor_count"] = len(gtensors)

    # ---------------- Tokenizer ----------------
    tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=args.gguf)
    probe = tok("Hello world").input_ids
    bos = {
        "tokenizer_class": type(tok).__name__,
        "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
        "add_eos_token": bool(getattr(tok, "add_eos_token", False)),
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
        "unk_token": tok.unk_token,
        "hello_world_ids_default": probe,
        "hello_world_ids_no_special": tok("Hello world", add_special_tokens=False).input_ids,
        "pre_tokenizer": str(tok.backend_tokenizer.pre_tokenizer),
        "post_processor": str(tok.backend_tokenizer.post_processor),
        "normalizer": str(tok.backend_tokenizer.normalizer),
    }
    bos["adds_bos"] = bool(probe and probe[0] == tok.bos_token_id)
    meta["tokenizer"] = bos
    print("tokenizer:", json.dumps(bos, ensure_ascii=False), flush=True)

    # Original SmolLM2 tokenizer.json pre-tokeniser (and llama.cpp's "smollm"): digits one by one.
    from tokenizers import Tokenizer, pre_tokenizers
    ref_tok = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    ref_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]
    )

    prompts = []
    for i, (name, kind, content) in enumerate(prompt_specs()):
        if kind == "chat":
            text = tok.apply_chat_template(content, tokenize=False, add_generation_prompt=True)
            ids_chat = tok.apply_chat_template(content, tokenize=True, add_generation_prompt=True)
            if isinstance(ids_chat, dict) or hasattr(ids_chat, "keys"):
                ids_chat = ids_chat["input_ids"]
            ids_chat = [int(x) for x in ids_chat]
        else:
            text = content
            ids_chat = None
        ids = [int(x) for x in tok(text).input_ids]
        if ids_chat is not None and ids_chat != ids:
            raise SystemExit(f"prompt {name}: apply_chat_template ids differ from tok(text)")
        ids_ref = ref_tok.encode(text, add_special_tokens=False).ids
        entry = {
            "index": i, "name": name, "kind": kind, "text": text, "n_tokens": len(ids), "ids": ids,
            "pieces": tok.convert_ids_to_tokens(ids),
            "same_as_smollm_digit_pretokenizer": ids_ref == ids,
            "decode_roundtrip": tok.decode(ids) == text,
        }
        if kind == "chat":
            entry["messages"] = content
        if ids_ref != ids:
            entry["ids_smollm_digit_pretokenizer"] = ids_ref
        prompts.append(entry)
        print(f"prompt {i} {name}: {len(ids)} tokens, ref-pretok same={ids_ref == ids}", flush=True)

    # ---------------- Model ----------------
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir, gguf_file=args.gguf, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    cfg = model.config
    rope_params = getattr(cfg, "rope_parameters", None)
    meta["hf_config"] = {
        "model_class": type(model).__name__,
        "attn_implementation": cfg._attn_implementation,
        "dtype": str(next(model.parameters()).dtype),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": getattr(cfg, "head_dim", None),
        "rope_theta": getattr(cfg, "rope_theta", None) or (rope_params or {}).get("rope_theta"),
        "rope_parameters": rope_params,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_act": cfg.hidden_act,
        "attention_bias": getattr(cfg, "attention_bias", None),
        "mlp_bias": getattr(cfg, "mlp_bias", None),
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": getattr(cfg, "pad_token_id", None),
        "attention_scaling": model.model.layers[0].self_attn.scaling,
    }
    meta["hf_config"]["lm_head_is_embed_tokens"] = (
        model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    )
    print("hf config:", json.dumps(meta["hf_config"], default=str), flush=True)

    # ---------------- Weight layout checks ----------------
    reader = GGUFReader(gguf_path)
    rt = {t.name: t for t in reader.tensors}
    checks = {}

    def gguf_dense(name):
        t = rt[name]
        return np.asarray(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32)

    def raw_dense(name):
        ne, ttype, off = gtensors[name]
        cols, rows = ne[0], (ne[1] if len(ne) > 1 else 1)
        if ttype == 3:
            return decode_q4_1(read_tensor_bytes(gguf_path, off, rows * cols // 32 * 20), rows, cols)
        if ttype == 8:
            return decode_q8_0(read_tensor_bytes(gguf_path, off, rows * cols // 32 * 34), rows, cols)
        if ttype == 0:
            return np.frombuffer(read_tensor_bytes(gguf_path, off, rows * cols * 4), dtype=np.float32).reshape(rows, cols)
        raise ValueError(ttype)

    layer0 = model.model.layers[0]
    hf_w = {
        "blk.0.attn_q.weight": layer0.self_attn.q_proj.weight,
        "blk.0.attn_k.weight": layer0.self_attn.k_proj.weight,
        "blk.0.attn_v.weight": layer0.self_attn.v_proj.weight,
        "blk.0.attn_output.weight": layer0.self_attn.o_proj.weight,
        "blk.0.ffn_gate.weight": layer0.mlp.gate_proj.weight,
        "blk.0.ffn_up.weight": layer0.mlp.up_proj.weight,
        "blk.0.ffn_down.weight": layer0.mlp.down_proj.weight,
        "blk.0.attn_norm.weight": layer0.input_layernorm.weight,
        "blk.0.ffn_norm.weight": layer0.post_attention_layernorm.weight,
        "output_norm.weight": model.model.norm.weight,
        "token_embd.weight": model.model.embed_tokens.weight,
    }
    for name, param in hf_w.items():
        mine = raw_dense(name)
        ref = gguf_dense(name).reshape(mine.shape)
        hf = param.detach().cpu().numpy().reshape(mine.shape)
        entry = {
            "shape_numpy_rows_cols": list(mine.shape),
            "raw_decode_vs_gguf_max_abs": float(np.max(np.abs(mine - ref))),
        }
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            n_head = N_HEAD if "attn_q" in name else N_HEAD_KV
            # HF row h*64 + j*32 + i  <-  GGUF row h*64 + 2*i + j   (i < 32, j in {0, 1})
            perm = np.empty(mine.shape[0], dtype=np.int64)
            for h in range(n_head):
                for j in range(2):
                    for i in range(HEAD_DIM // 2):
                        perm[h * HEAD_DIM + j * (HEAD_DIM // 2) + i] = h * HEAD_DIM + 2 * i + j
            entry["hf_equals_gguf_rows_permuted_max_abs"] = float(np.max(np.abs(hf - mine[perm])))
            entry["hf_equals_gguf_unpermuted_max_abs"] = float(np.max(np.abs(hf - mine)))
            entry["row_mapping"] = "HF row h*64 + j*32 + i == GGUF row h*64 + 2*i + j (i<32, j in {0,1})"
        else:
            entry["hf_vs_raw_max_abs"] = float(np.max(np.abs(hf - mine)))
        checks[name] = entry
        print("weight check", name, entry, flush=True)
    # every Q4_1 tensor, raw decode vs gguf-py (cheap), and a few vs HF
    worst = 0.0
    for name, (ne, ttype, _) in gtensors.items():
        if ttype in (3, 8):
            worst = max(worst, float(np.max(np.abs(raw_dense(name) - gguf_dense(name).reshape(raw_dense(name).shape)))))
    checks["all_quantized_raw_decode_vs_gguf_max_abs"] = worst
    meta["weight_checks"] = checks
    meta["qk_permutation"] = (
        "llama.cpp's converter permutes the rows of attn_q/attn_k within each head so that RoPE "
        "rotates adjacent pairs (x[2i], x[2i+1]); transformers' legacy GGUF loader "
        "(LlamaTensorProcessor._reverse_permute_weights) undoes it by reshaping the [rows, in] "
        "weight to [n_head, 32, 2, in] and swapping axes 1 and 2 (n_head = 9 for Q, 3 for K), i.e. "
        "HF row h*64 + j*32 + i = GGUF row h*64 + 2*i + j, so HF's rotate_half pairs (i, i+32) are "
        "GGUF's adjacent pairs (2i, 2i+1), both with frequency rope_theta^(-2i/64). V and O are "
        "not permuted."
    )

    # ---------------- Logit fixtures ----------------
    rng = np.random.default_rng(VOCAB_SUBSET_SEED)
    subset = np.sort(rng.choice(cfg.vocab_size, size=VOCAB_SUBSET_SIZE, replace=False)).astype(np.int32)
    np.save(os.path.join(args.out, "vocab_subset.npy"), subset)
    subset_t = torch.from_numpy(subset.astype(np.int64))

    json_dump({"note": "token ids are exactly what HF's tokenizer gives and what the model was fed "
                       "(no BOS is added)", "prompts": prompts},
              os.path.join(args.out, "prompts.json"))

    greedy = []
    with torch.inference_mode():
        for p in prompts:
            i = p["index"]
            ids = torch.tensor([p["ids"]], dtype=torch.long)
            logits = model(input_ids=ids, use_cache=False).logits[0].float()  # [n, V]
            n = logits.shape[0]
            np.save(os.path.join(args.out, f"logits_{i}.npy"),
                    np.ascontiguousarray(logits[:, subset_t].numpy().astype(np.float32)))
            topv, topi = torch.topk(logits, TOP_K, dim=-1)
            np.save(os.path.join(args.out, f"top_{i}.npy"), topi.numpy().astype(np.int32))
            np.save(os.path.join(args.out, f"top_logits_{i}.npy"), topv.numpy().astype(np.float32))
            np.save(os.path.join(args.out, f"max_abs_{i}.npy"), logits.abs().amax(dim=-1).numpy().astype(np.float32))
            prompt_gap = (topv[:, 0] - topv[:, 1]).numpy()
            last_logits = logits[-1].clone()

            # Own greedy loop with the KV cache.
            out = model(input_ids=ids, use_cache=True)
            past = out.cache
            step_logits = out.logits[0, -1].float()
            prefill_vs_nocache = float((step_logits - last_logits).abs().max())
            gen, gaps, top1_logit, step_rows = [], [], [], []
            for step in range(NEW_TOKENS):
                step_rows.append(step_logits)
                v2, i2 = torch.topk(step_logits, 2)
                nxt = int(i2[0])
                gen.append(nxt)
                gaps.append(float(v2[0] - v2[1]))
                top1_logit.append(float(v2[0]))
                if step + 1 == NEW_TOKENS:
                    break
                out = model(input_ids=torch.tensor([[nxt]]), cache=past, use_cache=True)
                past = out.cache
                step_logits = out.logits[0, -1].float()

            # model.generate, greedy, with EOS switched off (model.generation_config.eos_token_id =
            # None for the call) so that all 48 tokens are produced like in the loop above.
            saved_eos = model.generation_config.eos_token_id
            model.generation_config.eos_token_id = None
            try:
                gen_hf = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                        num_beams=1, max_new_tokens=NEW_TOKENS,
                                        pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
            finally:
                model.generation_config.eos_token_id = saved_eos

            # Uncached forward over prompt + continuation: argmax at each step.
            full = torch.tensor([p["ids"] + gen], dtype=torch.long)
            full_logits = model(input_ids=full, use_cache=False).logits[0].float()
            nocache_rows = full_logits[ids.shape[1] - 1: ids.shape[1] - 1 + NEW_TOKENS]
            nocache_arg = nocache_rows.argmax(-1).tolist()
            cached_vs_uncached = float((torch.stack(step_rows) - nocache_rows).abs().max())

            eos_ids = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
            first_eos = next((k for k, t in enumerate(gen) if t in eos_ids), None)
            min_gap = float(min(gaps))
            stable_prefix = next((k for k, g in enumerate(gaps) if g < GAP_THRESHOLD), NEW_TOKENS)
            rec = {
                "index": i, "name": p["name"], "n_prompt_tokens": n,
                "generated_ids": gen,
                "generated_text": tok.decode(gen),
                "top1_top2_gap": gaps,
                "top1_logit": top1_logit,
                "min_gap": min_gap,
                "argmin_gap_step": int(np.argmin(gaps)),
                "tokens_before_first_gap_below_threshold": stable_prefix,
                "first_eos_step": first_eos,
                "generate_agrees": gen_hf == gen,
                "uncached_argmax_agrees": nocache_arg == gen,
                "prefill_last_logits_cached_vs_uncached_max_abs": prefill_vs_nocache,
                "step_logits_cached_vs_uncached_max_abs": cached_vs_uncached,
                "prompt_min_top1_top2_gap": float(prompt_gap.min()),
            }
            if gen_hf != gen:
                rec["generate_ids"] = gen_hf
            greedy.append(rec)
            print(f"prompt {i} {p['name']}: n={n} min_gap={min_gap:.5f} at {rec['argmin_gap_step']} "
                  f"generate_agrees={rec['generate_agrees']} uncached_agrees={rec['uncached_argmax_agrees']} "
                  f"eos_at={first_eos} text={rec['generated_text']!r}", flush=True)

    json_dump({
        "new_tokens": NEW_TOKENS,
        "method": "own greedy loop: a prefill forward over the prompt with use_cache=True (DynamicCache), "
                  "then one token per forward with the cache; next token = argmax of the float32 logits "
                  "(torch.topk); EOS (<|im_end|> = 2) does not stop the loop, all 48 tokens are generated. "
                  "Cross-checked against model.generate(do_sample=False, num_beams=1) with "
                  "generation_config.eos_token_id = None (generate_agrees) and against the argmax of one "
                  "uncached forward over prompt + continuation (uncached_argmax_agrees).",
        "gap_threshold": GAP_THRESHOLD,
        "gap_definition": "top1_top2_gap[k] = logit(top1) - logit(top2) of the distribution that chose "
                          "generated_ids[k]; compare tokens only up to tokens_before_first_gap_below_threshold",
        "results": greedy,
    }, os.path.join(args.out, "greedy.json"))

    meta["fixtures"] = {
        "vocab_subset_seed": VOCAB_SUBSET_SEED,
        "vocab_subset": "np.sort(np.random.default_rng(15).choice(49152, 256, replace=False)).astype(int32)",
        "top_k": TOP_K,
        "new_tokens": NEW_TOKENS,
        "torch_num_threads": NUM_THREADS,
        "deterministic_algorithms": True,
        "forward": "model(input_ids=[1, n] ids, use_cache=False).logits[0] in float32, no attention mask, "
                   "positions 0..n-1, eager attention",
    }
    json_dump(meta, os.path.join(args.out, "meta.json"))
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out}: {total} bytes", flush=True)


def _dist_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # pragma: no cover
        return None


if __name__ == "__main__":
    sys.exit(main())
