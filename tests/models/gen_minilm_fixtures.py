#!/usr/bin/env python3
"""Writes the all-MiniLM-L6-v2 reference fixtures of issue 14 into tests/testdata/minilm/.

Run from the repository root with the PyTorch virtualenv, offline, on the local model:

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
        /root/venv-torch/bin/python tests/models/gen_minilm_fixtures.py \\
        --model models/all-MiniLM-L6-v2

(the two variables are also set by the script itself before it imports anything from
Hugging Face). Generated with Python 3.11.7, torch 2.15.0+cu132 (PyPI wheel, run on CPU), transformers 5.24.0,
sentence-transformers 6.2.0, tokenizers 0.23.3, numpy 2.4.6; the versions of each run are
written to VERSIONS.json. The model directory is the sentence-transformers layout
(config.json, model.safetensors, tokenizer.json, modules.json, 1_Pooling/config.json,
sentence_bert_config.json with max_seq_length 256).

Files written (all small; total well under 1 MB):

  tokenizer_cases.json  {"max_length": 256, "cases": [{"text", "ids", "pieces"}, ...]}
        ids from SentenceTransformer(dir).tokenizer(text, truncation=True, max_length=256)
        (so [CLS]=101 first and [SEP]=102 last), pieces = convert_ids_to_tokens(ids).
        Each case is also checked against SentenceTransformer.preprocess (the ids that
        encode() really feeds the model). Written first, before any model forward pass.
        JSON is UTF-8 (ensure_ascii=False): non-ASCII is raw UTF-8, while control
        characters U+0000..U+001F are \\u escapes, as JSON requires.
  sentences.json        list of sentences (one empty, one longer than 256 tokens)
  embeddings.npy        float32 [n, 384] = SentenceTransformer(dir, device="cpu").encode(
                        sentences, batch_size=16, convert_to_numpy=True); L2-normalised
  hidden_s{i}.npy, hidden_s{i}_ids.npy  for i in 0..2 (the first three
                        sentences, one at a time, no padding):
                        ids int64 [seq], hidden states float32 [7, seq, 384]
                        (embeddings output, then the output of each of the 6 layers),
                        from transformers AutoModel (BertModel) attn_implementation="eager",
                        output_hidden_states=True
  attn_texts.json       three texts of different token lengths
  attn_lengths.json     their token counts (with [CLS] and [SEP])
  attn_layer0.npy,      float32 [3, 12, seq, seq]: BertModel eager output_attentions=True
  attn_layer5.npy       on the batch padded to the longest (tokenizer(texts, padding=True,
                        truncation=True, max_length=256)); rows/columns of padding are
                        whatever HF gives, compare only real rows and columns
  VERSIONS.json         library versions used

Deterministic: fixed inputs, no sampling, torch.set_num_threads(1) for the forward passes.
"""

import argparse
import hashlib
import json
import os
import platform
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_DIR = os.path.join(REPO_ROOT, "tests", "testdata", "minilm")
MAX_LENGTH = 256
CLS_ID = 101
SEP_ID = 102


# --------------------------------------------------------------------------------------
# Tokenizer cases
# --------------------------------------------------------------------------------------

def tokenizer_texts():
    t = []
    # Plain English.
    t += [
        "Hello world",
        "hello world",
        "The quick brown fox jumps over the lazy dog.",
        "This is a sentence.",
        "A man is eating food.",
        "I love natural language processing!",
        "Sentence embeddings map text to vectors.",
        "What time is it?",
        "unaffable",
        "The embeddings are normalized to unit length.",
        "Tokenization splits words into subword pieces like ##ing.",
        "antidisestablishmentarianism",
        "supercalifragilisticexpialidocious",
        "Transformers use self-attention.",
        "She sells seashells by the seashore.",
        "a",
        "I",
        "x",
        "ok",
        "Nothing to see here",
    ]
    # Accents and diacritics, combining marks.
    t += [
        "café", "Café", "CAFÉ", "naïve résumé", "piñata", "Ñandú", "über", "Über", "Ärger",
        "Åsa", "Ångström", "Øresund", "Łódź", "Dvořák", "Škoda", "crème brûlée", "façade",
        "São Paulo", "Mötley Crüe", "e\u0301", "cafe\u0301",  # combining acute
        "n\u0303", "a\u0308\u0304", "Z\u0327\u030c",  # stacked combining marks
        "\u0301", "\u0301abc",  # combining mark alone / leading
        "résumé vs re\u0301sume\u0301",
    ]
    # All caps, casing.
    t += [
        "HELLO WORLD", "THIS IS ALL CAPS SHOUTING!", "NASA and the FBI", "iPhone eBay McDonald",
        "CamelCaseIdentifier", "snake_case_identifier",
    ]
    # German, Turkish, Greek.
    t += [
        "Straße", "STRASSE", "Fußball ist großartig", "ẞ capital sharp s",
        "İstanbul", "ıstanbul", "Iğdır", "DİYARBAKIR", "ışık", "İ", "ı",
        "Καλημέρα κόσμε", "ΑΘΗΝΑ", "αβγδεζηθ", "Σίσυφος", "ὁ λόγος",
    ]
    # Other scripts.
    t += [
        "Привет, мир!", "МОСКВА", "Ёжик в тумане", "Україна", "Беларусь",
        "مرحبا بالعالم", "السلام عليكم", "العربية\u200fنص",
        "שלום עולם", "עִבְרִית",
        "नमस्ते दुनिया", "हिन्दी भाषा", "क्षत्रिय",
        "สวัสดีชาวโลก", "ภาษาไทย",
        "Ողջույն", "გამარჯობა", "ሰላም", "வணக்கம்", "বাংলা", "ಕನ್ನಡ", "ꯃꯤꯇꯩ",
    ]
    # CJK.
    t += [
        "你好世界", "我爱自然语言处理。", "中文分词测试", "漢字",
        "こんにちは世界", "ひらがな", "カタカナ", "日本語の文章です。", "東京タワー",
        "ｶﾀｶﾅ",  # halfwidth katakana
        "안녕하세요 세계", "한국어", "한글",
        "\u1100\u1161\u11a8",  # conjoining jamo
        "𠀀𠀁",  # CJK extension B (non-BMP)
        "汉字and English混合",
        "㐀㐁",  # CJK extension A
        "豈",  # CJK compatibility ideograph
    ]
    # Emoji.
    t += [
        "😀", "I love pizza 🍕!", "👍🏽", "👍🏿 thumbs", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇺🇸", "🇩🇪🇫🇷🇯🇵",
        "❤️", "☺", "🧑‍💻 coding", "🤷‍♀️", "✨✨✨", "🙂🙃", "1️⃣", "🔥hot🔥",
    ]
    # Punctuation runs.
    t += [
        "!!!", "Wait...", "...", "What?!", "?!?!", "Really—really", "a — b – c - d",
        "«Bonjour»", "„Hallo“", "“quoted” ‘single’", "¿Qué? ¡Hola!", "、。", "日本、東京。",
        "((nested))", "[brackets] {braces} <angles>", "a/b\\c|d", "#$%^&*", "~`@",
        "'single' \"double\"", "…", "‽", "§¶†‡", "•·", "--", "___", "***bold***",
    ]
    # Numbers.
    t += [
        "3.14", "pi is 3.14159", "1,000,000", "2nd place", "1st 2nd 3rd 4th", "1e-5", "-42",
        "+1 (555) 123-4567", "2024-01-15", "12:30:45", "100%", "0.001", "1/2", "0x1F",
        "٣٤٥", "१२३", "１２３",  # Arabic-Indic, Devanagari, fullwidth digits
        "123456789012345678901234567890",
    ]
    # URLs, emails, code, hashtags.
    t += [
        "https://www.example.com/path?query=1&x=2#frag",
        "Visit http://example.org for details.",
        "ftp://files.example.net/pub/file.tar.gz",
        "user.name+tag@example.co.uk",
        "contact: john_doe@mail.example.com",
        "def foo(x): return x * 2",
        "for (int i = 0; i < n; ++i) { sum += a[i]; }",
        "std::vector<float> v{1.0f, 2.0f};",
        "SELECT * FROM users WHERE id = 42;",
        "<div class=\"main\">Hello</div>",
        "{\"key\": [1, 2, 3]}",
        "#MachineLearning #NLP",
        "@openai @huggingface thanks!",
        "$HOME/bin:/usr/local/bin",
        "C:\\Windows\\System32",
        "git commit -m \"fix bug\"",
    ]
    # Whitespace oddities.
    t += [
        "tab\tseparated\twords",
        "line one\nline two",
        "windows\r\nline ending",
        "carriage\rreturn",
        "non\u00a0breaking\u00a0space",
        "zero\u200bwidth\u200bspace",
        "ideographic\u3000space",
        "   leading spaces",
        "trailing spaces   ",
        "   both   ",
        " ",
        "     ",
        "\t\n\r",
        "multiple     internal     spaces",
        "en\u2002space em\u2003space thin\u2009space",
        "narrow\u202fnbsp",
        "word\u2028line\u2029para",
        "zwj\u200dzwnj\u200c",
        "bom\ufeffinside",
        "\ufeffleading bom",
        "vertical\u000btab form\u000cfeed",
        "next\u0085line",
        "ogham\u1680space",
    ]
    # Control and special characters.
    t += [
        "nul\u0000char",
        "\u0000",
        "bell\u0007char",
        "soft\u00adhyphen",
        "replacement\ufffdchar",
        "\ufffd",
        "escape\u001b[31mred\u001b[0m",
        "del\u007fchar",
        "c1\u0080\u009fcontrols",
        "private\ue000use",
        "noncharacter\ufffe",
        "lrm\u200emark rlm\u200fmark",
        "bidi\u202aembed\u202c",
        "variation\ufe0fselector",
        "tag\U000e0041chars",
    ]
    # Long words.
    t += [
        "a" * 100,
        "b" * 101,
        "c" * 150,
        "x" * 99 + " short",
        "ab" * 50,  # exactly 100 chars
        "pneumonoultramicroscopicsilicovolcanoconiosis" * 3,  # 135 chars
        "hello " + "z" * 120 + " world",
        "é" * 100,
        "é" * 101,
        "語" * 120,
    ]
    # Special tokens written in text.
    t += [
        "[MASK]",
        "hello [SEP] world",
        "[CLS]",
        "[unk]",
        "[UNK]",
        "[PAD]",
        "[mask]",
        "[CLS] sentence [SEP]",
        "the [MASK] sat on the mat",
        "[SEP][SEP]",
        "x[MASK]y",
        "[ MASK ]",
        "<s> </s> <pad> <unk>",
        "[unused0]",
        "##ing",
        "##",
    ]
    # Mixed scripts.
    t += [
        "Hello Привет 你好 مرحبا",
        "Tokyo東京Tokio",
        "the Ελληνικά word",
        "Zürich 株式会社 🇨🇭",
        "naïve 日本 café",
        "abcабв",  # Latin + Cyrillic lookalikes
    ]
    # Rare unicode punctuation, math, currency, misc.
    t += [
        "\u2e3a two-em dash \u2e3b three-em",
        "\u2e2e reversed question",
        "\u3030 wavy \u30fb middot",
        "\u2016 double bar \u2042 asterism",
        "∑ x_i ≤ ∞",
        "∀x ∃y: x ≠ y ∧ x ∈ ℝ",
        "√2 ≈ 1.414 ± 0.001",
        "α + β = γ",
        "E = mc²",
        "€100 ¥500 ₹200 £50 $20 ₿1",
        "price: 9,99 €",
        "don't",
        "I can't won't shouldn't",
        "rock 'n' roll",
        "U.S.A.",
        "e.g. i.e. etc.",
        "state-of-the-art",
        "well-known self-driving cars",
        "Ⅻ",
        "Chapter Ⅷ",
        "Ｌｅｔｔｅｒｓ",
        "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
        "ﬁnance ﬂow",
        "ﬀ ﬃ ﬄ ﬅ",
        "x² y³ z⁴",
        "H₂O",
        "½ ¼ ¾",
        "⅓ cup",
        "°C and °F",
        "™ ® ©",
        "µ micro Ω ohm",
        "№ 5",
        "ǅ titlecase",
        "ℌ𝔢𝔩𝔩𝔬",  # mathematical fraktur
        "𝐁𝐨𝐥𝐝",
        "Ⓐⓑⓒ",
        "㍻",
        "♠♥♦♣",
        "→ ← ↑ ↓",
        "★☆",
    ]
    # Edge: empty string and long text (> 256 tokens, truncated).
    t += [""]
    long_words = ("the history of natural language processing generally started in the "
                  "1950s although work can be found from earlier periods").split()
    t += [" ".join(long_words[i % len(long_words)] for i in range(300))]
    t += ["word " * 254 + "end"]  # 255 words -> 257 tokens with CLS/SEP, truncated by one
    t += ["word " * 253 + "end"]  # 254 words -> exactly 256 tokens, not truncated
    t += ["😀" * 300]
    return t


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def tokenize_ids(tok, text):
    return tok(text, truncation=True, max_length=MAX_LENGTH)["input_ids"]


def gen_tokenizer_cases(st_model, written):
    tok = st_model.tokenizer
    texts = tokenizer_texts()
    assert len(texts) == len(set(texts)), "duplicate tokenizer texts"
    cases = []
    for text in texts:
        ids = [int(i) for i in tokenize_ids(tok, text)]
        assert ids[0] == CLS_ID and ids[-1] == SEP_ID and len(ids) <= MAX_LENGTH, text
        cases.append({"text": text, "ids": ids, "pieces": tok.convert_ids_to_tokens(ids)})
    # The ids must be those sentence-transformers itself feeds the model.
    batch = 32
    for start in range(0, len(texts), batch):
        feats = st_model.preprocess(texts[start:start + batch])
        ids = feats["input_ids"].numpy()
        mask = feats["attention_mask"].numpy().astype(bool)
        for row in range(ids.shape[0]):
            got = ids[row][mask[row]].tolist()
            assert got == cases[start + row]["ids"], (texts[start + row], got)
    path = os.path.join(OUT_DIR, "tokenizer_cases.json")
    with open(path, "w", encoding="utf-8") as f:  # one case a line
        f.write('{"max_length": %d, "cases": [\n' % MAX_LENGTH)
        f.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in cases))
        f.write("\n]}\n")
    with open(path, encoding="utf-8") as f:
        assert json.load(f)["cases"] == cases
    written.append(path)
    print(f"wrote {path}: {len(cases)} cases", flush=True)
    return tok


# --------------------------------------------------------------------------------------
# Sentences
# --------------------------------------------------------------------------------------

def sentences():
    s = [
        # The first three feed hidden_s{i}.npy: keep them short.
        "Hello world.",
        "The cat sat on the mat.",
        "Attention is all you need, they said!",
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "A man is riding a horse.",
        "A woman is playing violin.",
        "Two men pushed carts through the woods.",
        "A man is riding a white horse on an enclosed ground.",
        "A monkey is playing drums.",
        "Someone in a gorilla costume is playing a set of drums.",
        "How do I bake sourdough bread at home?",
        "Sourdough needs a starter, flour, water and salt, plus a lot of patience.",
        "The stock market fell sharply on Monday after the central bank raised rates.",
        "Python is a popular programming language for data science.",
        "Rust guarantees memory safety without a garbage collector.",
        "Paris is the capital of France.",
        "Berlin is the capital of Germany.",
        "The Eiffel Tower was completed in 1889.",
        "Photosynthesis converts light energy into chemical energy.",
        "Water boils at 100 degrees Celsius at sea level.",
        "She opened the window and let the cold morning air fill the room.",
        "Yes.",
        "No!",
        "Why?",
        "Thanks",
        "OK",
        "",
        "I can't believe it's already December; where did the year go?",
        "The U.S.A. and the U.K. signed the agreement on 2023-07-14.",
        "Visit https://example.com or email info@example.com for more information.",
        "The quick brown fox jumps over the lazy dog while the cat watches from the fence.",
        "Machine learning models can learn patterns from large amounts of labelled and unlabelled data.",
        "Neural networks with attention mechanisms have transformed natural language processing in "
        "recent years, enabling translation, summarisation and question answering systems that "
        "were unthinkable a decade ago.",
        "He said, \"Don't worry, everything will be fine,\" and walked away.",
        "Please turn off your phones during the performance.",
        "The meeting has been moved to 3:30 pm on Thursday in room 204.",
        "Temperatures will reach 35°C this weekend, so stay hydrated.",
        "My favourite fruits are apples, bananas, cherries, and mangoes.",
        "THIS SENTENCE IS WRITTEN ENTIRELY IN CAPITAL LETTERS.",
        "this sentence has no capital letters and no punctuation",
        "Ceci est une phrase en français.",
        "Dies ist ein Satz auf Deutsch mit Umlauten: Äpfel, Öl und Übung.",
        "Esta es una oración en español, ¿verdad?",
        "Это предложение на русском языке.",
        "这是一个中文句子。",
        "これは日本語の文です。",
        "이것은 한국어 문장입니다.",
        "هذه جملة باللغة العربية.",
        "I love this movie 😍🎬 so much!!!",
        "#blessed @everyone see you at 8pm 🎉",
        "def add(a, b): return a + b",
        "x = [i ** 2 for i in range(10) if i % 2 == 0]",
        "E = mc² and ∑ x_i ≤ ∞ are both formulas.",
        "Prices rose by 3.5% to €1,250,000 in the second quarter.",
        "A well-known state-of-the-art model achieved 92.1% accuracy.",
        "The children laughed as the puppy chased its tail around the garden.",
        "After years of research, scientists finally discovered a way to store solar energy "
        "cheaply and efficiently for use at night.",
        "The library closes at nine, but the reading room stays open until midnight during exams.",
        "Astronomers observed a distant galaxy whose light left it more than thirteen billion "
        "years ago, shortly after the first stars formed.",
        "Café naïve résumé façade Zürich São Paulo.",
        "Straße, İstanbul, Ångström, Łódź.",
        "One two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty twenty-one twenty-two twenty-three "
        "twenty-four twenty-five twenty-six twenty-seven twenty-eight twenty-nine thirty.",
        "The committee reviewed the proposal carefully, discussed its costs and benefits at "
        "length, consulted with experts from three universities, and finally decided to fund "
        "the project for an initial period of two years, subject to annual reviews of progress "
        "and a detailed report on how the money had been spent by the research team members.",
    ]
    # One sentence longer than 256 tokens (about 300 words), truncated by the model.
    words = ("in the beginning the researchers collected thousands of documents from public "
             "archives and cleaned them carefully before training any model on the resulting "
             "corpus of text").split()
    s.append(" ".join(words[i % len(words)] for i in range(300)) + ".")
    return s


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(REPO_ROOT, "models", "all-MiniLM-L6-v2"),
                    help="sentence-transformers model directory (default: %(default)s)")
    args = ap.parse_args()
    model_dir = os.path.abspath(args.model)
    if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        sys.exit(f"no model.safetensors in {model_dir}")

    import torch
    import transformers
    import tokenizers
    import sentence_transformers
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    os.makedirs(OUT_DIR, exist_ok=True)
    written = []

    st = SentenceTransformer(model_dir, device="cpu", local_files_only=True)
    st.eval()
    assert st.max_seq_length == MAX_LENGTH, st.max_seq_length

    # a. Tokenizer cases first (another consumer waits for this file).
    tok = gen_tokenizer_cases(st, written)

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence-transformers": sentence_transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "tokenizer_class": type(tok).__name__,
        "tokenizer_is_fast": bool(getattr(tok, "is_fast", False)),
        "model_safetensors_sha256": sha256_file(os.path.join(model_dir, "model.safetensors")),
        "tokenizer_json_sha256": sha256_file(os.path.join(model_dir, "tokenizer.json")),
    }
    path = os.path.join(OUT_DIR, "VERSIONS.json")
    write_json(path, versions)
    written.append(path)
    print(f"wrote {path}: {versions}", flush=True)

    # b. Sentences and sentence-transformers embeddings.
    sents = sentences()
    lens = [len(tokenize_ids(tok, x)) for x in sents]
    assert "" in sents and max(lens) == MAX_LENGTH and len(sents) >= 60
    assert len(tok(sents[-1], verbose=False)["input_ids"]) > MAX_LENGTH  # really truncated
    path = os.path.join(OUT_DIR, "sentences.json")
    write_json(path, sents)
    written.append(path)
    print(f"wrote {path}: {len(sents)} sentences, token lengths {min(lens)}..{max(lens)}")

    with torch.inference_mode():
        emb = st.encode(sents, batch_size=16, convert_to_numpy=True)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    assert emb.shape == (len(sents), 384), emb.shape
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    assert np.all(np.abs(norms - 1.0) < 1e-5), norms
    path = os.path.join(OUT_DIR, "embeddings.npy")
    np.save(path, emb)
    written.append(path)
    print(f"wrote {path}: {emb.shape} float32, norms in [{norms.min():.7f}, {norms.max():.7f}]")

    # c. Layer-by-layer hidden states, one sentence at a time.
    bert = AutoModel.from_pretrained(model_dir, attn_implementation="eager",
                                     local_files_only=True)
    bert.eval()
    arrays = {}
    with torch.inference_mode():
        for i in range(3):
            enc = tok(sents[i], truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            out = bert(**enc, output_hidden_states=True)
            hs = torch.stack(out.hidden_states, 0)[:, 0].float().numpy()
            assert hs.shape == (7, enc["input_ids"].shape[1], 384), hs.shape
            arrays[f"s{i}_ids"] = enc["input_ids"][0].numpy().astype(np.int64)
            arrays[f"s{i}_hidden"] = np.ascontiguousarray(hs, dtype=np.float32)
            # Cross-check: mean pooling + L2 normalisation of the last layer is the
            # sentence-transformers embedding.
            pooled = hs[-1].astype(np.float64).mean(0)
            pooled /= np.linalg.norm(pooled)
            err = np.abs(pooled - emb[i]).max()
            assert err < 1e-5, (i, err)
    # .npy files (qkv reads .npy; it has no .npz reader).
    for i in range(3):
        for name, key in ((f"hidden_s{i}.npy", f"s{i}_hidden"), (f"hidden_s{i}_ids.npy", f"s{i}_ids")):
            path = os.path.join(OUT_DIR, name)
            np.save(path, arrays[key])
            written.append(path)
            print(f"wrote {path}: {arrays[key].shape} {arrays[key].dtype}")

    # d. Attention weights of a padded batch of three.
    attn_texts = [
        "Short one.",
        "A somewhat longer sentence than the first.",
        "The third text is the longest of all three, so it sets the padded length.",
    ]
    enc = tok(attn_texts, padding=True, truncation=True, max_length=MAX_LENGTH,
              return_tensors="pt")
    lengths = [int(x) for x in enc["attention_mask"].sum(1)]
    assert len(set(lengths)) == 3, lengths
    with torch.inference_mode():
        out = bert(**enc, output_attentions=True)
    seq = enc["input_ids"].shape[1]
    for layer in (0, 5):
        a = np.ascontiguousarray(out.attentions[layer].float().numpy(), dtype=np.float32)
        assert a.shape == (3, 12, seq, seq), a.shape
        # Real rows are softmax rows over the real columns only.
        for b, n in enumerate(lengths):
            assert np.allclose(a[b, :, :n, :n].sum(-1), 1.0, atol=1e-5)
            assert np.abs(a[b, :, :n, n:]).max(initial=0.0) < 1e-6
        path = os.path.join(OUT_DIR, f"attn_layer{layer}.npy")
        np.save(path, a)
        written.append(path)
        print(f"wrote {path}: {a.shape} float32")
    path = os.path.join(OUT_DIR, "attn_texts.json")
    write_json(path, attn_texts)
    written.append(path)
    path = os.path.join(OUT_DIR, "attn_lengths.json")
    write_json(path, lengths)
    written.append(path)
    print(f"wrote attn_texts.json, attn_lengths.json: lengths {lengths}, padded to {seq}")

    total = sum(os.path.getsize(p) for p in written)
    print(f"{len(written)} files, {total} bytes in {OUT_DIR}")


if __name__ == "__main__":
    main()
