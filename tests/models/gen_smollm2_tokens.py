#!/usr/bin/env python3
"""Writes tests/testdata/smollm2/tokens.json, the oracle of the byte-level BPE tokenizer
(src/models/tokenizer_bpe.cc) on SmolLM2-135M-Instruct (issue 15).

Run once from the repository root with the PyTorch virtualenv, offline, on the local model:

    /root/venv-torch/bin/python tests/models/gen_smollm2_tokens.py \\
        --gguf models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Generated with transformers 5.24.0, tokenizers 0.23.3, jinja2 3.1.6 (versions of each run are
written into the file). Its output is committed; the C++ test only reads it.

The oracle. transformers loads the tokenizer from the GGUF itself
(AutoTokenizer.from_pretrained(dir, gguf_file=name)): vocabulary, merges, the 17 control tokens
as special added tokens, no BOS. Its GGUF converter gives every "gpt2" vocabulary a bare
ByteLevel pre-tokeniser, however, and drops the digit split that SmolLM2's own tokenizer.json
has: pre_tokenizer = Sequence[Digits(individual_digits=true), ByteLevel(add_prefix_space=false,
trim_offsets=true, use_regex=true)] (the model's repository), which is also what llama.cpp runs
for tokenizer.ggml.pre = "smollm" (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM: the regex list
{"\\p{N}", GPT-2 pattern}). The ids written are therefore those of the GGUF-loaded tokenizer with
that Sequence put back; the cases where the bare GGUF conversion differs ("a  1", two spaces
before a digit) are listed under "gguf_loader_differs" for the record. SmolLM2's vocabulary
has no multi-digit pieces, so the split only matters next to whitespace.

File layout (UTF-8 JSON, ensure_ascii=False; control characters are \\u escapes):
  {"model", "pre_tokenizer", "versions",
   "cases": [{"text", "ids"}, ...]                   tokenizer.encode(text, add_special_tokens=False)
   "no_round_trip": [text, ...]                      texts with bytes the vocabulary lacks (HF
                                                     drops them, so decode(encode(s)) != s)
   "gguf_loader_differs": [text, ...]
   "chat": [{"message", "text", "ids"}, ...]}        apply_chat_template([{"role": "user",
                                                     "content": message}], tokenize=False,
                                                     add_generation_prompt=True) and its ids
"""

import argparse
import json
import os
import random
import sys
import unicodedata

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_PATH = os.path.join(REPO_ROOT, "tests", "testdata", "smollm2", "tokens.json")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>",
            "<file_sep>", "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>",
            "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
            "<jupyter_output>", "<jupyter_script>", "<empty_output>"]


def texts():
    """The fixture strings: every class of input the issue names, in groups."""
    out = ["", "a", "Hello", "Hello world", " Hello world", "Hello world!", "hello, world.",
           "The quick brown fox jumps over the lazy dog.",
           "SmolLM2 is a family of compact language models.",
           "What is the capital of France?", "Tell me a joke about cats."]
    # Numbers and digits: each \p{N} is its own word.
    out += ["0", "7", "12", "123", "12345", "3.14159", "1,000,000", "-42", "+1 (555) 010-9999",
            "2024-11-28", "v1.2.3", "0x1F", "1e-9", "3333333", "a1b2c3", "abc123def",
            "x  1", "a  12", "  1", "1  ", "1 2  3   4", "1\n2", "100%", "$9.99", "½ ¾ ⅓",
            "٣٤٥", "१२३", "Ⅻ Ⅳ", "①②③", "１２３", "²³", "2nd 3rd 4th"]
    # Emoji: single, ZWJ sequences, flags, skin tones, keycaps, variation selectors.
    out += ["😀", "🚀 launch", "👍🏽", "👨‍👩‍👧‍👦 family", "🏳️‍🌈", "🇫🇷🇯🇵🇺🇸", "1️⃣#️⃣",
            "❤️ ♥ ☺️", "I ❤️ NY", "😶‍🌫️ (multiple emojis concatenated) ✅",
            "🧑🏿‍💻🧑🏻‍🔬", "🐍🐍🐍", "emoji at end 🎉", "🎉at start"]
    # Accents in NFC and NFD, ligatures, other Latin.
    for s in ["café", "naïve résumé", "Ångström", "Crème brûlée", "São Paulo", "Zürich",
              "Dvořák", "Łódź", "façade"]:
        out += [s, unicodedata.normalize("NFD", s)]
    out += ["ﬁnance ﬂow", "straße STRASSE", "İstanbul ıi", "ǅemal", "é" * 20]
    # Scripts.
    out += ["你好，世界！", "这是一个测试。", "日本語のテキストとカタカナ", "한국어 텍스트입니다",
            "مرحبا بالعالم", "שלום עולם", "Привет, мир!", "Ёжик в тумане", "नमस्ते दुनिया",
            "ภาษาไทย", "Γειά σου Κόσμε", "ქართული", "Հայերեն", "ኢትዮጵያ", "தமிழ்",
            "English 中文 mixed العربية text", "𝕳𝖊𝖑𝖑𝖔 𝒘𝒐𝒓𝒍𝒅", "𐐷𐐸 Deseret"]
    # Code.
    out += ["def f(x):\n    return x * 2\n",
            "for i in range(10):\n\tprint(i)\n",
            "int main() {\n\tstd::cout << \"hi\" << std::endl;\n\treturn 0;\n}\n",
            "#include <vector>\nstd::vector<int> v{1, 2, 3};",
            "if (a && b || !c) { x += 1; } else { x -= 1; }",
            "const f = (a, b) => a ?? b;", "SELECT * FROM t WHERE id = 7;",
            "x=[i**2 for i in xs if i%2==0]", "<div class=\"a\">text</div>",
            "{\"key\": [1, 2, {\"n\": null}]}", "fn main() -> Result<(), Box<dyn Error>> {}",
            "    indented\n        more\n", "\t\tdouble tab", "a\tb\tc", "path/to/file.txt",
            "C:\\Users\\name\\file.txt", "user@example.com", "#!/bin/bash\necho $HOME",
            "// comment\n/* block */", "a->b->c", "i++; --j;", "`backticks` and ~tilde~ ^caret^"]
    # Whitespace runs.
    out += [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", "\n\n\n", " \n ", "\t \t", "a ", "a  ",
            "a   ", " a", "  a", "   a", "a  b", "a   b", "a \n b", "a\n\nb", "a\r\nb\r\n",
            "line1\nline2\n", "trailing spaces   ", "   leading spaces", "\t\n\r\x0b\x0c",
            "a\u00a0b", "a\u3000b", "a\u2028b", "a\u0085b", "a\u180eb", "a\u200bb", "a\ufeffb",
            "a\u2009\u2009b", "x" + " " * 40 + "y", "\n" * 12, " " * 64,
            # U+0085 is White_Space for Oniguruma; U+180E is not (PCRE2's \s has it).
            "a  \u180e\u180e!", " \u180e1\u180e  \u180e", "x \u0085\u0085y", "\u0085 \u0085a"]
    # Contractions and case.
    out += ["don't", "I'M", "we'll", "they're", "you've", "she'd", "it's", "It'S", "can't won't",
            "'s 't 're", "rock'n'roll", "O'Neil's", "I'm", "We'LL", "'", "''", "l'été"]
    # Punctuation runs.
    out += ["!!!", "?!?!", "...", "—", "-- --", "***bold***", "!@#$%^&*()_+", "«quotes»",
            "“curly” ‘single’", "a,b;c:d", "(((nested)))", "....!!!!????", "<<>>", "__init__",
            "~/.bashrc", "¿Qué? ¡Sí!", "。、！？"]
    # URLs.
    out += ["https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
            "http://example.com/path?q=1&r=two#frag", "www.example.org", "ftp://a.b/c",
            "see https://x.y/z.", "mailto:someone@example.com"]
    # Special tokens written in the text.
    out += SPECIALS
    out += ["<|im_start|>user\nhi<|im_end|>", "<|im_start|>system\nYou are helpful.<|im_end|>\n"
            "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
            "before<|endoftext|>after", "x<|im_end|>y", "<|im_start|><|im_end|>",
            "<|im_start|>" * 3, "<reponame>qkv<file_sep>a.cc", "not <|a special|> token",
            "<|im_start", "im_end|>", "<>", "<||>", "<|im_start|> spaced <|im_end|>",
            "<jupyter_code>print(1)<jupyter_output>1<empty_output>"]
    # Bytes the vocabulary has no piece for (HF drops them).
    out += ["a\x04b", "\x06", "x\x13\x14y", "!\x16!", "\x1d\x1d", "\x00 null", "\x7f del",
            "\x01\x02\x03"]
    # Long words and texts.
    out += ["supercalifragilisticexpialidocious", "antidisestablishmentarianism",
            "Pneumonoultramicroscopicsilicovolcanoconiosis", "a" * 2000, "ab" * 500,
            "ﷺ" * 10, "😀" * 50]
    rng = random.Random(15)
    out.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3000)))
    out.append(" ".join("".join(rng.choice("etaoinshrdlu") for _ in range(rng.randint(1, 9)))
                        for _ in range(300)))
    # Random mixed Unicode (fixed seed): letters, marks, digits, spaces, symbols, emoji.
    pool = ("aZé ñ\t\n7٣ 中あ한😀👍🏽‍️!?.,'-_ \u0301\u0308ßΩЖ" + "\u00a0\u2003")
    for _ in range(20):
        out.append("".join(rng.choice(pool) for _ in range(rng.randint(5, 60))))
    return out


CHAT_MESSAGES = ["Hello!", "What is the capital of France? Answer in one word.",
                 "Write a haiku about 3 cats 🐈 and\nnew lines."]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", default="models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--out", default=OUT_PATH)
    args = parser.parse_args()

    import jinja2
    import tokenizers
    import transformers
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    gguf_dir, gguf_name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    bare = tok.backend_tokenizer
    smollm = tokenizers.Tokenizer.from_str(bare.to_str())
    smollm.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    assert smollm.get_vocab_size() == 49152, smollm.get_vocab_size()

    cases, no_round_trip, differs = [], [], []
    for text in texts():
        ids = smollm.encode(text, add_special_tokens=False).ids
        cases.append({"text": text, "ids": ids})
        if smollm.decode(ids, skip_special_tokens=False) != text:
            no_round_trip.append(text)
        if bare.encode(text, add_special_tokens=False).ids != ids:
            differs.append(text)
    assert len(cases) >= 200, len(cases)

    chat = []
    for message in CHAT_MESSAGES:
        rendered = tok.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                           add_generation_prompt=True)
        # Cross-check with jinja2 on the GGUF's own template string.
        template = jinja2.Environment().from_string(tok.chat_template)
        assert rendered == template.render(messages=[{"role": "user", "content": message}],
                                           add_generation_prompt=True)
        chat.append({"message": message, "text": rendered,
                     "ids": smollm.encode(rendered, add_special_tokens=False).ids})

    fixture = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pre_tokenizer": "Sequence[Digits(individual_digits=true), ByteLevel(add_prefix_space="
                         "false, trim_offsets=true, use_regex=true)]",
        "versions": {"python": sys.version.split()[0], "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "jinja2": jinja2.__version__},
        "cases": cases,
        "no_round_trip": no_round_trip,
        "gguf_loader_differs": differs,
        "chat": chat,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(fixture, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out}: {len(cases)} cases ({len(no_round_trip)} drop bytes, "
          f"{len(differs)} differ under the bare GGUF loader), {len(chat)} chat renderings, "
          f"{os.path.getsize(args.out)} bytes")


if __name__ == "__main__":
    main()
